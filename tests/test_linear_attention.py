"""The linear-attention block: the chunked gated delta rule against its recurrence and megatron's
pure-torch kernel, the dynamic convolution's causality, and step decoding against the full forward."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from stages.engine.linear_attention import (JetBlock, chunk_gated_delta_rule,
                                            dynamic_causal_conv, recurrent_gated_delta_rule)


def inputs(b=2, t=45, heads=3, dk=8, dv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, t, heads, dk, generator=g), dim=-1)
    k = F.normalize(torch.randn(b, t, heads, dk, generator=g), dim=-1)
    v = torch.randn(b, t, heads, dv, generator=g)
    decay = -torch.rand(b, t, heads, generator=g)  # log alpha in [-1, 0]
    beta = torch.rand(b, t, heads, generator=g)
    state = torch.randn(b, heads, dk, dv, generator=g)
    return q, k, v, decay, beta, state


@pytest.mark.parametrize("chunk", [1, 16, 64])
def test_chunked_rule_equals_the_recurrence(chunk):
    q, k, v, g, beta, state = inputs()
    o_ref, s_ref = recurrent_gated_delta_rule(q, k, v, g, beta, state)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, state, chunk=chunk)  # 45: a partial chunk
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)


def test_chunked_rule_agrees_with_megatrons_torch_kernel():
    from megatron.core.ssm.gated_delta_net import torch_chunk_gated_delta_rule

    q, k, v, g, beta, state = inputs(t=130)
    o_ref, s_ref = torch_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state,
                                                output_final_state=True)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, state)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)


def test_chunked_rule_gradients_equal_the_recurrences():
    q, k, v, g, beta, state = (x.requires_grad_() for x in inputs(t=20))
    grads = []
    for rule in (recurrent_gated_delta_rule, chunk_gated_delta_rule):
        o, s = rule(q, k, v, g, beta, state)
        grads.append(torch.autograd.grad((o.sin().sum() + s.cos().sum()), (q, k, v, g, beta, state)))
    for ref, got in zip(*grads):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_dynamic_convolution_is_causal():
    torch.manual_seed(0)
    x = torch.randn(2, 12, 5)
    kernels = torch.randn(2, 12, 5, 4)
    out, _ = dynamic_causal_conv(x, kernels)
    for j in range(12):
        changed = x.clone()
        changed[:, j] += 10.0
        kernels_changed = kernels.clone()
        kernels_changed[:, j] += 1.0  # a kernel generated at position j
        out2, _ = dynamic_causal_conv(changed, kernels_changed)
        assert torch.equal(out2[:, :j], out[:, :j])
        assert not torch.allclose(out2[:, j], out[:, j])
    # explicit: out[t] = sum_w kernels[t, w] * x[t - 3 + w]
    padded = F.pad(x, (0, 0, 3, 0))
    ref = sum(kernels[..., w] * padded[:, w:w + 12] for w in range(4))
    torch.testing.assert_close(out, ref)


def test_dynamic_convolution_by_pieces_with_its_cache_equals_the_whole():
    torch.manual_seed(1)
    x, kernels = torch.randn(2, 10, 5), torch.randn(2, 10, 5, 4)
    whole, _ = dynamic_causal_conv(x, kernels)
    a, cache = dynamic_causal_conv(x[:, :3], kernels[:, :3])
    pieces = [a]
    for t in range(3, 10):
        o, cache = dynamic_causal_conv(x[:, t:t + 1], kernels[:, t:t + 1], cache)
        pieces.append(o)
    torch.testing.assert_close(torch.cat(pieces, 1), whole)


def block(seed=0) -> JetBlock:
    torch.manual_seed(seed)
    cfg = SimpleNamespace(hidden_size=32, num_attention_heads=4, num_query_groups=2, kv_channels=8,
                          layernorm_epsilon=1e-5, tensor_model_parallel_size=1,
                          sequence_parallel=False,
                          init_method=lambda w: torch.nn.init.normal_(w, std=0.2),
                          output_layer_init_method=lambda w: torch.nn.init.normal_(w, std=0.2))
    b = JetBlock(cfg, layer_number=1)
    with torch.no_grad():  # a trained generator: kernels that depend on the token
        b.conv_w1.weight.normal_(std=0.3)
        b.conv_w2.weight.normal_(std=0.3)
    return b


def test_step_decoding_with_state_equals_the_full_forward():
    b = block()
    x = torch.randn(70, 2, 32)  # [s, b, h]; 70 positions: more than a chunk
    with torch.no_grad():
        full, bias = b(x)
        assert bias is None
        ctx = SimpleNamespace(sequence_len_offset=0, key_value_memory_dict={})
        outs = [b(x[:5], inference_context=ctx)[0]]  # prefill, then one position at a time
        ctx.sequence_len_offset = 5
        for t in range(5, 70):
            outs.append(b(x[t:t + 1], inference_context=ctx)[0])
            ctx.sequence_len_offset += 1
    torch.testing.assert_close(torch.cat(outs), full, rtol=1e-5, atol=1e-5)
    # a context back at offset 0 starts afresh
    ctx.sequence_len_offset = 0
    with torch.no_grad():
        torch.testing.assert_close(b(x[:5], inference_context=ctx)[0], full[:5])


def test_a_fresh_blocks_convolution_is_the_identity():
    cfg_block = block()
    cfg_block.reset_parameters()
    x = torch.randn(1, 6, 32)
    kernels = cfg_block.conv_w2(F.silu(cfg_block.conv_w1(x))).view(1, 6, -1, 4)
    v = cfg_block.v_proj(x)
    torch.testing.assert_close(dynamic_causal_conv(v, kernels)[0], v)


def test_a_packed_sequence_mask_is_refused():
    b = block()
    x = torch.randn(6, 1, 32)
    causal = torch.ones(1, 1, 6, 6, dtype=torch.bool).triu(1)
    b(x, causal)  # the plain causal mask is fine
    packed = causal.clone()
    packed[..., 3:, :3] = True  # two samples of 3 tokens that must not see each other
    with pytest.raises(ValueError, match="^packing: a linear-attention layer"):
        b(x, packed)
