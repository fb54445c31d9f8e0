"""The setup and teardown every training stage shares (pretrain, sft, distill, rl): plain functions.

    with job_world(cfg.parallel, cfg.seed, "sft") as info:   # process group ... teardown
        ...
        trainer = start_training(spec.out, cfg, model_cfg, vocab_size, seq_length, schedule,
                                 init=spec.inputs.get("init"), fresh={"step": 0, ...}, started=t0)
        step = trainer.state["step"]
        while step < total_steps:
            zero_grad(trainer.model, trainer.optimizer)
            ...  # forward / backward over this rank's micro-batches
            grad_norm = optimizer_step(trainer.model, trainer.optimizer)
            trainer.scheduler.step(1)
            step += 1
            trainer.end_step(step, total_steps, logger)  # checkpoint when due; preemption

The order of the calls is the order every stage had before (model, DDP, optimizer, resume, LR
scheduler): the RNG draws of the model's initialisation, and so the run, stay what they were.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from stages.configs.base import ParallelConfig, TrainingConfig
from stages.engine import checkpoint as ckpt
from stages.engine import distributed
from stages.engine.model import build_model
from stages.engine.optim import build_ddp, build_optimizer, build_scheduler, check_memory_savers


@contextmanager
def job_world(parallel: ParallelConfig | None = None, seed: int = 0,
              loop: str = "training") -> Iterator[distributed.DistInfo]:
    """torch.distributed + Megatron's parallel state (every RNG seeded) for a stage job's lifetime,
    torn down however it ends. Pipeline parallelism is refused: no loop of ours schedules it."""
    parallel = parallel or ParallelConfig()
    info = distributed.init(parallel.tensor, parallel.pipeline, seed)
    try:
        if parallel.pipeline != 1:
            raise ValueError(f"parallel.pipeline > 1 is not supported by the {loop} loop yet; "
                             "set it to 1")
        yield info
    finally:
        distributed.teardown()


def check_batch_split(global_batch_size: int, micro_batch_size: int, dp_size: int,
                      where: str = "") -> None:
    """A global batch must split into whole micro-batches on every data-parallel rank."""
    if global_batch_size % (micro_batch_size * dp_size):
        raise ValueError(f"{where}global_batch_size ({global_batch_size}) must be a multiple of "
                         f"micro_batch_size ({micro_batch_size}) x data-parallel size ({dp_size})")


@dataclass
class Trainer:
    """A training stage's model (in Megatron DDP), optimizer, LR scheduler and resumable state."""

    model: Any
    optimizer: Any
    scheduler: Any
    state: dict[str, Any]
    """Saved with every checkpoint (common to all ranks); `step` and `seconds` at least."""
    ckpt_root: Path
    cfg: TrainingConfig
    clock: float
    """When the training time not yet added to state["seconds"] began."""

    def end_step(self, step: int, last_step: int, logger, due: bool = False) -> None:
        """After optimizer step `step` (collective): a checkpoint every `checkpoint_every` steps,
        when `due`, at the last step or on preemption (then job.Preempted is raised)."""
        self.clock = ckpt.save_at_step_end(
            self.ckpt_root, step, last_step, due or step % self.cfg.checkpoint_every == 0,
            self.model, self.optimizer, self.state, self.cfg.keep_checkpoints, logger, self.clock)

    def checkpoint(self) -> Path:
        """The directory of the last checkpoint this run wrote (or resumed from)."""
        return ckpt.step_dir(self.ckpt_root, self.state["step"])


def start_training(out: Path, cfg: TrainingConfig, model_cfg, vocab_size: int, seq_length: int,
                   schedule, init: str | None, fresh: dict[str, Any], started: float | None = None,
                   updates_per_step: int = 1) -> Trainer:
    """Build model -> Megatron DDP -> optimizer, resume from `<out>/checkpoints` (or load `init`'s
    weights and take `fresh` as the state), then the LR scheduler at the resumed position
    (`updates_per_step` optimizer updates per stage step: RL's updates per rollout batch)."""
    check_memory_savers(cfg.memory, cfg.parallel.tensor)
    model = build_ddp(build_model(model_cfg, vocab_size, seq_length, cfg.memory), cfg.memory)
    optimizer = build_optimizer(model, cfg.optimizer, schedule, cfg.memory)
    root = out / "checkpoints"
    state = ckpt.resume_or_start(root, model, optimizer, init, fresh)
    scheduler = build_scheduler(optimizer, schedule, cfg.optimizer.weight_decay,
                                state["step"] * updates_per_step)
    return Trainer(model, optimizer, scheduler, state, root, cfg,
                   time.time() if started is None else started)


def zero_grad(model, optimizer) -> None:
    """Clear DDP's fp32 grad buffers and the optimizer's grads before a step's micro-batches."""
    model.zero_grad_buffer()
    optimizer.zero_grad()


def optimizer_step(model, optimizer) -> float:
    """Average the grads over data-parallel ranks, step the optimizer; the grad norm."""
    model.finish_grad_sync()  # averages the fp32 grad buffers over data-parallel ranks
    ok, grad_norm, _ = optimizer.step()
    assert ok, "optimizer step skipped (non-finite gradients)"
    return float(grad_norm)
