"""Run state on disk: what each stage's output dir says about it, and the workdir lock.

A stage is `done` when its manifest exists (the job writes it last, atomically). Otherwise the
driver's `status.json` says what happened last: running / preempted / interrupted / failed; a
`running` record whose driver is gone is reported as `interrupted` (a rerun resumes it).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
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
    job = live_job(output_dir)
    if job:  # also a job whose driver was killed: it runs on, and will finish or fail by itself
        return StageState("running", f"job pid {job}", run_id)
    if (output_dir / slurm.JOB_FILE).exists():
        queued = slurm.live_job(output_dir)
        if queued:  # queued, running or requeued, with or without a driver watching it
            return StageState("running", queued.describe(), run_id)
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


class WorkdirLock:
    """An exclusive flock on `<workdir>/.pipeline.lock`; the kernel drops it if the driver dies."""

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / LOCK
        self._fd: int | None = None

    def __enter__(self) -> "WorkdirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise LockedError(f"{self.path.parent} is in use by another `pipeline run` "
                              f"({holder}); wait for it to finish or stop it first") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class LockedError(RuntimeError):
    pass
