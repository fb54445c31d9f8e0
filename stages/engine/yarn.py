"""YaRN RoPE scaling (arXiv 2309.00071) on megatron-core's plain RotaryEmbedding, CPU-safe.

megatron-core 0.16.1's YarnRotaryEmbedding moves its tables to CUDA, and the mscale it hands to
attention is applied to q and k only on some paths: dynamic inference rotates the query without
it, and TE's fused RoPE cannot take it. So, as a RoPE-base change does (stages.engine.model):
- the inverse frequencies are computed as transformers' `_compute_yarn_parameters` does, with
  megatron's own correction-range and ramp helpers, and installed in the model's rotary module;
- YaRN's attention factor `a` on q and k is folded into the softmax scale. RoPE is a rotation,
  so (a R_m q) . (a R_n k) = a^2 q . R_(n-m) k, and softmax_scale = a^2 / sqrt(head_dim) is the
  same attention on every backend (local, TE, flash, our KV-cache decoder).
"""

from __future__ import annotations

import math

import torch

from stages.configs.model import ModelConfig


def yarn_inv_freq(model_cfg: ModelConfig, base: float, dim: int,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """YaRN's per-pair inverse frequencies for a rotary dim `dim` and RoPE base `base`: the fast
    ones (many rotations over the original context) kept, the slow ones divided by the factor,
    a linear ramp between (transformers' truncate=True correction range)."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_find_correction_range, _yarn_linear_ramp_mask)

    factor = model_cfg.rope_scaling_factor
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    low, high = _yarn_find_correction_range(model_cfg.yarn_beta_fast, model_cfg.yarn_beta_slow,
                                            dim, base, model_cfg.rope_original_context, True)
    keep = 1 - _yarn_linear_ramp_mask(low, high, dim // 2, device=device).to(torch.float32)
    return interpolation * (1 - keep) + extrapolation * keep


def yarn_transformer_config(model_cfg: ModelConfig, head_dim: int) -> dict:
    """TransformerConfig fields for YaRN's attention factor (none without yarn)."""
    if model_cfg.rope_scaling != "yarn":
        return {}
    return {"softmax_scale": model_cfg.attention_factor() ** 2 / math.sqrt(head_dim)}
