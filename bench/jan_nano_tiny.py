"""Jan-nano's tiny proof on CPU: a tiny model warmed up by SFT on oracle tool trajectories, one
tool-RL sub-stage, then the QA eval with and without tools, per seed.

    nice -n 10 python bench/jan_nano_tiny.py [--seeds 0 1 2] [--out /tmp/jan_nano_tiny]

Per seed, through the real stage jobs (`python -m stages.<kind> --spec ...`, as the launcher
starts them):
1. data_recipes.tool_corpus: stdlib functions + a fictional world of `--towns` towns and their
   mayors (names no model knows); its 1-hop (founding year, trade) and 2-hop (the mayor's
   birthplace) questions. The last `--heldout-towns` towns' questions are held out.
2. data_recipes.oracles.tool_trajectories: an oracle conversation per training question (search
   with the question, visit when the preview is not enough, answer), in the sft_data output
   format; a sentencepiece tokenizer trained on them and the corpus; a random init.
3. sft (thinking off) on the trajectories: the warm start.
4. rl: one sub-stage with the tools on the training questions (reward: substring correctness +
   0.2 format + 0.2 tool success).
5. eval with `tools` on the held-out questions, of the warm start and of the RL result:
   accuracy with tools (the tool loop) and without (no tools offered).
Prints a table per seed and writes <out>/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_job(module: str, spec_path: Path, threads: int) -> float:
    """A stage job as the local launcher runs it; its wall seconds (its log beside the spec)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    t0 = time.time()
    with open(spec_path.parent / "job.log", "w") as log:
        code = subprocess.call([sys.executable, "-m", module, "--spec", str(spec_path)], cwd=REPO,
                               env=env, stdout=log, stderr=subprocess.STDOUT)
    if code:
        tail = (spec_path.parent / "job.log").read_text()[-3000:]
        raise SystemExit(f"{module} failed ({code}):\n{tail}")
    return time.time() - t0


def prepare(root: Path, seed: int, args) -> dict:
    """Corpus, question splits, oracle trajectories, tokenizer, random init."""
    from data_recipes.chat import SPECIAL_TOKENS, Message, render
    from data_recipes.oracles import tool_trajectories
    from data_recipes.tool_corpus import write_tool_corpus
    from data_recipes.tokenizer_training import train_sentencepiece
    from data_recipes.tools import build_toolbox
    from stages.engine import distributed
    from stages.engine.hf.importer import save_weights
    from stages.engine.model import build_model
    import torch

    if (root / "prepared.json").exists():  # an earlier run of this script
        return json.loads((root / "prepared.json").read_text())
    corpus, questions = write_tool_corpus(root / "corpus", seed=seed, n_towns=args.towns)
    qs = [json.loads(line) for line in questions.read_text().splitlines()]
    cut = len(qs) - 3 * args.heldout_towns  # three questions per town, in town order
    train, heldout = qs[:cut], qs[cut:]
    for name, rows in (("train", train), ("heldout", heldout)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(q) + "\n" for q in rows))
    box = build_toolbox(tools_config(corpus), str(root / "oracle_index"))
    convs = tool_trajectories(train, box)
    data = root / "data"
    data.mkdir(exist_ok=True)
    (data / "data.jsonl").write_text("".join(
        json.dumps({"id": f"q{i}", "messages": c["messages"]}) + "\n" for i, c in enumerate(convs)))
    (data / "manifest.json").write_text(json.dumps({"data": str(data / "data.jsonl")}))
    texts = [render([Message(**m) for m in c["messages"]], thinking="off") for c in convs]
    texts += [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    (root / "tok").mkdir(exist_ok=True)
    model_file = train_sentencepiece([iter(texts)], root / "tok" / "tok", args.vocab, seed=seed,
                                     special_tokens=SPECIAL_TOKENS)
    (root / "tok" / "manifest.json").write_text(json.dumps({"model_file": model_file}))
    cfg = model_config(args)
    distributed.init(seed=seed)
    torch.manual_seed(seed)
    save_weights(build_model(cfg, args.vocab, cfg.seq_length), root / "init" / "checkpoints")
    distributed.teardown()
    (root / "init" / "manifest.json").write_text(json.dumps({"model": asdict(cfg)}))
    prepared = {"corpus": str(corpus), "train": str(root / "train.jsonl"),
                "heldout": str(root / "heldout.jsonl"), "tokenizer": str(root / "tok"),
                "data": str(data), "init": str(root / "init"), "train_questions": len(train),
                "heldout_questions": len(heldout),
                "oracle_calls": sum(c["calls"] for c in convs) / len(convs)}
    (root / "prepared.json").write_text(json.dumps(prepared))
    return prepared


def tools_config(corpus):
    from data_recipes.tools import ToolsConfig

    return ToolsConfig(corpus=str(corpus), top_k=2, preview_chars=100, visit_max_chars=400)


def model_config(args):
    from stages.configs.model import ModelConfig

    return ModelConfig(num_layers=args.layers, hidden_size=args.hidden,
                       ffn_hidden_size=args.hidden * 11 // 4, num_attention_heads=4,
                       num_query_groups=2, seq_length=1024, hidden_dropout=0.0,
                       attention_dropout=0.0)


def questions(path, num: int):
    from data_recipes.prompts import PromptsConfig

    return PromptsConfig(kind="jsonl", path=str(path), field="question", task="qa_substring",
                         num=num)


def stage(root: Path, name: str, kind: str, cfg, inputs: dict, args) -> tuple[dict, float]:
    from stages.contract import StageSpec, read_json, save_spec

    out = root / name
    if not (out / "manifest.json").exists():
        spec = save_spec(StageSpec(name=name, kind=kind, config=asdict(cfg), output_dir=str(out),
                                   inputs=inputs, model=asdict(model_config(args))))
        seconds = run_job(f"stages.{'hf_export' if kind == 'export' else kind}", spec,
                          args.threads)
    else:
        seconds = float("nan")  # done by an earlier run of this script
    return read_json(out / "manifest.json"), seconds


def one_seed(root: Path, seed: int, args) -> dict:
    from data_recipes.rewards import RewardConfig
    from stages.configs.base import PostTrainingLRConfig
    from stages.configs.eval import EvalConfig
    from stages.configs.post_training import SFTConfig
    from stages.configs.rl import GRPOConfig, PassRateFilterConfig, RLConfig, RLSubstageConfig

    t0 = time.time()
    p = prepare(root, seed, args)
    tok = p["tokenizer"]
    sft = SFTConfig(tokenizer="tok", data="data", init="init", thinking="off",
                    epochs=args.sft_epochs, global_batch_size=8, micro_batch_size=4,
                    lr=PostTrainingLRConfig(max=2e-3, min=1e-4, warmup_steps=5,
                                            decay_style="cosine"),
                    heldout_samples=8, checkpoint_every=1000, seed=seed)
    sft_m, sft_s = stage(root, "sft", "sft", sft, {"tokenizer": tok, "data": p["data"],
                                                   "init": p["init"]}, args)
    sub = RLSubstageConfig(
        name="tools", prompts=questions(p["train"], 10_000),
        reward=RewardConfig(kind="qa_substring", format_weight=0.2, tool_weight=0.2),
        filter=PassRateFilterConfig(enabled=False), tools=tools_config(p["corpus"]),
        max_turns=4, max_tokens=480,
        grpo=GRPOConfig(steps=args.rl_steps, prompts_per_step=4, group_size=4,
                        micro_batch_size=8, max_new_tokens=96, temperature=1.0,
                        lr=PostTrainingLRConfig(max=args.rl_lr, min=args.rl_lr)))
    rl = RLConfig(tokenizer="tok", init="sft", substages=[sub], seed=seed, thinking="off",
                  rollout_batch_size=16, checkpoint_every=1000)
    rl_m, rl_s = stage(root, "rl", "rl", rl, {"tokenizer": tok, "init": str(root / "sft")}, args)
    results = {"seed": seed, "sft_seconds": sft_s, "rl_seconds": rl_s, **{
        k: p[k] for k in ("train_questions", "heldout_questions", "oracle_calls")}}
    for name, init in (("warm_start", "sft"), ("rl", "rl")):
        ev = EvalConfig(tokenizer="tok", init=init, thinking="off", samples=0, k=[1],
                        max_new_tokens=96, max_turns=4, max_tokens=480, batch_size=12,
                        prompts=questions(p["heldout"], 10_000),
                        tools=tools_config(p["corpus"]), seed=seed)
        m, _ = stage(root, f"eval_{name}", "eval", ev, {"tokenizer": tok,
                                                        "init": str(root / init)}, args)
        for key in ("accuracy_with_tools", "accuracy_without_tools", "tools/calls",
                    "answered_with_tools"):
            results[f"{name}/{key}"] = m[key]
    steps = [json.loads(line) for line in (root / "rl" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "reward/mean" in r]
    for key in ("reward/mean", "rollout_tokens_per_s", "masked_share", "tools/calls",
                "tools/invalid_calls", "tools/turns"):
        results[f"rl_steps/{key}"] = [round(r[key], 3) for r in steps]
    results["sft_heldout_loss"] = sft_m.get("heldout_loss")
    results["seconds"] = time.time() - t0
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="/tmp/jan_nano_tiny")
    ap.add_argument("--towns", type=int, default=100)
    ap.add_argument("--heldout-towns", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--sft-epochs", type=int, default=20)
    ap.add_argument("--rl-steps", type=int, default=8)
    ap.add_argument("--rl-lr", type=float, default=5e-5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    out = Path(args.out)
    rows = []
    for seed in args.seeds:
        r = one_seed(out / f"seed{seed}", seed, args)
        rows.append(r)
        print(json.dumps(r), flush=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "seeds": rows}, indent=1))
    print("seed | warm start: with tools / without | after RL: with tools / without | RL s")
    for r in rows:
        print(f"{r['seed']} | {r['warm_start/accuracy_with_tools']:.3f} / "
              f"{r['warm_start/accuracy_without_tools']:.3f} | {r['rl/accuracy_with_tools']:.3f} / "
              f"{r['rl/accuracy_without_tools']:.3f} | {r['rl_seconds']:.0f}")


if __name__ == "__main__":
    main()
