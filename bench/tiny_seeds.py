"""Held-out exact match of the tiny recipe's student after each stage, over seeds.

    python bench/tiny_seeds.py --seeds 0 1 2 --workdir /tmp/tiny_seeds

Each seed reruns recipes/tiny.yaml from pretraining on (the tokenizer and shards are shared) with
the seed set in both pretrainings, the drafter, both SFTs, distillation and RL, and prints from
the stages' manifests: per eval stage greedy exact match / pass@1 / pass@4 (4 samples) / the share
of answers in the expected form; distillation's pairs and held-out teacher-student divergence;
RL's pass-rate filter. Seed 0 is the recipe as it is.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def manifest(workdir: Path, stage: str, newest_after: float) -> dict:
    dirs = [d for d in workdir.glob(f"{stage}-*") if (d / "manifest.json").exists()
            and (d / "manifest.json").stat().st_mtime >= newest_after]
    return json.loads((max(dirs, key=lambda d: (d / "manifest.json").stat().st_mtime)
                       / "manifest.json").read_text())


EVALS = ("eval_base", "eval_sft", "eval_teacher", "eval_distill", "eval_rl_stem",
         "eval_code_before", "eval_code_after", "eval_rl")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workdir", default="/tmp/tiny_seeds")
    args = p.parse_args()
    workdir = Path(args.workdir)
    rows = []
    for seed in args.seeds:
        overrides = [f"workdir={workdir}", f"stages.sft_data.drafter.seed={seed}"] + [
            f"stages.{s}.seed={1234 + seed}" for s in ("pretrain", "teacher_pretrain", "sft",
                                                       "teacher_sft", "distill", "rl")]
        started = time.time()
        run = subprocess.run([sys.executable, "-m", "pipeline.cli", "run",
                              str(REPO / "recipes" / "tiny.yaml"), *overrides],
                             capture_output=True, text=True)
        if run.returncode:
            sys.exit(f"seed {seed} failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
        found = {s: manifest(workdir, s, started if seed else 0) for s in
                 EVALS + ("distill", "rl.stem", "rl.code", "rl.align")}
        rows.append((seed, found))
        print(f"seed {seed} done in {time.time() - started:.0f} s", flush=True)
    print("\nexact match / pass@1 / pass@4 / answered\n")
    print("| stage | " + " | ".join(f"seed {seed}" for seed, _ in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for e in EVALS:
        cells = [" / ".join(f"{m[e][k]:.2f}" for k in ("exact_match", "pass_at_1", "pass_at_4",
                                                        "answered")) for _, m in rows]
        print(f"| {e} | " + " | ".join(cells) + " |")
    for _, m in rows:
        d = m["distill"]
        before, after = d["heldout"]["0"], d["heldout"][str(len(d["heldout"]) - 1)]
        print(f"distill: kept {d['pairs_kept']}/{d['pairs_sampled']} pairs; held-out KD on "
              f"positives {before['heldout/kd_positive']:.4f} -> {after['heldout/kd_positive']:.4f}"
              f", negatives {before['heldout/kd_negative']:.4f} -> "
              f"{after['heldout/kd_negative']:.4f}; RL filter kept " + ", ".join(
                  f"{m[s]['substage']} {m[s]['filter_kept']}/{m[s]['filter_prompts']}"
                  for s in ("rl.stem", "rl.code", "rl.align")))


if __name__ == "__main__":
    main()
