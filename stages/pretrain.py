"""The `pretrain` stage: FG-WSD pretraining of a megatron-core GPTModel over phase-wise blends.

    python -m stages.pretrain --spec <output_dir>/spec.json        # or under torchrun

Reads spec.config (a PretrainConfig), spec.model (the resolved ModelConfig), the prepare stage's
manifest at spec.inputs["data"], and optionally spec.inputs["init"] (a stage whose latest
checkpoint initialises the weights). Resumes from `<output_dir>/checkpoints` when it holds one:
model, optimizer, RNG and step come back, the data position follows from the step (see
data_recipes.blend), and the run ends bitwise identical to an uninterrupted one on CPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from data_recipes.blend import build_phase_datasets, rank_micro_batches, step_samples
from data_recipes.config_fields import from_dict
from schedulers.fg_wsd import pretrain_schedule
from schedulers.mixture import all_sources
from stages.configs.model import ModelConfig, num_params
from stages.configs.pretrain import PretrainConfig
from stages.contract import MANIFEST, StageSpec, read_json
from stages.engine import distributed, job
from stages.engine.checkpoint import checkpoint_model, params_sha256, step_dir
from stages.engine.losses import lm_loss
from stages.engine.model import set_rotary_base
from stages.engine.optim import current_lr
from stages.engine.progress import Progress
from stages.engine.tracking import MetricLogger
from stages.engine.training import (check_batch_split, job_world, optimizer_step,
                                    start_training, zero_grad)

DATA_ORDER = "data_order.jsonl"


def load_configs(spec: StageSpec) -> tuple[PretrainConfig, ModelConfig]:
    """The config, and the model: the recipe's, or the one `init`'s manifest records (continued
    pretraining of an imported model or of a postnas hybrid keeps that architecture)."""
    cfg = from_dict(PretrainConfig, spec.config)
    init = spec.inputs.get("init")
    upstream = read_json(Path(init) / MANIFEST) if init else {}
    return cfg, checkpoint_model(spec.model, upstream, cfg.model)


def check_batching(cfg: PretrainConfig, schedule, dp_size: int) -> None:
    """Every phase's global batch must split into whole micro-batches on every DP rank."""
    for phase in schedule.phases:
        check_batch_split(phase.global_batch_size, cfg.micro_batch_size, dp_size,
                          f"phases[{phase.index}]: ")


def causal_mask(seq_length: int, device: torch.device) -> torch.Tensor | None:
    """An explicit causal mask on CPU (True = masked): megatron's default one is built on cuda."""
    if device.type == "cuda":
        return None
    return torch.triu(torch.ones(1, 1, seq_length, seq_length, dtype=torch.bool), diagonal=1)


def collate(dataset, indices, device: torch.device) -> dict[str, torch.Tensor]:
    samples = [dataset[i] for i in indices]
    return {k: torch.stack([s[k] for s in samples]).to(device)
            for k in ("tokens", "labels", "loss_mask", "position_ids")}


def train_step(model, optimizer, dataset, micro_batches, mask, device) -> tuple[float, float]:
    """Forward/backward over this rank's micro-batches, DP grad all-reduce, optimizer step."""
    zero_grad(model, optimizer)
    total = torch.zeros((), device=device)
    for indices in micro_batches:
        loss = lm_loss(model, collate(dataset, indices, device), mask)
        (loss / len(micro_batches)).backward()
        total += loss.detach()
    grad_norm = optimizer_step(model, optimizer)
    loss = distributed.dp_mean(total / len(micro_batches))
    assert math.isfinite(loss), f"loss is {loss}"
    return loss, grad_norm


@torch.no_grad()
def evaluate(model, dataset, n_samples: int, micro_batch_size: int, mask, info) -> float:
    """Mean loss over the first n_samples held-out sequences (shared out over DP ranks)."""
    model.eval()
    mine = list(range(n_samples))[info.dp_rank::info.dp_size]
    total = torch.zeros((), device=info.device)
    for i in range(0, len(mine), micro_batch_size):
        batch = collate(dataset, mine[i:i + micro_batch_size], info.device)
        total += lm_loss(model, batch, mask) * len(batch["tokens"])
    model.train()
    return distributed.dp_sum(total) / n_samples


def tokens_sha256(dataset, indices) -> str:
    h = hashlib.sha256()
    for i in indices:
        h.update(dataset[i]["tokens"].numpy().tobytes())
    return h.hexdigest()


def record_data_order(path: Path, step: int, phase, samples, dataset) -> None:
    """A line per step (its 0-based index): which samples it trained on, and their tokens' hash."""
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, "phase": phase.index, "samples": list(samples),
                            "tokens_sha256": tokens_sha256(dataset, samples)}) + "\n")


def truncate_data_order(path: Path, step: int) -> None:
    """Keep the records of steps < `step` (a resumed run rewrites the rest exactly as before)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] < step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError):  # a line cut short by a kill
            pass
    path.write_text("".join(kept))


def log_start(logger: MetricLogger, cfg: PretrainConfig, model_cfg: ModelConfig, schedule,
              out: Path) -> None:
    from stages.engine.plots import plot_lr, plot_mixture

    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    logger.artifact(plot_lr(schedule, plots / "lr.png"), "plots")
    logger.artifact(plot_mixture(schedule, plots / "mixture.png"), "plots")


def run(spec: StageSpec) -> dict[str, Any]:
    t_start = time.time()
    cfg, model_cfg = load_configs(spec)
    out = spec.out
    with job_world(cfg.parallel, cfg.seed, "pretrain") as info:
        # --- setup: data, schedule, model/optimizer resumed (or from `init` weights) --------------
        is_rank0 = info.rank == 0
        manifest = read_json(Path(spec.inputs["data"]) / MANIFEST)
        schedule = pretrain_schedule(cfg, model_cfg)
        check_batching(cfg, schedule, info.dp_size)
        sources = all_sources(schedule)
        logger = MetricLogger(spec, info.rank)
        trainer = start_training(out, cfg, model_cfg, manifest["vocab_size"],
                                 max(p.seq_length for p in schedule.phases), schedule,
                                 spec.inputs.get("init"),
                                 {"step": 0, "eval_losses": {}, "loss": None, "seconds": 0.0},
                                 started=t_start)
        model, optimizer, scheduler, state = (trainer.model, trainer.optimizer, trainer.scheduler,
                                              trainer.state)
        step = state["step"]
        assert scheduler.num_steps == state.get("scheduler_steps", step)
        data_order = out / DATA_ORDER
        if is_rank0:
            truncate_data_order(data_order, step)
            log_start(logger, cfg, model_cfg, schedule, out)

        # --- the loop -----------------------------------------------------------------------------
        data = None
        progress = Progress(schedule.total_steps, done=step, every=cfg.log_every, enabled=is_rank0)
        while step < schedule.total_steps:
            phase = schedule.phase_at(step)
            if data is None or data.phase is not phase:  # entering a phase (or resuming into one)
                data = build_phase_datasets(phase, manifest, seed=cfg.seed,
                                            eval_samples=cfg.eval_samples,
                                            cache_dir=out / "data_cache")
                set_rotary_base(model, phase.rotary_base)
                mask = causal_mask(phase.seq_length, info.device)
                # Megatron's scheduler drives the optimizer; FG-WSD is the plan: keep them in lockstep
                assert math.isclose(current_lr(optimizer), schedule.lr(step), rel_tol=1e-9,
                                    abs_tol=1e-15), (current_lr(optimizer), schedule.lr(step))
            samples = step_samples(phase, step)
            micro = rank_micro_batches(samples, info.dp_rank, info.dp_size, cfg.micro_batch_size)
            lr = current_lr(optimizer)
            t_step = time.time()
            loss, grad_norm = train_step(model, optimizer, data.train, micro, mask, info.device)
            tokens_per_s = phase.tokens_per_step / max(time.time() - t_step, 1e-9)
            scheduler.step(1)
            step += 1
            state["loss"] = loss

            # --- record: data order, metrics, progress (by the 0-based index of the step done) ----
            tokens = schedule.tokens_at(step)
            if is_rank0:
                record_data_order(data_order, step - 1, phase, samples, data.train)
            logger.log(step - 1, {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                                  "tokens_per_s": tokens_per_s, "phase": phase.index,
                                  **{f"mixture/{s}": phase.weights.get(s, 0.0) for s in sources}})
            progress.update(step, f"{phase.name} | loss {loss:.4f} | lr {lr:.3e} | tokens "
                                  f"{tokens:,} | {tokens_per_s:,.0f} tok/s")

            # --- phase end: held-out eval; checkpoints; preemption -----------------------------
            phase_end = step == phase.end_step
            if phase_end and cfg.eval_samples > 0:
                eval_loss = evaluate(model, data.valid, cfg.eval_samples, cfg.micro_batch_size,
                                     mask, info)
                state["eval_losses"][phase.name] = eval_loss
                logger.log(step - 1, {"eval/loss": eval_loss, f"eval/{phase.name}/loss": eval_loss})
            state.update(scheduler_steps=scheduler.num_steps,
                         data={"phase": phase.index, "next_sample": samples.stop})
            trainer.end_step(step, schedule.total_steps, logger, due=phase_end)

        # --- manifest -----------------------------------------------------------------------------
        progress.close()
        logger.close()
        last = schedule.phases[-1]
        return {"final_step": step, "tokens": schedule.tokens_at(step), "final_loss": state["loss"],
                "eval_losses": state["eval_losses"],
                "checkpoint": str(step_dir(trainer.ckpt_root, schedule.total_steps)),
                "params_sha256": params_sha256(model),
                "num_params": num_params(model_cfg, manifest["vocab_size"]),
                # what a stage starting from this checkpoint must build (the last phase's context)
                "model": dataclasses.asdict(dataclasses.replace(
                    model_cfg, seq_length=last.seq_length, rotary_base=last.rotary_base)),
                "seconds": state["seconds"]}


if __name__ == "__main__":  # dist_checkpointing spawns helper processes: they re-import __main__
    job.main(run)
