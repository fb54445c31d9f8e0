"""The `rl` stage: one GRPO sub-stage with verifiable (or judged) rewards.

    python -m stages.rl --spec <output_dir>/spec.json

The recipe loader expands an `rl` stage into one stage per sub-stage (pipeline.recipe), so this job
always runs exactly one: stem, then code, then align, each from the previous one's checkpoint.

1. Pass-rate filter: the starting checkpoint samples `filter.samples` answers per prompt; only
   prompts it solves sometimes (min_pass < rate < max_pass) are kept: the others give every
   sample of a group the same reward, hence zero advantage and no gradient. Saved (filter.jsonl).
2. GRPO, colocated (rollouts and training in this job, from the same weights): each step samples
   `group_size` answers for `prompts_per_step` prompts with the KV cache (stages.engine.generate),
   scores them, normalises rewards within each group, then takes `updates_per_batch` optimizer
   steps of the clipped loss (stages.engine.losses). Samples cut at max_new_tokens are masked out.
   Every rollout and its reward goes to rollouts.jsonl (an MLflow artifact).

Resume is bitwise: rollout k is sampled with seed + k from the restored weights, and rewards are
pure functions of the text. For GPU clusters the rollout engine is the weak point (no paged
attention, no continuous batching); the path is an OpenAI-compatible vLLM/SGLang server that
reloads our checkpoint after each step (the generator interface already speaks that protocol).
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
from data_recipes.chat import final_text
from data_recipes.config_fields import from_dict
from data_recipes.rewards import Task, build_reward, load_tasks
from schedulers.post_training import post_training_schedule
from stages.configs.rl import RLConfig
from stages.contract import MANIFEST, StageSpec, read_json, write_jsonl_atomic
from stages.engine import checkpoint as ckpt
from stages.engine import distributed, job
from stages.engine.checkpoint import checkpoint_model, params_sha256
from stages.engine.generate import (EngineGenerator, SamplingConfig, generate,
                                    load_checkpoint_model)
from stages.engine.losses import (grpo_loss, group_advantages, logits_of, masked_mean,
                                  token_entropy, token_logps)
from stages.engine.model import unwrap
from stages.engine.optim import current_lr
from stages.engine.progress import Progress
from stages.engine.tokenizer import tokenizer_of_stage
from stages.engine.tool_rollout import Rollouts, build_tool_loop, tool_rollouts
from stages.engine.tracking import MetricLogger
from stages.engine.training import job_world, optimizer_step, start_training, zero_grad


class Policy:
    """The policy's sampling in the recipe's prompt format. Prompt encoding, stop ids and decoding
    are the one generator's (stages.engine.generate.EngineGenerator, as eval samples); the seeding
    is RL's: batch i of a call samples from seed + i. `progress`, when set, advances per batch."""

    def __init__(self, model, tok, cfg: RLConfig, batch_size: int):
        self.gen = EngineGenerator(model, tok, cfg)
        self.cfg, self.batch_size = cfg, batch_size
        self.progress: Progress | None = None
        self.tools = None  # a ToolLoop (stages.engine.tool_rollout): multi-turn rollouts

    def encode(self, task) -> list[int]:
        """A task's conversation (its system prompt and earlier turns too) as prompt ids."""
        return self.gen.encode(task.chat())

    def sample(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[int]]:
        """New tokens of each prompt, batched; batch i uses seed + i (reproducible)."""
        out = []
        for i in range(0, len(prompts), self.batch_size):
            s = dataclasses.replace(sampling, seed=sampling.seed + i)
            out += generate(self.gen.model, prompts[i:i + self.batch_size], s, self.gen.stop_ids,
                            self.gen.tok.vocab_size)
            if self.progress is not None:
                self.progress.update(len(out))
        return out

    def final_text(self, new: list[int]) -> str:
        """What a reward sees: the answer without the thinking block, cut at a stop string."""
        return final_text(self.gen.decode(new), self.cfg.prompt_format)  # scored as eval scores it

    def truncated(self, new: list[int], max_new: int) -> bool:
        return len(new) >= max_new and new[-1] not in self.gen.stop_ids


# --- 1. the pass-rate filter -------------------------------------------------------------------


def pass_rate_filter(policy: Policy, tasks: list[Task], reward, sub, seed: int) -> list[dict]:
    """Each task's pass rate over `filter.samples` answers and whether it is kept."""
    f, g = sub.filter, sub.grpo
    if getattr(policy, "tools", None) is not None:
        rewards = tool_rollouts(policy, reward, tasks, g, seed, f.samples).rewards
    else:
        prompts = [policy.encode(t) for t in tasks for _ in range(f.samples)]
        new = policy.sample(prompts, SamplingConfig(g.temperature, g.top_p, g.max_new_tokens,
                                                    seed))
        rewards = reward.score(tasks, [policy.final_text(n) for n in new], f.samples)
    rows = []
    for k, t in enumerate(tasks):
        # a judge's win rate is relative, not a pass: count a sample as passed when it won most
        rate = float(np.mean([r > 0.5 for r in rewards[k * f.samples:(k + 1) * f.samples]]))
        rows.append({"id": t.id, "prompt": t.prompt, "pass_rate": rate,
                     "kept": f.min_pass < rate < f.max_pass})
    return rows


# --- 2. GRPO --------------------------------------------------------------------------------------


def make_batch(rows: list[tuple], pad_id: int, device):
    """(prompt ids, new ids, trained?[, mask over new ids]) rows -> right-padded tokens/labels/
    response mask (a tool rollout's observation tokens: mask 0)."""
    n = max(len(r[0]) + len(r[1]) for r in rows) - 1
    tokens = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.bool)
    for i, (p, r, trained, *rmask) in enumerate(rows):
        ids = p + r
        tokens[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        labels[i, :len(ids) - 1] = torch.tensor(ids[1:])
        mask[i, len(p) - 1:len(ids) - 1] = (  # positions predicting the response tokens
            torch.tensor(rmask[0], dtype=torch.bool) & trained if rmask and rmask[0] is not None
            else trained)
    return {"tokens": tokens.to(device), "labels": labels.to(device), "mask": mask.to(device),
            "position_ids": torch.arange(n, device=device).unsqueeze(0).expand(len(rows), -1),
            "attention_mask": torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool,
                                                    device=device), diagonal=1)}


def forward_logps(model, batch, vocab_size: int, entropy: bool = False):
    logits = logits_of(model, batch, vocab_size)
    lp = token_logps(logits, batch["labels"])
    return lp, (token_entropy(logits.detach()) if entropy else None)


def grpo_update(model, optimizer, scheduler, rows, advantages: torch.Tensor, sub, pad_id: int,
                vocab_size: int, info) -> dict[str, float]:
    """`updates_per_batch` optimizer steps on one rollout batch (this rank's rows)."""
    g = sub.grpo
    micro = [list(range(i, min(i + g.micro_batch_size, len(rows))))
             for i in range(0, len(rows), g.micro_batch_size)]
    batches = [make_batch([rows[i] for i in m], pad_id, info.device) for m in micro]
    tokens = distributed.dp_sum(torch.tensor(float(sum(int(b["mask"].sum()) for b in batches))))
    seqs = distributed.dp_sum(torch.tensor(float(sum(r[2] for r in rows))))
    normalizer = max(tokens if g.aggregation == "token" else seqs, 1.0)
    with torch.no_grad():  # the rollout policy's log-probs: the ratio's denominator
        old = [forward_logps(model, b, vocab_size)[0] for b in batches]
    stats: dict[str, float] = {}
    for u in range(g.updates_per_batch):
        zero_grad(model, optimizer)
        acc = {"pg_loss": 0.0, "clip_frac": 0.0, "ratio_mean": 0.0, "approx_kl": 0.0,
               "entropy": 0.0}
        for m, b, old_lp in zip(micro, batches, old):
            lp, ent = forward_logps(model, b, vocab_size, entropy=u == 0)
            loss, st = grpo_loss(lp, old_lp, advantages[m], b["mask"], g.eps_low, g.eps_high,
                                 g.aggregation, normalizer=normalizer)
            (loss * info.dp_size).backward()  # DDP averages; the normalizer is global
            w = float(b["mask"].sum()) / max(tokens, 1.0)  # token-weighted means of the stats
            acc["pg_loss"] += float(st["pg_loss"])  # already over the global normalizer
            for k in ("clip_frac", "ratio_mean", "approx_kl"):
                acc[k] += float(st[k]) * w
            if ent is not None:
                acc["entropy"] += float(masked_mean(ent, b["mask"])) * w
        grad_norm = optimizer_step(model, optimizer)
        scheduler.step(1)
        if u == 0:
            stats["entropy"] = distributed.dp_sum(torch.tensor(acc["entropy"]))
        stats.update({k: distributed.dp_sum(torch.tensor(acc[k])) for k in
                      ("pg_loss", "clip_frac", "ratio_mean", "approx_kl")})
        stats["grad_norm"] = grad_norm
    stats["trained_tokens"] = tokens
    assert math.isfinite(stats["pg_loss"]), f"loss is {stats['pg_loss']}"
    return stats


def step_tasks(kept: list[Task], step: int, per_step: int, seed: int) -> list[Task]:
    """The prompts of rollout step `step`: passes over the kept prompts, reshuffled each pass."""
    out, epoch = [], (step * per_step) // len(kept)
    start = (step * per_step) % len(kept)
    while len(out) < per_step:
        order = np.random.default_rng([seed, epoch]).permutation(len(kept))
        out += [kept[i] for i in order[start:start + per_step - len(out)]]
        epoch, start = epoch + 1, 0
    return out


def build_judge(spec: StageSpec, sub, tok):
    """The judge of `reward.kind: judge`: a checkpoint stage (engine) or a generator backend."""
    if sub.reward.kind != "judge":
        return None
    jc = sub.reward.judge
    if jc.kind != "engine":
        return build_generator(jc, spec.out / "http_cache-judge.jsonl")
    if not spec.inputs.get("judge"):
        raise ValueError("judge: reward.judge.kind engine needs the rl stage's `judge` "
                         "checkpoint stage")
    jcfg = checkpoint_model(spec.model, read_json(Path(spec.inputs["judge"]) / MANIFEST), None)
    return EngineGenerator(load_checkpoint_model(spec.inputs["judge"], jcfg, tok.vocab_size), tok,
                           jc)


def filtered_tasks(policy: Policy, tasks: list[Task], reward, sub, seed: int, out: Path, logger,
                   is_rank0: bool) -> tuple[list[Task], dict[str, float]]:
    """The tasks in the learnable band (filtered once with the starting weights, saved in
    filter.jsonl; every rank computes it: same seed) and the filter's statistics."""
    filter_file = out / "filter.jsonl"
    if filter_file.exists():
        rows = [json.loads(line) for line in filter_file.read_text().splitlines()]
    elif sub.filter.enabled:
        t0 = time.time()
        policy.progress = Progress(len(tasks) * sub.filter.samples, f"{sub.name} filter samples",
                                   min_interval_s=30.0, enabled=is_rank0)
        rows = pass_rate_filter(policy, tasks, reward, sub, seed)
        policy.progress.close()
        policy.progress = None
        if is_rank0:
            write_jsonl_atomic(filter_file, rows)
        logger.log(0, {"filter/seconds": time.time() - t0})
    else:
        rows = [{"id": t.id, "prompt": t.prompt, "pass_rate": None, "kept": True} for t in tasks]
    kept_ids = {r["id"] for r in rows if r["kept"]}
    kept = [t for t in tasks if t.id in kept_ids]
    rates = [r["pass_rate"] for r in rows if r["pass_rate"] is not None]
    fstats = {"filter/prompts": len(tasks), "filter/kept": len(kept),
              "filter/dropped_share": 1 - len(kept) / len(tasks),
              "filter/too_hard": sum(r <= sub.filter.min_pass for r in rates),
              "filter/too_easy": sum(r >= sub.filter.max_pass for r in rates),
              "filter/mean_pass_rate": float(np.mean(rates)) if rates else float("nan")}
    logger.log(0, fstats)
    if is_rank0:
        print(f"{sub.name}: pass-rate filter kept {len(kept)}/{len(tasks)} prompts "
              f"({fstats['filter/too_hard']} too hard, {fstats['filter/too_easy']} too easy; mean "
              f"pass rate {fstats['filter/mean_pass_rate']:.2f})", flush=True)
        if filter_file.exists():
            logger.artifact(filter_file)
    return kept, fstats


def rollouts(policy: Policy, reward, mine: list[Task], g, seed: int) -> Rollouts:
    """`group_size` sampled answers to each of this rank's prompts, their texts and rewards."""
    if policy.tools is not None:
        return tool_rollouts(policy, reward, mine, g, seed, g.group_size)
    t0 = time.time()
    prompts = [policy.encode(t) for t in mine for _ in range(g.group_size)]
    new = policy.sample(prompts, SamplingConfig(g.temperature, g.top_p, g.max_new_tokens, seed))
    rollout_s = time.time() - t0
    texts = [policy.final_text(n) for n in new]
    t1 = time.time()
    rewards = reward.score(mine, texts, g.group_size)
    reward_s = time.time() - t1
    truncated = [policy.truncated(n, g.max_new_tokens) for n in new]
    return Rollouts(prompts, new, texts, rewards, truncated, rollout_s, reward_s)


def step_metrics(ro: Rollouts, stats: dict[str, float], lr: float, train_s: float,
                 info) -> dict[str, float]:
    """A step's metrics over all ranks (they go into the checkpoint's common state too)."""
    r = torch.tensor(ro.rewards, dtype=torch.float64)
    n = len(r) * info.dp_size
    mean = distributed.dp_sum(r.sum()) / n
    new_tokens = distributed.dp_sum(torch.tensor(float(sum(len(x) for x in ro.new))))
    rollout_s, reward_s, train_s = (distributed.all_max(t) for t in (ro.rollout_s, ro.reward_s,
                                                                       train_s))
    return {"reward/mean": mean,
            "reward/std": math.sqrt(max(distributed.dp_sum(((r - mean) ** 2).sum()), 0.0)
                                    / max(n - 1, 1)),
            "pass_rate": distributed.dp_sum((r > 0.5).double().sum()) / n,
            "response_length": new_tokens / n,
            "truncated_share": distributed.dp_sum(torch.tensor(float(sum(ro.truncated)))) / n,
            "rollout_s": rollout_s, "reward_s": reward_s, "train_s": train_s,
            "rollout_tokens_per_s": new_tokens / max(rollout_s, 1e-9), "lr": lr,
            "masked_share": 1 - stats["trained_tokens"] / max(new_tokens, 1.0), **stats,
            **{k: distributed.dp_sum(torch.tensor(v)) / n for k, v in ro.tool_sums.items()}}


def write_rollouts(path: Path, step: int, mine: list[Task], ro: Rollouts, adv, tok,
                   group_size: int) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for i, (n, text) in enumerate(zip(ro.new, ro.texts)):
            f.write(json.dumps({"step": step, "prompt": mine[i // group_size].prompt,
                                "response": tok.decode(n), "final": text,
                                "reward": ro.rewards[i], "advantage": float(adv[i]),
                                "truncated": ro.truncated[i]}) + "\n")


def rollouts_file_at(out: Path, rank: int, step: int) -> Path:
    """This rank's rollouts file, without the rows of steps after the checkpoint resumed from
    (a killed run wrote them; they are sampled again)."""
    path = out / ("rollouts.jsonl" if rank == 0 else f"rollouts.rank{rank}.jsonl")
    if path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        write_jsonl_atomic(path, [r for r in rows if r["step"] < step])
    return path


def run(spec: StageSpec) -> dict[str, Any]:
    cfg = from_dict(RLConfig, spec.config)
    with job_world(cfg.parallel, cfg.seed, "rl") as info:
        # --- setup: reward, tasks, the policy resumed (or from `init`), the pass-rate filter ------
        if len(cfg.substages) != 1:
            raise ValueError("substages: an rl job runs one sub-stage (the recipe loader splits "
                             "them)")
        sub, g, out = cfg.substages[0], cfg.substages[0].grpo, spec.out
        is_rank0, t_start = info.rank == 0, time.time()
        tok = tokenizer_of_stage(spec.inputs["tokenizer"])
        model_cfg = checkpoint_model(spec.model, read_json(Path(spec.inputs["init"]) / MANIFEST),
                                     cfg.model)
        seq_length = model_cfg.seq_length
        reward = build_reward(sub.reward, build_judge(spec, sub, tok))
        tasks = load_tasks(sub.prompts)
        if not tasks:
            raise ValueError(f"substages[0].prompts ({sub.name}): the prompt set is empty")
        per_rank = g.prompts_per_step // info.dp_size
        if g.prompts_per_step % info.dp_size:
            raise ValueError(f"grpo.prompts_per_step ({g.prompts_per_step}) must be a multiple of "
                             f"the data-parallel size ({info.dp_size})")
        schedule = post_training_schedule(g.lr, g.steps * g.updates_per_batch,
                                          g.prompts_per_step * g.group_size, seq_length,
                                          model_cfg.rotary_base)
        trainer = start_training(out, cfg, model_cfg, tok.vocab_size, seq_length, schedule,
                                 spec.inputs["init"], {"step": 0, "seconds": 0.0, "last": {}},
                                 started=t_start, updates_per_step=g.updates_per_batch)
        model, optimizer, state = trainer.model, trainer.optimizer, trainer.state
        step = state["step"]
        policy = Policy(unwrap(model), tok, cfg, cfg.rollout_batch_size)
        policy.tools = build_tool_loop(sub, cfg, tok, out, policy.gen.stop_ids)
        logger = MetricLogger(spec, info.rank)
        kept, fstats = filtered_tasks(policy, tasks, reward, sub, cfg.seed + 10 ** 6, out, logger,
                                      is_rank0)
        rollouts_file = rollouts_file_at(out, info.rank, step)
        if not kept:  # nothing in the learnable band: hand the starting weights on, say so loudly
            print(f"{sub.name}: WARNING: no prompt has a pass rate in ({sub.filter.min_pass}, "
                  f"{sub.filter.max_pass}); nothing to train, the checkpoint is passed on "
                  "unchanged", flush=True)
            step = g.steps if step == 0 else step

        # --- the loop: rollouts, rewards, GRPO updates --------------------------------------------
        progress = Progress(g.steps, f"{sub.name} step", done=step, every=cfg.log_every,
                            enabled=is_rank0)
        while step < g.steps:
            mine = step_tasks(kept, step, g.prompts_per_step, cfg.seed)[
                info.dp_rank * per_rank:(info.dp_rank + 1) * per_rank]
            ro = rollouts(policy, reward, mine, g, cfg.seed + 1000 * step + info.dp_rank)
            adv = group_advantages(torch.tensor(ro.rewards).view(len(mine), g.group_size),
                                   g.normalize_std).flatten().to(info.device)
            rows = [(p, n, not (g.mask_truncated and cut), m) for p, n, cut, m in
                    zip(ro.prompts, ro.new, ro.truncated, ro.masks or [None] * len(ro.new))]
            t_train = time.time()
            lr = current_lr(optimizer)
            stats = grpo_update(model, optimizer, trainer.scheduler, rows, adv, sub, tok.pad_id,
                                tok.vocab_size, info)
            train_s = time.time() - t_train
            step += 1
            metrics = step_metrics(ro, stats, lr, train_s, info)
            logger.log(step - 1, metrics)
            state["last"] = metrics
            write_rollouts(rollouts_file, step - 1, mine, ro, adv, tok, g.group_size)
            progress.update(step, f"reward {metrics['reward/mean']:.3f} | pass "
                                  f"{metrics['pass_rate']:.2f} | len "
                                  f"{metrics['response_length']:.0f} | clip "
                                  f"{stats['clip_frac']:.3f} | entropy {stats['entropy']:.3f} | "
                                  f"rollout {metrics['rollout_s']:.1f}s train "
                                  f"{metrics['train_s']:.1f}s")
            trainer.end_step(step, g.steps, logger)

        # --- manifest -----------------------------------------------------------------------------
        progress.close()
        if not ckpt.complete_checkpoints(trainer.ckpt_root):  # no prompt: pass the weights on
            state.update(step=step)
            ckpt.save_checkpoint(trainer.ckpt_root, step, model, optimizer, state,
                                 keep=cfg.keep_checkpoints)
        distributed.barrier()  # every rank's rollouts are written
        if is_rank0:
            for f in sorted(out.glob("rollouts*.jsonl")):
                logger.artifact(f)
        logger.close()
        return {"substage": sub.name, "final_step": step, "final": state["last"],
                **{k.replace("/", "_"): v for k, v in fstats.items()},
                "checkpoint": str(ckpt.step_dir(trainer.ckpt_root, step)),
                "params_sha256": params_sha256(model), "model": dataclasses.asdict(model_cfg),
                "seconds": state["seconds"] + time.time() - trainer.clock}


if __name__ == "__main__":
    job.main(run)
