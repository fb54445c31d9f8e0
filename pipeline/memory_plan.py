"""Per-GPU memory of every training stage, before anything is submitted (`pipeline plan`, validation).

    plan = stage_memory(recipe, "pretrain")     # None for a stage that trains nothing on GPUs
    print("\n".join(plan.lines()))              # the breakdown, GB per GPU
    plan.problem()                              # None, or why it will not fit and what would help

The arithmetic (bytes per GPU; P = parameters, t/d/c = tensor/data/context parallel sizes, s/b =
sequence length and micro-batch):
- weights: bf16, 2P/t; gradients: Megatron DDP's buffer, fp32 4P/t (bf16 2P/t with
  grad_reduce_in_bf16); optimizer: fp32 main params + two Adam moments, 12P/t, divided by d·c with
  the distributed optimizer, less the share offloaded to CPU.
- activations of the backward pass, per layer and token, bf16 (Korthikanti et al. 2022, table 2,
  for our SwiGLU/GQA/RMSNorm layer): 8h (two norm inputs, two linear inputs; split over t only
  with sequence parallel) + 4q + 4kv (Q, K, V, attention output) + 8f (SwiGLU's gate/up outputs,
  SiLU output, product) split over t; + 5·heads·s when attention scores are stored (no fused
  attention and no recompute); dropout masks when dropout is on. Full recompute keeps only each
  recomputed layer's input (2h) and rebuilds one layer at a time. The output layer holds
  bf16 logits and their fp32 copy for the loss (6V/t per token). Divided over c ranks (each
  holds s/c of the sequence).
- KV cache of rollouts and sampling: 2 (K and V) · layers · kv heads · head_dim · batch · length
  · 2 bytes / t; it replaces the training activations while sampling (they are not alive at once).
- a DPD teacher held in the job (teacher_topk 0): its bf16 weights and its logits for a micro-batch;
  an RL judge checkpoint (reward.judge.kind engine): its bf16 weights.
Megatron-LM's `report_theoretical_memory` counts weights + optimizer the same way (18 or
6 + 12/d bytes per parameter) and activations with its GPT layer formula; tests/test_memory_plan.py
compares the two, and the README's "GPU cluster" section says where and why they differ.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field

from omegaconf import OmegaConf

from pipeline.graph import stage_launcher, stage_model
from pipeline.recipe import Recipe
from stages.configs.base import MemoryConfig, TrainingConfig
from stages.configs.hf import read_hf_config
from stages.configs.model import ModelConfig, num_params, padded_vocab_size
from stages.configs.post_training import DistillConfig, SFTConfig
from stages.configs.pretrain import PretrainConfig
from stages.configs.rl import RLConfig

GB = 1e9
BF16, FP32 = 2, 4


@dataclass
class Shape:
    """What one training stage holds on one GPU: the model, the parallel layout, the batch."""

    model: ModelConfig
    vocab: int
    tensor: int
    data: int
    context: int
    micro_batch: int
    seq_length: int
    memory: MemoryConfig
    fused_attention: bool
    """TransformerEngine's fused/flash attention: no s² scores stored."""


def weights_grads_optimizer(shape: Shape) -> dict[str, float]:
    """Bytes per GPU of the bf16 weights, the grad buffer and the optimizer states."""
    mem = shape.memory
    params = num_params(shape.model, shape.vocab) / shape.tensor
    optimizer = 3 * FP32 * params  # fp32 main params, exp_avg, exp_avg_sq
    if mem.distributed_optimizer:
        optimizer /= shape.data * shape.context
    if mem.optimizer_cpu_offload:
        optimizer *= 1 - mem.optimizer_offload_fraction
    grads = (BF16 if mem.grad_reduce_in_bf16 else FP32) * params
    return {"weights": BF16 * params, "gradients": grads, "optimizer states": optimizer}


def layer_activation_bytes(shape: Shape, scores_stored: bool) -> float:
    """Bytes one transformer layer keeps for backward, per GPU, with no recompute."""
    m = shape.model
    head_dim = m.head_dim or m.hidden_size // m.num_attention_heads
    q, kv = m.num_attention_heads * head_dim, m.num_query_groups * head_dim
    f, h = m.ffn_hidden_size, m.hidden_size
    t = shape.tensor
    tokens = shape.micro_batch * shape.seq_length / shape.context
    replicated = 4 * BF16 * h + (2 * h if m.hidden_dropout else 0)  # 1-byte masks
    split = BF16 * (2 * q + 2 * kv) + BF16 * 4 * f
    if scores_stored:  # softmax input and output (bf16) + dropout mask over heads × keys
        split += ((2 * BF16 + (1 if m.attention_dropout else 0)) * m.num_attention_heads
                  * shape.seq_length / shape.context)
    per_token = replicated / (t if shape.memory.sequence_parallel else 1) + split / t
    return tokens * per_token


def activations(shape: Shape) -> float:
    """Bytes per GPU of the activations of one micro-batch's forward, kept for its backward."""
    mem, m = shape.memory, shape.model
    layers = m.num_layers
    stored_scores = not shape.fused_attention and mem.recompute == "none"
    full = layer_activation_bytes(shape, stored_scores)
    tokens = shape.micro_batch * shape.seq_length / shape.context
    if mem.recompute == "full":
        recomputed = mem.recompute_num_layers or layers
        layer_input = tokens * BF16 * m.hidden_size / (shape.tensor if mem.sequence_parallel else 1)
        # the recomputed layers keep their inputs; one of them is rebuilt at a time in backward
        kept = recomputed * layer_input + (layers - recomputed) * full
        kept += layer_activation_bytes(shape, not shape.fused_attention)
    else:
        kept = layers * full
        if not shape.fused_attention and mem.recompute == "selective":
            kept += layer_activation_bytes(shape, True) - full  # one layer's scores, transiently
    vocab = padded_vocab_size(shape.vocab, m)
    output = tokens * (BF16 * m.hidden_size + (BF16 + FP32) * vocab / shape.tensor)
    return kept + output + tokens * 8  # + the token ids (int64)


def kv_cache(model: ModelConfig, batch: int, length: int, tensor: int) -> float:
    head_dim = model.head_dim or model.hidden_size // model.num_attention_heads
    return 2 * model.num_layers * model.num_query_groups * head_dim * batch * length * BF16 / tensor


@dataclass
class MemoryPlan:
    stage: str
    shape: Shape
    gpus: int
    budget_gb: float
    parts: dict[str, float]
    """Bytes per GPU held through the whole job (weights, grads, optimizer, a held teacher)."""
    peaks: dict[str, float]
    """Bytes per GPU of the phases that take turns (training activations, rollout KV cache)."""
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.parts.values()) + max(self.peaks.values(), default=0.0)

    def lines(self) -> list[str]:
        s = self.shape
        head = (f"memory per GPU: {self.total / GB:.1f} GB" +
                (f" of {self.budget_gb:g} GB" + ("" if self.fits else " - DOES NOT FIT")
                 if self.budget_gb else " (no launcher.gpu_memory_gb to check it against)") +
                f"; {self.gpus} GPU(s): TP {s.tensor} x DP {s.data} x CP {s.context}, micro batch "
                f"{s.micro_batch} x seq {s.seq_length}")
        parts = ", ".join(f"{k} {v / GB:.2f}" for k, v in {**self.parts, **self.peaks}.items())
        turns = f"; {' and '.join(self.peaks)} take turns" if len(self.peaks) > 1 else ""
        return [head, f"  {parts} (GB{turns})"] + \
            [f"  {note}" for note in self.notes]

    @property
    def fits(self) -> bool:
        return not self.budget_gb or self.total <= self.budget_gb * GB

    def problem(self) -> str | None:
        if self.fits:
            return None
        breakdown = ", ".join(f"{k} {v / GB:.1f}" for k, v in {**self.parts, **self.peaks}.items())
        return (f"needs {self.total / GB:.1f} GB per GPU, launcher.gpu_memory_gb is "
                f"{self.budget_gb:g} ({breakdown} GB); {self.hint()}")

    def hint(self) -> str:
        """The memory savers that make it fit, tried in the order one would turn them on: at each
        round one that fits ends the search, else the one that saves the most is kept."""
        chosen: list[str] = []
        plan = self
        for _ in range(6):
            best = None
            for key, shape in _candidates(plan):
                trial = dataclasses.replace(plan, shape=shape)
                trial.parts, trial.peaks = _breakdown(shape, self.extra)
                if trial.fits:
                    return f"{' and '.join(chosen + [key])} would make it fit ({trial.total / GB:.1f} GB)"
                if trial.total < plan.total and (best is None or trial.total < best[1].total):
                    best = (key, trial)
            if best is None:
                break
            chosen.append(best[0])
            plan = best[1]
        tried = f"even with {' and '.join(chosen)} ({plan.total / GB:.1f} GB); " if chosen else ""
        return f"{tried}more GPUs per replica (parallel.tensor) or a larger GPU"

    extra: dict = field(default_factory=dict, repr=False)


def _candidates(plan: MemoryPlan):
    s, mem = plan.shape, plan.shape.memory

    def with_memory(**kw):
        return dataclasses.replace(s, memory=dataclasses.replace(mem, **kw))

    if not mem.distributed_optimizer and s.data * s.context > 1:
        yield "memory.distributed_optimizer: true", with_memory(distributed_optimizer=True)
    if mem.recompute == "none":
        yield "memory.recompute: selective", with_memory(recompute="selective")
    if mem.recompute != "full" or mem.recompute_num_layers:
        yield "memory.recompute: full", with_memory(recompute="full", recompute_num_layers=0)
    if not mem.grad_reduce_in_bf16:
        yield "memory.grad_reduce_in_bf16: true", with_memory(grad_reduce_in_bf16=True)
    if not mem.optimizer_cpu_offload or mem.optimizer_offload_fraction < 1:
        yield ("memory.optimizer_cpu_offload: true (distributed_optimizer: true, "
               "optimizer_offload_fraction: 1)",
               with_memory(distributed_optimizer=True, optimizer_cpu_offload=True,
                           optimizer_offload_fraction=1.0))
    if s.micro_batch > 1:
        yield "micro_batch_size: 1", dataclasses.replace(s, micro_batch=1)
    if s.tensor > 1 and not mem.sequence_parallel:
        yield "memory.sequence_parallel: true", with_memory(sequence_parallel=True)


def _breakdown(shape: Shape, extra: dict) -> tuple[dict[str, float], dict[str, float]]:
    parts = weights_grads_optimizer(shape)
    peaks = {"activations": activations(shape)}
    if extra.get("teacher"):
        teacher, = extra["teacher"]
        parts["teacher"] = BF16 * num_params(teacher, shape.vocab) / shape.tensor
        peaks["activations"] += shape.micro_batch * shape.seq_length / shape.context * FP32 * \
            padded_vocab_size(shape.vocab, teacher) / shape.tensor  # its logits, fp32
    for label, model in extra.get("held", []):  # frozen models kept in the job (bf16 weights)
        parts[label] = BF16 * num_params(model, shape.vocab) / shape.tensor
    if extra.get("kv"):
        peaks["rollout KV cache"] = sum(kv_cache(m, b, n, shape.tensor) for m, b, n in extra["kv"])
    return parts, peaks


def fused_attention_available() -> bool:
    """TransformerEngine installed where the plan runs (then the jobs use its fused attention)."""
    return importlib.util.find_spec("transformer_engine") is not None


def stage_vocab(recipe: Recipe, cfg: TrainingConfig) -> int:
    tok = recipe.stages[cfg.tokenizer]
    return read_hf_config(tok.path)[1] if tok.kind == "import" else tok.vocab_size


def stage_memory(recipe: Recipe, name: str) -> MemoryPlan | None:
    """The memory plan of training stage `name` on its launcher's GPUs (None: not a training stage,
    or a CPU launcher)."""
    cfg = recipe.stages[name]
    launcher = stage_launcher(recipe, cfg)
    if not isinstance(cfg, TrainingConfig) or not launcher.gpus_per_node:
        return None
    model = stage_model(recipe, cfg)
    gpus = launcher.nodes * launcher.gpus_per_node
    mem = cfg.memory
    per_replica = cfg.parallel.tensor * cfg.parallel.pipeline * mem.context_parallel
    fused = recipe.plan.fused_attention
    if fused is None:
        fused = fused_attention_available()
        where = "TransformerEngine is installed here" if fused else "no TransformerEngine here"
    else:
        where = "the recipe's plan.fused_attention"
    extra: dict = {}
    notes = [f"attention: fused ({where})" if fused else
             f"attention: scores stored per layer unless recomputed ({where}; set "
             "plan.fused_attention if the jobs' environment differs)"]
    if isinstance(cfg, PretrainConfig):
        seq = max([p.seq_length or model.seq_length for p in cfg.phases] or [model.seq_length])
        micro = cfg.micro_batch_size
        if seq != model.seq_length:
            notes.append(f"activations at the longest phase's sequence ({seq})")
    elif isinstance(cfg, (SFTConfig, DistillConfig)):
        seq, micro = model.seq_length, cfg.micro_batch_size
    elif isinstance(cfg, RLConfig):
        seq = model.seq_length
        micro = max([s.grpo.micro_batch_size for s in cfg.substages] or [1])
        extra["kv"] = [(model, cfg.rollout_batch_size, seq)]
        judged = [s for s in cfg.substages
                  if s.reward.kind == "judge" and getattr(s.reward.judge, "kind", "") == "engine"]
        if judged and isinstance(cfg.judge, str) and cfg.judge in recipe.stages:
            extra["held"] = [("judge", stage_model(recipe, recipe.stages[cfg.judge]))]
            notes.append("the judge checkpoint is held in the job (reward.judge.kind: engine)")
        notes.append(f"rollouts: {cfg.rollout_batch_size} sequences of up to {seq} tokens "
                     "(prompt + answer)")
    else:
        return None
    if isinstance(cfg, DistillConfig):
        teacher_cfg = recipe.stages.get(cfg.teacher) if isinstance(cfg.teacher, str) else None
        if teacher_cfg is not None:
            teacher = stage_model(recipe, teacher_cfg)
            if cfg.teacher_model:
                teacher = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(teacher),
                                                              cfg.teacher_model))
            if cfg.loss.teacher_topk == 0:
                extra["teacher"] = (teacher,)
                notes.append("the DPD teacher is held through training (loss.teacher_topk: 0)")
            extra["kv"] = [(model, cfg.sample_batch_size, seq), (teacher, cfg.sample_batch_size, seq)]
    shape = Shape(model=model, vocab=stage_vocab(recipe, cfg), tensor=cfg.parallel.tensor,
                  data=max(1, gpus // per_replica), context=mem.context_parallel,
                  micro_batch=micro, seq_length=seq, memory=mem, fused_attention=fused)
    parts, peaks = _breakdown(shape, extra)
    return MemoryPlan(name, shape, gpus, launcher.gpu_memory_gb, parts, peaks, notes, extra)


def memory_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """(key, message) for every training stage that cannot fit its GPUs, or asks for a memory
    saver its parallel layout cannot use."""
    problems = []
    for name, cfg in recipe.stages.items():
        if not isinstance(cfg, TrainingConfig):
            continue
        if cfg.memory.sequence_parallel and cfg.parallel.tensor == 1:
            problems.append((f"stages.{name}.memory.sequence_parallel",
                             "needs parallel.tensor > 1 (it splits the tensor-parallel ranks' "
                             "activations along the sequence)"))
        if not stage_launcher(recipe, cfg).gpu_memory_gb:
            continue  # nothing to check against
        plan = stage_memory(recipe, name)
        why = plan.problem() if plan else None
        if why:
            problems.append((f"stages.{name}.memory", why))
    return problems
