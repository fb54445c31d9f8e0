"""Held-out exact match of the tiny recipe's model after pretraining vs after SFT, over seeds.

    python bench/tiny_seeds.py --seeds 0 1 2 --workdir /tmp/tiny_seeds

Each seed reruns pretrain, eval_base, sft_data, sft and eval_sft of recipes/tiny.yaml (the
tokenizer and shards are shared) with `seed` set in pretrain, the drafter and SFT, and prints one
row per seed from the eval stages' manifests: greedy exact match, pass@1/pass@4 from 4 samples,
and the share of answers that end in a well-formed `Answer: N` line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def manifest(workdir: Path, stage: str, newest_after: float) -> dict:
    dirs = [d for d in workdir.glob(f"{stage}-*") if (d / "manifest.json").exists()
            and (d / "manifest.json").stat().st_mtime >= newest_after]
    return json.loads((max(dirs, key=lambda d: (d / "manifest.json").stat().st_mtime)
                       / "manifest.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workdir", default="/tmp/tiny_seeds")
    args = p.parse_args()
    workdir = Path(args.workdir)
    rows = []
    for seed in args.seeds:
        overrides = [f"workdir={workdir}", f"stages.pretrain.seed={1234 + seed}",
                     f"stages.sft.seed={1234 + seed}", f"stages.sft_data.drafter.seed={seed}"]
        started = __import__("time").time()
        run = subprocess.run([sys.executable, "-m", "pipeline.cli", "run",
                              str(REPO / "recipes" / "tiny.yaml"), *overrides],
                             capture_output=True, text=True)
        if run.returncode:
            sys.exit(f"seed {seed} failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
        base, sft = (manifest(workdir, s, started) for s in ("eval_base", "eval_sft"))
        data = manifest(workdir, "sft_data", started)
        rows.append((seed, base, sft, data))
        print(f"seed {seed} done", flush=True)
    print("\n| seed | base: exact / pass@1 / pass@4 / answered | after SFT: exact / pass@1 / "
          "pass@4 / answered | SFT samples accepted |\n|---|---|---|---|")
    for seed, base, sft, data in rows:
        cells = [" / ".join(f"{m[k]:.2f}" for k in ("exact_match", "pass_at_1", "pass_at_4",
                                                     "answered")) for m in (base, sft)]
        print(f"| {seed} | {cells[0]} | {cells[1]} | {data['accepted']}/{data['prompts']} |")


if __name__ == "__main__":
    main()
