"""What every stage config has, and what every training stage adds to it.

kw_only dataclasses (as torchtitan's): a stage kind inherits these fields and may redeclare one to
change its default. Moving a field here changes no stage's hash: the hash is taken over the
field names and values (sorted), never their order or the class that declares them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from data_recipes.config_fields import added, ref, unhashed


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

    def __post_init__(self):
        for key in ("tensor", "pipeline"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: {getattr(self, key)}, must be at least 1")


@dataclass
class OptimizerConfig:
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


RECOMPUTE = ("none", "selective", "full")


@dataclass
class MemoryConfig:
    """Megatron's memory savers for one training stage. The defaults turn none on (what every
    stage did before they existed); `pipeline plan` shows what each saves per GPU."""

    distributed_optimizer: bool = False
    """Shard the fp32 main params and Adam moments over the data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Reduce each gradient bucket while backward still runs."""
    overlap_param_gather: bool = False
    """Gather the updated param shards during the next forward (needs distributed_optimizer)."""
    grad_reduce_in_bf16: bool = False
    """Keep and reduce gradients in bf16 instead of fp32 (halves the grad buffer; GPU only)."""
    recompute: str = "none"
    """none | selective (recompute attention's core, keeps the rest) | full (keep only each
    layer's input and rerun the layer in backward)."""
    recompute_num_layers: int = 0
    """full: how many layers (from the first) are recomputed; 0 = all of them."""
    sequence_parallel: bool = False
    """Split the norm/dropout activations along the sequence over the tensor-parallel ranks."""
    optimizer_cpu_offload: bool = False
    """Keep `optimizer_offload_fraction` of the optimizer states in CPU memory and step them
    there (Megatron's HybridDeviceOptimizer; needs distributed_optimizer and CUDA)."""
    optimizer_offload_fraction: float = 1.0
    context_parallel: int = 1
    """Ranks each sequence is split over (needs TransformerEngine's attention)."""

    def __post_init__(self):
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute: {self.recompute!r}; one of {', '.join(RECOMPUTE)}")
        if self.recompute_num_layers < 0:
            raise ValueError(f"recompute_num_layers: {self.recompute_num_layers}, must be 0 or more")
        if self.recompute_num_layers and self.recompute != "full":
            raise ValueError(f"recompute_num_layers: {self.recompute_num_layers} applies to "
                             "recompute: full only")
        if not 0 < self.optimizer_offload_fraction <= 1:
            raise ValueError(f"optimizer_offload_fraction: {self.optimizer_offload_fraction}, "
                             "must be in (0, 1]")
        if self.context_parallel < 1:
            raise ValueError(f"context_parallel: {self.context_parallel}, must be at least 1")
        for key in ("overlap_param_gather", "optimizer_cpu_offload"):
            if getattr(self, key) and not self.distributed_optimizer:
                raise ValueError(f"{key}: needs distributed_optimizer: true")


@dataclass(kw_only=True)
class TrainingConfig(StageConfig):
    """The fields of every stage that trains a model (pretrain, sft, distill, rl)."""

    tokenizer: str = ref()
    model: Optional[dict[str, Any]] = None
    """Overrides of the model this stage trains (the recipe's, or its init checkpoint's)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    memory: MemoryConfig = added(factory=MemoryConfig)
    """Megatron's memory savers (all off by default); hashed only once one is changed, so adding
    the key left every earlier stage's hash as it was."""
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
