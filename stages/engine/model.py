"""A Llama-style megatron-core GPTModel: RMSNorm, SwiGLU, RoPE, GQA, no biases.

fp32 on CPU (the bf16 Megatron optimizer needs CUDA), bf16 on GPU. The TransformerEngine layer
spec is used when transformer_engine is importable, the local (pure megatron-core) spec otherwise.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from stages.configs.base import MemoryConfig
from stages.configs.model import ModelConfig, padded_vocab_size
from stages.engine.yarn import yarn_inv_freq, yarn_transformer_config


def recompute_settings(memory: MemoryConfig, num_layers: int) -> dict:
    """TransformerConfig's activation-recompute fields for `memory.recompute`."""
    if memory.recompute == "selective":
        return {"recompute_granularity": "selective"}
    if memory.recompute == "full":
        if memory.recompute_num_layers:  # the first N layers of each pipeline stage
            return {"recompute_granularity": "full", "recompute_method": "block",
                    "recompute_num_layers": min(memory.recompute_num_layers, num_layers)}
        return {"recompute_granularity": "full", "recompute_method": "uniform",
                "recompute_num_layers": 1}
    return {}


def build_transformer_config(model_cfg: ModelConfig, memory: MemoryConfig | None = None):
    from megatron.core import parallel_state
    from megatron.core.transformer import TransformerConfig

    bf16 = torch.cuda.is_available()
    memory = memory or MemoryConfig()
    return TransformerConfig(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
        kv_channels=model_cfg.head_dim,  # None: hidden_size / num_attention_heads
        qk_layernorm=model_cfg.qk_layernorm,
        normalization="RMSNorm",
        layernorm_epsilon=model_cfg.norm_epsilon,
        gated_linear_unit=True,  # SwiGLU = gated linear unit with silu
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        init_method_std=model_cfg.init_method_std,
        hidden_dropout=model_cfg.hidden_dropout,
        attention_dropout=model_cfg.attention_dropout,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        sequence_parallel=memory.sequence_parallel,
        context_parallel_size=memory.context_parallel,
        **recompute_settings(memory, model_cfg.num_layers),
        **yarn_transformer_config(model_cfg, model_cfg.head_dim
                                  or model_cfg.hidden_size // model_cfg.num_attention_heads),
    )


def build_layer_spec(qk_layernorm: bool = False):
    from megatron.core.models.gpt import gpt_layer_specs

    if importlib.util.find_spec("transformer_engine") is not None:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    return gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=qk_layernorm,
                                                    normalization="RMSNorm")


def build_model(model_cfg: ModelConfig, vocab_size: int, max_seq_length: int,
                memory: MemoryConfig | None = None, layout: list[str] | None = None):
    """The GPTModel for this rank (its pipeline stage, its tensor-parallel shard), on its device.

    `max_seq_length` is the longest sequence of any phase (RoPE has no learned positions, so it
    only bounds what the model accepts). `memory`: the stage's recompute / sequence-parallel
    settings (the trained model's; frozen teachers and references need none). `layout`: each
    layer's attention kind when not `model_cfg`'s (stages.engine.hybrid: `super` for postnas's
    super-network). Needs stages.engine.distributed.init() first.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    vocab = padded_vocab_size(vocab_size, model_cfg)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if vocab % tp:
        raise ValueError(f"model.make_vocab_size_divisible_by ({model_cfg.make_vocab_size_divisible_by})"
                         f" must be a multiple of parallel.tensor ({tp})")
    config = build_transformer_config(model_cfg, memory)
    kinds = layout or model_cfg.layer_kinds()
    if set(kinds) == {"full"}:
        layer_spec = build_layer_spec(model_cfg.qk_layernorm)
    else:  # per-layer specs: megatron's attention where full, ours elsewhere
        from stages.engine.hybrid_spec import hybrid_block_spec

        layer_spec = hybrid_block_spec(kinds, model_cfg.qk_layernorm)
        # layers of different kinds cannot be stacked into one tensor per parameter name
        config.hetereogenous_dist_checkpoint = True
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=vocab,
        max_sequence_length=max_seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=model_cfg.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=model_cfg.rotary_base,
        # megatron's llama3 scaling fixes low/high_freq_factor 1/4 and original context 8192
        # (stages.engine.hf.weights rejects other values); linear scaling = position interpolation
        rope_scaling=model_cfg.rope_scaling == "llama3",
        rope_scaling_factor=model_cfg.rope_scaling_factor,
        seq_len_interpolation_factor=(model_cfg.rope_scaling_factor
                                      if model_cfg.rope_scaling == "linear" else None),
    )
    # set_rotary_base recomputes inv_freq and must apply the same llama3 scaling again
    model.llama3_rope_factor = (model_cfg.rope_scaling_factor
                                if model_cfg.rope_scaling == "llama3" else None)
    # yarn: megatron's rope is built unscaled; its inv_freq is replaced here and on a base change
    model.yarn_rope = model_cfg if model_cfg.rope_scaling == "yarn" else None
    if model.yarn_rope is not None:
        set_rotary_base(model, model_cfg.rotary_base)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def unwrap(model):
    """The GPTModel inside a (Megatron DDP) wrapper."""
    while hasattr(model, "module"):
        model = model.module
    return model


def set_rotary_base(model, base: float) -> None:
    """Change the RoPE base (ABF for a long-context phase): recompute inv_freq, drop cached tables."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = unwrap(model).rotary_pos_emb
    inv_freq = rope.inv_freq
    dim = 2 * inv_freq.numel()
    rope.inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32,
                                                 device=inv_freq.device) / dim))
    factor = getattr(unwrap(model), "llama3_rope_factor", None)
    if factor is not None:
        rope.inv_freq = rope._apply_scaling(rope.inv_freq, factor=factor)
    yarn = getattr(unwrap(model), "yarn_rope", None)
    if yarn is not None:
        rope.inv_freq = yarn_inv_freq(yarn, base, dim, inv_freq.device)
    # RotaryEmbedding.forward is lru_cached per (module, seq_len): stale tables would keep the old base
    RotaryEmbedding.forward.cache_clear()
    unwrap(model).rotary_pos_emb_cache.clear()
