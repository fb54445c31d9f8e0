"""PostNAS's tiny proof on CPU: a 4-layer base that learns key-value recall, then postnas keeping
one full layer, then generation time of the hybrid vs the original at a long generation.

    python bench/postnas.py /tmp/postnas_bench [--base-steps 5000] [--postnas-steps 300]
        [--hidden 256 --ffn 704] [--lr 1e-3]

1. A tokenizer and a token stream of recall documents (data_recipes.recall: PAIRS pairs, QUERIES
   asked per document) mixed with arithmetic text; a 4-layer base pretrained on it (a plain AdamW
   loop, warmup then constant LR) until its greedy recall accuracy on held-out prompts reaches
   --base-target or --base-steps run out (printed every 250 steps).
2. `python -m stages.postnas` on it: keep_full 1 of 4, beam 2, tasks recall + loss.
3. Prints the importance table, recall accuracy full / searched / all-linear / worst placement,
   whether the beam found the best of all placements, KV-cache bytes per token, and greedy
   generation time of the original and of the hybrid, each on our KV fast path (a JetBlock layer
   steps its state there) and on megatron's static path.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_recipes.arithmetic import iter_arithmetic_documents  # noqa: E402
from data_recipes.recall import recall_documents, recall_examples  # noqa: E402
from data_recipes.tokenizer_loading import SentencePieceTokenizer  # noqa: E402
from data_recipes.tokenizer_training import train_sentencepiece  # noqa: E402
from stages.configs.base import PostTrainingLRConfig  # noqa: E402
from stages.configs.model import ModelConfig  # noqa: E402
from stages.configs.postnas import PostNASConfig  # noqa: E402

PAIRS, QUERIES = 4, 8  # a document (~52 tokens) fits a window


def base_config(hidden: int, ffn: int) -> ModelConfig:
    """The 4-layer base: 4 heads, 2 query groups (head dim hidden / 4), seq 64."""
    return ModelConfig(num_layers=4, hidden_size=hidden, ffn_hidden_size=ffn,
                       num_attention_heads=4, num_query_groups=2, seq_length=64)


def make_inputs(root: Path) -> SentencePieceTokenizer:
    docs = (list(recall_documents(0, 15000, PAIRS, QUERIES))
            + list(iter_arithmetic_documents(800, 0, 2)))  # ~12% of the tokens
    rng = np.random.default_rng(0)
    docs = [docs[i] for i in rng.permutation(len(docs))]
    path = train_sentencepiece([iter(docs[:4000])], root / "tok", 320)
    tok = SentencePieceTokenizer(path)
    (root / "tok").mkdir(exist_ok=True)
    (root / "tok" / "manifest.json").write_text(json.dumps({"model_file": path}))
    ids = np.concatenate([tok.encode(d) + [tok.eod_id] for d in docs]).astype(np.uint16)
    (root / "data").mkdir(exist_ok=True)
    ids.tofile(root / "data" / "mix.bin")
    (root / "data" / "manifest.json").write_text(json.dumps({
        "vocab_size": tok.vocab_size, "shards": {"mix": {"prefix": str(root / "data" / "mix")}}}))
    return tok


def pretrain_base(root: Path, tok, base: ModelConfig, steps: int, target: float,
                  lr: float) -> None:
    from stages.engine.hf.importer import save_weights
    from stages.engine.layout_scoring import causal_logits, recall_accuracy, recall_batch
    from stages.engine.model import build_model

    torch.manual_seed(0)
    model = build_model(base, tok.vocab_size, base.seq_length)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 100))
    tokens = np.fromfile(root / "data" / "mix.bin", dtype=np.uint16).astype(np.int64)
    # windows start at a document's start: a window cut inside a listing asks keys it never
    # shows (random offsets: recall stayed at 0.26-0.37 through 2750 steps)
    starts = np.flatnonzero(tokens[:-base.seq_length - 1] == tok.eod_id) + 1
    rng = np.random.default_rng(1)
    probe = recall_batch(tok, recall_examples(12345, 128, PAIRS))
    t0 = time.time()
    for step in range(1, steps + 1):
        w = torch.from_numpy(np.stack([tokens[s:s + base.seq_length + 1]
                                       for s in rng.choice(starts, 16)]))
        logits = causal_logits(model, w[:, :-1])[..., :tok.vocab_size]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps:
            model.eval()
            acc = recall_accuracy(model, *probe, tok.vocab_size)
            model.train()
            print(f"base step {step}: loss {loss.item():.3f}, recall {acc:.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
            if acc >= target:
                break
    save_weights(model, root / "base" / "checkpoints")
    (root / "base" / "manifest.json").write_text(json.dumps({"model": asdict(base)}))


def run_postnas(root: Path, base: ModelConfig, steps: int) -> dict:
    cfg = PostNASConfig(tokenizer="tok", init="base", data="data", keep_full=1, beam=2,
                        steps=steps, global_batch_size=16, micro_batch_size=16, score_samples=256,
                        recall_pairs=PAIRS, lr=PostTrainingLRConfig(max=3e-3, min=3e-4,
                                                                     warmup_steps=10),
                        checkpoint_every=100, log_every=50, seed=7)
    out = root / "postnas"
    out.mkdir(exist_ok=True)
    spec = {"name": "postnas", "kind": "postnas", "config": asdict(cfg), "output_dir": str(out),
            "inputs": {"tokenizer": str(root / "tok"), "init": str(root / "base"),
                       "data": str(root / "data")}, "model": asdict(base)}
    (out / "spec.json").write_text(json.dumps(spec))
    subprocess.run([sys.executable, "-m", "stages.postnas", "--spec", str(out / "spec.json")],
                   cwd=REPO, check=True)
    return json.loads((out / "manifest.json").read_text())


def generation_times(root: Path, tok, base_cfg: ModelConfig, manifest: dict, new_tokens: int,
                     batch: int) -> dict:
    """Seconds to greedily generate `new_tokens` after a short prompt, batch rows at once."""
    from stages.engine import generate as gen
    from stages.engine.checkpoint import load_model_weights_only
    from stages.engine.model import build_model

    long = new_tokens + 16
    base = build_model(dataclasses.replace(base_cfg, seq_length=long), tok.vocab_size, long).eval()
    load_model_weights_only(root / "base", base)
    hybrid_cfg = dataclasses.replace(ModelConfig(**manifest["model"]), seq_length=long)
    hybrid = build_model(hybrid_cfg, tok.vocab_size, long).eval()
    load_model_weights_only(root / "postnas", hybrid)
    prompts = [tok.encode(e.prompt)[:8] for e in recall_examples(9, batch, PAIRS)]
    sampling = gen.SamplingConfig(max_new_tokens=new_tokens)

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def static(model):  # megatron's static-batch path (the hybrid's linear state in its context)
        with torch.no_grad():
            step = gen._megatron_static_step(model, batch, long)
            t = torch.tensor([p[:8] for p in prompts])
            logits = step(t)
            for _ in range(new_tokens):
                logits = step(logits[:, :tok.vocab_size].argmax(-1, keepdim=True))

    def fast(model):  # generate() takes the KV fast path for both (kv_decode.unsupported_reason)
        gen.generate(model, prompts, sampling, set(), tok.vocab_size)

    return {f"{name}_{path}": timed(lambda: fn(model)) for name, model in
            (("original", base), ("hybrid", hybrid))
            for path, fn in (("kv_fast_path", fast), ("megatron_static", static))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path)
    p.add_argument("--base-steps", type=int, default=5000)
    p.add_argument("--base-target", type=float, default=0.9,
                   help="stop pretraining once held-out recall accuracy reaches this")
    p.add_argument("--postnas-steps", type=int, default=300)
    p.add_argument("--hidden", type=int, default=64, help="base hidden size (head dim = / 4)")
    p.add_argument("--ffn", type=int, default=176, help="base ffn hidden size")
    p.add_argument("--lr", type=float, default=3e-3, help="base pretraining peak lr")
    p.add_argument("--new-tokens", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    from stages.engine import distributed

    args.root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # a shared 2-core machine
    distributed.init(seed=0)
    base = base_config(args.hidden, args.ffn)
    tok = make_inputs(args.root)
    if not (args.root / "base" / "manifest.json").exists():
        pretrain_base(args.root, tok, base, args.base_steps, args.base_target, args.lr)
    m = run_postnas(args.root, base, args.postnas_steps)
    print("\nimportance (each layer kept full alone):")
    for r in m["importance"]:
        print(f"  layer {r['layer']}: recall {r['recall']:.3f}  loss {-r['loss']:.3f}  "
              f"combined {r['combined']:.3f}")
    acc = {k: m[k]["recall"] for k in ("all_full", "chosen", "all_linear", "worst")}
    print(f"recall accuracy: full {acc['all_full']:.3f} | searched {m['full_layers']} "
          f"{acc['chosen']:.3f} | all-linear {acc['all_linear']:.3f} | worst "
          f"{m['worst_full_layers']} {acc['worst']:.3f}")
    print(f"beam search {m['full_layers']} vs all placements {m['exhaustive_full_layers']}")
    print(f"KV cache bytes/token (bf16): {m['kv_bytes_per_token_original']} -> "
          f"{m['kv_bytes_per_token_hybrid']}")
    times = generation_times(args.root, tok, base, m, args.new_tokens, args.batch)
    for k, v in times.items():
        print(f"generate {args.batch} x {args.new_tokens} tokens, {k}: {v:.2f} s")
    for path in ("kv_fast_path", "megatron_static"):
        print(f"hybrid / original time, {path}: "
              f"{times[f'hybrid_{path}'] / times[f'original_{path}']:.2f}")
    (args.root / "bench.json").write_text(json.dumps({"manifest": {k: m[k] for k in (
        "importance", "all_full", "chosen", "all_linear", "worst", "full_layers",
        "exhaustive_full_layers", "worst_full_layers", "kv_bytes_per_token_original",
        "kv_bytes_per_token_hybrid")}, "times": times}, indent=1))


if __name__ == "__main__":
    main()
