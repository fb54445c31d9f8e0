"""Token budgets and GPU-hours of the stages after pretraining, for `pipeline plan`.

Before anything runs, what a post-training stage will cost depends on numbers only the data knows
(how many conversations a hub dataset holds, how long answers are). Those are the recipe's `plan:`
assumptions, printed with the estimate:
- training: 6·N FLOPs per trained token (forward + backward), 2·N per token only scored (DPO's
  reference, GRPO's old log-probs), at `plan.mfu` of `plan.gpu_peak_tflops`;
- generation: `plan.rollout_tokens_per_gpu_s` new tokens per second per GPU, answers
  `plan.answer_fraction` of `max_new_tokens` long on average;
- SFT data: `plan.sft_tokens_per_sample` tokens per conversation, and `plan.sft_dataset_samples`
  records for a dataset whose size the recipe does not cap (`source.max_docs`).
Work done on a served model (an http teacher or judge) is counted as its tokens, not GPU-hours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipeline.graph import StageNode
from pipeline.memory_plan import stage_vocab
from pipeline.recipe import Recipe
from stages.configs.data import SFTDataConfig, SFTTokenizeConfig
from stages.configs.eval import EvalConfig
from stages.configs.model import ModelConfig, kv_cache_bytes_per_token, num_params
from stages.configs.post_training import DistillConfig, SFTConfig
from stages.configs.postnas import PostNASConfig
from stages.configs.rl import RLConfig

HUMANEVAL_PROBLEMS = 164


@dataclass
class Budget:
    lines: list[str] = field(default_factory=list)
    gpu_hours: float = 0.0


def stage_budget(recipe: Recipe, graph: dict[str, StageNode], node: StageNode) -> Budget | None:
    """The budget lines and GPU-hours of a post-training or eval stage (None for other kinds)."""
    cfg = node.config
    for kind, estimate in ((SFTConfig, _sft), (DistillConfig, _distill), (RLConfig, _rl),
                           (EvalConfig, _eval), (PostNASConfig, _postnas)):
        if isinstance(cfg, kind):
            return estimate(_Costs(recipe, graph, node), cfg)
    return None


def assumptions(recipe: Recipe) -> str:
    p = recipe.plan
    return (f"assumptions: {p.mfu:.0%} MFU of {p.gpu_peak_tflops:g} TFLOP/s per GPU for training; "
            f"{p.rollout_tokens_per_gpu_s:,.0f} generated tokens/s per GPU; answers "
            f"{p.answer_fraction:.0%} of max_new_tokens; SFT {p.sft_tokens_per_sample:,} tokens per "
            f"sample, {p.sft_dataset_samples:,} records per uncapped dataset")


class _Costs:
    """A stage's model size, GPUs and the recipe's assumptions, turned into hours."""

    def __init__(self, recipe: Recipe, graph: dict[str, StageNode], node: StageNode):
        self.recipe, self.graph, self.node, self.plan = recipe, graph, node, recipe.plan
        self.gpus = node.launcher.nodes * node.launcher.gpus_per_node
        self.model = ModelConfig(**node.model) if node.model else None
        self.params = num_params(self.model, stage_vocab(recipe, node.config)) if self.model else 0

    def answer_tokens(self, max_new_tokens: int) -> float:
        return max_new_tokens * self.plan.answer_fraction

    def tool_answer_tokens(self, max_new_tokens: int, max_turns: int,
                           max_tokens: int | None) -> float:
        """A tool-loop answer: up to `max_turns` turns of `max_new_tokens`, within its token
        budget (default the model's sequence), observations included; the same answer fraction."""
        budget = max_tokens or (self.model.seq_length if self.model else max_new_tokens)
        return min(max_turns * max_new_tokens, budget) * self.plan.answer_fraction

    def train_hours(self, trained: float, scored: float = 0.0) -> float:
        flops = 6.0 * self.params * trained + 2.0 * self.params * scored
        return flops / (self.plan.gpu_peak_tflops * 1e12 * self.plan.mfu) / 3600

    def generate_hours(self, tokens: float) -> float:
        return tokens / self.plan.rollout_tokens_per_gpu_s / 3600

    def finish(self, lines: list[str], hours: float) -> Budget:
        if self.gpus:
            lines.append(f"GPU-hours: {hours:,.1f} ({hours / self.gpus:,.2f} h on {self.gpus} GPUs)")
            return Budget(lines, hours)
        lines.append("GPU-hours: none (CPU launcher)")
        return Budget(lines, 0.0)


def _sft(c: _Costs, cfg: SFTConfig) -> Budget:
    samples = 0.0
    for ref in filter(None, (cfg.data, cfg.more_data)):
        for name, n in _datasets(c.graph[ref].config, ref, c.plan.sft_dataset_samples):
            samples += n * cfg.mix.get(name, 1.0)
    tokens = samples * c.plan.sft_tokens_per_sample
    seq = c.model.seq_length
    steps = math.ceil(tokens / (cfg.global_batch_size * seq) if cfg.packing
                      else samples / cfg.global_batch_size)
    return c.finish([f"SFT: {_human(samples)} samples x {cfg.epochs} epochs = "
                     f"{_human(tokens * cfg.epochs)} tokens, ~{steps * cfg.epochs:,} steps of "
                     f"{cfg.global_batch_size} x {seq}"],
                    c.train_hours(tokens * cfg.epochs))


def _datasets(cfg, name: str, uncapped: int) -> list[tuple[str, float]]:
    """(dataset name in `sft.mix`, samples) of an sft_data or sft_tokenize stage."""
    if isinstance(cfg, SFTDataConfig):  # at most one accepted sample per prompt
        return [(name, cfg.prompts.num + sum(p.num for p in cfg.more_prompts))]
    if isinstance(cfg, SFTTokenizeConfig):
        return [(d.name, d.source.get("max_docs") or uncapped) for d in cfg.datasets]
    return []


def _distill(c: _Costs, cfg: DistillConfig) -> Budget:
    prompts, answer = cfg.prompts.num, c.answer_tokens(cfg.max_new_tokens)
    student_new = prompts * cfg.student_samples * answer
    teacher_new = prompts * cfg.teacher_samples * answer
    served = not isinstance(cfg.teacher, str)
    pair_tokens = prompts * 2 * answer * cfg.epochs  # positive + negative, at most every prompt
    lines = [f"pair sampling: {_human(student_new)} student tokens, {_human(teacher_new)} teacher "
             f"tokens" + (" (on the teacher's server)" if served else ""),
             f"training: <= {_human(pair_tokens)} response tokens ({prompts:,} pairs x 2 x "
             f"{cfg.epochs} epochs) + the reference's and teacher's scoring"]
    generated = student_new + (0 if served else teacher_new)
    hours = c.generate_hours(generated) + c.train_hours(pair_tokens, scored=2 * pair_tokens)
    return c.finish(lines, hours)


def _rl(c: _Costs, cfg: RLConfig) -> Budget:
    (sub,) = cfg.substages  # the loader made every sub-stage its own stage
    g, answer = sub.grpo, c.answer_tokens(sub.grpo.max_new_tokens)
    if sub.tools is not None:
        answer = c.tool_answer_tokens(g.max_new_tokens, sub.max_turns, sub.max_tokens)
    filtered = sub.prompts.num * sub.filter.samples * answer if sub.filter.enabled else 0
    rollouts = g.steps * g.prompts_per_step * g.group_size * answer
    trained = rollouts * g.updates_per_batch
    lines = [f"pass-rate filter: {_human(filtered)} generated tokens "
             f"({sub.prompts.num:,} prompts x {sub.filter.samples})",
             f"GRPO: {g.steps:,} steps x {g.prompts_per_step} prompts x {g.group_size} samples = "
             f"{_human(rollouts)} rollout tokens, {_human(trained)} trained"]
    hours = c.generate_hours(filtered + rollouts) + c.train_hours(trained, scored=rollouts)
    return c.finish(lines, hours)


def _eval(c: _Costs, cfg: EvalConfig) -> Budget:
    generated = 0.0
    parts = []
    for b in cfg.benchmarks:
        problems = b.num or (b.prompts.num if b.prompts else HUMANEVAL_PROBLEMS)
        samples = cfg.samples if b.samples is None else b.samples
        tokens = problems * (1 + samples) * c.answer_tokens(b.max_new_tokens or cfg.max_new_tokens)
        generated += tokens
        parts.append(f"{b.name} {problems:,} x {1 + samples}")
    if not cfg.benchmarks and cfg.tools is not None:  # with tools, then once more without
        with_tools = c.tool_answer_tokens(cfg.max_new_tokens, cfg.max_turns, cfg.max_tokens)
        generated = cfg.prompts.num * ((1 + cfg.samples) * with_tools +
                                       c.answer_tokens(cfg.max_new_tokens))
        parts.append(f"{cfg.prompts.num:,} prompts x {1 + cfg.samples} with tools "
                     f"(up to {cfg.max_turns} turns) + 1 without")
    elif not cfg.benchmarks:
        generated = cfg.prompts.num * (1 + cfg.samples) * c.answer_tokens(cfg.max_new_tokens)
        parts.append(f"{cfg.prompts.num:,} prompts x {1 + cfg.samples}")
    return c.finish([f"eval: {_human(generated)} generated tokens ({', '.join(parts)}; greedy + "
                     "samples)"], c.generate_hours(generated))


def _postnas(c: _Costs, cfg: PostNASConfig) -> Budget:
    """Distillation of the super-network (student trained, original scored on the same tokens),
    then every layout the search scores: the two ends, each layer alone, the beam's candidates."""
    layers, seq = c.model.num_layers, c.model.seq_length
    tokens = cfg.steps * cfg.global_batch_size * seq
    layouts = 2 + layers + cfg.keep_full * cfg.beam * layers
    scored = layouts * len(cfg.tasks) * cfg.score_samples * seq
    full_kv = kv_cache_bytes_per_token(c.model)
    hybrid_kv = full_kv * cfg.keep_full // layers
    return c.finish([f"super-network: {cfg.steps:,} steps of {cfg.global_batch_size} x {seq} = "
                     f"{_human(tokens)} tokens distilled",
                     f"search: <= {layouts:,} layouts x {len(cfg.tasks)} tasks x "
                     f"{cfg.score_samples} examples",
                     f"KV cache per token: {full_kv:,} B -> {hybrid_kv:,} B (bf16; {cfg.keep_full} of "
                     f"{layers} layers full)"],
                    c.train_hours(tokens, scored=tokens + scored))


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.4g}{unit}"
    return f"{n:.4g}"
