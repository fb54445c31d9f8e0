"""A real one-node Slurm cluster for tests: a private munged, slurmctld and slurmd, all configured
and logging under one temp dir, on free ports, so it touches nothing of a system Slurm.

    cluster = SlurmCluster(tmp_dir); cluster.start()   # sets SLURM_CONF for this process
    ...                                                 # sbatch / squeue / scontrol work
    cluster.stop()

Needs the Debian packages slurmctld, slurmd, slurm-client and munge (22.05), and root (the daemons
run as root: SlurmUser=root, as in ../shared/notes/stack-facts.md). `ensure_installed()` installs
them with apt-get when they are missing and we are root.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "srun")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")


def missing_binaries() -> list[str]:
    path = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
    return [b for b in BINARIES if shutil.which(b, path=path) is None]


def ensure_installed() -> str | None:
    """None when the binaries are there (installing them if we can); else why not."""
    if not missing_binaries():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"Slurm binaries missing ({', '.join(missing_binaries())}) and no root apt-get " \
               f"to install {' '.join(PACKAGES)}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            return f"`{' '.join(cmd)}` failed: {done.stderr.strip().splitlines()[-1:]}"
    return None if not missing_binaries() else f"still missing: {missing_binaries()}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, root: Path, cpus: int | None = None, memory_mb: int = 8000):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.cpus = cpus or os.cpu_count() or 1
        self.memory_mb = memory_mb
        self.host = socket.gethostname()
        self.procs: list[subprocess.Popen] = []

    def config(self) -> str:
        r = self.root
        return "\n".join([
            "ClusterName=pipelinetest",
            f"SlurmctldHost={self.host}",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also sets how long a requeued job waits before it may start again
            # (default 120 s + 1): 5 s keeps the requeue tests short
            f"AuthInfo=socket={r}/munge.socket,cred_expire=5",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/slurmctld.log",
            f"SlurmdLogFile={r}/slurmd.log",
            "ProctrackType=proctrack/linuxproc",  # no cgroups in this sandbox
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "ReturnToService=2",
            "KillWait=10",         # SIGTERM -> SIGKILL: time for the tiny stage to checkpoint
            "MinJobAge=3600",      # keep finished jobs visible to scontrol (no accounting here)
            "SchedulerParameters=sched_interval=2",
            f"NodeName={self.host} CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            ""])

    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60) -> None:
        r = self.root
        for d in ("state", "spool"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r, 0o755)
        key = r / "munge.key"
        key.write_bytes(os.urandom(128))
        os.chmod(key, 0o400)
        self.conf.write_text(self.config())
        os.environ.update(self.env())
        self._daemon(["munged", "--foreground", "--force", f"--socket={r}/munge.socket",
                      f"--key-file={key}", f"--pid-file={r}/munged.pid",
                      f"--log-file={r}/munged.log", f"--seed-file={r}/munged.seed"])
        self._wait(lambda: (r / "munge.socket").exists(), timeout, "munged socket")
        self._daemon(["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self._ok(["scontrol", "ping"]) and "UP" in self._out(["scontrol", "ping"]),
                   timeout, "slurmctld")
        self._daemon(["slurmd", "-D", "-f", str(self.conf)])
        self._wait(lambda: self._out(["sinfo", "-h", "-o", "%t"]).strip() in ("idle", "mix", "alloc"),
                   timeout, "slurmd (node idle)")

    def _daemon(self, cmd: list[str]) -> None:
        log = open(self.root / f"{cmd[0]}.out", "ab")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, env={**os.environ, **self.env()},
                                           start_new_session=True))

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not come up ({'exited: ' + ', '.join(dead) if dead else 'timeout'});"
                                   f" logs in {self.root}")
            time.sleep(0.3)

    def _out(self, cmd: list[str]) -> str:
        return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **self.env()}).stdout

    def _ok(self, cmd: list[str]) -> bool:
        return subprocess.run(cmd, capture_output=True, env={**os.environ, **self.env()}).returncode == 0

    def stop(self) -> None:
        """Cancel what is left, then stop the daemons (slurmd first) and forget SLURM_CONF."""
        subprocess.run(["scancel", "--full", f"--user={os.getuid()}"], capture_output=True,
                       env={**os.environ, **self.env()})
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        self.procs.clear()
        if os.environ.get("SLURM_CONF") == str(self.conf):
            del os.environ["SLURM_CONF"]
