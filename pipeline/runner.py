"""Run the stage graph on Ray: every stage not yet done becomes a Ray task that launches its job.

Edges are ObjectRefs: a stage's task receives its upstreams' results, so Ray starts it when they
end, and independent branches run at the same time. A task whose upstream did not finish returns
`upstream_failed` without launching anything; other branches carry on. Stage tasks reserve no CPU
(they only wait on a subprocess), so the cluster's CPUs stay free for the jobs' own Ray tasks
(e.g. tokenization in `prepare`, which joins this cluster through PIPELINE_RAY_ADDRESS).

Each stage's `launcher.kind` picks its launcher, `launch.local` or `launch.slurm`; both block in
`run_job(spec, launcher, env) -> JobResult` until the job has really ended.

Ctrl-C: the driver asks every running local job to checkpoint and stop (SIGTERM), waits for them,
marks them interrupted and exits 130; a second Ctrl-C kills them. A rerun resumes them. Slurm jobs
are left queued/running (a rerun re-attaches to them) unless `--cancel-on-interrupt` scancels them.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from data_recipes.ray_tasks import set_worker_env
from launch import local, slurm
from pipeline.graph import StageNode, make_spec
from pipeline.ladder import format_ladder, ladder_rows
from pipeline.state import WorkdirLock, set_status, stage_state
from pipeline.tracking import Tracker, needs_sync
from launch.config import LaunchConfig
from stages.contract import LOG, StageSpec, save_spec

EXIT_INTERRUPTED = 130
EXIT_BUSY = 3  # the workdir (or a stage dir) is in use: same code as a held workdir lock
STOP_GRACE_S = 600.0  # how long Ctrl-C waits for jobs to checkpoint before giving up
LAUNCHERS = {"local": local, "slurm": slurm}


def run_stage_task(spec: dict, launcher: dict, env: dict, driver_pid: int, *upstream: dict) -> dict:
    """Body of a stage's Ray task: launch the job unless an upstream did not finish."""
    spec = StageSpec(**spec)
    blocked = [u["stage"] for u in upstream if u["status"] != "done"]
    if blocked:
        error = f"not run: upstream {', '.join(blocked)} did not finish"
        set_status(spec.out, "pending", error, driver_pid=driver_pid)
        return {"stage": spec.name, "status": "upstream_failed", "error": error, "log": ""}
    set_status(spec.out, "running", driver_pid=driver_pid)
    launcher = LaunchConfig(**launcher)
    result = LAUNCHERS[launcher.kind].run_job(spec, launcher, env)
    set_status(spec.out, result.status, result.error, driver_pid=driver_pid, seconds=result.seconds)
    return {"stage": spec.name, **dataclasses.asdict(result)}


def run_graph(graph: dict[str, StageNode], make_tracker, *, ray_address: str | None = None,
              workdir: Path, cancel_on_interrupt: bool = False) -> int:
    """Run what is not done. Returns the exit code of `pipeline run`."""
    with WorkdirLock(workdir):
        states = {name: stage_state(node.output_dir).state for name, node in graph.items()}
        todo = [name for name in graph if states[name] != "done"]
        w = max(len(n) for n in graph)
        for name, node in graph.items():
            print(f"  {name:<{w}} {node.kind:<10} {_plan_word(node, name in todo):<12}"
                  f" {node.output_dir}", flush=True)
        if not todo:
            print(f"all {len(graph)} stages are complete; nothing to run")
            if needs_sync(graph, workdir) and not make_tracker().sync(graph):
                print("[tracking] the server is still unreachable: `pipeline sync` sends what it "
                      "has not got, once it answers", file=sys.stderr, flush=True)
            return 0
        orphans = {name: local.live_job(graph[name].output_dir) for name in todo
                   if graph[name].launcher.kind == "local"}
        orphans = {name: pid for name, pid in orphans.items() if pid}
        if orphans:  # an earlier driver was killed but its jobs run on: never start a second copy
            for name, pid in orphans.items():
                print(f"error: stage {name}: its job from an earlier `pipeline run` is still "
                      f"running (pid {pid}, log {graph[name].output_dir / LOG}); wait for it or "
                      f"stop it (kill -TERM -{pid}), then run again", file=sys.stderr)
            return EXIT_BUSY
        # MLflow's store and Ray each take seconds to start: overlap them.
        with ThreadPoolExecutor(1) as pool:
            opening = pool.submit(_open_runs, make_tracker, graph, todo)
            env = _start_ray(ray_address)
            tracker, specs = opening.result()
        try:
            results = _execute(graph, todo, specs, env, tracker, cancel_on_interrupt)
        finally:
            import ray

            ray.shutdown()
        ok = all(r["status"] == "done" for r in results.values())
        rows = ladder_rows(graph)
        if rows:
            tracker.log_ladder(rows)
        tracker.finish(ok)
        if not tracker.sync(graph):
            print(f"[tracking] {tracker.uri} is still unreachable: `pipeline sync` sends what it "
                  "has not got, once it answers", file=sys.stderr, flush=True)
        _summary(results)
        if rows:
            print("\n" + format_ladder(rows), flush=True)
        if any(r["status"] == "interrupted" for r in results.values()):
            return EXIT_INTERRUPTED
        return 0 if ok else 1


def _plan_word(node: StageNode, todo: bool) -> str:
    """What this run does with a stage: skip it, run it, or watch its Slurm job from before."""
    if not todo:
        return "skip (done)"
    job = slurm.live_job(node.output_dir) if node.launcher.kind == "slurm" else None
    return f"re-attach to slurm job {job.job_id} ({job.state})" if job else "run"


def launch_text(node: StageNode, graph: dict[str, StageNode]) -> str:
    """What starts a stage's job: its sbatch script, or the local torchrun command."""
    if node.launcher.kind == "slurm":
        return slurm.render_script(node.output_dir, node.kind, node.launcher)
    return "local: " + " ".join(local.command(make_spec(node, graph), node.launcher))


def dry_run(graph: dict[str, StageNode]) -> int:
    """`pipeline run --dry-run`: each stage to run and how it would start; Slurm stages' scripts
    are written to their output dirs (nothing is submitted, no MLflow run is opened)."""
    for name, node in graph.items():
        state = stage_state(node.output_dir).state
        print(f"== {name} [{node.kind}] {'skip (done)' if state == 'done' else 'run'}: "
              f"{node.output_dir}")
        if state == "done":
            continue
        if node.launcher.kind == "slurm":
            node.output_dir.mkdir(parents=True, exist_ok=True)
            path = slurm.write_script(node.output_dir, node.kind, node.launcher)
            print(f"# {path}")
        print(launch_text(node, graph))
    return 0


def _open_runs(make_tracker, graph: dict[str, StageNode], todo: list[str]):
    """The MLflow runs of the stages to run, and their specs (written into their output dirs)."""
    tracker: Tracker = make_tracker()
    print(f"MLflow: {tracker.uri}  (mlflow ui --backend-store-uri {tracker.uri})", flush=True)
    tracker.sync(graph)  # what an earlier outage kept back
    specs = {}
    for name in todo:
        node = graph[name]
        node.output_dir.mkdir(parents=True, exist_ok=True)
        run_id = tracker.stage_run(node)
        specs[name] = make_spec(node, graph, tracker.uri, run_id)
        save_spec(specs[name])
        if node.launcher.kind == "slurm":  # written now so that it is logged with the spec
            slurm.write_script(node.output_dir, node.kind, node.launcher)
        tracker.log_spec(run_id, node)
    return tracker, specs


def _start_ray(ray_address: str | None) -> dict[str, str]:
    """Start (or join) Ray; returns the env that lets stage jobs join the same cluster."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray_address:
        set_worker_env()  # the workers' environment, once for the cluster (not per task)
    ray.init(address=ray_address or "local", include_dashboard=False, log_to_driver=False,
             configure_logging=False, num_cpus=None if ray_address else os.cpu_count())
    return {"PIPELINE_RAY_ADDRESS": ray.get_runtime_context().gcs_address}


def _execute(graph: dict[str, StageNode], todo: list[str], specs: dict[str, StageSpec],
             env: dict[str, str], tracker: Tracker, cancel_on_interrupt: bool) -> dict[str, dict]:
    import ray

    task = ray.remote(num_cpus=0, max_retries=0)(run_stage_task)
    refs = {}
    logs = [_LogTail(specs[name].out / LOG, name) for name in todo]
    for name in todo:  # graph order: upstream refs exist before their downstreams are submitted
        node = graph[name]
        upstream = [refs[d] for d in node.deps if d in refs]
        refs[name] = task.remote(dataclasses.asdict(specs[name]),
                                 dataclasses.asdict(node.launcher), env, os.getpid(), *upstream)
    results: dict[str, dict] = {}
    pending = list(refs.values())
    try:
        while pending:
            done, pending = ray.wait(pending, timeout=0.5)
            for tail in logs:
                tail.pump()
            for ref in done:
                result = ray.get(ref)
                results[result["stage"]] = result
                _report(result)
                tracker.stage_ended(specs[result["stage"]].run_id, graph[result["stage"]],
                                    result["status"])
    except KeyboardInterrupt:
        stopped = _interrupt(graph, [n for n in todo if n not in results], cancel_on_interrupt)
        for name, result in stopped.items():
            results[name] = result
            tracker.stage_ended(specs[name].run_id, graph[name], result["status"])
    finally:
        for tail in logs:
            tail.pump()
    return results


def _interrupt(graph: dict[str, StageNode], running: list[str],
               cancel_on_interrupt: bool) -> dict[str, dict]:
    on_slurm = [n for n in running if graph[n].launcher.kind == "slurm"]
    running = [n for n in running if n not in on_slurm]
    results = {name: _interrupt_slurm(name, graph[name].output_dir, cancel_on_interrupt)
               for name in on_slurm}
    print("\ninterrupted: asking running stage jobs to checkpoint and stop "
          "(Ctrl-C again to kill them)", flush=True)
    pids = {name: local.stop_job(graph[name].output_dir) for name in running}
    try:
        for name, pid in pids.items():
            if pid is not None and not local.wait_gone(pid, STOP_GRACE_S):
                print(f"[{name}] did not stop within {STOP_GRACE_S:.0f} s", flush=True)
    except KeyboardInterrupt:
        for pid in filter(None, pids.values()):
            os.killpg(pid, signal.SIGKILL)
    import ray

    ray.shutdown()  # stop the stage tasks first, so the states below are the last word
    for name in running:
        out = graph[name].output_dir
        if pids[name] is None:  # its job had not started yet
            set_status(out, "pending", "not started: the run was interrupted")
            results[name] = {"stage": name, "status": "interrupted", "error": "not started",
                             "log": ""}
            continue
        ended = local.job_result(out, 1)
        detail = "stopped after a checkpoint" if ended.status == "preempted" else "stopped"
        set_status(out, "interrupted", f"{detail}; rerun to resume")
        results[name] = {"stage": name, "status": "interrupted", "error": detail,
                         "log": str(out / LOG)}
    return results


def _interrupt_slurm(name: str, out: Path, cancel: bool) -> dict:
    """A Slurm job outlives its driver by default: a rerun re-attaches to it."""
    job = slurm.live_job(out)
    if job is None:
        detail = "its slurm job was not running"
    elif cancel:
        slurm.cancel(out)  # SIGTERM: the job checkpoints, then ends CANCELLED
        detail = f"cancelled slurm job {job.job_id}; rerun to resume"
    else:
        detail = (f"slurm job {job.job_id} left {job.state.lower()}; `pipeline run` again "
                  f"re-attaches to it, `scancel {job.job_id}` stops it")
    print(f"[{name}] {detail}", flush=True)
    set_status(out, "interrupted", detail)
    return {"stage": name, "status": "interrupted", "error": detail, "log": str(out / LOG)}


def _report(result: dict) -> None:
    name, status = result["stage"], result["status"]
    line = f"[{name}] {status}"
    if status != "done":
        line += f": {result.get('error', '')}" + (f" (log: {result['log']})" if result["log"] else "")
    print(line, flush=True)


def _summary(results: dict[str, dict]) -> None:
    bad = {n: r for n, r in results.items() if r["status"] != "done"}
    if bad:
        print("\nnot finished:", file=sys.stderr)
        for name, r in bad.items():
            print(f"  {name}: {r['status']}: {r.get('error', '')}"
                  + (f" (log: {r['log']})" if r.get("log") else ""), file=sys.stderr)
    else:
        print(f"\nall {len(results)} stages finished", flush=True)


class _LogTail:
    """Print a job log's new lines as `[stage] line` (only what was written during this run)."""

    def __init__(self, path: Path, name: str):
        self.path, self.name = path, name
        self.offset = path.stat().st_size if path.exists() else 0
        self.partial = ""

    def pump(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read().decode(errors="replace")
                self.offset = f.tell()
        except FileNotFoundError:
            return
        lines = (self.partial + chunk).split("\n")
        self.partial = lines.pop()
        for line in lines:
            print(f"[{self.name}] {line}", flush=True)
