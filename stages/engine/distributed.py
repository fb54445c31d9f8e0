"""Process group + Megatron parallel state for a stage job, from torchrun's environment.

Under torchrun/srun RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT are set. Started as a plain
`python -m stages.<kind>` they are not, and the job runs as a world of one on a free local port.
gloo on CPU (with the compat patches applied), nccl on GPU.
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from stages.engine import compat


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    dp_size: int
    dp_rank: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(tensor: int = 1, pipeline: int = 1, seed: int = 0) -> DistInfo:
    """Init torch.distributed and Megatron's model-parallel groups, seed every RNG."""
    compat.apply()  # first: on CPU it is what imports megatron
    from megatron.core import parallel_state

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if "RANK" in os.environ:  # torchrun / srun: env:// rendezvous
            dist.init_process_group(backend)
        else:  # a single process; no env vars set, so child processes don't inherit a rendezvous
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1)
    world = dist.get_world_size()
    if world % (tensor * pipeline):
        raise ValueError(f"parallel.tensor ({tensor}) x parallel.pipeline ({pipeline}) must divide "
                         f"the world size {world}")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor, pipeline)
    seed_all(seed)
    return DistInfo(rank=dist.get_rank(), world_size=world, local_rank=local_rank,
                    dp_size=parallel_state.get_data_parallel_world_size(),
                    dp_rank=parallel_state.get_data_parallel_rank(),
                    device=torch.device("cuda", local_rank) if cuda else torch.device("cpu"))


def seed_all(seed: int) -> None:
    """Seed python, numpy, torch and Megatron's tracked RNG states (same seed on every rank:
    Megatron offsets the tensor-parallel state by tp rank itself)."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # On CPU the cuda-side tracker cannot hold states: the inference tracker makes its fork() a
    # no-op, so dropout draws from the (checkpointed) CPU generator instead (notes #1/#2).
    tensor_parallel.model_parallel_cuda_manual_seed(
        seed, inference_rng_tracker=not torch.cuda.is_available(), force_reset_rng=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def dp_sum(value: torch.Tensor) -> float:
    """Sum of a scalar over the data-parallel ranks (the other ranks hold the same data)."""
    from megatron.core import parallel_state

    if parallel_state.get_data_parallel_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
    return float(value)


def dp_mean(value: torch.Tensor) -> float:
    from megatron.core import parallel_state

    return dp_sum(value) / parallel_state.get_data_parallel_world_size()


def all_max(value: float) -> float:
    """The largest value over all ranks: one answer every rank agrees on."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64,
                     device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_agree(flag: bool) -> bool:
    """True on every rank when any rank says True (e.g. a preemption signal seen by one rank)."""
    return all_max(float(flag)) > 0


def teardown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def one_process() -> None:
    """Conversion is one process's work (more would write the same files at once)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != 1:
        raise ValueError(f"launcher: import/export stages run as one process, not {world} "
                         "(set nproc_per_node: 1, nodes: 1)")
