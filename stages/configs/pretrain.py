"""The `pretrain` stage's config: FG-WSD phases, their mixtures, and the LR over them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from data_recipes.config_fields import MISSING, ref
from stages.configs.base import TrainingConfig


@dataclass
class LRConfig:
    """FG-WSD learning rate: linear warmup, constant through all stable phases, then decay."""

    max: float = 3e-3
    min: float = 3e-5
    init: float = 0.0
    warmup_tokens: float = MISSING
    decay_tokens: float = MISSING
    """The last `decay_tokens` of the run decay from max to min."""
    decay_style: str = "minus_sqrt"
    """linear | cosine | exponential | minus_sqrt, exactly as Megatron's WSD defines them."""


@dataclass
class PhaseConfig:
    """One FG-WSD phase: a token budget and the data mixture used throughout it."""

    name: str = MISSING
    tokens: float = MISSING
    mixture: dict[str, float] = field(default_factory=dict)
    """Source name (an output of the `data` stage) -> weight; weights sum to 1."""
    seq_length: Optional[int] = None
    """Longer context for this phase (the decay in the paper); default: the model's."""
    rotary_base: Optional[float] = None
    """Larger RoPE base for this phase (ABF); default: the model's."""
    global_batch_size: Optional[int] = None
    """Sequences per step in this phase; default: the stage's."""


@dataclass(kw_only=True)
class PretrainConfig(TrainingConfig):
    """FG-WSD pretraining of a GPTModel over phase-wise blended datasets."""

    kind: str = "pretrain"
    data: str = ref()
    """The prepare stage whose shards the phase mixtures name."""
    init: Optional[str] = ref(None)
    """A stage whose final checkpoint initialises the model (weights only); the model is then the
    one that stage's manifest records (an import, a postnas hybrid), with `model:` on top."""
    global_batch_size: int = 8
    """Sequences per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 4
    lr: LRConfig = field(default_factory=LRConfig)
    phases: list[PhaseConfig] = field(default_factory=list)
    eval_samples: int = 16
    """Held-out sequences scored at the end of every phase."""
