"""Hugging Face Llama/Qwen3 <-> our megatron-core GPTModel: weight names and layouts (the
config.json half is stages.configs.hf).

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

from stages.configs.model import ModelConfig, padded_vocab_size


# Names are the local layer spec's; the TransformerEngine spec fuses the two pre-norms
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
