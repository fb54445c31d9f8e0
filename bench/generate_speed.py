"""Our generator vs transformers' `generate` on the same weights: speed, greedy agreement, memory.

    python bench/generate_speed.py --run runs/tiny                # a tiny-recipe workdir
    python bench/generate_speed.py --run runs/tiny --megatron     # + megatron's static path

The model is the tiny recipe's SFT checkpoint (`<run>/sft-*`, its tokenizer `<run>/tokenizer-*`),
exported with our exporter (stages.engine.hf.exporter, fp32) and loaded by transformers; both run
fp32 on `--threads` threads in this one process.
(a) Speed: greedy, `--prompt-len` random-token prompts (`--ragged`: 1/2 to 3/2 of it, each
    engine left-pads), no stop token (every row runs to max_new_tokens), batch × new tokens from
    `--batch` × `--new`; ours is
    stages.engine.generate.generate (KV cache), theirs `model.generate` (its DynamicCache). The
    engines alternate, `--rounds` times each; the best round of each counts (other jobs on the
    machine only ever slow a round down). `--megatron` adds megatron's StaticInferenceContext
    path (what generate used before stages.engine.kv_decode) as a third column.
(b) Agreement: the tiny task's held-out questions (eval_sft's prompt set) in the chat format,
    greedy for `--agree-new` tokens with no stop, ours in one batch, theirs per prompt length
    (no padding). Where a sequence differs, the first differing position is scored in both models
    by a full forward over the common prefix: the logit gap between the two chosen tokens. A gap
    ≤ 1e-5 is a tie within fp32 noise.
(c) Peak RSS of a fresh process generating batch 64 × the largest `--new` (kv path, and the
    megatron path with `--megatron`).
`--profile` first prints each engine's top operators (torch.profiler, self CPU time) for one
batch 64 × 128 generation; `--speed-only` runs (a) alone (a second timing run); `--cpu-time`
times (a) by process CPU time, which other jobs on a shared machine barely move (with
`--threads 1`: more threads add spin-waits to it).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

TIE = 1e-5


def stage_dir(run: str, kind: str) -> Path:
    found = sorted(glob.glob(os.path.join(run, f"{kind}-*", "manifest.json")))
    if not found:
        sys.exit(f"no finished `{kind}` stage under {run} (run the tiny recipe's sft first)")
    return Path(found[-1]).parent


def load_ours(run: str, max_len: int):
    """(our GPTModel with the SFT weights, its ModelConfig, the tokenizer)."""
    from data_recipes.config_fields import from_dict
    from stages.configs.model import ModelConfig
    from stages.contract import read_json
    from stages.engine.checkpoint import load_model_weights_only
    from stages.engine.model import build_model
    from stages.engine.tokenizer import tokenizer_of_stage

    sft = stage_dir(run, "sft")
    cfg = from_dict(ModelConfig, read_json(sft / "manifest.json")["model"])
    tok = tokenizer_of_stage(stage_dir(run, "tokenizer"))
    # RoPE has no learned positions: seq_length only bounds what the model accepts
    model = build_model(cfg, tok.vocab_size, max(cfg.seq_length, max_len))
    load_model_weights_only(sft, model)
    return model.eval(), cfg, tok


def load_theirs(run: str, cfg, out: Path):
    import transformers

    from stages.engine.hf.exporter import export_stage

    export_stage(stage_dir(run, "sft"), stage_dir(run, "tokenizer"), cfg, out, "float32")
    return transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def ours_generate(model, prompts, new: int, vocab: int) -> list[list[int]]:
    from stages.engine.generate import SamplingConfig, generate

    return generate(model, prompts, SamplingConfig(max_new_tokens=new), set(), vocab)


def megatron_generate(model, prompts, new: int, vocab: int) -> list[list[int]]:
    """generate() forced onto megatron's StaticInferenceContext path."""
    from stages.engine import kv_decode

    keep = kv_decode.unsupported_reason
    kv_decode.unsupported_reason = lambda gpt: "bench: megatron's static path"
    try:
        return ours_generate(model, prompts, new, vocab)
    finally:
        kv_decode.unsupported_reason = keep


@torch.no_grad()
def theirs_generate(hf, prompts, new: int) -> list[list[int]]:
    """transformers' generate; prompts of different lengths are left-padded (its convention)."""
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=new,
                      do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, longest:].tolist()


def bench_prompts(args, b: int, vocab: int, g: torch.Generator) -> list[list[int]]:
    """b random-token prompts of --prompt-len tokens, or with --ragged of 1/2 to 3/2 of it."""
    if not args.ragged:
        return torch.randint(3, vocab, (b, args.prompt_len), generator=g).tolist()
    lengths = torch.randint(args.prompt_len // 2, args.prompt_len * 3 // 2 + 1, (b,), generator=g)
    return [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in lengths]


def engines_of(args, model, hf, vocab: int) -> dict:
    engines = {"ours": lambda p, n: ours_generate(model, p, n, vocab),
               "transformers": lambda p, n: theirs_generate(hf, p, n)}
    if args.megatron:
        engines["megatron"] = lambda p, n: megatron_generate(model, p, n, vocab)
    return engines


def profile(engines: dict, prompt_len: int, vocab: int, top: int = 8) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, vocab, (64, prompt_len), generator=g).tolist()
    for name, run in engines.items():
        run(prompts[:4], 4)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            run(prompts, 128)
            wall = time.perf_counter() - t0
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in ops)
        print(f"  {name}: {wall:.2f} s under the profiler; top operators by self CPU time:")
        for e in ops[:top]:
            print(f"    {e.key:<48} {e.self_cpu_time_total / total:6.1%} {e.count:6d} calls")


def speed(args, engines: dict, vocab: int) -> list[dict]:
    for run in engines.values():  # warm-up: first-call allocations and lazy imports
        run([[5] * args.prompt_len] * 4, 4)
    rows = []
    for b in args.batch:
        for n in args.new:
            g = torch.Generator().manual_seed(b * 1000 + n)
            prompts = bench_prompts(args, b, vocab, g)
            best = {k: float("inf") for k in engines}
            outs = {}
            # process CPU time instead of wall time: robust to other jobs on the machine
            clock = time.process_time if args.cpu_time else time.perf_counter
            for _ in range(args.rounds):
                for k, run in engines.items():
                    t0 = clock()
                    outs[k] = run(prompts, n)
                    best[k] = min(best[k], clock() - t0)
            row = {"batch": b, "new": n, **{k: b * n / t for k, t in best.items()},
                   "same": sum(a == c for a, c in zip(outs["ours"], outs["transformers"]))}
            rows.append(row)
            print(f"  batch {b} × {n}: " + ", ".join(f"{k} {row[k]:,.0f} tok/s" for k in engines)
                  + f", ratio {row['ours'] / row['transformers']:.2f}", flush=True)
    return rows


@torch.no_grad()
def first_difference_gap(model, hf, prompt, ours, theirs, vocab: int) -> tuple[int, float, float]:
    """(position, gap in our logits, gap in theirs) at the first token where they differ: the
    chosen token's logit minus the other engine's token's logit, after the common prefix."""
    j = next(i for i, (a, c) in enumerate(zip(ours, theirs)) if a != c)
    ids = torch.tensor([prompt + ours[:j]])
    n = ids.shape[1]
    mask = torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool), diagonal=1)
    mine = model(ids, torch.arange(n)[None], mask)[0, -1, :vocab]
    hers = hf(ids).logits[0, -1, :vocab]
    return j, float(mine[ours[j]] - mine[theirs[j]]), float(hers[theirs[j]] - hers[ours[j]])


def agreement(args, model, hf, tok) -> dict:
    from data_recipes.chat import Message, encode_prompt
    from data_recipes.prompts import PromptsConfig, load_prompts

    questions = load_prompts(PromptsConfig(kind="arithmetic", split="heldout", num=48,
                                           max_digits=1))
    prompts = [encode_prompt(tok, [Message("user", q.text)]) for q in questions]
    ours = ours_generate(model, prompts, args.agree_new, tok.vocab_size)
    theirs: list = [None] * len(prompts)
    for length in sorted({len(p) for p in prompts}):
        idx = [i for i, p in enumerate(prompts) if len(p) == length]
        for i, t in zip(idx, theirs_generate(hf, [prompts[i] for i in idx], args.agree_new)):
            theirs[i] = t
    same = sum(a == c for a, c in zip(ours, theirs))
    gaps = [first_difference_gap(model, hf, p, a, c, tok.vocab_size)
            for p, a, c in zip(prompts, ours, theirs) if a != c]
    ties = sum(abs(g1) <= TIE and abs(g2) <= TIE for _, g1, g2 in gaps)
    print(f"  {same}/{len(prompts)} held-out questions identical for {args.agree_new} tokens; "
          f"{len(gaps)} differ, {ties} of them at a logit tie (≤ {TIE:g})")
    for j, g1, g2 in gaps:
        print(f"    first difference at new token {j}: gap {g1:.2e} (ours), {g2:.2e} (theirs)")
    return {"prompts": len(prompts), "same": same, "ties": ties, "gaps": gaps}


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_child(args) -> None:
    """In a fresh process: RSS with the model loaded, then the peak RSS while generating batch 64
    × max(new) (the high-water mark is reset first: loading the checkpoint peaks higher)."""
    torch.set_num_threads(args.threads)
    from stages.engine import distributed

    distributed.init(seed=0)
    n = max(args.new)
    model, _, tok = load_ours(args.run, args.prompt_len + n)
    run = megatron_generate if args.rss_child == "megatron" else ours_generate
    run(model, [[5] * args.prompt_len] * 4, 4, tok.vocab_size)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
    before = _vm_kib("VmRSS") / 1024
    g = torch.Generator().manual_seed(0)
    run(model, torch.randint(3, tok.vocab_size, (64, args.prompt_len), generator=g).tolist(), n,
        tok.vocab_size)
    print(json.dumps({"before_mib": before, "peak_mib": _vm_kib("VmHWM") / 1024}))


def peak_rss(args, path: str) -> dict:
    cmd = [sys.executable, __file__, "--run", args.run, "--threads", str(args.threads),
           "--prompt-len", str(args.prompt_len), "--new", *map(str, args.new),
           "--rss-child", path]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/tiny", help="the tiny recipe's workdir")
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--new", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--prompt-len", type=int, default=40)
    ap.add_argument("--ragged", action="store_true",
                    help="speed on prompts of 1/2 to 3/2 of --prompt-len tokens (left-padded)")
    ap.add_argument("--agree-new", type=int, default=96, help="eval_sft's max_new_tokens")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--megatron", action="store_true", help="also time megatron's static path")
    ap.add_argument("--profile", action="store_true", help="print each engine's top operators")
    ap.add_argument("--speed-only", action="store_true", help="skip (b) agreement and (c) RSS")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time (a) by process CPU time (use with --threads 1 on a loaded machine)")
    ap.add_argument("--rss-child", choices=["kv", "megatron"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.rss_child:
        return rss_child(args)
    torch.set_num_threads(args.threads)
    from stages.engine import distributed

    distributed.init(seed=0)
    model, cfg, tok = load_ours(args.run, args.prompt_len * 3 // 2 + max(args.new))
    with tempfile.TemporaryDirectory() as tmp:
        hf = load_theirs(args.run, cfg, Path(tmp) / "hf")
        print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
              f"{cfg.num_layers} × {cfg.hidden_size}; load average {os.getloadavg()[0]:.1f}")
        engines = engines_of(args, model, hf, tok.vocab_size)
        if args.profile:
            print("profile, batch 64 × 128 new tokens")
            profile(engines, args.prompt_len, tok.vocab_size)
        print("(a) speed, new tokens/s (best of rounds)")
        rows = speed(args, engines, tok.vocab_size)
        agree = None
        if not args.speed_only:
            print("(b) greedy agreement on held-out questions")
            agree = agreement(args, model, hf, tok)
    rss = {}
    if not args.speed_only:
        print("(c) peak RSS, batch 64")
        rss = {p: peak_rss(args, p) for p in (["kv", "megatron"] if args.megatron else ["kv"])}
    for p, r in rss.items():
        print(f"  {p}: {r['before_mib']:.0f} MiB loaded -> {r['peak_mib']:.0f} MiB peak")

    cols = ["ours", "transformers"] + (["megatron"] if args.megatron else [])
    print(f"\nload average {os.getloadavg()[0]:.1f}, {args.threads} threads, fp32, "
          f"{args.prompt_len}-token prompts{' (ragged: 1/2 to 3/2 of it)' if args.ragged else ''}"
          ", greedy\n")
    print("| batch × new | " + " | ".join(cols) + " | ours / transformers | same outputs |")
    print("|---" * (len(cols) + 3) + "|")
    for r in rows:
        print(f"| {r['batch']} × {r['new']} | " + " | ".join(f"{r[c]:,.0f}" for c in cols)
              + f" | **{r['ours'] / r['transformers']:.2f}** | {r['same']}/{r['batch']} |")
    if agree:
        print(f"\nheld-out agreement: {agree['same']}/{agree['prompts']} identical, "
              f"{agree['ties']}/{len(agree['gaps'])} differing ones at a tie ≤ {TIE:g}")


if __name__ == "__main__":
    main()
