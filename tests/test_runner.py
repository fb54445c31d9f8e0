"""The Ray runner on real (trivial) stage jobs: skip, concurrency, failure isolation, lock,
Ctrl-C, and what lands in MLflow."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from conftest import default_sigint
from pipeline.cli import main
from pipeline.state import WorkdirLock, stage_state

DAG = """
    name: dag
    workdir: {workdir}
    stages:
      a: {{kind: noop, seconds: 0.5}}
      b: {{kind: noop, input: a}}
      broken: {{kind: noop, input: a, fail: true}}
      after_broken: {{kind: noop, input: broken}}
      joined: {{kind: noop, after: [b, after_broken]}}
      side: {{kind: noop, seconds: 2}}
"""


def stage_dirs(workdir):
    return {p.name.rsplit("-", 1)[0]: p for p in workdir.iterdir() if p.is_dir() and "-" in p.name}


@pytest.mark.slow
def test_failure_fails_descendants_only_then_rerun_skips_done(write_recipe, tmp_path, capsys):
    workdir = tmp_path / "wd"
    recipe = write_recipe(DAG.format(workdir=workdir))
    assert main(["run", str(recipe)]) == 1
    out = capsys.readouterr()
    dirs = stage_dirs(workdir)
    done = {n for n, d in dirs.items() if (d / "manifest.json").exists()}
    assert done == {"a", "b", "side"}
    assert "broken: failed: RuntimeError: failed on purpose" in out.err
    assert f"(log: {dirs['broken'] / 'job.log'})" in out.err
    assert "after_broken: upstream_failed" in out.err and "joined: upstream_failed" in out.err

    # status shows each state and run id
    assert main(["status", str(recipe)]) == 0
    status = capsys.readouterr().out
    assert [line.split()[2] for line in status.splitlines()[1:] if not line.startswith(" ")] == [
        "done", "done", "failed", "pending", "pending", "done"]

    # MLflow: one parent, one nested run per stage, params, step metrics, artifacts
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dag")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(parents) == 1 and set(children) == set(dirs)
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children.values())
    a = children["a"]
    assert a.info.status == "FINISHED" and children["broken"].info.status == "FAILED"
    assert a.data.params["config.seconds"] == "0.5"
    assert a.data.metrics["waited_s"] == 0.5
    artifacts = {f.path for f in client.list_artifacts(a.info.run_id)}
    assert {"spec.json", "manifest.json", "job.log"} <= artifacts

    # rerun: done stages are skipped, the failed one is tried again (and fails again)
    assert main(["run", str(recipe)]) == 1
    out = capsys.readouterr().out
    assert out.count("skip (done)") == 3


@pytest.mark.slow
def test_independent_branches_run_concurrently(write_recipe, tmp_path):
    workdir = tmp_path / "wd"
    recipe = write_recipe(f"""
        name: par
        workdir: {workdir}
        stages:
          x: {{kind: noop, seconds: 6}}
          y: {{kind: noop, seconds: 6, launcher: {{cpus_per_node: 2}}}}
    """)
    assert main(["run", str(recipe)]) == 0
    spans = []
    for d in stage_dirs(workdir).values():
        lines = (d / "metrics.jsonl").read_text().splitlines()
        ended = json.loads(lines[-1])["time"] / 1000
        spans.append((ended - 6, ended))
    (s1, e1), (s2, e2) = spans
    assert min(e1, e2) > max(s1, s2)  # the two 6 s waits overlapped in time
    # torch threads: one by default, `cpus_per_node` when a stage sets it (the Ray task that
    # launches the job has Ray's OMP_NUM_THREADS=1, which used to win)
    threads = {name: json.loads((d / "manifest.json").read_text())["omp_num_threads"]
               for name, d in stage_dirs(workdir).items()}
    assert threads == {"x": "1", "y": "2"}


def test_second_run_on_a_locked_workdir_is_refused(write_recipe, tmp_path, capsys):
    workdir = tmp_path / "wd"
    recipe = write_recipe(f"name: l\nworkdir: {workdir}\nstages:\n  a: {{kind: noop}}\n")
    with WorkdirLock(workdir):
        assert main(["run", str(recipe)]) == 3
    err = capsys.readouterr().err
    assert "is in use by another `pipeline run` (pid" in err
    assert not stage_dirs(workdir)


@pytest.mark.slow
def test_ctrl_c_asks_jobs_to_stop_and_waits_for_them(write_recipe, tmp_path):
    workdir = tmp_path / "wd"
    recipe = write_recipe(f"""
        name: cc
        workdir: {workdir}
        stages:
          slow: {{kind: noop, seconds: 60}}
    """)
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(recipe)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              preexec_fn=default_sigint)
    _wait_for_worker(workdir, "slow")
    time.sleep(2)  # let the worker install its signal handlers and enter its loop
    driver.send_signal(signal.SIGINT)
    out, _ = driver.communicate(timeout=60)
    assert driver.returncode == 130, out
    assert "asking running stage jobs to checkpoint and stop" in out
    d = stage_dirs(workdir)["slow"]
    assert json.loads((d / "exit.json").read_text())["status"] == "preempted"
    assert json.loads((d / "status.json").read_text())["state"] == "interrupted"
    pid = int((d / "job.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # nothing of the job is left running
    assert stage_state(d).state == "interrupted"


@pytest.mark.slow
def test_ray_address_joins_an_existing_cluster(write_recipe, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    # --block keeps `ray start` in the foreground: stopping its process group stops this cluster
    # only (`ray stop` would stop every Ray cluster on the machine).
    head = subprocess.Popen(["ray", "start", "--head", f"--port={port}", "--num-cpus=2", "--block",
                             "--include-dashboard=false", "--node-ip-address=127.0.0.1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _wait_for_port(port, head)
        workdir = tmp_path / "wd"
        recipe = write_recipe(f"name: j\nworkdir: {workdir}\nstages:\n  a: {{kind: noop}}\n")
        assert main(["run", str(recipe), "--ray-address", f"127.0.0.1:{port}"]) == 0
        (d,) = stage_dirs(workdir).values()
        # the driver joined that cluster (it started none of its own) and told the job to join it
        assert json.loads((d / "manifest.json").read_text())["ray_address"].endswith(f":{port}")
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)


def _wait_for_worker(workdir, stage, timeout=120):
    """Until the stage's worker process runs (it records itself in workers/0.pid)."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dirs = stage_dirs(workdir) if workdir.exists() else {}
        pid_file = dirs[stage] / "workers" / "0.pid" if stage in dirs else None
        if pid_file and pid_file.exists():
            try:
                if psutil.Process(int(pid_file.read_text())).is_running():
                    return
            except (ValueError, psutil.Error):
                pass
        time.sleep(0.2)
    raise TimeoutError(f"the {stage} job's worker did not start")


def _wait_for_port(port, proc, timeout=60):
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "ray start exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                time.sleep(2)  # GCS answers before the raylet has registered
                return
        time.sleep(0.2)
    raise TimeoutError(f"no Ray head on port {port}")


@pytest.mark.slow
def test_jobs_orphaned_by_a_killed_driver_are_seen_and_never_doubled(write_recipe, tmp_path, capsys):
    workdir = tmp_path / "wd"
    recipe = write_recipe(f"name: o\nworkdir: {workdir}\nstages:\n  slow: {{kind: noop, seconds: 60}}\n")
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(recipe)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_worker(workdir, "slow")
    driver.kill()  # SIGKILL: no chance to stop its job, which runs on in its own session
    driver.wait()
    d = stage_dirs(workdir)["slow"]
    pid = int((d / "job.pid").read_text())
    try:
        assert stage_state(d).state == "running"
        assert main(["run", str(recipe)]) == 3
        err = capsys.readouterr().err
        assert f"stage slow: its job from an earlier `pipeline run` is still running (pid {pid}" in err
    finally:
        os.killpg(pid, signal.SIGKILL)
    time.sleep(1)
    assert stage_state(d).state in ("failed", "interrupted")  # both gone: a rerun may resume it


@pytest.mark.slow
def test_only_runs_the_stages_asked_for_and_what_they_need(write_recipe, tmp_path, capsys):
    workdir = tmp_path / "wd"
    recipe = write_recipe(DAG.format(workdir=workdir))
    assert main(["run", str(recipe), "--only", "b"]) == 0
    out = capsys.readouterr().out
    assert "2 stages selected by --only/--until" in out and "all 2 stages finished" in out
    assert set(stage_dirs(workdir)) == {"a", "b"}  # nothing else was even prepared
    assert main(["status", str(recipe)]) == 0
    states = {line.split()[0]: line.split()[2]
              for line in capsys.readouterr().out.splitlines()[1:] if not line.startswith(" ")}
    assert states == {"a": "done", "b": "done", "broken": "pending", "after_broken": "pending",
                      "joined": "pending", "side": "pending"}
    assert main(["run", str(recipe), "--until", "nope"]) == 2
    assert "error: --until: no stage named 'nope'" in capsys.readouterr().err
