"""Jan-nano's tiny proof on CPU: a tiny model warmed up by SFT on oracle tool trajectories, one
tool-RL sub-stage, then the QA eval with and without tools, per seed.

    OMP_NUM_THREADS=1 nice -n 5 python bench/jan_nano_tiny.py [--seeds 0 1 2] [--rl-seeds 0 1 2]
        [--warm-start-only] [--out /tmp/jan_nano_tiny]

Per seed, through the real stage jobs (`python -m stages.<kind> --spec ...`, as the launcher
starts them):
1. data_recipes.tool_corpus: stdlib functions + a fictional world of `--towns` towns and their
   mayors (names no model knows); its 1-hop (founding year, trade) and 2-hop (the mayor's
   birthplace) questions. The last `--heldout-towns` towns' questions are held out.
2. data_recipes.oracles.tool_trajectories: an oracle conversation per training question (search
   with the question, visit when the preview is not enough, answer "The answer is X."), in the
   sft_data output format; a sentencepiece tokenizer trained on them and the corpus, with the
   tool tags and the call's JSON glue as single tokens (TOOL_PIECES); a random init. The
   defaults list only `search` (`--tools`): with 160-character previews the oracle never visits,
   and the tools block is then 174 tokens instead of ~250.
3. sft (thinking off) on the trajectories, `--sft-more-epochs` more in a second stage: the warm
   start; its eval (`--warm-start-only` stops there).
4. rl: one sub-stage with the tools on the training questions (reward: substring correctness +
   0.2 format + 0.2 tool success), one per `--rl-seeds` seed from the same warm start.
5. eval with `tools` on the held-out questions, of the warm start and of the RL result:
   accuracy with tools (the tool loop) and without (no tools offered).
Prints a table per seed and writes <out>/results.json. Stages already done under --out are
reused. Results: bench/README.md, "Jan-nano tiny proof".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Qwen3's vocabulary has the tool tags as single tokens (the loop then stops a call turn on one
# token); the JSON around a call's name and arguments is made cheap the same way
TOOL_PIECES = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
               '{"name": "', '", "arguments": {"', '": "', '"}}']


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
    box = build_toolbox(tools_config(corpus, args), str(root / "oracle_index"))
    convs = tool_trajectories(train, box, answer_template=args.answer_template)
    data = root / "data"
    data.mkdir(exist_ok=True)
    (data / "data.jsonl").write_text("".join(
        json.dumps({"id": f"q{i}", "messages": c["messages"]}) + "\n" for i, c in enumerate(convs)))
    (data / "manifest.json").write_text(json.dumps({"data": str(data / "data.jsonl")}))
    texts = [render([Message(**m) for m in c["messages"]], thinking="off") for c in convs]
    texts += [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    (root / "tok").mkdir(exist_ok=True)
    model_file = train_sentencepiece([iter(texts)], root / "tok" / "tok", args.vocab, seed=seed,
                                     special_tokens=SPECIAL_TOKENS + TOOL_PIECES)
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
                "oracle_calls": sum(c["calls"] for c in convs) / len(convs),
                **token_counts(model_file, box, convs)}
    (root / "prepared.json").write_text(json.dumps(prepared))
    return prepared


def token_counts(model_file: str, box, convs: list[dict]) -> dict:
    """The system prompt's tokens and the oracle conversations' (all, trained) in this tokenizer."""
    from data_recipes.chat import Message, encode_chat
    from data_recipes.tokenizer_loading import SentencePieceTokenizer

    tok = SentencePieceTokenizer(model_file)
    encoded = [encode_chat(tok, [Message(**m) for m in c["messages"]], "off") for c in convs]
    return {"system_prompt_tokens": len(tok.encode(box.system_prompt())),
            "conversation_tokens": sum(len(ids) for ids, _ in encoded) / len(encoded),
            "trained_tokens": sum(sum(mask) for _, mask in encoded) / len(encoded)}


def tools_config(corpus, args):
    from data_recipes.tools import ToolsConfig

    return ToolsConfig(corpus=str(corpus), tools=args.tools, top_k=args.top_k,
                       preview_chars=args.preview_chars, visit_max_chars=400)


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


def evaluate(root: Path, name: str, init: str, p: dict, seed: int, args, results: dict) -> None:
    """The QA eval with and without tools on the held-out questions, into `results`."""
    from stages.configs.eval import EvalConfig

    ev = EvalConfig(tokenizer="tok", init=init, thinking="off", samples=0, k=[1],
                    max_new_tokens=96, max_turns=4, max_tokens=480,
                    batch_size=p["heldout_questions"], prompts=questions(p["heldout"], 10_000),
                    tools=tools_config(p["corpus"], args), seed=seed)
    out = "eval_warm_start" if init == "sft" else f"eval_{init}"
    m, _ = stage(root, out, "eval", ev, {"tokenizer": p["tokenizer"], "init": str(root / init)},
                 args)
    for key in ("accuracy_with_tools", "accuracy_without_tools", "tools/calls",
                "tools/invalid_calls", "answered_with_tools"):
        results[f"{name}/{key}"] = m.get(key)


def one_seed(root: Path, seed: int, args) -> list[dict]:
    """The warm start of `seed`, then one tool-RL sub-stage per RL seed on top of it; a row each."""
    from stages.configs.base import PostTrainingLRConfig
    from stages.configs.post_training import SFTConfig

    t0 = time.time()
    p = prepare(root, seed, args)
    sft = SFTConfig(tokenizer="tok", data="data", init="init", thinking="off",
                    epochs=args.sft_epochs, global_batch_size=args.sft_batch, micro_batch_size=4,
                    lr=PostTrainingLRConfig(max=args.sft_lr, min=args.sft_lr / 20,
                                            warmup_steps=10, decay_style="cosine"),
                    heldout_samples=8, checkpoint_every=1000, seed=seed)
    sft_m, sft_s = stage(root, "sft", "sft", sft, {"tokenizer": p["tokenizer"],
                                                   "data": p["data"], "init": p["init"]}, args)
    warm_dir = "sft"
    if args.sft_more_epochs:  # a second SFT stage from the first (the LR schedule restarts)
        more = dataclasses.replace(sft, init="sft", epochs=args.sft_more_epochs)
        sft_m, more_s = stage(root, "sft_more", "sft", more, {
            "tokenizer": p["tokenizer"], "data": p["data"], "init": str(root / "sft")}, args)
        sft_s, warm_dir = sft_s + more_s, "sft_more"
    warm = {"seed": seed, "warm_start": warm_dir, "sft_seconds": sft_s,
            "sft_steps": sft_m.get("final_step"), "sft_final_loss": sft_m.get("final_loss"),
            "sft_heldout_loss": sft_m.get("heldout_loss"),
            **{k: p[k] for k in ("train_questions", "heldout_questions", "oracle_calls",
                                 "system_prompt_tokens", "conversation_tokens", "trained_tokens")}}
    evaluate(root, "warm_start", warm_dir, p, seed, args, warm)
    warm["seconds"] = time.time() - t0
    if args.warm_start_only:
        return [warm]
    return [{**warm, **rl_seed(root, p, warm_dir, rl_seed_, args)}
            for rl_seed_ in (args.rl_seeds if args.rl_seeds is not None else [seed])]


def rl_seed(root: Path, p: dict, warm_dir: str, seed: int, args) -> dict:
    """One tool-RL sub-stage from the warm start (`sft`) with this seed, and its eval."""
    from data_recipes.rewards import RewardConfig
    from stages.configs.base import PostTrainingLRConfig
    from stages.configs.rl import GRPOConfig, PassRateFilterConfig, RLConfig, RLSubstageConfig

    t0 = time.time()
    sub = RLSubstageConfig(
        name="tools", prompts=questions(p["train"], 10_000),
        reward=RewardConfig(kind="qa_substring", format_weight=0.2, tool_weight=0.2),
        filter=PassRateFilterConfig(enabled=False), tools=tools_config(p["corpus"], args),
        max_turns=4, max_tokens=480,
        grpo=GRPOConfig(steps=args.rl_steps, prompts_per_step=args.rl_prompts, group_size=4,
                        micro_batch_size=8, max_new_tokens=96, temperature=1.0,
                        lr=PostTrainingLRConfig(max=args.rl_lr, min=args.rl_lr)))
    rl = RLConfig(tokenizer="tok", init="sft", substages=[sub], seed=seed, thinking="off",
                  rollout_batch_size=4 * args.rl_prompts, checkpoint_every=1000)
    name = f"rl_seed{seed}"
    _, rl_s = stage(root, name, "rl", rl, {"tokenizer": p["tokenizer"],
                                           "init": str(root / warm_dir)}, args)
    results = {"rl_seed": seed, "rl_seconds": rl_s}
    evaluate(root, "rl", name, p, seed, args, results)
    steps = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "reward/mean" in r]
    for key in ("reward/mean", "rollout_tokens_per_s", "masked_share", "tools/calls",
                "tools/invalid_calls", "tools/turns"):
        results[f"rl_steps/{key}"] = [round(r[key], 3) for r in steps if key in r]
    results["rl_total_seconds"] = time.time() - t0
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="/tmp/jan_nano_tiny")
    ap.add_argument("--towns", type=int, default=400)
    ap.add_argument("--heldout-towns", type=int, default=10, help="3 questions each")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--sft-epochs", type=int, default=2)
    ap.add_argument("--sft-lr", type=float, default=3e-3)
    ap.add_argument("--sft-more-epochs", type=int, default=2,
                    help="a second SFT stage of this many epochs from the first")
    ap.add_argument("--sft-batch", type=int, default=4, help="packed sequences per step")
    ap.add_argument("--tools", nargs="+", default=["search"],
                    help="the tools listed in the system prompt")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--preview-chars", type=int, default=160)
    ap.add_argument("--answer-template", default="The answer is {answer}.")
    ap.add_argument("--warm-start-only", action="store_true",
                    help="stop after the warm start's eval (a first measurement)")
    ap.add_argument("--rl-steps", type=int, default=3)
    ap.add_argument("--rl-lr", type=float, default=5e-5)
    ap.add_argument("--rl-prompts", type=int, default=4,
                    help="prompts per RL step (4 samples each)")
    ap.add_argument("--rl-seeds", type=int, nargs="+", default=None,
                    help="RL sub-stages from each warm start, one per seed (default: its own)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    out = Path(args.out)
    rows = []
    for seed in args.seeds:
        for r in one_seed(out / f"seed{seed}", seed, args):
            rows.append(r)
            print(json.dumps(r), flush=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "seeds": rows}, indent=1))
    print("seed | RL seed | warm start: with tools / without | after RL: with tools / without | "
          "RL s")
    for r in rows:
        if args.warm_start_only:
            print(f"{r['seed']} | {r['warm_start/accuracy_with_tools']:.3f} / "
                  f"{r['warm_start/accuracy_without_tools']:.3f} | - | -")
            continue
        print(f"{r['seed']} | {r['rl_seed']} | {r['warm_start/accuracy_with_tools']:.3f} / "
              f"{r['warm_start/accuracy_without_tools']:.3f} | {r['rl/accuracy_with_tools']:.3f} / "
              f"{r['rl/accuracy_without_tools']:.3f} | {r['rl_seconds']:.0f}")


if __name__ == "__main__":
    main()
