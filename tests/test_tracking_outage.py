"""A tracking-server outage costs no run and no metric, against a real `mlflow server` on localhost
that the test stops and restarts.

- Down when `pipeline run` starts: the stages run and finish; the runs, params, metrics and
  artifacts reach MLflow at the next `pipeline run` once the server is back.
- Dies mid-run: the job keeps its unsent metric lines; `pipeline sync` sends them, and MLflow ends
  up with every metric line the job wrote, no more and no less.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.cli import main

pytestmark = pytest.mark.slow


class MlflowServer:
    def __init__(self, root: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.db = f"sqlite:///{root / 'server.db'}"
        self.root = root
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.db,
             "--default-artifact-root", (self.root / "artifacts").as_uri(), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "mlflow server exited"
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    try:
                        MlflowClient(self.uri).search_experiments()
                        return
                    except Exception:
                        pass
            time.sleep(0.5)
        raise TimeoutError("mlflow server did not start")

    def stop(self) -> None:
        """SIGKILL the server and every process it started (its web workers hold the port)."""
        import psutil

        if self.proc and self.proc.poll() is None:
            procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(True)]
            for p in procs:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(procs, timeout=30)
            self.proc.wait()


@pytest.fixture
def server(tmp_path):
    s = MlflowServer(tmp_path)
    yield s
    s.stop()


def stage_dir(workdir: Path, name: str) -> Path:
    (d,) = [p for p in workdir.iterdir() if p.is_dir() and p.name.startswith(name + "-")]
    return d


def tick_lines(d: Path) -> int:
    return sum("tick" in json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines())


def runs_by_name(uri: str, experiment: str) -> dict:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])} if exp else {}


def test_server_down_at_start_then_back(write_recipe, tmp_path, server, capsys):
    workdir = tmp_path / "wd"
    recipe = write_recipe(f"""
        name: down
        workdir: {workdir}
        tracking: {{uri: "{server.uri}"}}
        stages:
          a: {{kind: noop, seconds: 1, metric_every_s: 0.1}}
          b: {{kind: noop, input: a}}
    """)
    assert main(["run", str(recipe)]) == 0  # nothing listens yet
    err = capsys.readouterr().err
    assert f"MLflow at {server.uri} cannot be reached" in err
    a = stage_dir(workdir, "a")
    assert (a / "manifest.json").exists() and (stage_dir(workdir, "b") / "manifest.json").exists()
    written = tick_lines(a)
    assert written >= 5

    server.start()
    assert main(["run", str(recipe)]) == 0  # all done: it only catches MLflow up
    runs = runs_by_name(server.uri, "down")
    assert {"down", "a", "b"} <= set(runs)
    client = MlflowClient(server.uri)
    ra = runs["a"]
    assert ra.info.status == "FINISHED" and runs["down"].info.status == "FINISHED"
    assert ra.data.tags["mlflow.parentRunId"] == runs["down"].info.run_id
    assert ra.data.params["config.metric_every_s"] == "0.1"
    assert len(client.get_metric_history(ra.info.run_id, "tick")) == written
    names = {f.path for f in client.list_artifacts(ra.info.run_id)}
    assert {"spec.json", "manifest.json", "job.log"} <= names
    assert main(["sync", str(recipe)]) == 0  # nothing left: sending again adds nothing
    assert len(client.get_metric_history(ra.info.run_id, "tick")) == written


def test_server_dies_mid_run_and_sync_loses_no_metric(write_recipe, tmp_path, server, capsys):
    workdir = tmp_path / "wd"
    recipe = write_recipe(f"""
        name: mid
        workdir: {workdir}
        tracking: {{uri: "{server.uri}"}}
        stages:
          slow: {{kind: noop, seconds: 14, metric_every_s: 0.1}}
    """)
    server.start()
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(recipe)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (workdir.exists() and any(workdir.glob("slow-*/metrics.sent"))):
        assert driver.poll() is None and time.monotonic() < deadline, "no metrics reached MLflow"
        time.sleep(0.1)
    d = stage_dir(workdir, "slow")
    before = int((d / "metrics.sent").read_text())
    server.stop()
    out, _ = driver.communicate(timeout=300)
    assert driver.returncode == 0, out
    assert "still unreachable" in out
    written = tick_lines(d)
    assert int((d / "metrics.sent").read_text()) < written  # the outage kept lines back

    server.start()
    assert main(["sync", str(recipe)]) == 0
    run = runs_by_name(server.uri, "mid")["slow"]
    history = MlflowClient(server.uri).get_metric_history(run.info.run_id, "tick")
    assert sorted(m.step for m in history) == list(range(written))  # each line once
    assert run.info.status == "FINISHED"
    print(f"metric lines in MLflow before the outage {before}, written {written}, "
          f"in MLflow after sync {len(history)}")
