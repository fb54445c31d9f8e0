"""The model a recipe describes: a Llama-style decoder, and the arithmetic of its size.

Torch-free on purpose: `pipeline plan` counts parameters before anything is built, and the stage
jobs rebuild the same ModelConfig from their spec (stages.engine.model builds the GPTModel;
tests/test_model.py checks `num_params` against it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from data_recipes.config_fields import added

LAYER_KINDS = ("full", "linear")
"""What a layer's attention may be: softmax attention with a KV cache, or Jet-Nemotron's
linear-attention block (stages.engine.linear_attention: gated delta rule, constant state)."""
LINEAR_CONV_KERNEL = 4
"""Taps of the linear block's dynamic value convolution (stages.engine.linear_attention)."""
LINEAR_GENERATOR_REDUCTION = 8
"""The linear block's kernel generator has hidden_size / this units (JetBlock's)."""


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
    head_dim: Optional[int] = None
    """Per-head size (megatron's kv_channels); None = hidden_size / num_attention_heads. Qwen3
    sets it apart (Qwen3-4B: hidden 2560, 32 heads, head_dim 128)."""
    qk_layernorm: bool = False
    """RMSNorm over each query and key head before RoPE (Qwen3)."""
    rope_scaling: Optional[str] = None
    """None | llama3 (Llama 3.x frequency scaling) | linear (position interpolation) | yarn
    (YaRN, arXiv 2309.00071, as transformers computes it)."""
    rope_scaling_factor: float = 1.0
    """The factor of `rope_scaling`, > 1 (ignored when it is None)."""
    rope_original_context: Optional[int] = added()
    """yarn: the context the model was pretrained at (HF `original_max_position_embeddings`);
    the scaled model reaches about factor x this."""
    yarn_beta_fast: float = added(32.0)
    """yarn: rotations above which a frequency is kept as is (extrapolated)."""
    yarn_beta_slow: float = added(1.0)
    """yarn: rotations below which a frequency is divided by the factor (interpolated)."""
    yarn_attention_factor: Optional[float] = added()
    """yarn: the factor on q and k (so attention logits get its square); None: transformers'
    and megatron's default 0.1 * ln(rope_scaling_factor) + 1."""
    layout: Optional[list[str]] = added()
    """Per layer, its attention: `full` or `linear` (a hybrid model, as the postnas stage writes);
    None: every layer full."""

    def __post_init__(self):
        for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                    "num_query_groups", "seq_length", "make_vocab_size_divisible_by"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: {getattr(self, key)}, must be at least 1")
        if self.num_layers > 100_000:  # a list per layer is built from it (a fuzz found 1e30)
            raise ValueError(f"num_layers: {self.num_layers}, must be at most 100000")
        if self.head_dim is not None and self.head_dim < 1:
            raise ValueError(f"head_dim: {self.head_dim}, must be at least 1 (or null)")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"num_query_groups: {self.num_query_groups} does not divide "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.rotary_base <= 0 or self.norm_epsilon <= 0:
            key = "rotary_base" if self.rotary_base <= 0 else "norm_epsilon"
            raise ValueError(f"{key}: {getattr(self, key)}, must be positive")
        if self.rope_scaling not in (None, "llama3", "linear", "yarn"):
            raise ValueError(f"rope_scaling: {self.rope_scaling!r} is not supported; one of "
                             "null, llama3, linear, yarn")
        if self.rope_scaling is not None and not self.rope_scaling_factor > 1:
            raise ValueError(f"rope_scaling_factor: {self.rope_scaling_factor}, must be > 1 "
                             f"for rope_scaling {self.rope_scaling}")
        self._check_yarn()
        if self.layout is not None:
            if len(self.layout) != self.num_layers:
                raise ValueError(f"layout: {len(self.layout)} entries for num_layers "
                                 f"{self.num_layers}; one per layer")
            for i, kind in enumerate(self.layout):
                if kind not in LAYER_KINDS:
                    raise ValueError(f"layout[{i}]: {kind!r} is not a layer kind; one of "
                                     f"{', '.join(LAYER_KINDS)}")

    def layer_kinds(self) -> list[str]:
        """Each layer's attention kind (`full` everywhere without a layout)."""
        return list(self.layout) if self.layout is not None else ["full"] * self.num_layers

    def _check_yarn(self) -> None:
        if self.rope_scaling != "yarn":
            for key, default in (("rope_original_context", None), ("yarn_beta_fast", 32.0),
                                 ("yarn_beta_slow", 1.0), ("yarn_attention_factor", None)):
                if getattr(self, key) != default:
                    raise ValueError(f"{key}: {getattr(self, key)} is set but rope_scaling is "
                                     f"{self.rope_scaling!r}, not yarn")
            return
        if self.rope_original_context is None or self.rope_original_context < 1:
            raise ValueError(f"rope_original_context: {self.rope_original_context}, yarn needs "
                             "the pretrained context length (at least 1)")
        if not 0 < self.yarn_beta_slow < self.yarn_beta_fast:
            raise ValueError(f"yarn_beta_slow: {self.yarn_beta_slow}, must be positive and "
                             f"below yarn_beta_fast {self.yarn_beta_fast}")
        if self.yarn_attention_factor is not None and self.yarn_attention_factor <= 0:
            raise ValueError(f"yarn_attention_factor: {self.yarn_attention_factor}, must be "
                             "positive (or null)")

    def attention_factor(self) -> float:
        """The factor YaRN puts on q and k (1 without yarn)."""
        if self.rope_scaling != "yarn":
            return 1.0
        if self.yarn_attention_factor is not None:
            return self.yarn_attention_factor
        return 0.1 * math.log(self.rope_scaling_factor) + 1.0


def padded_vocab_size(vocab_size: int, model: ModelConfig) -> int:
    """Megatron pads the embedding table up to a multiple (for TP splits and fast GEMMs)."""
    multiple = model.make_vocab_size_divisible_by
    return -(-vocab_size // multiple) * multiple


def num_params(model: ModelConfig, vocab_size: int) -> int:
    """Parameters of the Llama-style GPTModel that stages.engine.model builds (analytic, torch-free)."""
    h, layers = model.hidden_size, model.num_layers
    head_dim = model.head_dim or h // model.num_attention_heads
    q = model.num_attention_heads * head_dim
    kv = model.num_query_groups * head_dim
    attention = h * (q + 2 * kv) + q * h  # fused QKV (GQA) + output projection, no biases
    mlp = h * 2 * model.ffn_hidden_size + model.ffn_hidden_size * h  # SwiGLU: gate+up, down
    if model.qk_layernorm:
        attention += 2 * head_dim  # one RMSNorm weight shared by all query heads, one for keys
    kinds = model.layer_kinds()
    linear = linear_block_params(model)
    mixers = sum(attention if k == "full" else linear for k in kinds)
    vocab = padded_vocab_size(vocab_size, model)
    embeddings = vocab * h * (1 if model.tie_embeddings else 2)
    return mixers + layers * (mlp + 2 * h) + h + embeddings  # + two norms per layer, final norm


def linear_block_params(model: ModelConfig) -> int:
    """Parameters of one linear-attention block (stages.engine.linear_attention.JetBlock)."""
    h, heads = model.hidden_size, model.num_attention_heads
    head_dim = model.head_dim or h // heads
    q, kv = heads * head_dim, model.num_query_groups * head_dim
    projections = h * (2 * q + 2 * kv + 2 * heads) + q * h  # q, gate, k, v, beta, alpha; out
    generator = max(h // LINEAR_GENERATOR_REDUCTION, 1)
    conv = h * generator + generator * kv * LINEAR_CONV_KERNEL + kv * LINEAR_CONV_KERNEL
    return projections + 2 * heads + head_dim + conv  # + A_log, dt_bias, output norm


def kv_cache_bytes_per_token(model: ModelConfig, bytes_per_value: int = 2) -> int:
    """KV-cache bytes one more token of one sequence costs: K and V of every full layer (a linear
    layer's state is a constant, independent of the length)."""
    head_dim = model.head_dim or model.hidden_size // model.num_attention_heads
    full = model.layer_kinds().count("full")
    return 2 * full * model.num_query_groups * head_dim * bytes_per_value
