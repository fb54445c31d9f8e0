"""The `eval` stage's config: a prompt set scored on a checkpoint, greedy and pass@k."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from data_recipes.chat import PromptFormat
from data_recipes.config_fields import ref, unhashed
from data_recipes.prompts import PromptsConfig
from stages.configs.base import StageConfig


@dataclass(kw_only=True)
class EvalConfig(StageConfig, PromptFormat):
    """Verifiable benchmark on a checkpoint: exact match (greedy) and pass@k (sampled)."""

    kind: str = "eval"
    tokenizer: str = ref()
    init: str = ref()
    """The stage whose latest checkpoint is evaluated."""
    model: Optional[dict[str, Any]] = None
    prompts: PromptsConfig = field(default_factory=lambda: PromptsConfig(split="heldout", num=64))
    completion_template: str = "Question: {prompt}\n"
    max_new_tokens: int = 96
    samples: int = 4
    """Sampled answers per prompt for pass@k (0: greedy only)."""
    k: list[int] = field(default_factory=lambda: [1, 4])
    temperature: float = 0.7
    top_p: float = 0.95
    batch_size: int = unhashed(32)
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        bad = [k for k in self.k if not 1 <= k <= max(self.samples, 1)]
        if self.samples and bad:
            raise ValueError(f"k: {bad} must be between 1 and samples ({self.samples})")
