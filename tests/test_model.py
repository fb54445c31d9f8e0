"""The Llama-style GPTModel: analytic parameter count, and the RoPE base switch (ABF)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from stages.configs.model import ModelConfig, num_params

MODEL = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=88, num_attention_heads=4,
                    num_query_groups=2, seq_length=16)


@pytest.mark.parametrize("tied", [False, True])
def test_num_params_matches_the_built_model(megatron_world, tied):
    from stages.engine.model import build_model

    cfg = dataclasses.replace(MODEL, tie_embeddings=tied)
    model = build_model(cfg, vocab_size=300, max_seq_length=16)
    assert sum(p.numel() for p in model.parameters()) == num_params(cfg, 300)
    assert model.embedding.word_embeddings.weight.shape[0] == 384  # padded to a multiple of 128
    assert all("bias" not in name for name, _ in model.named_parameters())


def test_set_rotary_base_equals_a_model_built_with_that_base(megatron_world):
    from stages.engine.model import build_model, set_rotary_base

    tokens = torch.randint(0, 300, (2, 16))
    pos = torch.arange(16)[None].expand(2, 16)
    mask = torch.triu(torch.ones(1, 1, 16, 16, dtype=torch.bool), diagonal=1)
    model = build_model(MODEL, 300, 16).eval()
    before = model(tokens, pos, mask)  # fills the rotary cache with the old base
    set_rotary_base(model, 500000.0)
    reference = build_model(dataclasses.replace(MODEL, rotary_base=500000.0), 300, 16).eval()
    reference.load_state_dict(model.state_dict())
    after = model(tokens, pos, mask)
    assert not torch.allclose(before, after)
    assert torch.equal(after, reference(tokens, pos, mask))
