"""Atomic, resumable checkpoints with megatron's dist_checkpointing.

Layout: `<output_dir>/checkpoints/step-000123/`. A checkpoint is written into `step-000123.tmp`,
the checksums of its files and then a completion marker are written inside it last, and the
directory is renamed: a directory that is still `.tmp` or has no marker was interrupted mid-write,
is never loaded and is removed. A complete one whose files no longer match their checksums is
skipped on resume (renamed `corrupt-step-000123`, kept for a look) for the one before it
(stages.engine.checkpoint_integrity). A disk that fills during a save stops the job with a message
naming the directory and the space needed, and leaves no partial checkpoint behind.

What a checkpoint holds:
  model      the unwrapped GPTModel's sharded_state_dict (the DDP wrapper would prefix `module.`)
  optimizer  the Megatron optimizer's sharded state (Adam moments, step counts)
  rng        one ShardedObject per rank: python, numpy, torch CPU (+CUDA) and Megatron-tracker states
  extra      common state, identical on every rank: step, scheduler steps, data position, ...
Saves are synchronous: on CPU the async path's device-to-host copy is a no-op, so it would write
live tensors that the next step modifies.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import shutil
import signal
from multiprocessing.managers import SyncManager
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from data_recipes.config_fields import from_dict
from stages.configs.model import ModelConfig
from stages.engine.checkpoint_integrity import (dir_bytes, disk_full, is_disk_full, verify,
                                                write_checksums)
from stages.engine.model import unwrap

MARKER = "complete.json"
PREFIX = "step-"


# The distributed optimizer's states as each data-parallel rank's own shards of its buffers,
# reshardable over the data-parallel size (a DP=2 checkpoint loads at DP=1). megatron-core 0.16.1's
# default layout is refused by its own saver ("flattened_range is not supported"), and its
# fully_reshardable layout does not load over torch's Adam (KeyError 'step'). The plain optimizer
# ignores it.
OPTIMIZER_LAYOUT = {"distrib_optim_sharding_type": "dp_reshardable"}


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"{PREFIX}{step:06d}"


def _is_complete(path: Path) -> bool:
    return (path.is_dir() and path.name.startswith(PREFIX) and not path.name.endswith(".tmp")
            and (path / MARKER).exists())


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    # by step number, not name: the 3B recipe's 2.7M steps outgrow the 6-digit padding
    return sorted((p for p in root.iterdir() if _is_complete(p)),
                  key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def remove_incomplete(root: str | os.PathLike) -> list[Path]:
    """Delete interrupted writes (`.tmp` or no marker). Call on rank 0 before any save or load."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = [p for p in root.iterdir()
               if p.is_dir() and p.name.startswith(PREFIX) and not _is_complete(p)]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def prune(root: str | os.PathLike, keep: int) -> list[Path]:
    """Keep the newest `keep` (at least 1) complete checkpoints; delete the older ones."""
    old = complete_checkpoints(root)[:-max(keep, 1)]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return old


# --------------------------------------------------------------------------------------------
# RNG


def rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_rng(data: Any):
    """RNG states differ per rank, so each rank stores its own shard (common state is rank 0's)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return ShardedObject("rng_state", data, (world,), (rank,), replica_id=0)


# --------------------------------------------------------------------------------------------
# save / load


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _ignore_stop_signals() -> None:
    """The checkpoint writer's Manager: deaf to stop signals, but gone with the worker."""
    from stages.engine.ownership import follow_parent

    follow_parent()
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def _start_writer_queue() -> None:
    """Start the results queue of dist_checkpointing's file writer ourselves, deaf to stop signals.

    dist_checkpointing spawns a multiprocessing Manager (filesystem_async._results_queue) on the
    first save. Slurm preemption and torchrun deliver SIGTERM to the whole process group, which
    killed that Manager, so the checkpoint written in answer to the signal failed with
    `BrokenPipeError` in `write_preloaded_data_multiproc`. It still exits with the job (its
    finalizer runs at interpreter exit; a SIGKILL of the group takes it too).
    """
    global _writer_manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        _writer_manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        _writer_manager.start(_ignore_stop_signals)
        filesystem_async._results_queue = _writer_manager.Queue()


_writer_manager: SyncManager | None = None


def save_checkpoint(root: str | os.PathLike, step: int, model, optimizer,
                    extra: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `step` atomically (collective: every rank calls it); returns its path."""
    from megatron.core import dist_checkpointing

    _start_writer_queue()
    final = step_dir(root, step)
    if _is_complete(final):  # e.g. a preemption right after a scheduled save of the same step
        return final
    tmp = final.with_name(final.name + ".tmp")
    if _is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    if getattr(getattr(model, "ddp_config", None), "overlap_param_gather", False):
        # the updated param shards are gathered by the next forward; the checkpoint needs them now
        model.start_param_sync(force_sync=True)
    model_sd = unwrap(model).sharded_state_dict()
    state = {"model": model_sd,
             "optimizer": optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_LAYOUT),
             "rng": _sharded_rng(rng_state()), "extra": extra}
    try:
        dist_checkpointing.save(state, str(tmp))
        _barrier()
        if _is_rank0():
            from stages.contract import write_json_atomic

            write_checksums(tmp)
            write_json_atomic(tmp / MARKER, {"step": step})
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            prune(root, keep)
    except BaseException as e:  # torch's CheckpointException is a BaseException
        if not is_disk_full(e):
            raise
        if _is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
        last = latest_checkpoint(root)
        needed = dir_bytes(last) if last else 3 * sum(  # weights + two Adam moments
            p.numel() * p.element_size() for p in unwrap(model).parameters())
        raise disk_full(Path(root), final.name, needed) from e
    _barrier()
    return final


def load_checkpoint(path: str | os.PathLike, model, optimizer) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG states; returns the saved `extra` dict."""
    from megatron.core import dist_checkpointing

    model_sd = unwrap(model).sharded_state_dict()
    state = {"model": model_sd,
             "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                       metadata=OPTIMIZER_LAYOUT),
             "rng": _sharded_rng(None)}
    loaded = dist_checkpointing.load(state, str(path))
    unwrap(model).load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    set_rng_state(loaded["rng"])
    return loaded["extra"]


def resume_or_start(root: str | os.PathLike, model, optimizer, init: str | None,
                    fresh: dict[str, Any]) -> dict[str, Any]:
    """A training job's start (collective): the latest complete checkpoint under `root` if there
    is one (returns its saved `extra` state), else `init`'s weights when given (returns `fresh`).
    Interrupted writes are removed first."""
    if _is_rank0():
        remove_incomplete(root)
        set_aside_corrupt(root)
    _barrier()
    latest = latest_checkpoint(root)
    if latest is not None:
        state = load_checkpoint(latest, model, optimizer)
        print(f"resumed from {latest}", flush=True)
        return state
    if init:
        load_model_weights_only(init, model)
        print(f"initialised from {init} (weights only)", flush=True)
    return fresh


def set_aside_corrupt(root: str | os.PathLike) -> list[Path]:
    """From the newest complete checkpoint back, rename each whose files fail their checksums
    (WARNING naming it) until an intact one is found; returns those set aside."""
    aside = []
    for path in reversed(complete_checkpoints(root)):
        problem = verify(path, MARKER)
        if problem is None:
            break
        corrupt = path.with_name(f"corrupt-{path.name}")
        shutil.rmtree(corrupt, ignore_errors=True)
        os.replace(path, corrupt)
        print(f"WARNING: checkpoint {path} is corrupt ({problem}); set aside as {corrupt.name}, "
              "resuming from the one before it", flush=True)
        aside.append(corrupt)
    return aside


def save_at_step_end(root: str | os.PathLike, step: int, last_step: int, due: bool, model,
                     optimizer, state: dict[str, Any], keep: int, logger, t_start: float) -> float:
    """The end of a training step (collective): a checkpoint when `due`, at the last step, or
    when a preemption was asked for, and then stop (job.Preempted). `state["seconds"]` adds up the
    training time, agreed on by all ranks (common state must match). Returns the clock's restart."""
    import time

    from stages.engine import distributed, job

    preempt = distributed.all_agree(job.preempt_requested())
    if due or step == last_step or preempt:
        state.update(step=step, seconds=distributed.all_max(state["seconds"] + time.time() - t_start))
        t_start = time.time()
        path = save_checkpoint(root, step, model, optimizer, state, keep=keep)
    if preempt and step < last_step:
        logger.close()
        raise job.Preempted(f"checkpoint {path.name} written at step {step}")
    return t_start


def load_model_weights_only(path: str | os.PathLike, model) -> None:
    """Initialise `model` from another stage's checkpoint (a checkpoint dir, or the `checkpoints`
    root / stage output dir holding them, in which case the latest complete one is used)."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if not (path / MARKER).exists():
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = latest_checkpoint(root)
        if found is None:
            raise FileNotFoundError(f"no complete checkpoint under {root}")
        path = found
    problem = verify(path, MARKER)
    if problem is not None:
        raise ValueError(f"checkpoint {path} is corrupt ({problem}); rerun the stage that wrote "
                         "it, or point at an intact one")
    loaded = dist_checkpointing.load({"model": unwrap(model).sharded_state_dict()}, str(path))
    unwrap(model).load_state_dict(loaded["model"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def params_sha256(model) -> str:
    """SHA-256 over this rank's parameters in a fixed (name) order: equal iff bitwise equal."""
    h = hashlib.sha256()
    for name, p in sorted(unwrap(model).named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def checkpoint_model(spec_model: dict[str, Any], upstream_manifest: dict[str, Any],
                     overrides: Optional[dict[str, Any]]) -> ModelConfig:
    """The architecture of a stage that starts from another stage's checkpoint: the one recorded
    in that stage's manifest (e.g. pretraining's last seq length and RoPE base), with this stage's
    own `model:` overrides on top; the recipe's model when the upstream records none."""
    base = upstream_manifest.get("model") or spec_model
    return from_dict(ModelConfig, {**base, **(overrides or {})})
