"""Config dataclasses of the stage kinds: the single source of truth for what a recipe may say.

Torch-free on purpose: the driver (`pipeline/`) validates recipes against these classes without
importing torch or megatron, and the stage jobs rebuild the same classes from their spec.

Fields marked `ref()` name another stage of the recipe; they are the DAG's edges (as in Marin's
executor, nobody writes edges by hand). Fields marked `unhashed()` change how a stage runs but not
what it produces, so they stay out of the stage's content hash.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

MISSING: Any = "???"  # OmegaConf's marker for a value the recipe must give


def ref(default: Any = MISSING) -> Any:
    """A field that names an upstream stage (an edge of the DAG)."""
    return field(default=default, metadata={"ref": True})


def unhashed(default: Any = None) -> Any:
    """A field that does not change a stage's outputs (logging cadence, process count, ...)."""
    return field(default=default, metadata={"unhashed": True})


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """A stage job's config dataclass back from its spec's dict (nested dataclasses included)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), data))


def ref_fields(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if f.metadata.get("ref")]


def unhashed_fields(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if f.metadata.get("unhashed")]


# --------------------------------------------------------------------------------------------
# Model


@dataclass
class ModelConfig:
    """A Llama-style decoder: RMSNorm, SwiGLU, RoPE, GQA, no biases."""

    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 176
    """SwiGLU inner size (Llama uses ~8/3 of hidden, rounded)."""
    num_attention_heads: int = 4
    num_query_groups: int = 2
    """GQA: number of key/value heads; equal to num_attention_heads for plain MHA."""
    seq_length: int = 128
    rotary_base: float = 10000.0
    tie_embeddings: bool = False
    make_vocab_size_divisible_by: int = 128
    """The tokenizer's vocabulary is padded up to a multiple of this (Megatron's convention)."""
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0


@dataclass
class ParallelConfig:
    """Megatron parallelism; data-parallel size = world size / (tensor * pipeline)."""

    tensor: int = 1
    pipeline: int = 1


@dataclass
class LaunchConfig:
    """How a stage job is started. Global in the recipe, overridable per stage."""

    kind: str = "local"
    """local (torchrun subprocess on this machine) | slurm (the Slurm launcher: not built yet)."""
    nproc_per_node: int = 1
    nodes: int = 1
    gpus_per_node: int = 0
    """0 on CPU; used by `pipeline plan` for the GPU-hours estimate."""

    def __post_init__(self):
        if self.kind not in ("local", "slurm"):
            raise ValueError(f"kind: {self.kind!r} is not a launcher; one of local, slurm")


# --------------------------------------------------------------------------------------------
# Stage kinds


@dataclass
class TokenizerConfig:
    """Train a sentencepiece BPE tokenizer (byte fallback) on a sample of sources, or adopt one."""

    kind: str = "tokenizer"
    after: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    """Names of recipe sources to sample the training text from."""
    vocab_size: int = 4096
    sample_bytes: int = 5_000_000
    """At most this many bytes of text are sampled (evenly over the sources) for training."""
    model_file: Optional[str] = None
    """An existing sentencepiece .model to adopt instead of training one."""
    seed: int = 0
    launcher: Optional[dict[str, Any]] = unhashed()
    """Overrides of the recipe's `launcher` for this stage."""


@dataclass
class PrepareConfig:
    """Tokenize sources into Megatron .bin/.idx shards, one shard set per source."""

    kind: str = "prepare"
    after: list[str] = field(default_factory=list)
    tokenizer: str = ref()
    sources: list[str] = field(default_factory=list)
    docs_per_task: int = unhashed(512)
    """Documents per Ray tokenization task (throughput knob, not an output knob)."""
    launcher: Optional[dict[str, Any]] = unhashed()
    """Overrides of the recipe's `launcher` for this stage."""


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
class OptimizerConfig:
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


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


@dataclass
class PretrainConfig:
    """FG-WSD pretraining of a GPTModel over phase-wise blended datasets."""

    kind: str = "pretrain"
    after: list[str] = field(default_factory=list)
    tokenizer: str = ref()
    data: str = ref()
    """The prepare stage whose shards the phase mixtures name."""
    init: Optional[str] = ref(None)
    """A stage whose final checkpoint initialises the model (weights only)."""
    model: Optional[dict[str, Any]] = None
    """Overrides of the recipe's `model` for this stage."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    global_batch_size: int = 8
    """Sequences per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 4
    lr: LRConfig = field(default_factory=LRConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    phases: list[PhaseConfig] = field(default_factory=list)
    seed: int = 1234
    checkpoint_every: int = unhashed(50)
    """Steps between checkpoints (a checkpoint is also written at each phase end and on preemption)."""
    keep_checkpoints: int = unhashed(2)
    eval_samples: int = 16
    """Held-out sequences scored at the end of every phase."""
    log_every: int = unhashed(5)
    launcher: Optional[dict[str, Any]] = unhashed()
    """Overrides of the recipe's `launcher` for this stage."""


@dataclass
class NoopConfig:
    """A stage that only waits: exercises the DAG, launcher and tracking (tests, benches)."""

    kind: str = "noop"
    after: list[str] = field(default_factory=list)
    input: Optional[str] = ref(None)
    """Any upstream stage (an edge, to build test DAGs)."""
    seconds: float = 0.0
    fail: bool = False
    fail_message: str = "failed on purpose (noop stage with fail: true)"
    launcher: Optional[dict[str, Any]] = unhashed()


STAGE_KINDS: dict[str, type] = {
    "noop": NoopConfig,
    "tokenizer": TokenizerConfig,
    "prepare": PrepareConfig,
    "pretrain": PretrainConfig,
}

_MODULE_OF_KIND = {"import": "hf_import", "export": "hf_export"}  # `import` is a Python keyword


def stage_module(kind: str) -> str:
    """The module a launcher runs for a stage kind (`python -m <module> --spec ...`)."""
    return f"stages.{_MODULE_OF_KIND.get(kind, kind)}"


def phase_specs(cfg: PretrainConfig, model: ModelConfig) -> list:
    """The recipe's phases with the model's defaults filled in (for `schedulers.fg_wsd`)."""
    from schedulers.fg_wsd import PhaseSpec

    return [PhaseSpec(p.name, float(p.tokens), dict(p.mixture), p.seq_length or model.seq_length,
                      p.rotary_base or model.rotary_base,
                      p.global_batch_size or cfg.global_batch_size) for p in cfg.phases]


def pretrain_schedule(cfg: PretrainConfig, model: ModelConfig):
    """The FG-WSD schedule (phases in steps, LR) that a pretrain config describes."""
    from schedulers.fg_wsd import build_schedule

    return build_schedule(phase_specs(cfg, model), lr_max=cfg.lr.max,
                          lr_min=cfg.lr.min, lr_init=cfg.lr.init,
                          warmup_tokens=float(cfg.lr.warmup_tokens),
                          decay_tokens=float(cfg.lr.decay_tokens), decay_style=cfg.lr.decay_style)


def padded_vocab_size(vocab_size: int, model: ModelConfig) -> int:
    """Megatron pads the embedding table up to a multiple (for TP splits and fast GEMMs)."""
    multiple = model.make_vocab_size_divisible_by
    return -(-vocab_size // multiple) * multiple


def num_params(model: ModelConfig, vocab_size: int) -> int:
    """Parameters of the Llama-style GPTModel that stages.model builds (analytic, torch-free)."""
    h, layers = model.hidden_size, model.num_layers
    kv = model.num_query_groups * (h // model.num_attention_heads)
    attention = h * (h + 2 * kv) + h * h  # fused QKV (GQA) + output projection, no biases
    mlp = h * 2 * model.ffn_hidden_size + model.ffn_hidden_size * h  # SwiGLU: gate+up, down
    per_layer = attention + mlp + 2 * h  # + two RMSNorm weights
    vocab = padded_vocab_size(vocab_size, model)
    embeddings = vocab * h * (1 if model.tie_embeddings else 2)
    return layers * per_layer + h + embeddings  # + final norm
