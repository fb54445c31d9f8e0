"""DPD ablation and seeds on a finished tiny run: each loss term off in turn, and several seeds.

    pipeline run recipes/tiny.yaml && python bench/distill.py runs/tiny

Every variant reuses the run's sampled pairs and reference log-probs (copied into its own dir, so
only the loss and data order differ), trains the student with `python -m stages.distill`, and
evaluates it like `eval_distill`. Prints a table: held-out exact match and the share of answers in
the `Answer: N` form, the teacher-student divergence on held-out pairs before/after, held-out DPO
accuracy, and ms per step.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"all three terms": {},  # the recipe's loss "no DPO": {"dpo_weight": 0.0},
            "no KD on positives": {"positive_weight": 0.0},
            "no KD on negatives": {"negative_weight": 0.0},
            "DPO weight 0.1": {"dpo_weight": 0.1},
            "DPO length-normalised": {"length_normalize": True},
            "DPO on summed log-probs": {"length_normalize": False}}


def finished(workdir: Path, name: str) -> Path:
    dirs = [d for d in workdir.glob(f"{name}-*") if (d / "manifest.json").exists()]
    if not dirs:
        sys.exit(f"{workdir} has no finished {name} stage: run `pipeline run recipes/tiny.yaml`")
    return max(dirs, key=lambda d: (d / "manifest.json").stat().st_mtime)


def run_job(module: str, spec: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "output_dir": str(out), "run_id": "", "tracking_uri": ""}
    (out / "spec.json").write_text(json.dumps(spec))
    if not (out / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", module, "--spec", str(out / "spec.json")], cwd=REPO,
                       check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "manifest.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--seeds", type=int, nargs="*", default=[1, 2],
                    help="more seeds (data order) for --seed-variants")
    ap.add_argument("--seed-variants", nargs="*", default=["all three terms"])
    args = ap.parse_args()
    base, base_eval = finished(args.workdir, "distill"), finished(args.workdir, "eval_distill")
    sft_eval = finished(args.workdir, "eval_sft")
    spec = json.loads((base / "spec.json").read_text())
    eval_spec = json.loads((base_eval / "spec.json").read_text())
    root = args.workdir / "bench_distill"
    loss = spec["config"]["loss"]
    variants = {n: w for n, w in VARIANTS.items()  # a variant that is the run's own loss is not one
                if not w or any(loss[k] != v for k, v in w.items())}
    runs = [(name, w, spec["config"]["seed"] + s) for s in [0] + args.seeds
            for name, w in variants.items() if s == 0 or name in args.seed_variants]
    sft = json.loads((sft_eval / "manifest.json").read_text())
    print(f"student after SFT: exact match {sft['exact_match']:.2f}")
    print("| variant | seed | exact match | answered | held-out KD+ before -> after | "
          "KD- before -> after | DPO acc (held out) | ms/step |")
    print("|---|---|---|---|---|---|---|---|")
    for name, weights, seed in runs:
        tag = f"{name.replace(' ', '_')}-seed{seed}"
        out = root / tag
        out.mkdir(parents=True, exist_ok=True)
        cfg = {**spec["config"], "seed": seed,
               "loss": {**spec["config"]["loss"], **weights}}
        shutil.copy(base / "pairs.jsonl", out / "pairs.jsonl")
        if cfg["loss"]["length_normalize"] == spec["config"]["loss"]["length_normalize"]:
            shutil.copy(base / "reference_logps.json", out / "reference_logps.json")
        m = run_job("stages.distill", {**spec, "config": cfg}, out)
        ev = run_job("stages.eval", {**eval_spec, "inputs": {**eval_spec["inputs"],
                                                             "init": str(out)}}, root / f"eval-{tag}")
        held = m["heldout"]
        last = held[str(max(int(k) for k in held))]
        steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        ms = [r["step_s"] * 1000 for r in steps if "step_s" in r]
        print(f"| {name} | {seed} | {ev['exact_match']:.2f} | {ev['answered']:.2f} | "
              f"{held['0']['heldout/kd_positive']:.4f} -> {last['heldout/kd_positive']:.4f} | "
              f"{held['0']['heldout/kd_negative']:.4f} -> {last['heldout/kd_negative']:.4f} | "
              f"{last['heldout/dpo_accuracy']:.2f} | {sum(ms) / len(ms):.0f} |", flush=True)


if __name__ == "__main__":
    main()
