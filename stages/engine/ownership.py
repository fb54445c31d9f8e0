"""A job owns its stage dir: one job per dir at a time, and no worker outlives its job.

Why: torchrun starts its workers in their own session, so a SIGKILL of torchrun (or of its process
group) used to leave the worker training on. A rerun then trained the same dir beside it, both
writing `checkpoints/` and `job.log` (seen in a fault campaign on the tiny recipe's pretrain).

- `hold_stage_dir`: the rank-0 worker takes an exclusive flock on `<out>/job.lock` before it
  touches anything, and keeps it until it exits (the kernel drops it however the process ends).
  A second job waits for it a while (the first may be dying), then fails naming the holder.
- `follow_parent`: a worker started by torchrun kills itself as soon as torchrun is gone (a
  watchdog thread on the parent pid; prctl's PDEATHSIG would fire when the forking *thread* of
  the agent exits, which is not what we mean).
- `record_worker`: every worker writes its pid to `<out>/workers/<rank>.pid`, so the launcher and
  `pipeline status` see a job's workers, not only torchrun.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import threading
import time
from pathlib import Path

from stages.contract import JOB_LOCK, WORKERS

LOCK_WAIT_S = float(os.environ.get("PIPELINE_JOB_LOCK_WAIT_S", "60"))
"""How long a job waits for an earlier job of the same dir to end before it gives up."""
WATCH_EVERY_S = 0.2

_lock_fd: int | None = None  # held for the life of the process


class StageDirBusy(RuntimeError):
    """Another live job holds the stage dir."""


def hold_stage_dir(out: Path, wait_s: float = LOCK_WAIT_S) -> None:
    """Take `<out>/job.lock` for the rest of this process's life, waiting up to `wait_s`."""
    global _lock_fd
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / JOB_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    deadline, told = time.monotonic() + wait_s, False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = _holder(fd)
            if time.monotonic() >= deadline:
                os.close(fd)
                raise StageDirBusy(f"{out} is in use by another job ({holder}); stop it first, "
                                   f"or wait for it to end") from None
            if not told:
                print(f"waiting up to {wait_s:.0f}s for the job that holds {out / JOB_LOCK} "
                      f"({holder}) to end", flush=True)
                told = True
            time.sleep(0.1)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
    _lock_fd = fd


def _holder(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process"


def follow_parent(parent: int | None = None) -> None:
    """Kill this process (SIGKILL) once `parent` (default: the current parent) is gone.

    A process whose parent died is re-parented, so a changed getppid() is the signal. A parent
    that died before this call is not seen: check `torchrun_is_parent()` first."""
    parent = parent or os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(WATCH_EVERY_S)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="follow-parent", daemon=True).start()


def started_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def torchrun_is_parent() -> bool:
    """Whether our parent is still a torchrun agent (it may have died before we looked)."""
    import psutil

    try:
        cmdline = " ".join(psutil.Process(os.getppid()).cmdline())
    except psutil.Error:
        return False
    return "torch.distributed.run" in cmdline or "torchrun" in cmdline


def record_worker(out: Path, rank: int) -> None:
    workers = out / WORKERS
    workers.mkdir(parents=True, exist_ok=True)
    (workers / f"{rank}.pid").write_text(str(os.getpid()))
