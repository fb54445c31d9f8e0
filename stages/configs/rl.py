"""The `rl` stage's config: GRPO sub-stages, each with its prompts, reward and pass-rate filter."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from data_recipes.chat import PromptFormat
from data_recipes.config_fields import MISSING, added, ref, unhashed
from data_recipes.prompts import PromptsConfig
from data_recipes.rewards import RewardConfig
from data_recipes.tools import ToolsConfig
from stages.configs.base import PostTrainingLRConfig, TrainingConfig


@dataclass
class PassRateFilterConfig:
    """Before a sub-stage trains, keep the prompts the current model solves sometimes, not always."""

    enabled: bool = True
    samples: int = 16
    """Answers sampled per prompt to measure its pass rate."""
    min_pass: float = 0.1
    """Keep prompts with min_pass < pass rate < max_pass (both exclusive)."""
    max_pass: float = 0.9

    def __post_init__(self):
        if not 0 <= self.min_pass < self.max_pass <= 1:
            raise ValueError(f"max_pass: {self.max_pass} with min_pass {self.min_pass}; need "
                             "0 <= min_pass < max_pass <= 1")
        if self.samples < 1:
            raise ValueError(f"samples: {self.samples}, must be at least 1")


@dataclass
class GRPOConfig:
    """On-policy GRPO: G samples per prompt, group-normalised advantages, clipped ratio."""

    steps: int = 20
    """Rollout batches (each followed by `updates_per_batch` optimizer steps)."""
    prompts_per_step: int = 8
    group_size: int = 8
    """G: samples per prompt."""
    updates_per_batch: int = 1
    """Optimizer steps per rollout batch; > 1 makes the later ones off-policy (ratio != 1)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 96
    eps_low: float = 0.2
    eps_high: float = 0.28
    """Clip-higher (DAPO): the ratio may rise to 1 + eps_high for positive advantages."""
    normalize_std: bool = True
    """Divide advantages by the group's std (off: Dr. GRPO)."""
    aggregation: str = "token"
    """token (every response token of the batch weighs the same) | sequence (mean per sample)."""
    kl_coef: float = 0.0
    """KL to the initial policy (k3 estimator); 0 as in Nanbeige4-3B and DAPO."""
    mask_truncated: bool = True
    """Samples cut at max_new_tokens get no loss (their reward is not about a finished answer)."""
    lr: PostTrainingLRConfig = field(default_factory=lambda: PostTrainingLRConfig(max=1e-5, min=1e-5))
    """Constant by default (min = max); warmup/decay over the optimizer steps when they differ."""

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"group_size: {self.group_size}; GRPO needs at least 2 samples")
        if self.aggregation not in ("token", "sequence"):
            raise ValueError(f"aggregation: {self.aggregation!r}; one of token, sequence")
        for key in ("steps", "prompts_per_step", "updates_per_batch", "micro_batch_size",
                    "max_new_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: {getattr(self, key)}, must be at least 1")


@dataclass
class RLSubstageConfig:
    """One sub-stage of `rl`: its prompts, reward, pass-rate filter and GRPO settings."""

    name: str = MISSING
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    filter: PassRateFilterConfig = field(default_factory=PassRateFilterConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    tools: Optional[ToolsConfig] = added(None)
    """Multi-turn rollouts with these tools (stages.engine.tool_rollout); none: one turn."""
    max_turns: int = added(5)
    """tools: assistant turns per rollout (a tool call in the last one is not run)."""
    max_tokens: Optional[int] = added(None)
    """tools: token budget of a rollout after its prompt (sampled and observation tokens); none:
    up to the model's seq_length. `grpo.max_new_tokens` limits each turn."""

    def __post_init__(self):
        if self.name != MISSING and not re.fullmatch(r"[A-Za-z0-9_]+", self.name):
            raise ValueError(f"name: {self.name!r}; letters, digits and _ only (it names a stage)")
        if self.max_turns < 1:
            raise ValueError(f"max_turns: {self.max_turns}, must be at least 1")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens: {self.max_tokens}, must be at least 1")


@dataclass(kw_only=True)
class RLConfig(TrainingConfig, PromptFormat):
    """Multi-stage RL: GRPO sub-stages run in order, each its own resumable stage of the DAG.

    The recipe loader turns an `rl` stage with sub-stages [a, b, c] into stages `<name>.a`,
    `<name>.b`, `<name>.c`, each starting from the previous one's checkpoint (a from `init`); a
    reference to `<name>` elsewhere means its last sub-stage."""

    kind: str = "rl"
    init: str = ref()
    """The checkpoint RL starts from: SFT, distill, or a pretrained base model (Jan-nano style)."""
    judge: Optional[str] = ref(None)
    """A checkpoint stage that plays the judge of `reward.kind: judge` with `judge.kind: engine`."""
    completion_template: str = "Question: {prompt}\n"
    substages: list[RLSubstageConfig] = field(default_factory=list)
    rollout_batch_size: int = unhashed(64)
    """Sequences per generate() call."""
    checkpoint_every: int = unhashed(10)
    log_every: int = unhashed(1)

    def __post_init__(self):
        super().__post_init__()
        names = [s.name for s in self.substages]
        if len(set(names)) != len(names):
            raise ValueError(f"substages: names repeat ({', '.join(names)})")
        for i, s in enumerate(self.substages):
            if s.tools is not None and self.prompt_format != "chat":
                raise ValueError(f"substages[{i}].tools: tool calls need prompt_format chat")
