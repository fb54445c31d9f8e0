"""The `eval` stage's config: a prompt set, or a list of benchmarks, scored on a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from data_recipes.chat import PromptFormat
from data_recipes.benchmarks import BenchmarkConfig, check_benchmarks
from data_recipes.config_fields import added, ref, unhashed
from data_recipes.prompts import PromptsConfig
from data_recipes.tools import ToolsConfig
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
    """The prompt set scored when no `benchmarks` are given."""
    benchmarks: list[BenchmarkConfig] = added(factory=list)
    """Benchmarks run instead of `prompts`, each with its own template, few-shot examples,
    checker and sampling (unset sampling fields take the values below); data_recipes.benchmarks."""
    completion_template: str = "Question: {prompt}\n"
    max_new_tokens: int = 96
    samples: int = 4
    """Sampled answers per prompt for pass@k (0: greedy only)."""
    k: list[int] = field(default_factory=lambda: [1, 4])
    temperature: float = 0.7
    top_p: float = 0.95
    batch_size: int = unhashed(32)
    seed: int = 0
    tools: Optional[ToolsConfig] = added(None)
    """The QA eval with tools (Jan-nano): `prompts` are answered through the multi-turn tool loop
    (stages.engine.tool_rollout, the tools listed in the system prompt) and again with no tools
    offered; accuracy with and without tools, tool metrics, pass@k with tools. None: one turn."""
    max_turns: int = added(5)
    """tools: assistant turns per answer (a tool call in the last one is not run)."""
    max_tokens: Optional[int] = added(None)
    """tools: token budget of an answer after its prompt (sampled and observation tokens); none:
    up to the model's seq_length. `max_new_tokens` limits each turn."""

    def __post_init__(self):
        super().__post_init__()
        bad = [k for k in self.k if not 1 <= k <= max(self.samples, 1)]
        if self.samples and bad:
            raise ValueError(f"k: {bad} must be between 1 and samples ({self.samples})")
        check_benchmarks(self.benchmarks)
        if self.max_turns < 1:
            raise ValueError(f"max_turns: {self.max_turns}, must be at least 1")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens: {self.max_tokens}, must be at least 1")
        if self.tools is not None and self.prompt_format != "chat":
            raise ValueError("tools: tool calls need prompt_format chat")
        if self.tools is not None and self.benchmarks:
            raise ValueError("tools: the tool loop answers `prompts`; give no benchmarks with it")
        for i, b in enumerate(self.benchmarks):
            samples = self.samples if b.samples is None else b.samples
            bad = [k for k in (self.k if b.k is None else b.k) if not 1 <= k <= max(samples, 1)]
            if samples and bad:
                raise ValueError(f"benchmarks[{i}].k: {bad} must be between 1 and samples "
                                 f"({samples})")
