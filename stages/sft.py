"""The `sft` stage: supervised fine-tuning on chat samples from an `sft_data` stage.

    python -m stages.sft --spec <output_dir>/spec.json

Starts from the `init` stage's latest checkpoint with that checkpoint's architecture (its manifest's
`model`, plus this stage's `model:` overrides). Samples are rendered with the chat template
(data_recipes.chat), the loss counts assistant tokens only, and several samples are packed into
each sequence with attention blocked between them (data_recipes.sft_pack). The loss of a step is
the mean over all assistant tokens of the global batch, so a long answer weighs as much per token
as a short one and packing does not change the objective. The LR is Megatron's WSD scheduler on a
one-phase FG-WSD schedule: linear warmup, then decay over the remaining steps. Resume: the same
checkpoint machinery as pretraining, bitwise on CPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_recipes.chat import Message, encode_chat
from data_recipes.prompts import split_heldout
from data_recipes.sft_pack import Packed, attention_mask, build_sequence, pack
from data_recipes.config_fields import from_dict
from schedulers.post_training import post_training_schedule
from stages.configs.post_training import SFTConfig
from stages.contract import MANIFEST, StageSpec, read_json
from stages.engine import distributed, job
from stages.engine.checkpoint import checkpoint_model, params_sha256
from stages.engine.losses import token_losses
from stages.engine.optim import current_lr
from stages.engine.progress import Progress
from stages.engine.tokenizer import tokenizer_of_stage
from stages.engine.tracking import MetricLogger
from stages.engine.training import (check_batch_split, job_world, optimizer_step,
                                    start_training, zero_grad)


def load_samples(data_dir: str) -> list[dict]:
    manifest = read_json(Path(data_dir) / MANIFEST)
    with open(manifest["data"], encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def encode_all(tokenizer, samples: list[dict]) -> list[tuple[list[int], list[int]]]:
    return [encode_chat(tokenizer, [Message(**m) for m in s["messages"]]) for s in samples]


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
def heldout_loss(model, encoded, cfg: SFTConfig, seq_length: int, pad_id: int, info) -> float:
    """Mean loss over the assistant tokens of the held-out samples (shared out over DP ranks)."""
    if not encoded:
        return float("nan")
    packs = pack([len(e[0]) for e in encoded], seq_length, packing=cfg.packing, shuffle=False)
    mine = packs[info.dp_rank::info.dp_size]
    model.eval()
    s = torch.zeros((), device=info.device)
    n = torch.zeros((), device=info.device)
    for i in range(0, len(mine), cfg.micro_batch_size):
        batch = make_batch(encoded, mine[i:i + cfg.micro_batch_size], seq_length, pad_id,
                           info.device)
        s += token_losses(model, batch).sum()
        n += batch["loss_mask"].sum()
    model.train()
    return distributed.dp_sum(s) / distributed.dp_sum(n)


@dataclasses.dataclass
class Data:
    """The encoded samples, their packing into sequences over the epochs and the steps they make."""

    tok: Any
    train: list[tuple[list[int], list[int]]]
    held: list[tuple[list[int], list[int]]]
    truncated: int
    packs: list[Packed]
    total_steps: int
    epoch_end: dict[int, int]
    """epoch -> the step after which all its sequences are trained"""


def load_data(spec: StageSpec, cfg: SFTConfig, seq_length: int, dp_size: int) -> Data:
    tok = tokenizer_of_stage(spec.inputs["tokenizer"])
    samples = load_samples(spec.inputs["data"])
    train, held = split_heldout(samples, [s["id"] for s in samples], cfg.heldout_samples)
    if not train:
        raise ValueError(f"data: no training samples ({len(held)} held out)")
    encoded, held_encoded = encode_all(tok, train), encode_all(tok, held)
    truncated = sum(len(ids) > seq_length + 1 for ids, _ in encoded)
    packs = pack([len(e[0]) for e in encoded], seq_length, epochs=cfg.epochs, seed=cfg.seed,
                 packing=cfg.packing)
    per_step = cfg.global_batch_size
    check_batch_split(per_step, cfg.micro_batch_size, dp_size)
    total_steps = len(packs) // per_step
    if total_steps < 1:
        raise ValueError(f"{len(packs)} packed sequences make less than one step of "
                         f"global_batch_size {per_step}")
    epoch_end = {}
    for i, p in enumerate(packs[:total_steps * per_step]):
        epoch_end[p.epoch] = i // per_step + 1
    print(f"{len(train)} samples ({truncated} cut to {seq_length + 1} tokens), "
          f"{len(held)} held out; {len(packs)} sequences of {seq_length} over {cfg.epochs} "
          f"epochs -> {total_steps} steps", flush=True)
    return Data(tok, encoded, held_encoded, truncated, packs, total_steps, epoch_end)


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
        d = load_data(spec, cfg, seq_length, info.dp_size)
        pad_id, packs, per_step = d.tok.pad_id, d.packs, cfg.global_batch_size
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
            state["heldout"]["0"] = heldout_loss(model, d.held, cfg, seq_length, pad_id, info)
            logger.log(0, {"heldout/loss": state["heldout"]["0"]})

        # --- the loop -----------------------------------------------------------------------------
        progress = Progress(total_steps, done=step, every=cfg.log_every, enabled=is_rank0)
        while step < total_steps:
            step_packs = packs[step * per_step:(step + 1) * per_step][info.dp_rank::info.dp_size]
            lr = current_lr(optimizer)
            t_step = time.time()
            loss, grad_norm, tokens = train_step(model, optimizer, d.train, step_packs, cfg,
                                                 seq_length, pad_id, info)
            step_s = time.time() - t_step
            trainer.scheduler.step(1)
            step += 1
            state["loss"] = loss
            epoch = packs[(step - 1) * per_step].epoch
            logger.log(step - 1, {"loss": loss, "lr": lr, "grad_norm": grad_norm,
                                  "trained_tokens": tokens, "step_s": step_s, "epoch": epoch})
            progress.update(step, f"epoch {epoch} | loss {loss:.4f} | lr {lr:.3e} | "
                                  f"{step_s * 1000:.0f} ms/step")
            ended = [e for e, end in d.epoch_end.items() if end == step]
            if ended and d.held:
                h = heldout_loss(model, d.held, cfg, seq_length, pad_id, info)
                state["heldout"][str(ended[-1] + 1)] = h
                logger.log(step - 1, {"heldout/loss": h})
                progress.write(f"epoch {ended[-1] + 1} done: held-out loss {h:.4f}")
            state["scheduler_steps"] = trainer.scheduler.num_steps
            trainer.end_step(step, total_steps, logger)

        # --- manifest -----------------------------------------------------------------------------
        progress.close()
        logger.close()
        return {"final_step": step, "final_loss": state["loss"], "heldout_loss": state["heldout"],
                "samples": len(d.train), "heldout_samples": len(d.held), "truncated": d.truncated,
                "sequences": len(packs), "checkpoint": str(trainer.checkpoint()),
                "params_sha256": params_sha256(model), "model": dataclasses.asdict(model_cfg),
                "seconds": state["seconds"]}


if __name__ == "__main__":
    job.main(run)
