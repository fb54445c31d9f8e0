"""What every stage config has, and what every training stage adds to it.

kw_only dataclasses (as torchtitan's): a stage kind inherits these fields and may redeclare one to
change its default. Moving a field here changes no stage's hash: the hash is taken over the
field names and values (sorted), never their order or the class that declares them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from data_recipes.config_fields import ref, unhashed


@dataclass(kw_only=True)
class StageConfig:
    kind: str
    """The stage kind (a key of stages.configs.STAGE_KINDS)."""
    after: list[str] = field(default_factory=list)
    """Stages that must finish first although this one reads nothing of theirs."""
    launcher: Optional[dict[str, Any]] = unhashed()
    """Overrides of the recipe's `launcher` for this stage."""


@dataclass
class ParallelConfig:
    """Megatron parallelism; data-parallel size = world size / (tensor * pipeline)."""

    tensor: int = 1
    pipeline: int = 1


@dataclass
class OptimizerConfig:
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass(kw_only=True)
class TrainingConfig(StageConfig):
    """The fields of every stage that trains a model (pretrain, sft, distill, rl)."""

    tokenizer: str = ref()
    model: Optional[dict[str, Any]] = None
    """Overrides of the model this stage trains (the recipe's, or its init checkpoint's)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    seed: int = 1234
    checkpoint_every: int = unhashed(50)
    """Steps between checkpoints (one is also written at the end and on preemption)."""
    keep_checkpoints: int = unhashed(2)
    log_every: int = unhashed(5)


@dataclass
class PostTrainingLRConfig:
    """The post-training stages' LR (SFT, distill, RL): linear warmup, then decay over the rest."""

    max: float = 1e-3
    min: float = 1e-5
    warmup_steps: int = 0
    decay_style: str = "cosine"
    """linear | cosine | exponential | minus_sqrt over the steps after warmup."""


@dataclass(kw_only=True)
class NoopConfig(StageConfig):
    """A stage that only waits: exercises the DAG, launcher and tracking (tests, benches)."""

    kind: str = "noop"
    input: Optional[str] = ref(None)
    """Any upstream stage (an edge, to build test DAGs)."""
    seconds: float = 0.0
    fail: bool = False
    fail_message: str = "failed on purpose (noop stage with fail: true)"
    metric_every_s: float = 0.0
    """Log a `tick` metric this often while waiting (0: one metric at the end)."""
