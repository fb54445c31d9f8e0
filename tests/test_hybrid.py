"""Hybrid GPTModels (full and linear attention per layer) and postnas's super-network: size,
exactness against the base model, generation with state, bitwise save/load."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from stages.configs.model import ModelConfig, kv_cache_bytes_per_token, num_params
from test_generate import padded_decode_error

BASE = ModelConfig(num_layers=3, hidden_size=32, ffn_hidden_size=88, num_attention_heads=4,
                   num_query_groups=2, seq_length=24)
HYBRID = dataclasses.replace(BASE, layout=["linear", "full", "linear"])
VOCAB = 100


def logits_of(model, tokens):
    n = tokens.shape[1]
    mask = torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool), diagonal=1)
    return model(tokens, torch.arange(n)[None].expand_as(tokens), mask)


def test_layout_errors_name_the_key():
    with pytest.raises(ValueError, match=r"^layout\[1\]: 'mamba' is not a layer kind"):
        dataclasses.replace(BASE, layout=["full", "mamba", "full"])
    with pytest.raises(ValueError, match=r"^layout: 2 entries for num_layers 3"):
        dataclasses.replace(BASE, layout=["full", "linear"])


def test_kv_cache_bytes_per_token_count_full_layers_only():
    assert kv_cache_bytes_per_token(BASE) == 2 * 3 * 2 * 8 * 2
    assert kv_cache_bytes_per_token(HYBRID) == kv_cache_bytes_per_token(BASE) // 3


def test_num_params_matches_the_built_hybrid(megatron_world):
    from stages.engine.linear_attention import JetBlock
    from stages.engine.model import build_model

    model = build_model(HYBRID, VOCAB, 24)
    kinds = [type(layer.self_attention) is JetBlock for layer in model.decoder.layers]
    assert kinds == [True, False, True]
    assert sum(p.numel() for p in model.parameters()) == num_params(HYBRID, VOCAB)


def base_and_super():
    from stages.engine.hybrid import SUPER, base_into_super
    from stages.engine.model import build_model

    torch.manual_seed(0)
    base = build_model(BASE, VOCAB, 24).eval()
    supernet = build_model(BASE, VOCAB, 24, layout=[SUPER] * 3).eval()
    base_into_super(base.state_dict(), supernet)
    return base, supernet


def test_an_all_full_super_network_reproduces_the_base_model_exactly(megatron_world):
    from stages.engine import kv_decode
    from stages.engine.hybrid import set_paths

    base, supernet = base_and_super()
    assert kv_decode.unsupported_reason(supernet) == "a super-network layer (its path may be linear)"
    tokens = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        reference = logits_of(base, tokens)
        set_paths(supernet, ["full"] * 3)
        assert torch.equal(logits_of(supernet, tokens), reference)
        set_paths(supernet, ["full", "linear", "full"])
        assert not torch.allclose(logits_of(supernet, tokens), reference)


def test_the_extracted_hybrid_computes_what_its_sub_network_did(megatron_world):
    from stages.engine.hybrid import hybrid_state_dict, set_paths
    from stages.engine.model import build_model

    _, supernet = base_and_super()
    hybrid = build_model(HYBRID, VOCAB, 24).eval()
    hybrid.load_state_dict(hybrid_state_dict(supernet.state_dict(), HYBRID.layout), strict=True)
    tokens = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        set_paths(supernet, HYBRID.layout)
        assert torch.equal(logits_of(hybrid, tokens), logits_of(supernet, tokens))


def test_hybrid_step_decoding_equals_the_full_forward(megatron_world):
    """Through megatron's static inference context (the generator's fallback path): the linear
    layers keep their state in it."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from stages.engine.generate import SamplingConfig, generate
    from stages.engine.model import build_model

    torch.manual_seed(1)
    model = build_model(HYBRID, VOCAB, 24).eval()
    tokens = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        full = logits_of(model, tokens)
        ctx = StaticInferenceContext(2, 20)
        steps = [logits_of_ctx(model, tokens[:, :6], ctx)]
        for t in range(6, 20):
            steps.append(logits_of_ctx(model, tokens[:, t:t + 1], ctx))
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 5:], rtol=1e-4, atol=1e-5)
    # greedy generation continues each prompt with the full forward's argmax
    new = generate(model, [tokens[0, :8].tolist()], SamplingConfig(max_new_tokens=6), set(), VOCAB)
    seq = tokens[0, :8].tolist()
    for t in new[0]:
        with torch.no_grad():
            assert t == int(logits_of(model, torch.tensor([seq]))[0, -1, :VOCAB].argmax())
        seq.append(t)


def test_hybrid_on_the_kv_fast_path_equals_each_rows_own_full_forward(megatron_world,
                                                                     monkeypatch):
    """The KV fast path steps a JetBlock layer by its state; left padding (a ragged batch
    prefilled at once) must leave each row's logits those of its own unpadded forward."""
    from stages.engine import kv_decode
    from stages.engine.model import build_model

    torch.manual_seed(2)
    model = build_model(HYBRID, VOCAB, 24).eval()
    assert kv_decode.unsupported_reason(model) is None and kv_decode.plain_weights(model)

    def own(tokens):
        return logits_of(model, tokens)[0]

    for direct in (True, False):
        worst = padded_decode_error(model, own, [7, 3, 10, 10], new=5, seed=3, direct=direct,
                                    vocab=VOCAB)
        assert worst <= 1e-4, (direct, worst)
    # the check above can fail: a JetBlock that ignores the padding takes it into its state
    from stages.engine.linear_attention import JetBlock

    def mix_ignoring_padding(self, x, state=None, valid=None):
        return mix(self, x, state)

    mix = JetBlock.mix
    monkeypatch.setattr(JetBlock, "mix", mix_ignoring_padding)
    assert padded_decode_error(model, own, [7, 3, 10, 10], new=5, seed=3, vocab=VOCAB) > 1e-3


def logits_of_ctx(model, chunk, ctx):
    n, start = chunk.shape[1], ctx.sequence_len_offset
    mask = torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool), diagonal=1)
    out = model(chunk, torch.arange(start, start + n)[None].expand_as(chunk), mask,
                inference_context=ctx, runtime_gather_output=True)
    ctx.sequence_len_offset += n
    return out[:, -1:]  # megatron keeps the last position's logits only


def test_hybrid_save_and_load_are_bitwise(megatron_world, tmp_path):
    from stages.configs.base import OptimizerConfig
    from stages.engine import checkpoint as ckpt
    from stages.engine.model import build_model
    from stages.engine.optim import build_ddp, build_optimizer

    torch.manual_seed(2)
    model = build_ddp(build_model(HYBRID, VOCAB, 24))
    optimizer = build_optimizer(model, OptimizerConfig(), lr_schedule())
    tokens = torch.randint(0, VOCAB, (2, 24))
    mask = torch.triu(torch.ones(1, 1, 24, 24, dtype=torch.bool), diagonal=1)
    model.zero_grad_buffer()
    model(tokens, torch.arange(24)[None], mask, labels=tokens).mean().backward()
    model.finish_grad_sync()
    optimizer.step()  # moves every parameter off its initial value
    ckpt.save_checkpoint(tmp_path, 1, model, optimizer, {"step": 1})
    torch.manual_seed(3)
    fresh = build_model(HYBRID, VOCAB, 24)
    assert ckpt.params_sha256(fresh) != ckpt.params_sha256(model)
    ckpt.load_model_weights_only(tmp_path, fresh)
    assert ckpt.params_sha256(fresh) == ckpt.params_sha256(model)
    for (name, a), (_, b) in zip(sorted(fresh.state_dict().items()),
                                 sorted(ckpt.unwrap(model).state_dict().items())):
        if torch.is_tensor(a):
            assert torch.equal(a, b), name


def lr_schedule():
    from stages.configs.base import PostTrainingLRConfig
    from schedulers.post_training import post_training_schedule

    return post_training_schedule(PostTrainingLRConfig(), 10, 2, 24, 10000.0)
