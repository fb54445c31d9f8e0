"""Orchestration overhead: the fixed costs every stage pays around its work, one by one, and a
chain of trivial stages through `pipeline run`.

    python bench/orchestration.py [--stages 10] [--rounds 3] [--only parts,chain]

Parts (median of --rounds, the variants alternating so that both see the same machine):
- driver `ray.init`: a local cluster started the way `pipeline run` starts it;
- job start: a noop job (no torch, no MLflow) started as `python -m stages.noop` (what the local
  launcher does for one process) vs under `torchrun --nproc-per-node 1` (what it did before);
- MLflow in the job: the same noop job logging into a run of a sqlite store (import mlflow, open
  the store, system metrics start/stop, one batch) vs not tracked;
- Ray tasks in a job: a process that joins the cluster (as `prepare`/`sft_tokenize` jobs do) and
  runs 4 one-CPU tasks, with a per-task runtime_env (before) vs the workers' environment set
  once on the cluster (data_recipes.ray_tasks.WORKER_ENV, now).
Chain: `pipeline run` of N noop stages; "the job itself" is the launcher's wall time of the job
process, everything else `pipeline run` spends (recipe, hashing, MLflow runs, Ray start,
scheduling, log tailing) is overhead. Targets: <= 1 s per stage, skipped rerun <= 5 s.
The machine is shared: the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled",
       "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
JOIN = """
import os, sys, time
import ray
ray.init(address=os.environ["PIPELINE_RAY_ADDRESS"], logging_level="WARNING")
start = time.monotonic()
opts = {"runtime_env": {"env_vars": {"MALLOC_ARENA_MAX": "2"}}} if sys.argv[1] == "1" else {}
task = ray.remote(num_cpus=1, **opts)(lambda i: os.environ.get("MALLOC_ARENA_MAX"))
assert ray.get([task.remote(i) for i in range(4)]) == ["2"] * 4
print(time.monotonic() - start)
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stages", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="parts,chain")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-orch-"))
    rows = []
    if "parts" in args.only:
        rows += parts(tmp, args.rounds)
    if "chain" in args.only:
        rows += chain(tmp, args.stages)
    print("| measure | seconds | load average |\n|---|---|---|")
    for name, value, load in rows:
        print(f"| {name} | {value:.2f} | {load:.1f} |")


def parts(tmp: Path, rounds: int) -> list[tuple[str, float, float]]:
    import mlflow

    from data_recipes.ray_tasks import set_worker_env

    client = mlflow.MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    experiment = client.create_experiment("bench")
    times: dict[str, list[float]] = {}
    loads: list[float] = []
    for r in range(rounds):
        for torchrun in (False, True):
            for tracked in (False, True):
                spec = {"name": "s", "kind": "noop", "config": {"kind": "noop"},
                        "output_dir": str(tmp / f"noop-{r}-{torchrun}-{tracked}")}
                if tracked:
                    spec.update(tracking_uri=client.tracking_uri,
                                run_id=client.create_run(experiment).info.run_id)
                Path(spec["output_dir"]).mkdir()
                path = Path(spec["output_dir"]) / "spec.json"
                path.write_text(json.dumps(spec))
                agent = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                         "--max-restarts=0"] if torchrun else []
                start = time.monotonic()
                subprocess.run([sys.executable, *agent, "-m", "stages.noop", "--spec", str(path)],
                               env=ENV, check=True, capture_output=True)
                key = ("torchrun + " if torchrun else "python + ") + ("MLflow" if tracked else "")
                times.setdefault(key, []).append(time.monotonic() - start)
                loads.append(os.getloadavg()[0])
                print(f"{key}: {times[key][-1]:.2f} s (load {loads[-1]:.1f})", file=sys.stderr)
    import ray

    os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")  # as the driver
    for r in range(rounds):
        start = time.monotonic()
        set_worker_env()
        ray.init(address="local", include_dashboard=False, log_to_driver=False,
                 configure_logging=False, num_cpus=os.cpu_count())
        times.setdefault("ray.init", []).append(time.monotonic() - start)
        env = {**ENV, "PIPELINE_RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        for per_task in ("1", "0"):
            done = subprocess.run([sys.executable, "-c", JOIN, per_task], env=env,
                                  capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-3000:]
            times.setdefault(f"tasks{per_task}", []).append(float(done.stdout.split()[-1]))
        ray.shutdown()
        loads.append(os.getloadavg()[0])
        print(f"ray.init {times['ray.init'][-1]:.2f} s, tasks with runtime_env "
              f"{times['tasks1'][-1]:.2f} s, without {times['tasks0'][-1]:.2f} s "
              f"(load {loads[-1]:.1f})", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    load = statistics.median(loads)
    return [("driver ray.init (local cluster)", med["ray.init"], load),
            ("noop job, python (no torchrun), untracked", med["python + "], load),
            ("noop job, torchrun, untracked", med["torchrun + "], load),
            ("-> torchrun's cost per job (cut: one process starts without it)",
             med["torchrun + "] - med["python + "], load),
            ("-> MLflow in the job (import, store, system metrics)",
             med["python + MLflow"] - med["python + "], load),
            ("4 Ray tasks in a joining job, per-task runtime_env (before)", med["tasks1"], load),
            ("4 Ray tasks in a joining job, env set on the cluster (now)", med["tasks0"], load)]


def chain(tmp: Path, stages: int) -> list[tuple[str, float, float]]:
    lines = [f"name: orch\nworkdir: {tmp / 'wd'}\nstages:"]
    for i in range(stages):
        dep = f", input: s{i - 1}" if i else ""
        lines.append(f"  s{i}: {{kind: noop{dep}}}")
    recipe = tmp / "orch.yaml"
    recipe.write_text("\n".join(lines) + "\n")
    first = _timed_run(recipe)
    job_seconds = sum(json.loads(status.read_text()).get("seconds", 0.0)
                      for status in (tmp / "wd").glob("*/status.json"))
    rerun = _timed_run(recipe)
    load = os.getloadavg()[0]
    return [(f"chain of {stages} noop stages, wall", first, load),
            ("sum of job wall times", job_seconds, load),
            ("overhead per stage beyond the job (target <= 1 s)",
             (first - job_seconds) / stages, load),
            ("fully-skipped rerun (target <= 5 s)", rerun, load)]


def _timed_run(recipe: Path) -> float:
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(recipe)], check=True,
                   stdout=subprocess.DEVNULL, env=ENV)
    return time.monotonic() - start


if __name__ == "__main__":
    main()
