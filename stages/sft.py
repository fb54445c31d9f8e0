"""The `sft` stage: supervised fine-tuning on the SFT store of `sft_tokenize` and/or `sft_data`.

    python -m stages.sft --spec <output_dir>/spec.json

Starts from the `init` stage's latest checkpoint with that checkpoint's architecture (its manifest's
`model`, plus this stage's `model:` overrides). The conversations were rendered with the chat
template (data_recipes.chat) and tokenized once by the upstream stage into the SFT store (token
ids + loss mask, data_recipes.sft_store), which this job memory-maps; `data` and `more_data`'s
datasets are mixed by the weights of `mix`. Packing is planned from the stored lengths alone
(data_recipes.sft_pack: a few flat arrays, 8 bytes per sample per epoch), so the job's memory does
not grow with the dataset. The loss counts assistant tokens only; several samples are packed into
each sequence with attention blocked between them. The loss of a step is the mean over all
assistant tokens of the global batch, so a long answer weighs as much per token as a short one and
packing does not change the objective. The LR is Megatron's WSD scheduler on a one-phase FG-WSD
schedule: linear warmup, then decay over the remaining steps. Resume: the same checkpoint
machinery as pretraining, bitwise on CPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_recipes.sft_pack import (PackPlan, Packed, attention_mask, build_sequence,
                                   mixture_pool, plan_packing)
from data_recipes.sft_store import SFTStore, store_from_samples
from data_recipes.config_fields import from_dict
from schedulers.post_training import post_training_schedule
from stages.configs.post_training import SFTConfig
from stages.contract import MANIFEST, StageSpec, read_json, sha256_file
from stages.engine import distributed, job
from stages.engine.checkpoint import checkpoint_model, params_sha256
from stages.engine.losses import token_losses
from stages.engine.optim import current_lr
from stages.engine.progress import Progress
from stages.engine.tokenizer import tokenizer_of_stage
from stages.engine.tracking import MetricLogger
from stages.engine.training import (check_batch_split, job_world, optimizer_step,
                                    start_training, zero_grad)


def open_datasets(spec: StageSpec, cfg: SFTConfig, tok, is_rank0: bool) -> list[dict]:
    """The SFT-store entries (name, shards, counts) of `data` then `more_data`. An sft_data stage
    that wrote no store for this tokenizer and thinking mode has its samples encoded here, once,
    into <out>/store/ (by rank 0; the other ranks wait for it)."""
    tok_sha = sha256_file(tok.model_file)
    entries = []
    for key in ("data", "more_data"):
        if not spec.inputs.get(key):
            continue
        manifest = read_json(Path(spec.inputs[key]) / MANIFEST)
        store = manifest.get("sft_store") or {}
        if store.get("tokenizer_sha256") == tok_sha and store.get("thinking", "on") == cfg.thinking:
            entries += [{**e, "shards": [str(Path(spec.inputs[key]) / p) for p in e["shards"]]}
                        for e in store["datasets"]]
        elif "data" in manifest:  # sft_data's samples.jsonl
            name = manifest.get("stage", key)
            prefix = spec.out / "store" / name
            prefix.parent.mkdir(parents=True, exist_ok=True)
            if is_rank0:
                store_from_samples(manifest["data"], prefix, name, tok, tok_sha, cfg.thinking)
            distributed.barrier()
            entries.append(store_from_samples(manifest["data"], prefix, name, tok, tok_sha,
                                              cfg.thinking))
        else:
            raise ValueError(f"{key}: {spec.inputs[key]} was tokenized with another tokenizer or "
                             f"thinking mode (it says thinking {store.get('thinking')!r}; this "
                             f"stage: {cfg.thinking!r}); tokenize it with this stage's")
    names = [e["name"] for e in entries]
    for name in cfg.mix:
        if name not in names:
            raise ValueError(f"mix.{name}: not a dataset of data/more_data ({', '.join(names)})")
    if len(set(names)) < len(names):
        raise ValueError(f"data, more_data: a dataset name appears twice ({', '.join(names)})")
    return entries


def make_batch(encoded, packs: list[Packed], seq_length: int, pad_id: int,
               device) -> dict[str, torch.Tensor]:
    seqs = [build_sequence(encoded, p, seq_length, pad_id) for p in packs]
    batch = {k: torch.from_numpy(np.stack([s[k] for s in seqs])) for k in seqs[0]}
    batch["attention_mask"] = torch.from_numpy(attention_mask(batch.pop("segment").numpy()))
    return {k: v.to(device) for k, v in batch.items()}


def train_step(model, optimizer, encoded, packs: list[Packed], cfg: SFTConfig, seq_length: int,
               pad_id: int, info) -> tuple[float, float, int]:
    """One optimizer step over this rank's packed sequences; returns (loss, grad norm, tokens)."""
    micro = [packs[i:i + cfg.micro_batch_size] for i in range(0, len(packs), cfg.micro_batch_size)]
    batches = [make_batch(encoded, m, seq_length, pad_id, info.device) for m in micro]
    mine = sum(float(b["loss_mask"].sum()) for b in batches)
    total = distributed.dp_sum(torch.tensor(mine, device=info.device))  # trained tokens, all ranks
    zero_grad(model, optimizer)
    loss_sum = torch.zeros((), device=info.device)
    for batch in batches:
        s = token_losses(model, batch).sum()
        # DDP averages gradients over DP ranks: scale so the result is sum / all ranks' tokens
        (s * info.dp_size / max(total, 1.0)).backward()
        loss_sum += s.detach()
    grad_norm = optimizer_step(model, optimizer)
    loss = distributed.dp_sum(loss_sum) / max(total, 1.0)
    assert math.isfinite(loss), f"loss is {loss}"
    return loss, grad_norm, int(total)


@torch.no_grad()
def heldout_loss(model, store, held: list[Packed], cfg: SFTConfig, seq_length: int, pad_id: int,
                 info) -> float:
    """Mean loss over the assistant tokens of the held-out samples (shared out over DP ranks)."""
    if not held:
        return float("nan")
    mine = held[info.dp_rank::info.dp_size]
    model.eval()
    s = torch.zeros((), device=info.device)
    n = torch.zeros((), device=info.device)
    for i in range(0, len(mine), cfg.micro_batch_size):
        batch = make_batch(store, mine[i:i + cfg.micro_batch_size], seq_length, pad_id,
                           info.device)
        s += token_losses(model, batch).sum()
        n += batch["loss_mask"].sum()
    model.train()
    return distributed.dp_sum(s) / distributed.dp_sum(n)


@dataclasses.dataclass
class Data:
    """The memory-mapped store, the packing plan over the epochs (from the lengths alone) and the
    steps it makes."""

    tok: Any
    store: SFTStore
    held: list[Packed]
    plan: PackPlan
    samples: int
    """distinct training samples (before the mix's weights)"""
    truncated: int
    total_steps: int
    epoch_end: dict[int, int]
    """epoch -> the step after which all its sequences are trained"""


def load_data(spec: StageSpec, cfg: SFTConfig, seq_length: int, dp_size: int,
              is_rank0: bool = True) -> Data:
    tok = tokenizer_of_stage(spec.inputs["tokenizer"])
    entries = open_datasets(spec, cfg, tok, is_rank0)
    store = SFTStore([p for e in entries for p in e["shards"]])
    n = len(store)
    rng = np.random.default_rng([cfg.seed, 7])
    held_idx = np.sort(rng.choice(n, min(cfg.heldout_samples, n), replace=False))
    pool = mixture_pool([e["conversations"] for e in entries],
                        [cfg.mix.get(e["name"], 1.0) for e in entries], held_idx, cfg.seed)
    if not len(pool):
        raise ValueError(f"data: no training samples ({len(held_idx)} held out)")
    distinct = np.unique(pool)
    truncated = int((store.lengths[distinct] > seq_length + 1).sum())
    plan = plan_packing(store.lengths, seq_length, epochs=cfg.epochs, seed=cfg.seed,
                        packing=cfg.packing, pool=pool)
    held = list(plan_packing(store.lengths, seq_length, packing=cfg.packing, shuffle=False,
                             pool=held_idx))
    per_step = cfg.global_batch_size
    check_batch_split(per_step, cfg.micro_batch_size, dp_size)
    total_steps = len(plan) // per_step
    if total_steps < 1:
        raise ValueError(f"{len(plan)} packed sequences make less than one step of "
                         f"global_batch_size {per_step}")
    trained = plan.epochs[:total_steps * per_step]
    epoch_end = {int(e): int(np.flatnonzero(trained == e)[-1]) // per_step + 1
                 for e in np.unique(trained)}
    print(f"{len(distinct)} samples in {len(entries)} dataset(s) ({truncated} cut to "
          f"{seq_length + 1} tokens), {len(held_idx)} held out, {len(pool)} per epoch after the "
          f"mix; {len(plan)} sequences of {seq_length} over {cfg.epochs} epochs -> "
          f"{total_steps} steps", flush=True)
    return Data(tok, store, held, plan, len(distinct), truncated, total_steps, epoch_end)


def run(spec: StageSpec) -> dict[str, Any]:
    cfg = from_dict(SFTConfig, spec.config)
    with job_world(cfg.parallel, cfg.seed, "sft") as info:
        # --- setup: data, then the model resumed (or from `init`) ---------------------------------
        t_start, is_rank0 = time.time(), info.rank == 0
        if cfg.packing and importlib.util.find_spec("transformer_engine") is not None:
            # TE's fused attention takes its mask type from the layer spec (causal) and would
            # attend across packed samples; the fix is PackedSeqParams (THD), not built yet.
            raise ValueError("packing: not supported with the TransformerEngine layer spec yet; "
                             "set packing: false (one sample per sequence)")
        init = spec.inputs.get("init")
        model_cfg = checkpoint_model(spec.model, read_json(Path(init) / MANIFEST) if init else {},
                                     cfg.model)
        seq_length = model_cfg.seq_length
        d = load_data(spec, cfg, seq_length, info.dp_size, is_rank0)
        pad_id, plan, per_step = d.tok.pad_id, d.plan, cfg.global_batch_size
        total_steps = d.total_steps
        schedule = post_training_schedule(cfg.lr, total_steps, cfg.global_batch_size, seq_length,
                                          model_cfg.rotary_base)
        logger = MetricLogger(spec, info.rank)
        trainer = start_training(spec.out, cfg, model_cfg, d.tok.vocab_size, seq_length, schedule,
                                 init, {"step": 0, "heldout": {}, "loss": None, "seconds": 0.0},
                                 started=t_start)
        model, optimizer, state = trainer.model, trainer.optimizer, trainer.state
        step = state["step"]
        if step == 0 and d.held:
            state["heldout"]["0"] = heldout_loss(model, d.store, d.held, cfg, seq_length, pad_id,
                                                  info)
            logger.log(0, {"heldout/loss": state["heldout"]["0"]})

        # --- the loop -----------------------------------------------------------------------------
        progress = Progress(total_steps, done=step, every=cfg.log_every, enabled=is_rank0)
        while step < total_steps:
            step_packs = plan.slice(step * per_step, (step + 1) * per_step)
            step_packs = step_packs[info.dp_rank::info.dp_size]
            lr = current_lr(optimizer)
            t_step = time.time()
            loss, grad_norm, tokens = train_step(model, optimizer, d.store, step_packs, cfg,
                                                 seq_length, pad_id, info)
            step_s = time.time() - t_step
            trainer.scheduler.step(1)
            step += 1
            state["loss"] = loss
            epoch = int(plan.epochs[(step - 1) * per_step])
            logger.log(step - 1, {"loss": loss, "lr": lr, "grad_norm": grad_norm,
                                  "trained_tokens": tokens, "step_s": step_s, "epoch": epoch})
            progress.update(step, f"epoch {epoch} | loss {loss:.4f} | lr {lr:.3e} | "
                                  f"{step_s * 1000:.0f} ms/step")
            ended = [e for e, end in d.epoch_end.items() if end == step]
            if ended and d.held:
                h = heldout_loss(model, d.store, d.held, cfg, seq_length, pad_id, info)
                state["heldout"][str(ended[-1] + 1)] = h
                logger.log(step - 1, {"heldout/loss": h})
                progress.write(f"epoch {ended[-1] + 1} done: held-out loss {h:.4f}")
            state["scheduler_steps"] = trainer.scheduler.num_steps
            trainer.end_step(step, total_steps, logger)

        # --- manifest -----------------------------------------------------------------------------
        progress.close()
        logger.close()
        return {"final_step": step, "final_loss": state["loss"], "heldout_loss": state["heldout"],
                "samples": d.samples, "heldout_samples": sum(len(p.samples) for p in d.held),
                "truncated": d.truncated, "sequences": len(plan),
                "checkpoint": str(trainer.checkpoint()),
                "params_sha256": params_sha256(model), "model": dataclasses.asdict(model_cfg),
                "seconds": state["seconds"]}


if __name__ == "__main__":
    job.main(run)
