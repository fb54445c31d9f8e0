"""Incremental decoding of the engine's GPTModel with a compact KV cache, by its own weights.

Why not megatron-core's inference path (torch.profiler on the tiny recipe's model shape, 2 layers,
hidden 256, batch 64, 40-token prompts, fp32, 2 threads; figures in bench/README.md, "Generation
speed"): its StaticInferenceContext caches keys *before* RoPE, so at every step every layer
re-rotates the whole cached key sequence (torch.cos/sin of the table, mul, neg, cat over
[length, batch, groups, dim]), expands the cache for GQA with repeat_interleave (a full copy) and
runs baddbmm/softmax/bmm over it: that work (copy_, cat, mul, add, cos, sin, neg, baddbmm, bmm)
took more CPU time than the weight matmuls, and it grows with the sequence. Megatron's other
engine (DynamicInferenceContext, paged cache) attends with flash-attn's varlen kernels
(Attention.flash_decode_and_prefill): CUDA only.

This path runs the same model on the same weights: the model's norms (input, pre-MLP, qk, final)
are called as modules; RoPE's table comes from the model's own rotary module (its scaling
included) once per batch and is applied as megatron applies it; keys and values go into a
[batch, groups, length, dim] cache sized to the longest sequence of the batch; attention is
torch's scaled_dot_product_attention (GQA without copying the cache); only the last position goes
through the output layer. The linear layers (embedding, fused qkv, output projection, SwiGLU MLP,
output layer) are applied as F.linear/F.embedding on the modules' own weights when they are
megatron's plain single-rank layers (`plain_weights`): a decode step is ~20 small matmuls, and
megatron's wrappers (autograd Functions for the tensor-parallel regions around every linear,
_forward_mlp's bookkeeping) cost ~120 us of Python each, ~2.5 ms of a ~12 ms step at batch 32
(thread CPU time, tiny recipe model). Any other layer (TransformerEngine's, tensor parallel) is
called as its module.

Hybrid models (stages.engine.hybrid_spec) run here too: a JetBlock layer keeps its recurrent and
convolution state instead of a KV cache and steps it by its own `mix`.

Rows may be left-padded (`left_pad`): a row's RoPE positions start at its first real token and
its queries do not see the padding, so a ragged batch is prefilled in one forward.
tests/test_generate.py checks that the logits equal the full forward's at every step, padded or
not, on both the direct-weight and the module path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from stages.engine.linear_attention import JetBlock


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
                not isinstance(layer.self_attention, (SelfAttention, JetBlock)):
            return f"layer type {type(layer).__name__}"
        if hasattr(layer.self_attention, "linear"):  # postnas's super-network (engine.hybrid_spec)
            return "a super-network layer (its path may be linear)"
    return None


def plain_weights(gpt) -> bool:
    """Whether every linear layer is megatron's plain one on a single tensor-parallel rank with no
    bias, and every MLP a SwiGLU without clamp or offset: then F.linear on its weight is exactly
    the module's computation."""
    from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,
                                               VocabParallelEmbedding)
    from megatron.core.transformer.mlp import MLP

    c = gpt.config
    if c.tensor_model_parallel_size != 1 or not c.gated_linear_unit or \
            c.activation_func is not F.silu or c.glu_linear_offset or \
            c.activation_func_clamp_value is not None or c.use_te_activation_func or \
            c.fp32_residual_connection or \
            type(gpt.embedding.word_embeddings) is not VocabParallelEmbedding:
        return False
    linears = [(gpt.output_layer, ColumnParallelLinear)]
    for layer in gpt.decoder.layers:
        if type(layer.mlp) is not MLP:
            return False
        if not isinstance(layer.self_attention, JetBlock):  # its torch linears run as modules
            linears += [(layer.self_attention.linear_qkv, ColumnParallelLinear),
                        (layer.self_attention.linear_proj, RowParallelLinear)]
        linears += [(layer.mlp.linear_fc1, ColumnParallelLinear),
                    (layer.mlp.linear_fc2, RowParallelLinear)]
    return all(type(m) is kind and getattr(m, "bias", None) is None for m, kind in linears)


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
    `left_pad` [b] (optional): how many leading positions of each row are padding; a row's RoPE
    position is its buffer position minus its padding, and no real position attends to padding.
    `direct` (default: plain_weights(gpt)) applies the linear layers by their weights.
    """

    def __init__(self, gpt, batch: int, max_len: int, left_pad: torch.Tensor | None = None,
                 direct: bool | None = None):
        self.gpt, self.len, self.max_len = gpt, 0, max_len
        self.direct = plain_weights(gpt) if direct is None else direct
        p = next(gpt.parameters())
        freqs = gpt.rotary_pos_emb(max_len).to(p.device)  # [max_len, 1, 1, rot_dim]
        self.cos, self.sin = torch.cos(freqs).to(p.dtype), torch.sin(freqs).to(p.dtype)
        self.valid = None  # [b, max_len]: False at padding
        self.padded_until = 0  # positions before this may be padding (in some row)
        if left_pad is not None and bool((left_pad > 0).any()):
            pad = left_pad.to(p.device)
            self.padded_until = int(pad.max())
            positions = torch.arange(max_len, device=p.device)
            self.valid = positions[None, :] >= pad[:, None]
            # each row's own positions (RoPE is relative, so a shift changes the logits only by
            # rounding; these keep the angles of the row's unpadded forward): [max_len, b, 1, rot]
            rows = (positions[:, None] - pad[None, :]).clamp(min=0)
            self.cos, self.sin = self.cos[rows, 0], self.sin[rows, 0]
        self.cache = []
        for layer in gpt.decoder.layers:
            a = layer.self_attention
            if isinstance(a, JetBlock):  # its (recurrent state, conv cache), set by the prefill
                self.cache.append([None])
                continue
            shape = (batch, a.num_query_groups_per_partition, max_len,
                     a.hidden_size_per_attention_head)
            self.cache.append((torch.empty(shape, dtype=p.dtype, device=p.device),
                               torch.empty(shape, dtype=p.dtype, device=p.device)))
        self.output_weight = gpt.shared_embedding_or_output_weight() \
            if gpt.share_embeddings_and_output_weights else None
        if self.direct and self.output_weight is None:
            self.output_weight = gpt.output_layer.weight

    def _rope_and_mask(self, s: int):
        """(cos, sin) broadcastable to [s, b, heads, dim], and the attention mask of the new
        positions (None: plain causal from position 0, or a single step without padding)."""
        start, end = self.len, self.len + s
        dev = self.cos.device
        cos, sin = self.cos[start:end], self.sin[start:end]
        if s == 1:
            mask = None if self.valid is None else self.valid[:, None, None, :end]
        else:
            mask = None
            if start or self.valid is not None:
                mask = (torch.arange(end, device=dev)[None, :]
                        <= torch.arange(start, end, device=dev)[:, None])
            if self.valid is not None:  # padding queries see their causal past (finite, unused)
                mask = mask & (self.valid[:, None, :end] | ~self.valid[:, start:end, None])
                mask = mask[:, None]
        return cos, sin, mask

    def _qkv(self, a, x: torch.Tensor):
        """q [s, b, heads, dim], k and v [s, b, groups, dim], as get_query_key_value_tensors."""
        if not self.direct:
            return a.get_query_key_value_tensors(x, None)
        s, b = x.shape[:2]
        groups, dim = a.num_query_groups_per_partition, a.hidden_size_per_attention_head
        per_group = a.num_attention_heads_per_partition // groups
        mixed = F.linear(x, a.linear_qkv.weight).view(s, b, groups, (per_group + 2) * dim)
        q, k, v = torch.split(mixed, [per_group * dim, dim, dim], dim=3)
        q = q.reshape(s, b, -1, dim)
        if a.q_layernorm is not None:
            q = a.q_layernorm(q)
        if a.k_layernorm is not None:
            k = a.k_layernorm(k)
        return q, k, v

    def _attention(self, layer, x: torch.Tensor, cache, cos, sin, mask) -> torch.Tensor:
        """Self-attention of the new positions x [s, b, h] over the cache; output [s, b, h]
        (before the residual; megatron's linear_proj output)."""
        a = layer.self_attention
        q, k, v = self._qkv(a, x)
        s, b = q.shape[:2]
        start, end = self.len, self.len + s
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        kc, vc = cache
        kc[:, :, start:end] = k.permute(1, 2, 0, 3)
        vc[:, :, start:end] = v.permute(1, 2, 0, 3)
        keys, values = kc[:, :, :end], vc[:, :, :end]
        heads, groups = q.shape[2], keys.shape[1]
        scale = getattr(a.core_attention, "softmax_scale", None) or \
            1.0 / math.sqrt(a.hidden_size_per_attention_head)
        if s == 1:  # decode: the heads of a group share its keys, as rows of one query matrix
            qg = q.reshape(b, groups, heads // groups, -1)
            out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask, scale=scale)
            out = out.reshape(1, b, -1)
        else:  # prefill (from position `start`): causal within the new positions
            out = F.scaled_dot_product_attention(
                q.permute(1, 2, 0, 3), keys, values, attn_mask=mask,
                is_causal=mask is None, scale=scale, enable_gqa=heads != groups)
            out = out.permute(2, 0, 1, 3).reshape(s, b, -1)
        if self.direct:
            return F.linear(out, a.linear_proj.weight)
        return a.linear_proj(out)

    def _linear_attention(self, block, x: torch.Tensor, cache: list) -> torch.Tensor:
        """A JetBlock layer's mixer over the new positions x [s, b, h]: its state carries the
        past, so nothing grows with the sequence. Padding (only ever in the prefill) is skipped;
        steps past it run unmasked."""
        valid = None
        if self.len < self.padded_until:
            valid = self.valid[:, self.len:self.len + x.shape[0]]
        out, cache[0] = block.mix(x.transpose(0, 1), cache[0], valid)
        out = out.transpose(0, 1)
        return out if self.direct else (out, None)  # the module path's (output, bias)

    def _layer(self, layer, h: torch.Tensor, cache, cos, sin, mask) -> torch.Tensor:
        if isinstance(layer.self_attention, JetBlock):
            out = self._linear_attention(layer.self_attention, layer.input_layernorm(h), cache)
        else:
            out = self._attention(layer, layer.input_layernorm(h), cache, cos, sin, mask)
        if not self.direct:
            h = layer.self_attn_bda(False, layer.config.bias_dropout_fusion)(
                out, h, layer.hidden_dropout)
            return layer._forward_mlp(h)
        h = h + out  # bias-dropout-add in eval without bias (residual first, as megatron adds)
        mlp = layer.mlp
        gate, up = torch.chunk(F.linear(layer.pre_mlp_layernorm(h), mlp.linear_fc1.weight), 2, -1)
        return h + F.linear(F.silu(gate) * up, mlp.linear_fc2.weight)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [b, vocab] (the padded vocabulary) after feeding tokens [b, s]."""
        gpt = self.gpt
        b, s = tokens.shape
        if self.len + s > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions is full")
        if self.direct:  # megatron's embedding: lookup, [s, b, h]; its dropout is off in eval
            h = F.embedding(tokens.t(), gpt.embedding.word_embeddings.weight)
        else:
            h = gpt.embedding(input_ids=tokens, position_ids=None)
        cos, sin, mask = self._rope_and_mask(s)
        for layer, cache in zip(gpt.decoder.layers, self.cache):
            h = self._layer(layer, h, cache, cos, sin, mask)
        self.len += s
        h = gpt.decoder.final_layernorm(h[-1])
        if self.direct:
            return F.linear(h, self.output_weight)
        logits, _ = gpt.output_layer(h[None], weight=self.output_weight,
                                     runtime_gather_output=True)
        return logits[0]
