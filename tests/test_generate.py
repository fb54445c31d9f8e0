"""The generator's fast path (stages.engine.kv_decode) is the same model: its logits equal the full
forward's at every step (prefill, a second prefill chunk, single-token steps; GQA, qk-norm, tied
embeddings, llama3 RoPE scaling), by the weights or through the modules, and for left-padded rows
of a ragged batch (each equal to its own unpadded forward); generate() with it equals megatron's
static-cache path and transformers' generate on the exported weights token for token, and its
cache is sized to the longest sequence of the batch.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from stages.configs.model import ModelConfig

VOCAB = 300
# std 0.2: peaked logits, so greedy argmax is not decided by float noise between engines
MODEL = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
                    num_query_groups=2, seq_length=64, hidden_dropout=0.0, attention_dropout=0.0,
                    init_method_std=0.2)
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19], [20, 21, 22, 23]]


def build(cfg: ModelConfig = MODEL, std: float | None = None):
    from stages.engine.model import build_model

    torch.manual_seed(0)
    if std is not None:
        cfg = dataclasses.replace(cfg, init_method_std=std)
    model = build_model(cfg, VOCAB, cfg.seq_length).eval()
    with torch.no_grad():  # norms start at 1: randomise them, or a swapped norm would pass
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


def full_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    n = tokens.shape[1]
    mask = torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool), diagonal=1)
    with torch.no_grad():
        return model(tokens, torch.arange(n)[None].expand_as(tokens), mask)


@pytest.mark.parametrize("variant", [
    {},
    {"qk_layernorm": True, "head_dim": 32, "tie_embeddings": True},
    {"rope_scaling": "llama3", "rope_scaling_factor": 8.0, "num_query_groups": 4},
])
def test_fast_path_logits_equal_the_full_forward_at_every_step(megatron_world, variant):
    from stages.engine.kv_decode import KVDecoder, plain_weights, unsupported_reason

    model = build(dataclasses.replace(MODEL, **variant), std=0.05)
    assert unsupported_reason(model) is None and plain_weights(model)
    tokens = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    want = full_logits(model, tokens)
    cuts = [0, 9, 14] + list(range(15, 41))  # prefill 9, a second chunk of 5, then one at a time
    for direct in (True, False):  # by the weights (the default here), through the modules
        decoder = KVDecoder(model, 3, 40, direct=direct)
        worst = 0.0
        for a, b in zip(cuts, cuts[1:]):
            got = decoder.step(tokens[:, a:b])
            worst = max(worst, (got - want[:, b - 1]).abs().max().item())
        print(f"{variant} direct={direct}: max |fast - full| logit difference {worst:.2e} "
              f"(logits up to {want.abs().max().item():.1f})")
        assert worst <= 1e-5
    with pytest.raises(ValueError, match="KV cache of 40 positions is full"):
        decoder.step(tokens[:, :1])


def padded_decode_error(model, forward, lengths: list[int], new: int, seed: int,
                        direct: bool | None = None, vocab: int = VOCAB) -> float:
    """Rows of `lengths` tokens (+ `new` more each), left-padded into one batch, prefilled at once
    and then decoded a position at a time by KVDecoder: the largest logit difference from each
    row's own unpadded `forward` (tokens [1, n] -> logits [n, vocab])."""
    from stages.engine.kv_decode import KVDecoder

    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, vocab, (n + new,), generator=g) for n in lengths]
    longest = max(lengths)
    pad = torch.tensor([longest - n for n in lengths])
    buf = torch.zeros(len(rows), longest + new, dtype=torch.long)  # padding: token 0
    for i, r in enumerate(rows):
        buf[i, int(pad[i]):] = r
    with torch.no_grad():
        want = [forward(r[None]) for r in rows]
    decoder = KVDecoder(model, len(rows), longest + new, left_pad=pad, direct=direct)
    worst = 0.0
    for a, b in zip([0] + list(range(longest, longest + new)), range(longest, longest + new + 1)):
        got = decoder.step(buf[:, a:b])  # the prefill, then one position at a time
        for i in range(len(rows)):
            worst = max(worst, (got[i] - want[i][b - 1 - int(pad[i])]).abs().max().item())
    return worst


def test_left_padded_rows_equal_their_own_full_forward(megatron_world):
    model = build(dataclasses.replace(MODEL, qk_layernorm=True), std=0.05)
    for direct in (True, False):
        worst = padded_decode_error(model, lambda t: full_logits(model, t)[0], [9, 3, 12, 12],
                                    new=6, seed=2, direct=direct)
        print(f"direct={direct}: max |padded - own forward| logit difference {worst:.2e}")
        assert worst <= 1e-5


def test_generate_equals_megatron_static_path_and_sizes_the_cache(megatron_world, monkeypatch):
    from stages.engine import kv_decode
    from stages.engine.generate import SamplingConfig, generate

    model = build()
    sizes = []
    real = kv_decode.KVDecoder

    class Recording(real):
        def __init__(self, gpt, batch, max_len, **kw):
            super().__init__(gpt, batch, max_len, **kw)
            sizes.append([tuple(k.shape) for k, _ in self.cache])

    monkeypatch.setattr(kv_decode, "KVDecoder", Recording)
    greedy = SamplingConfig(max_new_tokens=12)
    fast = generate(model, PROMPTS, greedy, set(), VOCAB)
    # the longest prompt (7) + 12 new tokens, not the model's seq_length (64)
    assert sizes == [[(4, 2, 19, 16)] * 2]
    monkeypatch.setattr(kv_decode, "unsupported_reason", lambda gpt: "forced")
    assert generate(model, PROMPTS, greedy, set(), VOCAB) == fast
    assert len(sizes) == 1  # the forced run did not use the fast path
    assert all(len(new) == 12 for new in fast) and len({tuple(n) for n in fast}) > 1
    # a stop token: both paths cut every row at its first one (the batch ends when all stopped)
    stop = {fast[0][3], fast[2][5]}
    cut = generate(model, PROMPTS, greedy, stop, VOCAB)
    monkeypatch.undo()
    assert generate(model, PROMPTS, greedy, stop, VOCAB) == cut
    assert cut[0][-1] in stop and cut[2][-1] in stop and len(cut[0]) <= 4 and len(cut[2]) <= 6


def test_generate_agrees_with_transformers_on_the_exported_model(megatron_world, tmp_path):
    transformers = pytest.importorskip("transformers")
    from stages.engine.generate import SamplingConfig, generate
    from stages.engine.hf.exporter import export_weights

    model = build()
    export_weights(model, MODEL, VOCAB, tmp_path, "float32",
                   {"bos_token_id": None, "eos_token_id": 1, "pad_token_id": 0,
                    "max_position_embeddings": MODEL.seq_length})
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = generate(model, PROMPTS, SamplingConfig(max_new_tokens=16), set(), VOCAB)
    for prompt, new in zip(PROMPTS, ours):
        ids = torch.tensor([prompt])
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
        assert theirs[0, len(prompt):].tolist() == new
