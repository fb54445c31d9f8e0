"""The `postnas` stage: Jet-Nemotron's PostNAS (arXiv 2508.15884) on a pretrained model.

    python -m stages.postnas --spec <output_dir>/spec.json

1. Super-network: the `init` model with, beside every layer's attention, a linear-attention block
   initialised from it (stages.engine.hybrid). Only the linear blocks train: MLPs, embeddings,
   norms and the attention stay as pretrained, so an all-full path is the original model exactly.
2. Each step samples a path per layer (linear with `linear_probability`) and distils that
   sub-network from the frozen original: forward KL per token on windows of `data`'s tokens.
   Checkpoints under <out>/super/checkpoints; resumable like every training stage (bitwise on CPU:
   the paths and windows of a step are drawn from (seed, step)).
3. Scoring (per task, stages.engine.layout_scoring) of: all-linear, all-full, each layer kept full
   alone (the importance table), then a beam search adding one full layer per round up to
   `keep_full` (stages.engine.layout_search), checked against trying every placement when there
   are at most 128.
4. The hybrid of the chosen layout (model config `layout`) is written to <out>/checkpoints, where
   `init:` of sft/rl/eval finds it; its architecture goes into the manifest's `model`.
MLflow: step metrics, the importance table and plot, the beam trace, the chosen layout, KV-cache
bytes per token of the hybrid vs the original.
"""

from __future__ import annotations

import dataclasses
import math
import time
from math import comb
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_recipes.config_fields import from_dict
from data_recipes.recall import recall_examples
from schedulers.post_training import post_training_schedule
from stages.configs.model import kv_cache_bytes_per_token
from stages.configs.postnas import PostNASConfig
from stages.contract import MANIFEST, StageSpec, read_json, write_json_atomic
from stages.engine import checkpoint as ckpt
from stages.engine import distributed, job
from stages.engine.hf.importer import save_weights
from stages.engine.hybrid import SUPER, base_into_super, hybrid_state_dict, set_paths
from stages.engine.layout_scoring import (TokenWindows, causal_logits, mean_loss, plot_importance,
                                          recall_accuracy, recall_batch)
from stages.engine.layout_search import (Layout, Scores, beam_search, exhaustive_search,
                                         importance_table, layout_kinds, worst_placement)
from stages.engine.losses import token_divergence
from stages.engine.model import build_model, unwrap
from stages.engine.optim import (build_ddp, build_optimizer, build_scheduler, check_memory_savers,
                                 current_lr)
from stages.engine.progress import Progress
from stages.engine.tokenizer import tokenizer_of_stage
from stages.engine.tracking import MetricLogger
from stages.engine.training import Trainer, check_batch_split, job_world, optimizer_step, zero_grad

EXHAUSTIVE_LIMIT = 128
"""Placements up to which the beam search is checked against trying them all."""


def build_networks(spec: StageSpec, cfg: PostNASConfig, model_cfg, vocab_size: int):
    """The frozen original (teacher) and the super-network initialised from it, only its linear
    blocks trainable, in Megatron DDP."""
    teacher = build_model(model_cfg, vocab_size, model_cfg.seq_length)
    ckpt.load_model_weights_only(spec.inputs["init"], teacher)
    teacher.eval().requires_grad_(False)
    supernet = build_model(model_cfg, vocab_size, model_cfg.seq_length, cfg.memory,
                           layout=[SUPER] * model_cfg.num_layers)
    base_into_super(teacher.state_dict(), supernet)
    for name, p in supernet.named_parameters():
        p.requires_grad_(".self_attention.linear." in name)
    return teacher, build_ddp(supernet, cfg.memory)


def step_draws(cfg: PostNASConfig, step: int, num_layers: int, windows: TokenWindows):
    """The paths and token windows of training step `step` (from (seed, step) alone)."""
    rng = np.random.default_rng([cfg.seed, 17, step])
    paths = ["linear" if rng.random() < cfg.linear_probability else "full"
             for _ in range(num_layers)]
    if "linear" not in paths:  # the all-full path is the frozen original: nothing would train
        paths[int(rng.integers(num_layers))] = "linear"
    return paths, windows.sample(rng, cfg.global_batch_size)


def train_step(model, teacher, optimizer, rows: torch.Tensor, cfg: PostNASConfig, vocab: int,
               info) -> tuple[float, float]:
    """One optimizer step of the sampled sub-network; (KL, grad norm)."""
    mine = rows[info.dp_rank::info.dp_size].to(info.device)
    micro = [mine[i:i + cfg.micro_batch_size] for i in range(0, len(mine), cfg.micro_batch_size)]
    zero_grad(model, optimizer)
    total = torch.zeros((), device=info.device)
    for tokens in micro:
        with torch.no_grad():
            target = causal_logits(teacher, tokens)[..., :vocab]
        kl = token_divergence(causal_logits(model, tokens)[..., :vocab], target, "forward_kl",
                              temperature=cfg.temperature).mean()
        (kl / len(micro)).backward()
        total += kl.detach() / len(micro)
    grad_norm = optimizer_step(model, optimizer)
    loss = distributed.dp_sum(total) / info.dp_size
    assert math.isfinite(loss), f"loss is {loss}"
    return loss, grad_norm


def layout_scorer(model, cfg: PostNASConfig, tok, windows: TokenWindows, num_layers: int):
    """{task: score} of a layout (its set of full layers), run on the super-network."""
    examples = recall_examples(cfg.seed + 1, cfg.score_samples, cfg.recall_pairs)
    recall = recall_batch(tok, examples)
    heldout = windows.sample(np.random.default_rng([cfg.seed, 29]), cfg.score_samples)

    def score(full: Layout) -> dict[str, float]:
        set_paths(model, layout_kinds(full, num_layers))
        out = {}
        for task in cfg.tasks:
            if task == "recall":
                out[task] = recall_accuracy(model, *recall, tok.vocab_size)
            else:  # loss: higher is better everywhere, so its negative
                out[task] = -mean_loss(model, heldout, tok.vocab_size)
        return out

    return score


def search(model, cfg: PostNASConfig, tok, windows, num_layers: int, logger, out: Path) -> dict:
    """Importance table, beam search (+ exhaustive check), worst placement; logged to MLflow."""
    model.eval()
    scores = Scores(layout_scorer(model, cfg, tok, windows, num_layers), num_layers)
    table = importance_table(scores)
    chosen, trace = beam_search(scores, cfg.keep_full, cfg.beam)
    result = {"importance": table, "beam_trace": trace, "full_layers": sorted(chosen),
              "all_full": scores.high, "all_linear": scores.low, "chosen": scores.of(chosen)}
    if comb(num_layers, cfg.keep_full) <= EXHAUSTIVE_LIMIT:
        best, worst = exhaustive_search(scores, cfg.keep_full), worst_placement(scores, cfg.keep_full)
        result.update(exhaustive_full_layers=sorted(best), worst_full_layers=sorted(worst),
                      worst=scores.of(worst))
    result["layouts_scored"] = len(scores.seen)
    logger.table(table, "importance.json")
    logger.table([{**r, "full_layers": str(r["full_layers"])} for r in trace], "beam_trace.json")
    if logger.enabled:  # rank 0
        logger.artifact(plot_importance(table, cfg.tasks, out / "importance.png"))
    return result


def run(spec: StageSpec) -> dict[str, Any]:
    cfg = from_dict(PostNASConfig, spec.config)
    with job_world(cfg.parallel, cfg.seed, "postnas") as info:
        # --- setup: the original, the super-network (resumed), the data -----------------------------
        t_start, is_rank0 = time.time(), info.rank == 0
        model_cfg = ckpt.checkpoint_model(spec.model, read_json(Path(spec.inputs["init"]) / MANIFEST),
                                          cfg.model)
        if "linear" in model_cfg.layer_kinds():
            raise ValueError(f"init: {spec.inputs['init']} is already a hybrid; postnas starts "
                             "from a full-attention model")
        cfg.check_layers(model_cfg.num_layers)
        check_batch_split(cfg.global_batch_size, cfg.micro_batch_size, info.dp_size)
        check_memory_savers(cfg.memory, cfg.parallel.tensor)
        tok = tokenizer_of_stage(spec.inputs["tokenizer"])
        windows = TokenWindows(read_json(Path(spec.inputs["data"]) / MANIFEST),
                               model_cfg.seq_length + 1)
        layers = model_cfg.num_layers
        teacher, model = build_networks(spec, cfg, model_cfg, tok.vocab_size)
        schedule = post_training_schedule(cfg.lr, cfg.steps, cfg.global_batch_size,
                                          model_cfg.seq_length, model_cfg.rotary_base)
        optimizer = build_optimizer(model, cfg.optimizer, schedule, cfg.memory)
        root = spec.out / "super" / "checkpoints"
        state = ckpt.resume_or_start(root, model, optimizer, None,
                                     {"step": 0, "loss": None, "seconds": 0.0})
        scheduler = build_scheduler(optimizer, schedule, cfg.optimizer.weight_decay, state["step"])
        trainer = Trainer(model, optimizer, scheduler, state, root, cfg, t_start)
        logger = MetricLogger(spec, info.rank)

        # --- distil the super-network -----------------------------------------------------------------
        step = state["step"]
        progress = Progress(cfg.steps, done=step, every=cfg.log_every, enabled=is_rank0)
        model.train()
        while step < cfg.steps:
            paths, rows = step_draws(cfg, step, layers, windows)
            set_paths(model, paths)
            lr = current_lr(optimizer)
            loss, grad_norm = train_step(model, teacher, optimizer, rows, cfg, tok.vocab_size, info)
            scheduler.step(1)
            step += 1
            state["loss"] = loss
            logger.log(step - 1, {"kl": loss, "lr": lr, "grad_norm": grad_norm,
                                  "linear_layers": paths.count("linear")})
            progress.update(step, f"kl {loss:.4f} | {paths.count('linear')}/{layers} linear")
            trainer.end_step(step, cfg.steps, logger)
        progress.close()

        # --- search, the hybrid checkpoint ---------------------------------------------------------------
        found = search(model, cfg, tok, windows, layers, logger, spec.out)
        layout = layout_kinds(Layout(found["full_layers"]), layers)
        hybrid_cfg = dataclasses.replace(model_cfg, layout=layout)
        hybrid = build_model(hybrid_cfg, tok.vocab_size, hybrid_cfg.seq_length)
        hybrid.load_state_dict(hybrid_state_dict(unwrap(model).state_dict(), layout), strict=True)
        path = ckpt.step_dir(spec.out / "checkpoints", cfg.steps)
        if not (path / ckpt.MARKER).exists():  # a rerun after the save found it written
            save_weights(hybrid, spec.out / "checkpoints", cfg.steps)
        kv = {"kv_bytes_per_token_original": kv_cache_bytes_per_token(model_cfg),
              "kv_bytes_per_token_hybrid": kv_cache_bytes_per_token(hybrid_cfg)}
        logger.log(cfg.steps, {**{f"chosen/{t}": v for t, v in found["chosen"].items()}, **kv})
        logger.table([{"layer": i, "kind": k} for i, k in enumerate(layout)], "layout.json")
        logger.close()
        return {"final_step": step, "final_kl": state["loss"], "layout": layout, **found, **kv,
                "checkpoint": str(path),
                "params_sha256": ckpt.params_sha256(hybrid),
                "model": dataclasses.asdict(hybrid_cfg), "seconds": state["seconds"]}


if __name__ == "__main__":
    job.main(run)
