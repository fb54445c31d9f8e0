"""Incremental decoding of the engine's GPTModel with a compact KV cache, by its own submodules.

Why not megatron-core's inference path (torch.profiler on the tiny recipe's model shape, 2 layers,
hidden 256, batch 64, 40-token prompts, fp32, 2 threads; figures in bench/README.md, "Generation
speed"): its StaticInferenceContext caches keys *before* RoPE, so at every step every layer
re-rotates the whole cached key sequence (torch.cos/sin of the table, mul, neg, cat over
[length, batch, groups, dim]), expands the cache for GQA with repeat_interleave (a full copy) and
runs baddbmm/softmax/bmm over it: that work (copy_, cat, mul, add, cos, sin, neg, baddbmm, bmm)
took more CPU time than the weight matmuls, and it grows with the sequence. Megatron's other
engine (DynamicInferenceContext, paged cache) attends with flash-attn's varlen kernels
(Attention.flash_decode_and_prefill): CUDA only.

This path runs the same modules with the same weights: the embedding, each layer's input norm,
its `get_query_key_value_tensors` (the fused qkv projection, qk-norm), its `linear_proj`, its
bias-dropout-add and its `_forward_mlp`, the final norm and the output layer. What it does itself:
the RoPE table is built once per batch by the model's own rotary module (its scaling included)
and applied as megatron applies it; keys and values go into a [batch, groups, length, dim] cache
sized to the longest sequence of the batch; attention is torch's scaled_dot_product_attention
(GQA without copying the cache); only the last position goes through the output layer.
tests/test_generate.py checks that its logits equal the full forward's at every step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def unsupported_reason(gpt) -> str | None:
    """Why this path cannot run `gpt` (None when it can): it covers the dense, RoPE, self-attention
    GPTModel that stages.engine.model builds, on one pipeline stage."""
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.transformer_layer import TransformerLayer

    c = gpt.config
    if not (gpt.pre_process and gpt.post_process):
        return "pipeline parallelism"
    if c.sequence_parallel or c.context_parallel_size > 1:
        return "sequence or context parallelism"
    if gpt.position_embedding_type != "rope":
        return f"position embedding {gpt.position_embedding_type}"
    if c.flash_decode or c.rotary_interleaved or c.multi_latent_attention or \
            c.attention_output_gate or getattr(c, "softmax_type", "vanilla") != "vanilla":
        return "an attention variant (flash_decode, interleaved RoPE, MLA, output gate, softmax)"
    for layer in gpt.decoder.layers:
        if type(layer) is not TransformerLayer or \
                not isinstance(layer.self_attention, SelfAttention):
            return f"layer type {type(layer).__name__}"
    return None


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first rot_dim channels, as megatron's apply_rotary_pos_emb_bshd computes it."""
    rot = cos.shape[-1]
    x, rest = t[..., :rot], t[..., rot:]
    x1, x2 = torch.chunk(x, 2, dim=-1)
    x = x * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((x, rest), dim=-1) if rest.shape[-1] else x


class KVDecoder:
    """Feed tokens [b, s] (the next `s` positions of every row), get the last position's logits.

    The cache holds `max_len` positions per row: the longest sequence the caller will build.
    """

    def __init__(self, gpt, batch: int, max_len: int):
        self.gpt, self.len, self.max_len = gpt, 0, max_len
        p = next(gpt.parameters())
        freqs = gpt.rotary_pos_emb(max_len).to(p.device)  # [max_len, 1, 1, rot_dim]
        self.cos, self.sin = torch.cos(freqs).to(p.dtype), torch.sin(freqs).to(p.dtype)
        self.cache = []
        for layer in gpt.decoder.layers:
            a = layer.self_attention
            shape = (batch, a.num_query_groups_per_partition, max_len,
                     a.hidden_size_per_attention_head)
            self.cache.append((torch.empty(shape, dtype=p.dtype, device=p.device),
                               torch.empty(shape, dtype=p.dtype, device=p.device)))

    def _attention(self, layer, x: torch.Tensor, cache) -> torch.Tensor:
        """Self-attention of the new positions x [s, b, h] over the cache; output [s, b, h]."""
        a = layer.self_attention
        q, k, v = a.get_query_key_value_tensors(x, None)  # [s, b, heads|groups, dim]
        s, b = q.shape[:2]
        start, end = self.len, self.len + s
        cos, sin = self.cos[start:end], self.sin[start:end]
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        kc, vc = cache
        kc[:, :, start:end] = k.permute(1, 2, 0, 3)
        vc[:, :, start:end] = v.permute(1, 2, 0, 3)
        keys, values = kc[:, :, :end], vc[:, :, :end]
        heads, groups = q.shape[2], keys.shape[1]
        scale = getattr(a.core_attention, "softmax_scale", None) or \
            1.0 / math.sqrt(a.hidden_size_per_attention_head)
        if s == 1:  # decode: the heads of a group share its keys, as rows of one query matrix
            qg = q.view(b, groups, heads // groups, -1)
            out = F.scaled_dot_product_attention(qg, keys, values, scale=scale)
            out = out.reshape(1, b, -1)
        else:  # prefill (from position `start`): causal within the new positions
            mask = None
            if start:
                mask = (torch.arange(end, device=q.device)[None, :]
                        <= torch.arange(start, end, device=q.device)[:, None])
            out = F.scaled_dot_product_attention(
                q.permute(1, 2, 0, 3), keys, values, attn_mask=mask,
                is_causal=not start, scale=scale, enable_gqa=heads != groups)
            out = out.permute(2, 0, 1, 3).reshape(s, b, -1)
        return a.linear_proj(out)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [b, vocab] (the padded vocabulary) after feeding tokens [b, s]."""
        gpt = self.gpt
        b, s = tokens.shape
        if self.len + s > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions is full")
        positions = torch.arange(self.len, self.len + s, device=tokens.device).expand(b, -1)
        h = gpt.embedding(input_ids=tokens, position_ids=positions)  # [s, b, h]
        for layer, cache in zip(gpt.decoder.layers, self.cache):
            residual = h
            out = self._attention(layer, layer.input_layernorm(h), cache)
            h = layer.self_attn_bda(False, layer.config.bias_dropout_fusion)(
                out, residual, layer.hidden_dropout)
            h = layer._forward_mlp(h)
        self.len += s
        h = gpt.decoder.final_layernorm(h[-1:])
        weight = gpt.shared_embedding_or_output_weight() \
            if gpt.share_embeddings_and_output_weights else None
        logits, _ = gpt.output_layer(h, weight=weight, runtime_gather_output=True)
        return logits[0]
