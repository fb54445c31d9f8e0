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
3. Training (stages.distill_loss): per step, w_dpo * DPO(positive, negative) + w_pos * KD on the
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
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_recipes.chat import Message, encode_chat, parse_assistant
from data_recipes.generators import build_generator
from data_recipes.pairs import ArithmeticVerifier, JudgeScorer, Pair, make_pairs
from data_recipes.prompts import load_prompts, split_heldout
from data_recipes.tokenizer import tokenizer_mismatch, tokenizer_of_stage
from stages.engine import checkpoint as ckpt
from stages import distill_loss as L
from stages.engine import distributed, job
from stages.configs.post_training import DistillConfig
from data_recipes.generators import GeneratorConfig
from stages.engine.checkpoint import checkpoint_model
from data_recipes.config_fields import from_dict
from stages.contract import (MANIFEST, StageSpec, read_json, write_json_atomic,
                             write_jsonl_atomic)
from stages.engine.generate import EngineGenerator, load_checkpoint_model
from stages.engine.model import build_model
from stages.engine.optim import build_ddp, build_optimizer, build_scheduler, current_lr
from stages.engine.checkpoint import params_sha256
from schedulers.post_training import post_training_schedule
from stages.engine.tracking import MetricLogger

# --- 1. pairs ------------------------------------------------------------------------------------


def sample_answers(model, tok, cfg: DistillConfig, prompts: list[str], n: int, seed: int) -> list[list[str]]:
    """n sampled chat answers per prompt (sample j uses seed + j, so a rerun samples the same)."""
    per_seed = []
    for j in range(n):
        gen = EngineGenerator(model, tok, GeneratorConfig(
            kind="engine", temperature=cfg.temperature, top_p=cfg.top_p,
            max_tokens=cfg.max_new_tokens, seed=seed + j, batch_size=cfg.sample_batch_size))
        per_seed.append(gen.complete([[Message("user", p)] for p in prompts]))
    return [[answers[i] for answers in per_seed] for i in range(len(prompts))]


def build_pairs(spec: StageSpec, cfg: DistillConfig, tok, student, teacher, info) -> list[Pair]:
    """Every prompt's pair (kept or not), sampling only the shards no earlier run finished."""
    records = spec.out / "records"
    records.mkdir(parents=True, exist_ok=True)
    prompts = load_prompts(cfg.prompts)
    if not prompts:
        raise ValueError("prompts: the prompt set is empty")
    shards = [prompts[i:i + cfg.shard_size] for i in range(0, len(prompts), cfg.shard_size)]
    scorer = (ArithmeticVerifier() if cfg.filter.kind == "verifier" else
              JudgeScorer(build_generator(cfg.filter.judge, spec.out / "http_cache-judge.jsonl")))
    todo = [i for i in range(len(shards)) if not (records / f"shard-{i:05d}.jsonl").exists()]
    if info.rank == 0:
        print(f"{len(prompts)} prompts in {len(shards)} shards, {len(todo)} to sample "
              f"({cfg.teacher_samples} teacher + {cfg.student_samples} student answers each)",
              flush=True)
    t0 = time.time()
    for k, i in enumerate(todo[info.dp_rank::info.dp_size]):
        shard = shards[i]
        texts = [p.text for p in shard]
        seed = cfg.seed + 1000 * i
        t_answers = sample_answers(teacher, tok, cfg, texts, cfg.teacher_samples, seed)
        s_answers = sample_answers(student, tok, cfg, texts, cfg.student_samples, seed + 500)
        pairs = make_pairs([p.id for p in shard], texts, t_answers, s_answers, scorer,
                           cfg.filter.min_margin)
        write_jsonl_atomic(records / f"shard-{i:05d}.jsonl", [dataclasses.asdict(p) for p in pairs])
        if info.rank == 0:
            done = (k + 1) * info.dp_size
            print(f"sampled {min(done, len(todo))}/{len(todo)} shards "
                  f"({time.time() - t0:.0f} s, {sum(p.kept for p in pairs)}/{len(pairs)} kept "
                  "in the last)", flush=True)
    distributed.barrier()
    pairs = []
    for i in range(len(shards)):
        with open(records / f"shard-{i:05d}.jsonl", encoding="utf-8") as f:
            pairs += [Pair(**json.loads(line)) for line in f if line.strip()]
    return pairs


# --- 2. batches and the per-token quantities of a micro-batch -----------------------------------


def encode_pair(tok, pair: Pair, seq_length: int) -> list[tuple[list[int], list[int]]]:
    """(ids, loss mask) of prompt + positive and of prompt + negative, cut to seq_length + 1."""
    out = []
    for answer in (pair.positive, pair.negative):
        ids, mask = encode_chat(tok, [Message("user", pair.prompt), parse_assistant(answer)])
        out.append((ids[:seq_length + 1], mask[:seq_length + 1]))
    return out


def make_batch(encoded: list[list[tuple[list[int], list[int]]]], idx: list[int], pad_id: int,
               device) -> dict[str, torch.Tensor]:
    """Rows [positives of idx..., negatives of idx...], right-padded to the longest row."""
    rows = [encoded[i][0] for i in idx] + [encoded[i][1] for i in idx]
    n = max(len(ids) for ids, _ in rows) - 1
    tokens = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), n)
    for r, (ids, m) in enumerate(rows):
        k = len(ids) - 1
        tokens[r, :k] = torch.tensor(ids[:-1])
        labels[r, :k] = torch.tensor(ids[1:])
        mask[r, :k] = torch.tensor(m[1:], dtype=torch.float)
    batch = {"tokens": tokens, "labels": labels, "loss_mask": mask,
             "position_ids": torch.arange(n).unsqueeze(0).expand(len(rows), -1),
             # causal; the padding is at the end of each row and outside the loss mask
             "attention_mask": torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool), diagonal=1)}
    return {k: v.to(device) for k, v in batch.items()}


def logits_of(model, batch, vocab_size: int) -> torch.Tensor:
    """[rows, seq, vocab] fp32 logits over the tokenizer's real vocabulary (padding rows cut)."""
    out = model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                runtime_gather_output=True)
    return out[..., :vocab_size].float()


class TeacherLogits:
    """The teacher's view of a micro-batch: online logits, or the saved top-k of every row."""

    def __init__(self, teacher=None, topk: tuple[np.ndarray, np.ndarray] | None = None):
        self.teacher, self.topk = teacher, topk

    @torch.no_grad()
    def divergence(self, student_logits, batch, idx: list[int], vocab_size: int,
                   loss_cfg) -> torch.Tensor:
        kw = dict(kind=loss_cfg.divergence, beta=loss_cfg.jsd_beta,
                  temperature=loss_cfg.temperature)
        if self.topk is None:
            t_logits = logits_of(self.teacher, batch, vocab_size)
            with torch.enable_grad():
                return L.token_divergence(student_logits, t_logits, **kw)
        values, indices = self.topk
        rows = [2 * i for i in idx] + [2 * i + 1 for i in idx]
        n = student_logits.shape[1]
        v = torch.from_numpy(np.ascontiguousarray(values[rows, :n])).to(student_logits.device)
        ix = torch.from_numpy(np.ascontiguousarray(indices[rows, :n])).long().to(v.device)
        with torch.enable_grad():
            return L.token_divergence_topk(student_logits, v, ix, **kw)


@torch.no_grad()
def reference_logps(model, encoded, pad_id: int, vocab_size: int, length_normalize: bool,
                    batch_size: int, device) -> list[list[float]]:
    """[positive, negative] sequence log-prob of every pair under `model` (the initial student)."""
    out = []
    for s in range(0, len(encoded), batch_size):
        idx = list(range(s, min(s + batch_size, len(encoded))))
        batch = make_batch(encoded, idx, pad_id, device)
        lp = L.sequence_logps(L.token_logps(logits_of(model, batch, vocab_size), batch["labels"]),
                              batch["loss_mask"], length_normalize)
        m = len(idx)
        out += [[float(lp[j]), float(lp[m + j])] for j in range(m)]
    return out


@torch.no_grad()
def write_teacher_topk(teacher, encoded, pad_id: int, vocab_size: int, k: int, seq_length: int,
                       batch_size: int, device, out: Path) -> None:
    """The teacher's top-k logits and ids of every row ([2 * pairs, seq_length, k], row 2i the
    positive of pair i, 2i + 1 its negative) as two .npy files, written through a memory map."""
    shape = (2 * len(encoded), seq_length, k)
    files = {name: out / f"teacher_topk_{name}.npy" for name in ("values", "indices")}
    arrays = {name: np.lib.format.open_memmap(path.with_suffix(".tmp.npy"), mode="w+",
                                              dtype=np.float32 if name == "values" else np.int32,
                                              shape=shape) for name, path in files.items()}
    for s in range(0, len(encoded), batch_size):
        idx = list(range(s, min(s + batch_size, len(encoded))))
        batch = make_batch(encoded, idx, pad_id, device)
        top = logits_of(teacher, batch, vocab_size).topk(k, dim=-1)
        n = batch["tokens"].shape[1]
        rows = [2 * i for i in idx] + [2 * i + 1 for i in idx]
        arrays["values"][rows, :n] = top.values.cpu().numpy()
        arrays["indices"][rows, :n] = top.indices.cpu().numpy()
    for name, path in files.items():
        arrays[name].flush()
        os.replace(path.with_suffix(".tmp.npy"), path)


def read_teacher_topk(out: Path) -> tuple[np.ndarray, np.ndarray] | None:
    files = [out / f"teacher_topk_{name}.npy" for name in ("values", "indices")]
    if not all(f.exists() for f in files):
        return None
    return tuple(np.load(f, mmap_mode="r") for f in files)


# --- 3. training ---------------------------------------------------------------------------------


def micro_losses(model, teacher: TeacherLogits, encoded, refs, idx: list[int], cfg: DistillConfig,
                 pad_id: int, vocab_size: int, device):
    """Summed (unnormalised) DPO loss, positive-token KD and negative-token KD of a micro-batch,
    their normalisers (pairs, positive tokens, negative tokens) and DPO statistics."""
    lc = cfg.loss
    batch = make_batch(encoded, idx, pad_id, device)
    logits = logits_of(model, batch, vocab_size)
    m = len(idx)
    mask = batch["loss_mask"]
    lp = L.sequence_logps(L.token_logps(logits, batch["labels"]), mask, lc.length_normalize)
    ref = torch.tensor([refs[i] for i in idx], device=device)
    dpo, st = L.dpo_loss(lp[:m], lp[m:], ref[:, 0], ref[:, 1], lc.dpo_beta)
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
    model.zero_grad_buffer()
    optimizer.zero_grad()
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
    model.finish_grad_sync()
    ok, grad_norm, _ = optimizer.step()
    assert ok, "optimizer step skipped (non-finite gradients)"
    out = {f"loss/{k}": distributed.dp_sum(torch.tensor(v)) / totals[k] for k, v in sums.items()}
    out["loss"] = sum(getattr(cfg.loss, WEIGHTS[k]) * out[f"loss/{k}"] for k in WEIGHTS)
    out.update({f"dpo/{k}": distributed.dp_sum(torch.tensor(v)) / totals["dpo"]
                for k, v in stats.items()})
    out["grad_norm"] = float(grad_norm)
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


def run(spec: StageSpec) -> dict[str, Any]:
    cfg = from_dict(DistillConfig, spec.config)
    info = distributed.init(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.seed)
    try:
        return _run(spec, cfg, info)
    finally:
        distributed.teardown()


def _run(spec: StageSpec, cfg: DistillConfig, info) -> dict[str, Any]:
    out, is_rank0, t_start = spec.out, info.rank == 0, time.time()
    if cfg.parallel.pipeline != 1:
        raise ValueError("parallel.pipeline > 1 is not supported by the distill loop yet")
    tok = tokenizer_of_stage(spec.inputs["tokenizer"])
    if spec.inputs.get("teacher_tokenizer"):  # before any work: a mismatch makes the KD meaningless
        why = tokenizer_mismatch(tok, tokenizer_of_stage(spec.inputs["teacher_tokenizer"]))
        if why:
            raise ValueError(f"teacher_tokenizer: the teacher's tokenizer is not the student's: "
                             f"{why}; distillation compares token distributions, so both must "
                             "use one tokenizer")
    vocab = tok.vocab_size
    student_cfg = checkpoint_model(spec.model, read_json(Path(spec.inputs["student"]) / MANIFEST),
                                   cfg.model)
    teacher_cfg = checkpoint_model(spec.model, read_json(Path(spec.inputs["teacher"]) / MANIFEST),
                                   cfg.teacher_model)
    seq_length = student_cfg.seq_length
    logger = MetricLogger(spec, info.rank)
    teacher = load_checkpoint_model(spec.inputs["teacher"], teacher_cfg, vocab)
    for p in teacher.parameters():
        p.requires_grad_(False)
    initial = load_checkpoint_model(spec.inputs["student"], student_cfg, vocab)
    if is_rank0:
        print(f"student {student_cfg.num_layers}x{student_cfg.hidden_size}, teacher "
              f"{teacher_cfg.num_layers}x{teacher_cfg.hidden_size}", flush=True)

    # 1. pairs
    pairs_file = out / "pairs.jsonl"
    if pairs_file.exists():
        pairs = [Pair(**json.loads(line)) for line in pairs_file.read_text().splitlines()]
    else:
        t0 = time.time()
        pairs = build_pairs(spec, cfg, tok, initial, teacher, info)
        if is_rank0:
            write_jsonl_atomic(pairs_file, [dataclasses.asdict(p) for p in pairs])
        distributed.barrier()
        logger.log(0, {"pairs/sampling_s": time.time() - t0})
    kept = [p for p in pairs if p.kept]
    train, held = split_heldout(kept, [p.id for p in kept], cfg.heldout_pairs)
    pair_stats = {"pairs/sampled": len(pairs), "pairs/kept": len(kept),
                  "pairs/kept_fraction": len(kept) / len(pairs),
                  "pairs/teacher_score": float(np.mean([np.mean(p.teacher_scores) for p in pairs])),
                  "pairs/student_score": float(np.mean([np.mean(p.student_scores) for p in pairs])),
                  "pairs/train": len(train), "pairs/heldout": len(held)}
    logger.log(0, pair_stats)
    if is_rank0:
        print(" | ".join(f"{k.split('/')[1]} {v:.3g}" for k, v in pair_stats.items()), flush=True)
        logger.artifact(pairs_file)
    per_step = cfg.global_batch_size
    if per_step % (cfg.micro_batch_size * info.dp_size):
        raise ValueError(f"global_batch_size ({per_step}) must be a multiple of micro_batch_size "
                         f"({cfg.micro_batch_size}) x data-parallel size ({info.dp_size})")
    order, epoch_of = data_order(len(train), cfg)
    total_steps = len(order) // per_step
    if total_steps < 1:
        raise ValueError(f"filter: {len(train)} training pairs kept (of {len(pairs)} sampled) make "
                         f"less than one step of global_batch_size {per_step}; sample more prompts "
                         "or loosen the filter")
    encoded = [encode_pair(tok, p, seq_length) for p in train + held]
    held_idx = list(range(len(train), len(train) + len(held)))

    # 2. reference log-probs (and the teacher's top-k), once
    refs_file = out / "reference_logps.json"
    if not refs_file.exists():
        refs = reference_logps(initial, encoded, tok.pad_id, vocab, cfg.loss.length_normalize,
                               cfg.micro_batch_size, info.device)
        if is_rank0:
            write_json_atomic(refs_file, refs)
        distributed.barrier()
    refs = json.loads(refs_file.read_text())
    del initial
    if cfg.loss.teacher_topk:
        if read_teacher_topk(out) is None and is_rank0:
            write_teacher_topk(teacher, encoded, tok.pad_id, vocab, cfg.loss.teacher_topk,
                               seq_length, cfg.micro_batch_size, info.device, out)
        distributed.barrier()
        teacher_view = TeacherLogits(topk=read_teacher_topk(out))
        del teacher  # freed: the cached top-k replaces it
    else:
        teacher_view = TeacherLogits(teacher=teacher)

    # 3. training
    schedule = post_training_schedule(cfg.lr, total_steps, cfg.global_batch_size, seq_length,
                            student_cfg.rotary_base)
    model = build_ddp(build_model(student_cfg, vocab, seq_length))
    optimizer = build_optimizer(model, cfg.optimizer, schedule)
    ckpt_root = out / "checkpoints"
    state = ckpt.resume_or_start(ckpt_root, model, optimizer, spec.inputs["student"],
                                 {"step": 0, "heldout": {}, "last": {}, "seconds": 0.0})
    step = state["step"]
    scheduler = build_scheduler(optimizer, schedule, cfg.optimizer.weight_decay, step)
    args = (encoded, refs)
    if step == 0 and held_idx:
        state["heldout"]["0"] = heldout_metrics(model, teacher_view, *args, held_idx, cfg,
                                                tok.pad_id, vocab, info)
        logger.log(0, state["heldout"]["0"])
    if is_rank0:
        print(f"{len(train)} training pairs, {len(held)} held out; {cfg.epochs} epochs -> "
              f"{total_steps} steps", flush=True)
    t_loop, first_step = time.time(), step
    while step < total_steps:
        idx = order[step * per_step:(step + 1) * per_step][info.dp_rank::info.dp_size]
        lr = current_lr(optimizer)
        t_step = time.time()
        metrics = train_step(model, optimizer, teacher_view, *args, idx, cfg, tok.pad_id, vocab,
                             info)
        metrics.update(lr=lr, step_s=distributed.all_max(time.time() - t_step),  # ranks agree
                       epoch=epoch_of[step * per_step])
        scheduler.step(1)
        step += 1
        state["last"] = metrics
        logger.log(step - 1, metrics)
        if is_rank0 and (step % cfg.log_every == 0 or step == total_steps):
            eta = (time.time() - t_loop) / (step - first_step) * (total_steps - step)
            print(f"step {step}/{total_steps} | loss {metrics['loss']:.4f} | dpo "
                  f"{metrics['loss/dpo']:.4f} | kd+ {metrics['loss/positive_kd']:.4f} | kd- "
                  f"{metrics['loss/negative_kd']:.4f} | acc {metrics['dpo/accuracy']:.2f} | "
                  f"{metrics['step_s'] * 1000:.0f} ms/step | ETA {eta:,.0f}s", flush=True)
        epoch_done = step == total_steps or epoch_of[step * per_step] != epoch_of[(step - 1) * per_step]
        if epoch_done and held_idx:
            h = heldout_metrics(model, teacher_view, *args, held_idx, cfg, tok.pad_id, vocab, info)
            state["heldout"][str(epoch_of[(step - 1) * per_step] + 1)] = h
            logger.log(step - 1, h)
            if is_rank0:
                print("held out: " + " | ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in h.items()),
                      flush=True)
        state["scheduler_steps"] = scheduler.num_steps
        t_start = ckpt.save_at_step_end(ckpt_root, step, total_steps,
                                        step % cfg.checkpoint_every == 0, model, optimizer, state,
                                        cfg.keep_checkpoints, logger, t_start)
    logger.close()
    return {"final_step": step, "final": state["last"], "heldout": state["heldout"],
            **{k.replace("/", "_"): v for k, v in pair_stats.items()},
            "pairs": str(pairs_file.resolve()), "checkpoint": str(ckpt.step_dir(ckpt_root, step)),
            "params_sha256": params_sha256(model), "model": dataclasses.asdict(student_cfg),
            "teacher_model": dataclasses.asdict(teacher_cfg), "seconds": state["seconds"]}


if __name__ == "__main__":
    job.main(run)
