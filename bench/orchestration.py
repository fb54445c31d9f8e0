"""Orchestration overhead: a chain of 10 trivial stages, seconds per stage beyond the job itself,
and the time of a fully-skipped rerun.

    python bench/orchestration.py [--stages 10]

"The job itself" is the launcher's wall time of the job process (torchrun, interpreter start,
imports, the stage's work); everything else `pipeline run` spends (recipe, hashing, MLflow runs,
Ray start, scheduling, log tailing) is overhead. Targets: <= 1 s per stage, skipped rerun <= 5 s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stages", type=int, default=10)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-orch-"))
    lines = [f"name: orch\nworkdir: {tmp / 'wd'}\nstages:"]
    for i in range(args.stages):
        dep = f", input: s{i - 1}" if i else ""
        lines.append(f"  s{i}: {{kind: noop{dep}}}")
    recipe = tmp / "orch.yaml"
    recipe.write_text("\n".join(lines) + "\n")

    first = _timed_run(recipe)
    job_seconds = 0.0
    for status in (tmp / "wd").glob("*/status.json"):
        job_seconds += json.loads(status.read_text()).get("seconds", 0.0)
    rerun = _timed_run(recipe)
    overhead = (first - job_seconds) / args.stages
    print(f"| measure | value | target |\n|---|---|---|\n"
          f"| chain of {args.stages} noop stages, wall | {first:.1f} s | |\n"
          f"| sum of job wall times (torchrun + job) | {job_seconds:.1f} s | |\n"
          f"| overhead per stage beyond the job | {overhead:.2f} s | <= 1 s |\n"
          f"| fully-skipped rerun | {rerun:.2f} s | <= 5 s |")


def _timed_run(recipe: Path) -> float:
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(recipe)], check=True,
                   stdout=subprocess.DEVNULL)
    return time.monotonic() - start


if __name__ == "__main__":
    main()
