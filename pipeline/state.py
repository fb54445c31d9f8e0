"""Run state on disk: what each stage's output dir says about it, and the workdir's run lease.

A stage is `done` when its manifest exists (the job writes it last, atomically). Otherwise the
driver's `status.json` says what happened last: running / preempted / interrupted / failed; a
`running` record whose driver is gone is reported as `interrupted` (a rerun resumes it).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch import slurm
from launch.local import live_job
from stages.contract import LOG, MANIFEST, read_json, write_json_atomic

STATUS = "status.json"
RUN_ID = "mlflow_run.json"
LOCK = ".pipeline.lock"


@dataclass
class StageState:
    state: str
    """done | running | preempted | interrupted | failed | pending"""
    detail: str = ""
    run_id: str = ""


def stage_state(output_dir: Path) -> StageState:
    run_id = read_run_id(output_dir)
    if (output_dir / MANIFEST).exists():
        return StageState("done", run_id=run_id)
    if (output_dir / slurm.JOB_FILE).exists():  # first: its workers may run on this host too
        queued = slurm.live_job(output_dir)
        if queued:  # queued, running or requeued, with or without a driver watching it
            return StageState("running", queued.describe(), run_id)
    job = live_job(output_dir)
    if job:  # also a job whose driver was killed: it runs on, and will finish or fail by itself
        return StageState("running", f"job pid {job}", run_id)
    status = _read(output_dir / STATUS)
    if not status:
        return StageState("pending", run_id=run_id)
    state = status.get("state", "pending")
    if state == "running" and not _alive(status.get("driver_pid"), status.get("host")):
        state = "interrupted"
    return StageState(state, status.get("detail", ""), run_id)


def set_status(output_dir: Path, state: str, detail: str = "", driver_pid: int | None = None,
               **extra: Any) -> None:
    """Record a stage's state; `driver_pid` is the `pipeline run` that owns it (default: us)."""
    write_json_atomic(output_dir / STATUS, {
        "state": state, "detail": detail, "time": time.time(), "host": socket.gethostname(),
        "driver_pid": driver_pid or os.getpid(), "log": str(output_dir / LOG), **extra})


def read_run_id(output_dir: Path) -> str:
    return (_read(output_dir / RUN_ID) or {}).get("run_id", "")


def _read(path: Path) -> dict | None:
    try:
        return read_json(path)
    except (OSError, json.JSONDecodeError):
        return None


def _alive(pid: int | None, host: str | None) -> bool:
    if not pid:
        return False
    if host != socket.gethostname():
        return True  # another host's driver: we cannot look, so assume it is still there
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


HEARTBEAT_S = 10.0
"""How often a running driver renews its lease."""
STALE_AFTER_S = 60.0
"""A lease not renewed for this long is its dead driver's (a node lost, a requeue elsewhere)."""


class WorkdirLock:
    """The workdir's run lease, `<workdir>/.pipeline.lock`: the driver's host, pid and Slurm job
    and a heartbeat time that a thread renews every HEARTBEAT_S while the run lasts.

    A lease is refused while its driver is alive: on this host, its pid runs and its heartbeat is
    fresh; on another host, its heartbeat is fresh (another host's pids cannot be looked at). A
    lease whose driver is gone, or that our own Slurm job wrote before it was requeued (perhaps
    onto another node), is taken over, and the takeover is said. A short flock around the
    read-decide-write keeps two drivers starting together on one host from both winning.
    """

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / LOCK
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mine: dict[str, Any] = {}

    def __enter__(self) -> "WorkdirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # held for the decision only
            held = _read(self.path)
            if held and not _lease_is_over(held):
                raise LockedError(f"{self.path.parent} is in use by another `pipeline run` "
                                  f"({_describe(held)}); wait for it to finish or stop it first")
            if held:
                print(f"taking over the run lock of {self.path.parent} from {_describe(held)}: "
                      f"{_lease_is_over(held)}", file=sys.stderr, flush=True)
            now = time.time()
            self._mine = {"host": socket.gethostname(), "pid": os.getpid(), "since": now,
                          "heartbeat": now, "slurm_job": os.environ.get("SLURM_JOB_ID", "")}
            write_json_atomic(self.path, self._mine)
        self._thread = threading.Thread(target=self._beat, name="run-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if (_read(self.path) or {}).get("pid") != self._mine["pid"]:
                print(f"warning: the run lock of {self.path.parent} was taken over",
                      file=sys.stderr, flush=True)
                return
            write_json_atomic(self.path, {**self._mine, "heartbeat": time.time()})

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        held = _read(self.path) or {}
        if held.get("pid") == self._mine.get("pid") and held.get("host") == self._mine.get("host"):
            self.path.unlink(missing_ok=True)


def _lease_is_over(held: dict[str, Any]) -> str:
    """Why a lease's driver is gone ("" while it may be alive)."""
    age = time.time() - float(held.get("heartbeat", 0))
    job = os.environ.get("SLURM_JOB_ID", "")
    if job and held.get("slurm_job") == job and held.get("pid") != os.getpid():
        return f"it is this Slurm job's ({job}) from before a requeue"
    if age > STALE_AFTER_S:
        return f"no heartbeat for {age:.0f}s"
    if held.get("host") == socket.gethostname() and not _alive(held.get("pid"), held.get("host")):
        return f"pid {held.get('pid')} is gone"
    return ""


def _describe(held: dict[str, Any]) -> str:
    age = time.time() - float(held.get("heartbeat", 0))
    return f"pid {held.get('pid')} on {held.get('host')}, heartbeat {age:.0f}s ago"


class LockedError(RuntimeError):
    pass
