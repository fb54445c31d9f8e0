"""How a stage job is started: the recipe's `launcher` (global, overridable per stage)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class LaunchConfig:
    """How a stage job is started. Global in the recipe, overridable per stage.

    The fields after `gpus_per_node` are read by the Slurm launcher only (launch/slurm.py)."""

    kind: str = "local"
    """local (a subprocess on this machine; torchrun when nproc_per_node > 1) | slurm (an sbatch
    job per stage)."""
    nproc_per_node: int = 1
    nodes: int = 1
    gpus_per_node: int = 0
    """0 on CPU; used by `pipeline plan` for the GPU-hours estimate."""
    gpu_memory_gb: float = 0
    """Memory of one GPU in GB (H100/H200: 80/141, RTX 4090: 24); `pipeline plan` and validation
    check every training stage's per-GPU memory plan against it. 0: not checked."""
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    cpus_per_node: Optional[int] = None
    """CPUs for torchrun and its workers on each node (sbatch --cpus-per-task; one task a node).
    Each worker gets its share of them as torch threads (OMP_NUM_THREADS). Without it a Slurm
    job's workers share what Slurm allocated (SLURM_CPUS_ON_NODE) and a local job's workers get
    one thread each: local jobs of parallel branches share the machine, and two 2-thread jobs on
    2 cores ran 1.5-4x slower per step than two 1-thread jobs (bench/README.md). Fixed per stage,
    not per moment, so that a resumed job computes as its first start did."""
    mem: Optional[str] = None
    """Memory per node, sbatch --mem syntax: 512G, 64000M, 0 (all of it)."""
    time: Optional[str] = None
    """Time limit, sbatch --time syntax: minutes, HH:MM:SS, D-HH:MM:SS. A job stopped by it
    resumes from its checkpoint on its next start."""
    signal_grace_s: int = 300
    """Seconds before the time limit that the job is told (SIGUSR1) to checkpoint and requeue
    itself; 0: no warning (a timed-out job is then resubmitted by the driver)."""
    max_resubmits: int = 10
    """How often the driver resubmits a job that ended TIMEOUT / PREEMPTED / NODE_FAIL (Slurm's own
    requeues do not count); then the stage fails."""
    extra_sbatch: list[str] = field(default_factory=list)
    """More sbatch options, one per item: ["--exclusive", "--reservation=big"]."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before the job: module loads, venv activation, exports."""
    srun_args: list[str] = field(default_factory=list)
    """More srun options, e.g. a pyxis container: ["--container-image=nvcr.io#nvidia/pytorch:25.01-py3"]."""
    wrapper: str = ""
    """A prefix of the command each node runs, e.g. `apptainer exec --nv train.sif`."""
    python: Optional[str] = None
    """The interpreter on the compute nodes; default: the driver's (sys.executable)."""
    rdzv_port: int = 29500
    """torchrun's c10d rendezvous port on the job's first node."""
    ray_cluster: bool = False
    """Start a Ray cluster over the job's nodes for the stage to use (launch/ray_on_slurm.py)."""
    ray_port: int = 6379
    """The port of that Ray cluster's head (GCS) on the job's first node."""
    poll_s: float = 10.0
    """Seconds between the driver's squeue/scontrol polls of a job."""

    def threads_per_worker(self) -> int:
        """torch threads of each local worker: its share of `cpus_per_node`, else 1."""
        return max(1, (self.cpus_per_node or 1) // self.nproc_per_node)

    def __post_init__(self):
        if self.kind not in ("local", "slurm"):
            raise ValueError(f"kind: {self.kind!r} is not a launcher; one of local, slurm")
        for key in ("nodes", "nproc_per_node", "cpus_per_node"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key}: must be at least 1, got {getattr(self, key)}")
        for key in ("gpus_per_node", "signal_grace_s", "max_resubmits"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: must be 0 or more, got {getattr(self, key)}")
        if self.gpu_memory_gb < 0:
            raise ValueError(f"gpu_memory_gb: must be 0 or more, got {self.gpu_memory_gb}")
        if self.poll_s <= 0:
            raise ValueError(f"poll_s: must be positive, got {self.poll_s}")
        if self.time is not None and not re.fullmatch(
                r"(\d+-)?\d+(:\d{1,2}){0,2}|UNLIMITED|INFINITE", str(self.time)):
            raise ValueError(f"time: {self.time!r} is not a Slurm time limit "
                             "(minutes, HH:MM:SS or D-HH:MM:SS)")
        if self.mem is not None and not re.fullmatch(r"\d+[KMGT]?", str(self.mem)):
            raise ValueError(f"mem: {self.mem!r} is not a Slurm memory size (e.g. 512G, 64000M, 0)")
        bad = [o for o in self.extra_sbatch if not str(o).startswith("-")]
        if bad:
            raise ValueError(f"extra_sbatch: {bad[0]!r} is not an sbatch option (--name=value)")
        bad = [o for o in self.srun_args if not str(o).startswith("-")]
        if bad:
            raise ValueError(f"srun_args: {bad[0]!r} is not an srun option (--name=value)")


