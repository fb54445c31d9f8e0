"""Configs of the data stages: tokenizer, prepare (tokenized shards), sft_data (refinement) and
sft_tokenize (conversation datasets -> the SFT store)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from data_recipes.chat import SPECIAL_TOKENS as CHAT_SPECIAL_TOKENS
from data_recipes.chat import check_thinking
from data_recipes.config_fields import ref, unhashed
from data_recipes.conversations import ConversationsConfig
from data_recipes.generators import GeneratorConfig
from data_recipes.prompts import PromptsConfig
from stages.configs.base import StageConfig


@dataclass(kw_only=True)
class TokenizerConfig(StageConfig):
    """Train a sentencepiece BPE tokenizer (byte fallback) on a sample of sources, or adopt one."""

    kind: str = "tokenizer"
    sources: list[str] = field(default_factory=list)
    """Names of recipe sources to sample the training text from."""
    vocab_size: int = 4096
    sample_bytes: int = 5_000_000
    """At most this many bytes of text are sampled (evenly over the sources) for training."""
    model_file: Optional[str] = None
    """An existing sentencepiece .model to adopt instead of training one."""
    special_tokens: list[str] = field(default_factory=lambda: list(CHAT_SPECIAL_TOKENS))
    """Pieces that are always one token (the chat markers of data_recipes.chat by default)."""
    seed: int = 0


@dataclass(kw_only=True)
class PrepareConfig(StageConfig):
    """Tokenize sources into Megatron .bin/.idx shards, one shard set per source."""

    kind: str = "prepare"
    tokenizer: str = ref()
    sources: list[str] = field(default_factory=list)
    docs_per_task: int = unhashed(512)
    """Documents per Ray tokenization task (throughput knob, not an output knob)."""


@dataclass(kw_only=True)
class SFTTokenizeConfig(StageConfig):
    """Conversation datasets (messages / ShareGPT / Alpaca / prompt-response) rendered with the chat
    template and tokenized once, Ray-parallel, into the SFT store (token ids + loss mask) that
    `sft` memory-maps. Their mix is `sft.mix`, so a new weight never retokenizes."""

    kind: str = "sft_tokenize"
    tokenizer: str = ref()
    datasets: list[ConversationsConfig] = field(default_factory=list)
    records_per_shard: int = unhashed(100_000)
    """Records per store shard, the unit of resumption (a rerun skips finished shards)."""
    records_per_task: int = unhashed(512)
    """Records per Ray tokenization task (throughput knob)."""
    thinking: str = "on"
    """on: assistant turns keep their thinking block | off: Qwen3's empty think block, answers
    only (data_recipes.chat); an sft stage reading this store must say the same."""

    def __post_init__(self):
        check_thinking(self.thinking)
        seen = set()  # (an empty list is reported by validation: the loader sets items later)
        for i, d in enumerate(self.datasets):
            if d.name in seen:
                raise ValueError(f"datasets[{i}].name: {d.name!r} is used twice")
            seen.add(d.name)
        for key in ("records_per_shard", "records_per_task"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: {getattr(self, key)}, must be at least 1")


@dataclass(kw_only=True)
class SFTDataConfig(StageConfig):
    """Deliberative generation refinement + chain-of-thought reconstruction -> SFT samples."""

    kind: str = "sft_data"
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    more_prompts: list[PromptsConfig] = field(default_factory=list)
    """Further prompt sets refined alongside `prompts` (e.g. coding tasks next to arithmetic)."""
    engine: Optional[str] = ref(None)
    """The stage whose latest checkpoint backs every `kind: engine` role."""
    tokenizer: Optional[str] = ref(None)
    """The tokenizer of the `engine` checkpoint."""
    drafter: GeneratorConfig = field(default_factory=GeneratorConfig)
    evaluators: list[GeneratorConfig] = field(default_factory=lambda: [GeneratorConfig()])
    """Each scores every checklist item; an item passes only if every evaluator passes it."""
    reviser: GeneratorConfig = field(default_factory=GeneratorConfig)
    cot: GeneratorConfig = field(default_factory=GeneratorConfig)
    max_rounds: int = 3
    """Evaluation rounds per sample (a revision between two rounds); then it is rejected."""
    accept_min_pass: float = 1.0
    """The share of checklist items that must pass for a sample to be accepted."""
    system_prompt: str = ""
    """A system turn for every SFT sample (none when empty)."""
    shard_size: int = unhashed(64)
    """Samples per unit of work (one Ray task when workers > 1); finished samples are saved as
    they finish, so a restart redoes only unfinished ones."""
    workers: int = unhashed(1)
    """Ray tasks working on shards at once (engine backends need 1: the model lives in the job)."""

    def __post_init__(self):
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds: {self.max_rounds}, must be >= 1")
        if not 0 < self.accept_min_pass <= 1:
            raise ValueError(f"accept_min_pass: {self.accept_min_pass}, must be in (0, 1]")
        if not self.evaluators:
            raise ValueError("evaluators: name at least one evaluator")
