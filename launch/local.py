"""Start a stage job on this machine and tell how it ended.

    python -m stages.<kind> --spec <output_dir>/spec.json                  (nproc_per_node: 1)
    torchrun --standalone --nproc-per-node N -m stages.<kind> --spec ...   (N > 1)

The job runs in a new session (its own process group), so a Ctrl-C in the driver's terminal does
not reach it: the driver decides what to tell it (SIGTERM: checkpoint and stop). stdout and stderr
go, appended, to `<output_dir>/job.log`; the started process's pid (torchrun's, or the single
worker's) is in `<output_dir>/job.pid` and each worker's in `<output_dir>/workers/<rank>.pid`: a
worker can outlive torchrun for a moment (it kills itself when torchrun is gone,
stages.engine.ownership), and until then it is the job.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from launch.config import LaunchConfig
from stages.configs import stage_module
from stages.contract import EXIT_STATUS, LOG, MANIFEST, WORKERS, StageSpec, read_json

PID_FILE = "job.pid"


@dataclass
class JobResult:
    status: str
    """done | preempted | failed"""
    exit_code: int
    log: str
    error: str = ""
    seconds: float = 0.0
    """Wall time of the job process (torchrun and all)."""


def command(spec: StageSpec, launcher: LaunchConfig) -> list[str]:
    """torchrun for several processes; one process is started as it is. torchrun's agent costs
    ~4.5 s a job (its own torch import and rendezvous; bench/orchestration.py --only parts) and a ~220 MiB
    process, and a world of one needs none of it: the engine then sets up that world itself
    (stages.engine.distributed), and the worker is the job (job.pid)."""
    stage = ["-m", stage_module(spec.kind), "--spec", str(spec.out / "spec.json")]
    if launcher.nproc_per_node == 1:
        return [sys.executable, *stage]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={launcher.nproc_per_node}", "--max-restarts=0", *stage]


def run_job(spec: StageSpec, launcher: LaunchConfig, env: dict[str, str] | None = None) -> JobResult:
    """Run the job to its end (blocking) and map how it ended."""
    out = spec.out
    log_path = out / LOG
    (out / EXIT_STATUS).unlink(missing_ok=True)
    # Set here, not inherited: the Ray task that runs this has Ray's OMP_NUM_THREADS=1, which
    # `cpus_per_node` could not raise before.
    job_env = {**os.environ, "OMP_NUM_THREADS": str(launcher.threads_per_worker()),
               "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "ab") as log:
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: "
                  f"{' '.join(command(spec, launcher))}\n".encode())
        log.flush()
        proc = subprocess.Popen(command(spec, launcher), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=job_env, cwd=out,
                                start_new_session=True)
        (out / PID_FILE).write_text(str(proc.pid))
        started = time.monotonic()
        code = proc.wait()
    result = job_result(out, code)
    result.seconds = time.monotonic() - started
    return result


def job_result(out: Path, code: int) -> JobResult:
    """Map an exit code plus the job's own exit.json to done / preempted / failed."""
    log = str(out / LOG)
    status = {}
    if (out / EXIT_STATUS).exists():
        status = read_json(out / EXIT_STATUS)
    if code == 0 and (out / MANIFEST).exists():
        return JobResult("done", code, log)
    if status.get("status") == "preempted":
        return JobResult("preempted", code, log, "stopped after a checkpoint; rerun to resume")
    if code < 0:
        error = f"killed by {signal.Signals(-code).name}"
    else:
        error = status.get("error") or _worker_signal(out / LOG) or f"exited with code {code}"
    return JobResult("failed", code, log, error)


def _worker_signal(log: Path) -> str | None:
    """torchrun reports a worker killed by a signal as `exitcode : -9`; name the signal."""
    try:
        with open(log, "rb") as f:
            f.seek(max(f.seek(0, os.SEEK_END) - 16384, 0))
            tail = f.read().decode(errors="replace")
    except OSError:
        return None
    found = re.findall(r"exitcode\s*:\s*-(\d+)", tail)
    return f"a worker was killed by {signal.Signals(int(found[-1])).name}" if found else None


def job_processes(out: Path) -> list:
    """The live processes of this stage dir's latest job: torchrun and each worker it started
    (psutil.Process objects; a recorded pid counts only while its command line names this dir's
    spec, so a reused pid is not mistaken for the job)."""
    import psutil

    pid_files = [out / PID_FILE, *sorted((out / WORKERS).glob("*.pid"))]
    found = []
    for path in pid_files:
        try:
            proc = psutil.Process(int(path.read_text()))
            if str(out / "spec.json") in " ".join(proc.cmdline()) and proc not in found:
                found.append(proc)  # a single worker is both job.pid and workers/0.pid
        except (OSError, ValueError, psutil.Error):
            pass
    return found


def live_job(out: Path) -> int | None:
    """The pid of this stage dir's job if any process of it still runs (orphaned by a killed
    driver, or a worker that outlives its torchrun): torchrun's when it is alive."""
    procs = job_processes(out)
    return procs[0].pid if procs else None


def stop_job(out: Path, sig: int = signal.SIGTERM) -> int | None:
    """Send `sig` to a running job's workers; returns torchrun's pid (its process group id).

    The workers are signalled directly, not torchrun: torchrun would forward the signal but
    SIGKILL its workers 30 s later, which can cut a large checkpoint short.
    """
    import psutil

    procs = job_processes(out)
    workers = [p for p in procs if p.pid != _torchrun_pid(out)] or procs
    for proc in workers:
        try:
            proc.send_signal(sig)
        except psutil.Error:  # gone meanwhile
            pass
    return procs[0].pid if procs else None


def _torchrun_pid(out: Path) -> int | None:
    try:
        return int((out / PID_FILE).read_text())
    except (OSError, ValueError):
        return None


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until process group `pid` has no members left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False
