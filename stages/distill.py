"""The `distill` stage: Dual Preference Distillation (Nanbeige4-3B, arXiv 2512.06266 section 3.3).

    python -m stages.distill --spec <output_dir>/spec.json

1. Pairs (data_recipes.pairs): the teacher samples positives, the initial student samples
   negatives, a verifier or judge keeps the pairs where the positive clearly wins. Sampling is
   shared out over the data-parallel ranks by shard; finished shards are saved (records/), so a
   restart samples only what is missing. Then `pairs.jsonl` (every pair, kept or not).
2. Reference log-probs of the kept pairs under the frozen initial student (DPO's reference),
   computed once and saved (`reference_logps.json`): no third model is held during training.
   With `loss.teacher_topk` > 0 the teacher's top-k logits of every response token are saved too
   (`teacher_topk_{values,indices}.npy`) and the teacher is freed.
   The teacher is a checkpoint held in the job or a server (`teacher: {kind: http, url, model,
   top_k}`: it samples the positives and returns its top-k log-probs of every row, which are
   cached the same way): stages.engine.teachers.
3. Training (stages.engine.losses): per step, w_dpo * DPO(positive, negative) + w_pos * KD on the
   positive's tokens + w_neg * KD on the negative's tokens, each term a mean over the global batch
   (pairs, positive tokens, negative tokens). Held-out pairs: teacher-student KL on their tokens and
   DPO accuracy, before training and after every epoch. Resume is bitwise, like SFT.

Memory of the teacher's logits: online, one micro-batch of [2 * micro_batch_size, seq, vocab]
fp32 at a time (4 x 2 x 4096 x 151k x 4 B = 19.8 GB for a Qwen-size vocabulary at seq 4096, so use
micro_batch_size 1 there: 5 GB). Cached top-k: 8 B per token per k (int32 id + fp32 logit), so
k = 64 over 100M response tokens is 51 GB on disk, memory-mapped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_recipes.backends import build_generator
from data_recipes.config_fields import from_dict
from data_recipes.pairs import Pair, build_scorer, make_pairs
from data_recipes.prompts import load_prompts, load_tasks, split_heldout
from schedulers.post_training import post_training_schedule
from stages.configs.post_training import DistillConfig
from stages.contract import (MANIFEST, StageSpec, read_json, write_json_atomic,
                             write_jsonl_atomic)
from stages.engine import distributed, job
from stages.engine.checkpoint import checkpoint_model, params_sha256
from stages.engine.generate import load_checkpoint_model
from stages.engine.losses import dpo_loss, logits_of, sequence_logps, token_logps
from stages.engine.optim import current_lr
from stages.engine.pair_batches import TeacherLogits, encode_pair, make_batch, reference_logps
from stages.engine.progress import Progress
from stages.engine.teachers import build_teacher, checked_tokenizer, sample_answers
from stages.engine.tracking import MetricLogger
from stages.engine.training import (check_batch_split, job_world, optimizer_step,
                                    start_training, zero_grad)

# --- 1. pairs ------------------------------------------------------------------------------------


def build_pairs(spec: StageSpec, cfg: DistillConfig, tok, student, teacher, info) -> list[Pair]:
    """Every prompt's pair (kept or not), sampling only the shards no earlier run finished."""
    records = spec.out / "records"
    records.mkdir(parents=True, exist_ok=True)
    prompts = load_prompts(cfg.prompts)
    if not prompts:
        raise ValueError("prompts: the prompt set is empty")
    shards = [prompts[i:i + cfg.shard_size] for i in range(0, len(prompts), cfg.shard_size)]
    judge = (build_generator(cfg.filter.judge, spec.out / "http_cache-judge.jsonl")
             if cfg.filter.kind == "judge" else None)
    scorer = build_scorer(cfg.filter, load_tasks(cfg.prompts) if cfg.filter.kind == "verifier"
                          else [], judge)
    todo = [i for i in range(len(shards)) if not (records / f"shard-{i:05d}.jsonl").exists()]
    if info.rank == 0:
        print(f"{len(prompts)} prompts in {len(shards)} shards, {len(todo)} to sample "
              f"({cfg.teacher_samples} teacher + {cfg.student_samples} student answers each)",
              flush=True)
    t0 = time.time()
    progress = Progress(len(todo), "sampled shards", enabled=info.rank == 0)
    for k, i in enumerate(todo[info.dp_rank::info.dp_size]):
        shard = shards[i]
        texts = [p.text for p in shard]
        seed = cfg.seed + 1000 * i
        t_answers = teacher.sample(tok, cfg, texts, cfg.teacher_samples, seed)
        s_answers = sample_answers(student, tok, cfg, texts, cfg.student_samples, seed + 500)
        pairs = make_pairs([p.id for p in shard], texts, t_answers, s_answers, scorer,
                           cfg.filter.min_margin)
        write_jsonl_atomic(records / f"shard-{i:05d}.jsonl", [dataclasses.asdict(p) for p in pairs])
        progress.update(min((k + 1) * info.dp_size, len(todo)), f"{time.time() - t0:.0f} s | "
                        f"{sum(p.kept for p in pairs)}/{len(pairs)} kept in the last")
    progress.close()
    distributed.barrier()
    pairs = []
    for i in range(len(shards)):
        with open(records / f"shard-{i:05d}.jsonl", encoding="utf-8") as f:
            pairs += [Pair(**json.loads(line)) for line in f if line.strip()]
    return pairs


# --- 2. training (batches, reference log-probs, teacher logits: stages.engine.pair_batches) ------


def micro_losses(model, teacher: TeacherLogits, encoded, refs, idx: list[int], cfg: DistillConfig,
                 pad_id: int, vocab_size: int, device):
    """Summed (unnormalised) DPO loss, positive-token KD and negative-token KD of a micro-batch,
    their normalisers (pairs, positive tokens, negative tokens) and DPO statistics."""
    lc = cfg.loss
    batch = make_batch(encoded, idx, pad_id, device)
    logits = logits_of(model, batch, vocab_size)
    m = len(idx)
    mask = batch["loss_mask"]
    lp = sequence_logps(token_logps(logits, batch["labels"]), mask, lc.length_normalize)
    ref = torch.tensor([refs[i] for i in idx], device=device)
    dpo, st = dpo_loss(lp[:m], lp[m:], ref[:, 0], ref[:, 1], lc.dpo_beta)
    div = teacher.divergence(logits, batch, idx, vocab_size, lc)
    div = torch.where(mask.bool(), div, torch.zeros_like(div))  # padding may hold anything
    sums = {"dpo": dpo.sum(), "positive_kd": div[:m].sum(), "negative_kd": div[m:].sum()}
    counts = {"dpo": float(m), "positive_kd": float(mask[:m].sum()),
              "negative_kd": float(mask[m:].sum())}
    stats = {"margin": float(st["margins"].sum()), "accuracy": float(st["accuracy"].sum()),
             "chosen_reward": float(st["rewards_chosen"].sum()),
             "rejected_reward": float(st["rewards_rejected"].sum())}
    return sums, counts, stats


WEIGHTS = {"dpo": "dpo_weight", "positive_kd": "positive_weight", "negative_kd": "negative_weight"}


def train_step(model, optimizer, teacher, encoded, refs, idx: list[int], cfg: DistillConfig,
               pad_id: int, vocab_size: int, info) -> dict[str, float]:
    """One optimizer step over this rank's pairs `idx`; every term is a mean over the global batch."""
    micro = [idx[i:i + cfg.micro_batch_size] for i in range(0, len(idx), cfg.micro_batch_size)]
    zero_grad(model, optimizer)
    # normalisers first (token counts of all ranks), so each micro-batch's backward is final
    counts = {k: 0.0 for k in WEIGHTS}
    for mb in micro:
        for i in mb:
            counts["dpo"] += 1
            counts["positive_kd"] += sum(encoded[i][0][1][1:])
            counts["negative_kd"] += sum(encoded[i][1][1][1:])
    totals = {k: max(distributed.dp_sum(torch.tensor(v)), 1.0) for k, v in counts.items()}
    sums = {k: 0.0 for k in WEIGHTS}
    stats = {"margin": 0.0, "accuracy": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0}
    for mb in micro:
        s, _, st = micro_losses(model, teacher, encoded, refs, mb, cfg, pad_id, vocab_size,
                                info.device)
        loss = sum(getattr(cfg.loss, WEIGHTS[k]) * s[k] / totals[k] for k in WEIGHTS)
        (loss * info.dp_size).backward()  # DDP averages over ranks; the totals are global sums
        for k in WEIGHTS:
            sums[k] += float(s[k].detach())
        for k in stats:
            stats[k] += st[k]
    grad_norm = optimizer_step(model, optimizer)
    out = {f"loss/{k}": distributed.dp_sum(torch.tensor(v)) / totals[k] for k, v in sums.items()}
    out["loss"] = sum(getattr(cfg.loss, WEIGHTS[k]) * out[f"loss/{k}"] for k in WEIGHTS)
    out.update({f"dpo/{k}": distributed.dp_sum(torch.tensor(v)) / totals["dpo"]
                for k, v in stats.items()})
    out["grad_norm"] = grad_norm
    assert math.isfinite(out["loss"]), f"loss is {out['loss']}"
    return out


@torch.no_grad()
def heldout_metrics(model, teacher, encoded, refs, idx: list[int], cfg: DistillConfig,
                    pad_id: int, vocab_size: int, info) -> dict[str, float]:
    """Teacher-student divergence per token on held-out positives and negatives, DPO accuracy."""
    if not idx:
        return {}
    model.eval()
    mine = idx[info.dp_rank::info.dp_size]
    acc = {"positive_kd": 0.0, "negative_kd": 0.0, "accuracy": 0.0, "margin": 0.0}
    n = {"positive_kd": 0.0, "negative_kd": 0.0}
    for s in range(0, len(mine), cfg.micro_batch_size):
        mb = mine[s:s + cfg.micro_batch_size]
        sums, counts, st = micro_losses(model, teacher, encoded, refs, mb, cfg, pad_id,
                                        vocab_size, info.device)
        for k in n:
            acc[k] += float(sums[k])
            n[k] += counts[k]
        acc["accuracy"] += st["accuracy"]
        acc["margin"] += st["margin"]
    model.train()
    pairs = distributed.dp_sum(torch.tensor(float(len(mine))))
    return {"heldout/kd_positive": distributed.dp_sum(torch.tensor(acc["positive_kd"])) /
            max(distributed.dp_sum(torch.tensor(n["positive_kd"])), 1.0),
            "heldout/kd_negative": distributed.dp_sum(torch.tensor(acc["negative_kd"])) /
            max(distributed.dp_sum(torch.tensor(n["negative_kd"])), 1.0),
            "heldout/dpo_accuracy": distributed.dp_sum(torch.tensor(acc["accuracy"])) / pairs,
            "heldout/dpo_margin": distributed.dp_sum(torch.tensor(acc["margin"])) / pairs}


def data_order(n_train: int, cfg: DistillConfig) -> tuple[list[int], list[int]]:
    """(pair index of every training slot, epoch of every slot): a fresh shuffle per epoch."""
    order, epochs = [], []
    for e in range(cfg.epochs):
        order += np.random.default_rng([cfg.seed, e]).permutation(n_train).tolist()
        epochs += [e] * n_train
    return order, epochs


def frozen_models(spec: StageSpec, cfg: DistillConfig, tok, is_rank0: bool):
    """(student config, the teacher (stages.engine.teachers), the frozen initial student). A served
    teacher is checked first, before anything is loaded."""
    vocab = tok.vocab_size
    student_cfg = checkpoint_model(spec.model, read_json(Path(spec.inputs["student"]) / MANIFEST),
                                   cfg.model)
    teacher = build_teacher(spec, cfg, tok, vocab, student_cfg.seq_length)
    initial = load_checkpoint_model(spec.inputs["student"], student_cfg, vocab)
    if is_rank0:
        print(f"student {student_cfg.num_layers}x{student_cfg.hidden_size}, {teacher.summary}",
              flush=True)
    return student_cfg, teacher, initial


def load_pairs(spec: StageSpec, cfg: DistillConfig, tok, initial, teacher, info, logger):
    """Every pair (sampled once, then read back from pairs.jsonl), the kept ones split into
    training and held-out pairs, and the pair statistics."""
    pairs_file = spec.out / "pairs.jsonl"
    if pairs_file.exists():
        pairs = [Pair(**json.loads(line)) for line in pairs_file.read_text().splitlines()]
    else:
        t0 = time.time()
        pairs = build_pairs(spec, cfg, tok, initial, teacher, info)
        if info.rank == 0:
            write_jsonl_atomic(pairs_file, [dataclasses.asdict(p) for p in pairs])
        distributed.barrier()
        logger.log(0, {"pairs/sampling_s": time.time() - t0})
    kept = [p for p in pairs if p.kept]
    train, held = split_heldout(kept, [p.id for p in kept], cfg.heldout_pairs)
    stats = {"pairs/sampled": len(pairs), "pairs/kept": len(kept),
             "pairs/kept_fraction": len(kept) / len(pairs),
             "pairs/teacher_score": float(np.mean([np.mean(p.teacher_scores) for p in pairs])),
             "pairs/student_score": float(np.mean([np.mean(p.student_scores) for p in pairs])),
             "pairs/train": len(train), "pairs/heldout": len(held)}
    logger.log(0, stats)
    if info.rank == 0:
        print(" | ".join(f"{k.split('/')[1]} {v:.3g}" for k, v in stats.items()), flush=True)
        logger.artifact(pairs_file)
    return pairs, train, held, stats


def reference_once(out, cfg: DistillConfig, initial, encoded, pad_id: int, vocab: int, info):
    """DPO's reference log-probs of every pair, computed once (reference_logps.json)."""
    refs_file = out / "reference_logps.json"
    if not refs_file.exists():
        refs = reference_logps(initial, encoded, pad_id, vocab, cfg.loss.length_normalize,
                               cfg.micro_batch_size, info.device)
        if info.rank == 0:
            write_json_atomic(refs_file, refs)
        distributed.barrier()
    return json.loads(refs_file.read_text())


def run(spec: StageSpec) -> dict[str, Any]:
    cfg = from_dict(DistillConfig, spec.config)
    with job_world(cfg.parallel, cfg.seed, "distill") as info:
        # --- setup: 1. pairs; 2. the frozen models' views of them; the student, resumed -----------
        out, is_rank0, t_start = spec.out, info.rank == 0, time.time()
        tok = checked_tokenizer(spec)
        vocab, pad_id = tok.vocab_size, tok.pad_id
        logger = MetricLogger(spec, info.rank)
        student_cfg, teacher, initial = frozen_models(spec, cfg, tok, is_rank0)
        seq_length = student_cfg.seq_length
        pairs, train, held, pair_stats = load_pairs(spec, cfg, tok, initial, teacher, info, logger)
        per_step = cfg.global_batch_size
        check_batch_split(per_step, cfg.micro_batch_size, info.dp_size)
        order, epoch_of = data_order(len(train), cfg)
        total_steps = len(order) // per_step
        if total_steps < 1:
            raise ValueError(f"filter: {len(train)} training pairs kept (of {len(pairs)} sampled) "
                             f"make less than one step of global_batch_size {per_step}; sample "
                             "more prompts or loosen the filter")
        encoded = [encode_pair(tok, p, seq_length) for p in train + held]
        held_idx = list(range(len(train), len(train) + len(held)))
        args = (encoded, reference_once(out, cfg, initial, encoded, pad_id, vocab, info))
        del initial
        teacher_view = teacher.view(out, cfg, encoded, pad_id, vocab, seq_length, info)
        teacher.free()  # with a cached top-k nothing holds it any more
        schedule = post_training_schedule(cfg.lr, total_steps, cfg.global_batch_size, seq_length,
                                          student_cfg.rotary_base)
        trainer = start_training(out, cfg, student_cfg, vocab, seq_length, schedule,
                                 spec.inputs["student"],
                                 {"step": 0, "heldout": {}, "last": {}, "seconds": 0.0},
                                 started=t_start)
        model, optimizer, state = trainer.model, trainer.optimizer, trainer.state
        step = state["step"]
        if step == 0 and held_idx:
            state["heldout"]["0"] = heldout_metrics(model, teacher_view, *args, held_idx, cfg,
                                                    pad_id, vocab, info)
            logger.log(0, state["heldout"]["0"])
        if is_rank0:
            print(f"{len(train)} training pairs, {len(held)} held out; {cfg.epochs} epochs -> "
                  f"{total_steps} steps", flush=True)

        # --- 3. the loop --------------------------------------------------------------------------
        progress = Progress(total_steps, done=step, every=cfg.log_every, enabled=is_rank0)
        while step < total_steps:
            idx = order[step * per_step:(step + 1) * per_step][info.dp_rank::info.dp_size]
            lr = current_lr(optimizer)
            t_step = time.time()
            metrics = train_step(model, optimizer, teacher_view, *args, idx, cfg, pad_id, vocab,
                                 info)
            metrics.update(lr=lr, step_s=distributed.all_max(time.time() - t_step),  # ranks agree
                           epoch=epoch_of[step * per_step])
            trainer.scheduler.step(1)
            step += 1
            state["last"] = metrics
            logger.log(step - 1, metrics)
            progress.update(step, f"loss {metrics['loss']:.4f} | dpo {metrics['loss/dpo']:.4f} | "
                                  f"kd+ {metrics['loss/positive_kd']:.4f} | kd- "
                                  f"{metrics['loss/negative_kd']:.4f} | acc "
                                  f"{metrics['dpo/accuracy']:.2f} | "
                                  f"{metrics['step_s'] * 1000:.0f} ms/step")
            if held_idx and (step == total_steps
                             or epoch_of[step * per_step] != epoch_of[(step - 1) * per_step]):
                h = heldout_metrics(model, teacher_view, *args, held_idx, cfg, pad_id, vocab, info)
                state["heldout"][str(epoch_of[(step - 1) * per_step] + 1)] = h
                logger.log(step - 1, h)
                progress.write("held out: " + " | ".join(f"{k.split('/')[1]} {v:.4f}"
                                                         for k, v in h.items()))
            state["scheduler_steps"] = trainer.scheduler.num_steps
            trainer.end_step(step, total_steps, logger)

        # --- manifest -----------------------------------------------------------------------------
        progress.close()
        logger.close()
        return {"final_step": step, "final": state["last"], "heldout": state["heldout"],
                **{k.replace("/", "_"): v for k, v in pair_stats.items()},
                "pairs": str((out / "pairs.jsonl").resolve()),
                "checkpoint": str(trainer.checkpoint()),
                "params_sha256": params_sha256(model), "model": dataclasses.asdict(student_cfg),
                "teacher_model": teacher.description, "seconds": state["seconds"]}


if __name__ == "__main__":
    job.main(run)
