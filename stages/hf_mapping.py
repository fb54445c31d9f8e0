"""Hugging Face Llama/Qwen3 <-> our megatron-core GPTModel: configs and weight names/layouts.

Torch-free at import time: the driver (`pipeline.validate`) reads an HF config.json through
`model_config_from_hf` to check a recipe before anything runs.

Layouts that differ between the two (weights are [out, in] in both):
  attention  HF q_proj [heads*d, h], k_proj/v_proj [groups*d, h]; megatron one linear_qkv whose
             rows are grouped per KV group: for each group g, its q_per_group query heads, then
             its key head, then its value head ([groups, (q_per_group + 2) * d, h]). That is
             what lets a TP rank own whole groups: a contiguous row slice holds q, k and v of its
             own heads (megatron-core 0.16.1, Attention.get_query_key_value_tensors).
  MLP        HF gate_proj, up_proj; megatron linear_fc1 = [gate; up] (its SwiGLU chunks the output
             in two and applies silu to the first half).
  vocab      megatron's tables may be padded up to make_vocab_size_divisible_by: rows past the
             HF vocab are zero on import and dropped on export.
RoPE is the non-interleaved (rotate-half) form in both, so q/k rows need no permutation.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from stages.config import ModelConfig, padded_vocab_size

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3"}

ARCH_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
               "num_query_groups", "head_dim", "qk_layernorm", "rotary_base", "rope_scaling",
               "rope_scaling_factor", "tie_embeddings", "norm_epsilon",
               "make_vocab_size_divisible_by")
"""The ModelConfig fields a checkpoint fixes (the others are training knobs: seq_length, dropout)."""

# config.json keys that do not change the weights or the forward pass of a causal LM
_NO_EFFECT = {"architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
              "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache",
              "max_position_embeddings", "_name_or_path", "output_attentions",
              "output_hidden_states", "return_dict", "attention_dropout", "max_window_layers",
              "sliding_window", "tokenizer_class"}
# keys the reader below interprets (each either mapped or checked to hold a value we implement)
_READ = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
         "rope_parameters", "tie_word_embeddings", "vocab_size", "hidden_act", "attention_bias",
         "mlp_bias", "pretraining_tp", "use_sliding_window", "layer_types"}
# megatron-core's llama3 RoPE scaling hard-codes these (RotaryEmbedding._apply_scaling defaults)
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}


class UnsupportedModel(ValueError):
    """An HF config we cannot convert exactly; the message names the config.json field."""


def _rope(cfg: dict[str, Any]) -> tuple[float, str | None, float]:
    """(theta, scaling kind, factor) from a transformers-4 (`rope_theta` + `rope_scaling`) or
    transformers-5 (`rope_parameters`) config.json."""
    key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    params = dict(cfg.get(key) or {})
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if kind not in ("default", "linear", "llama3"):
        raise UnsupportedModel(f"{key}.rope_type: {kind!r} is not supported (default, linear, llama3)")
    factor = float(params.pop("factor", 0.0) or 0.0)
    if kind == "llama3":
        for name, value in _LLAMA3_FIXED.items():
            if float(params.pop(name, value)) != value:
                raise UnsupportedModel(f"{key}.{name}: megatron-core's llama3 RoPE scaling fixes "
                                       f"it to {value:g}")
    if params:
        raise UnsupportedModel(f"{key}.{sorted(params)[0]}: not understood for rope_type {kind}")
    if kind == "default":
        return theta, None, 1.0
    if factor <= 0:
        raise UnsupportedModel(f"{key}.factor: {kind} scaling needs a positive factor")
    return theta, kind, factor


def model_config_from_hf(cfg: dict[str, Any]) -> tuple[ModelConfig, int]:
    """(ModelConfig, vocab size) of an HF Llama/Qwen3 config.json; UnsupportedModel for anything
    we would have to ignore or cannot run exactly."""
    archs = cfg.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise UnsupportedModel(f"architectures: {archs} is not supported "
                               f"(one of {', '.join(ARCHITECTURES)})")
    unknown = sorted(k for k in cfg if k not in _NO_EFFECT | _READ)
    if unknown:
        raise UnsupportedModel(f"{unknown[0]}: config field not understood by the converter "
                               f"(would be ignored): {', '.join(unknown)}")
    expect = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
              "pretraining_tp": 1, "use_sliding_window": False}
    for key, value in expect.items():
        if key in cfg and cfg[key] != value:
            raise UnsupportedModel(f"{key}: {cfg[key]!r} is not supported (only {value!r})")
    if any(t != "full_attention" for t in cfg.get("layer_types") or []):
        raise UnsupportedModel("layer_types: only full_attention layers are supported")
    theta, scaling, factor = _rope(cfg)
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    model = ModelConfig(
        num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"], num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        # None keeps megatron's default (hidden / heads), so a plain Llama stays hash-equal to a
        # recipe model that never mentions head_dim
        head_dim=None if head_dim * heads == cfg["hidden_size"] else head_dim,
        qk_layernorm=archs[0] == "Qwen3ForCausalLM",
        seq_length=min(cfg.get("max_position_embeddings") or 4096, 4096),
        rotary_base=theta, rope_scaling=scaling, rope_scaling_factor=factor,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        make_vocab_size_divisible_by=1,  # the HF table is used as is
        norm_epsilon=cfg.get("rms_norm_eps", 1e-6), init_method_std=cfg.get("initializer_range", 0.02),
        hidden_dropout=0.0, attention_dropout=0.0)
    return model, cfg["vocab_size"]


def read_hf_config(path: str) -> tuple[ModelConfig, int]:
    """model_config_from_hf of the config.json in HF model directory `path`."""
    import json
    import os

    with open(os.path.join(os.path.expanduser(path), "config.json")) as f:
        return model_config_from_hf(json.load(f))


def architecture_mismatch(model: ModelConfig, imported: ModelConfig) -> list[str]:
    """`field: recipe X, checkpoint Y` for every architecture field where the two differ."""
    out = []
    for name in ARCH_FIELDS:
        a, b = getattr(model, name), getattr(imported, name)
        if name == "head_dim":
            a = a or model.hidden_size // model.num_attention_heads
            b = b or imported.hidden_size // imported.num_attention_heads
        if name == "rope_scaling_factor" and imported.rope_scaling is None:
            continue
        if a != b:
            out.append(f"{name}: recipe {a!r}, checkpoint {b!r}")
    return out


def hf_config(model: ModelConfig, vocab_size: int, dtype: str, special: dict[str, Any]) -> dict:
    """config.json for `model` (Qwen3 when it has qk-norm, Llama otherwise). Written with the
    transformers-4 rope keys, which transformers 5 still reads, so either version loads it."""
    qwen3 = model.qk_layernorm
    head_dim = model.head_dim or model.hidden_size // model.num_attention_heads
    rope_scaling = None
    if model.rope_scaling == "linear":
        rope_scaling = {"rope_type": "linear", "factor": model.rope_scaling_factor}
    elif model.rope_scaling == "llama3":
        rope_scaling = {"rope_type": "llama3", "factor": model.rope_scaling_factor, **_LLAMA3_FIXED}
    cfg = {
        "architectures": ["Qwen3ForCausalLM" if qwen3 else "LlamaForCausalLM"],
        "model_type": "qwen3" if qwen3 else "llama",
        "vocab_size": vocab_size, "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size, "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups, "head_dim": head_dim,
        "hidden_act": "silu", "rms_norm_eps": model.norm_epsilon, "rope_theta": model.rotary_base,
        "rope_scaling": rope_scaling, "max_position_embeddings": model.seq_length,
        "tie_word_embeddings": model.tie_embeddings, "attention_bias": False,
        "attention_dropout": 0.0, "initializer_range": model.init_method_std, "use_cache": True,
        "torch_dtype": dtype, **special}
    if qwen3:
        cfg.update(use_sliding_window=False, sliding_window=None)
    else:
        cfg.update(mlp_bias=False, pretraining_tp=1)
    return cfg


# --------------------------------------------------------------------------------------------
# weights. Names are the local layer spec's; the TransformerEngine spec fuses the two pre-norms
# into the following linear layer, so their weights live under other names.

TE_NAMES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
            "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


def megatron_name(name: str, model_keys: set[str]) -> str:
    """`name` (local spec) as the built model calls it (TE spec names when it uses those)."""
    if name in model_keys:
        return name
    for local, te in TE_NAMES.items():
        if name.endswith(local):
            return name[: -len(local)] + te
    return name


def _layer_names(i: int) -> tuple[str, str]:
    return f"decoder.layers.{i}.", f"model.layers.{i}."


def _heads(model: ModelConfig) -> tuple[int, int, int]:
    d = model.head_dim or model.hidden_size // model.num_attention_heads
    return model.num_query_groups, model.num_attention_heads // model.num_query_groups, d


def hf_to_megatron(get: Callable[[str], Any], model: ModelConfig,
                   vocab_size: int) -> Iterator[tuple[str, Any]]:
    """(megatron name, tensor) one at a time, reading HF tensors through `get(name)`, so a large
    checkpoint is never held twice in memory."""
    import torch

    def embedding(name: str):
        w = get(name)
        pad = padded_vocab_size(vocab_size, model) - w.shape[0]
        return torch.cat([w, w.new_zeros(pad, w.shape[1])]) if pad else w

    yield "embedding.word_embeddings.weight", embedding("model.embed_tokens.weight")
    groups, per_group, d = _heads(model)
    for i in range(model.num_layers):
        mg, hf = _layer_names(i)
        a = hf + "self_attn."
        h = model.hidden_size
        q = get(a + "q_proj.weight").view(groups, per_group * d, h)
        k = get(a + "k_proj.weight").view(groups, d, h)
        v = get(a + "v_proj.weight").view(groups, d, h)
        yield mg + "self_attention.linear_qkv.weight", torch.cat([q, k, v], 1).reshape(-1, h)
        yield mg + "self_attention.linear_proj.weight", get(a + "o_proj.weight")
        if model.qk_layernorm:
            yield mg + "self_attention.q_layernorm.weight", get(a + "q_norm.weight")
            yield mg + "self_attention.k_layernorm.weight", get(a + "k_norm.weight")
        yield mg + "input_layernorm.weight", get(hf + "input_layernorm.weight")
        yield mg + "pre_mlp_layernorm.weight", get(hf + "post_attention_layernorm.weight")
        yield mg + "mlp.linear_fc1.weight", torch.cat([get(hf + "mlp.gate_proj.weight"),
                                                       get(hf + "mlp.up_proj.weight")])
        yield mg + "mlp.linear_fc2.weight", get(hf + "mlp.down_proj.weight")
    yield "decoder.final_layernorm.weight", get("model.norm.weight")
    if not model.tie_embeddings:
        yield "output_layer.weight", embedding("lm_head.weight")


def megatron_to_hf(get: Callable[[str], Any], model: ModelConfig,
                   vocab_size: int) -> Iterator[tuple[str, Any]]:
    """(HF name, tensor) one at a time from megatron tensors `get(name)` (local-spec names)."""
    yield "model.embed_tokens.weight", get("embedding.word_embeddings.weight")[:vocab_size]
    groups, per_group, d = _heads(model)
    for i in range(model.num_layers):
        mg, hf = _layer_names(i)
        a = hf + "self_attn."
        qkv = get(mg + "self_attention.linear_qkv.weight")
        qkv = qkv.view(groups, (per_group + 2) * d, qkv.shape[-1])
        q, k, v = qkv.split([per_group * d, d, d], dim=1)
        yield a + "q_proj.weight", q.reshape(-1, qkv.shape[-1])
        yield a + "k_proj.weight", k.reshape(-1, qkv.shape[-1])
        yield a + "v_proj.weight", v.reshape(-1, qkv.shape[-1])
        yield a + "o_proj.weight", get(mg + "self_attention.linear_proj.weight")
        if model.qk_layernorm:
            yield a + "q_norm.weight", get(mg + "self_attention.q_layernorm.weight")
            yield a + "k_norm.weight", get(mg + "self_attention.k_layernorm.weight")
        yield hf + "input_layernorm.weight", get(mg + "input_layernorm.weight")
        yield hf + "post_attention_layernorm.weight", get(mg + "pre_mlp_layernorm.weight")
        gate, up = get(mg + "mlp.linear_fc1.weight").chunk(2)
        yield hf + "mlp.gate_proj.weight", gate
        yield hf + "mlp.up_proj.weight", up
        yield hf + "mlp.down_proj.weight", get(mg + "mlp.linear_fc2.weight")
    yield "model.norm.weight", get("decoder.final_layernorm.weight")
    if not model.tie_embeddings:
        yield "lm_head.weight", get("output_layer.weight")[:vocab_size]
