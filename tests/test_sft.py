"""Chat template, KV-cache generation, packing, the SFT stage (resume bitwise) and eval scoring."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from data_recipes.arithmetic import iter_arithmetic_documents
from data_recipes.chat import (SPECIAL_TOKENS, Message, encode_chat, encode_prompt, encode_text,
                               parse_assistant, render)
from data_recipes.oracles import ArithmeticOracle
from data_recipes.prompts import load_prompts
from data_recipes.refine import RefineRoles, refine
from data_recipes.sft_pack import attention_mask, build_sequence, pack
from data_recipes.tokenizer_loading import SentencePieceTokenizer
from data_recipes.tokenizer_training import train_sentencepiece
from data_recipes.generators import GeneratorConfig
from stages.configs.model import ModelConfig
from data_recipes.prompts import PromptsConfig
from stages.configs.post_training import SFTConfig
from stages.configs.base import PostTrainingLRConfig
from conftest import finish_job, sigkill_at_first_checkpoint_then_rerun, start_job
from stages.contract import StageSpec, read_json, save_spec

REPO = Path(__file__).resolve().parents[1]
MODEL = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=88, num_attention_heads=4,
                    num_query_groups=2, seq_length=128, hidden_dropout=0.1, attention_dropout=0.1)
CONVERSATION = [Message("system", "Show your work."), Message("user", "What is 12 + 5?"),
                Message("assistant", "Answer: 17", "column 1: 2 + 5 + carry 0 = 7\nso 17"),
                Message("user", "And 3 * 4?"), Message("assistant", "Answer: 12")]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> SentencePieceTokenizer:
    prefix = tmp_path_factory.mktemp("tok") / "tok"
    path = train_sentencepiece([iter_arithmetic_documents(1500, 0, 3)], prefix, 400,
                               special_tokens=SPECIAL_TOKENS)
    return SentencePieceTokenizer(path)


# --- chat format ---------------------------------------------------------------------------------

def test_template_round_trip(tok):
    ids, _ = encode_chat(tok, CONVERSATION)
    text = render(CONVERSATION)
    assert tok.decode(ids) == text
    assert encode_text(tok, text) == ids  # encoding the whole text gives the same ids
    assert [tok.token_id(t) for t in SPECIAL_TOKENS] == [ids[0], *[
        tok.token_id(t) for t in SPECIAL_TOKENS[1:]]]
    for m in (CONVERSATION[2], CONVERSATION[4]):
        body = render([m]).split("assistant\n", 1)[1]
        assert parse_assistant(body) == m
    prompt = encode_prompt(tok, CONVERSATION[:2])
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    assert ids[:len(prompt)] == prompt


def test_loss_mask_covers_exactly_the_assistant_turns(tok):
    ids, mask = encode_chat(tok, CONVERSATION)
    trained = [i for i, m in zip(ids, mask) if m]
    expected = "".join(
        f"<think>\n{m.reasoning}\n</think>\n\n{m.content}<|im_end|>"
        for m in CONVERSATION if m.role == "assistant")
    assert tok.decode(trained) == expected
    # and the mask is contiguous per assistant turn: two runs of ones
    runs = [k for k, _ in itertools.groupby(mask)]
    assert runs == [0, 1, 0, 1, 0]


def test_a_tokenizer_without_the_chat_markers_is_a_clear_error(tmp_path):
    path = train_sentencepiece([iter_arithmetic_documents(500, 0, 2)], tmp_path / "plain", 300)
    with pytest.raises(ValueError, match="has no '<\\|im_start\\|>' token"):
        encode_chat(SentencePieceTokenizer(path), CONVERSATION)


# --- generation ------------------------------------------------------------------------------------

def test_kv_cache_generation_equals_full_recompute(megatron_world):
    from stages.engine.generate import SamplingConfig, generate
    from stages.engine.model import build_model

    torch.manual_seed(0)
    model = build_model(dataclasses.replace(MODEL, hidden_dropout=0.0, attention_dropout=0.0),
                        300, 64).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19]]
    got = generate(model, prompts, SamplingConfig(max_new_tokens=10), set(), 300)
    for p, new in zip(prompts, got):
        seq = list(p)
        for _ in range(10):
            n = len(seq)
            mask = torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool), diagonal=1)
            with torch.no_grad():
                logits = model(torch.tensor([seq]), torch.arange(n)[None], mask)
            seq.append(int(logits[0, -1, :300].argmax()))
        assert new == seq[len(p):]
    # a stop token ends a sequence (and is returned), sampling is reproducible from its seed
    stop = {got[0][3]}
    assert generate(model, prompts[:1], SamplingConfig(max_new_tokens=10), stop, 300)[0] == \
        got[0][:got[0].index(got[0][3]) + 1]
    cfg = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=8, seed=3)
    assert generate(model, prompts, cfg, set(), 300) == generate(model, prompts, cfg, set(), 300)


# --- packing ---------------------------------------------------------------------------------------

def test_pack_fills_sequences_in_order_and_covers_every_epoch():
    lengths = [30, 50, 20, 70, 10, 40]
    packs = pack(lengths, 64, epochs=2, seed=0)
    for epoch in (0, 1):
        seen = [i for p in packs if p.epoch == epoch for i in p.samples]
        assert sorted(seen) == list(range(6))
    assert all(sum(min(lengths[i], 65) - 1 for i in p.samples) <= 64 for p in packs)
    assert pack(lengths, 64, epochs=2, seed=0) == packs
    assert all(len(p.samples) == 1 for p in pack(lengths, 64, packing=False))


def test_packing_gives_the_same_loss_as_unpacked_samples(megatron_world, tok):
    """Per-token losses of samples packed together (positions reset, attention blocked between
    them) equal those of each sample alone, so packing does not change the objective."""
    from stages.engine.model import build_model
    from stages.engine.losses import token_losses
    from stages.sft import make_batch

    torch.manual_seed(0)
    model = build_model(dataclasses.replace(MODEL, hidden_dropout=0.0, attention_dropout=0.0),
                        tok.vocab_size, 256).eval()
    encoded = [encode_chat(tok, [Message("user", f"What is {a} + {b}?"),
                                 Message("assistant", f"Answer: {a + b}", f"{a} plus {b}")])
               for a, b in ((1, 2), (35, 7), (600, 44))]
    packed = pack([len(e[0]) for e in encoded], 256, shuffle=False)
    assert len(packed) == 1 and packed[0].samples == [0, 1, 2]
    with torch.no_grad():
        together = token_losses(model, make_batch(encoded, packed, 256, tok.pad_id, "cpu"))[0]
        alone = [token_losses(model, make_batch(encoded, [p], 256, tok.pad_id, "cpu"))[0]
                 for p in pack([len(e[0]) for e in encoded], 256, packing=False, shuffle=False)]
    at = 0
    for (ids, _), single in zip(encoded, alone):
        n = len(ids) - 1
        torch.testing.assert_close(together[at:at + n], single[:n], rtol=1e-5, atol=1e-6)
        at += n
    assert float(together.sum()) == pytest.approx(sum(float(a.sum()) for a in alone), rel=1e-5)
    seq = build_sequence(encoded, packed[0], 256, tok.pad_id)
    mask = attention_mask(seq["segment"][None])[0, 0]
    first = len(encoded[0][0]) - 1
    assert mask[first, first - 1] and not mask[first - 1, first - 2]  # blocked across, causal within


# --- the SFT stage ---------------------------------------------------------------------------------

def make_inputs(root: Path, tok: SentencePieceTokenizer) -> dict[str, str]:
    """A tokenizer stage dir and an sft_data stage dir (oracle-refined arithmetic samples)."""
    (root / "tok").mkdir()
    (root / "tok" / "manifest.json").write_text(json.dumps({"model_file": tok.model_file}))
    oracle = ArithmeticOracle(GeneratorConfig())
    samples = refine(load_prompts(PromptsConfig(num=40, seed=4, max_digits=1)),
                     RefineRoles(oracle, [oracle], oracle, oracle), max_rounds=1)
    (root / "data").mkdir()
    with open(root / "data" / "data.jsonl", "w") as f:
        for s in samples:
            f.write(json.dumps({"id": s.id, "messages": s.messages}) + "\n")
    (root / "data" / "manifest.json").write_text(json.dumps({"data": str(root / "data" / "data.jsonl")}))
    return {"tokenizer": str(root / "tok"), "data": str(root / "data")}


SFT = SFTConfig(tokenizer="tok", data="data", epochs=2, global_batch_size=4, micro_batch_size=2,
                lr=PostTrainingLRConfig(max=2e-3, min=2e-5, warmup_steps=2), heldout_samples=6,
                checkpoint_every=3, keep_checkpoints=2, log_every=2, seed=11)


def sft_spec(out: Path, inputs: dict[str, str]) -> Path:
    return save_spec(StageSpec(name="sft", kind="sft", config=asdict(SFT), output_dir=str(out),
                               inputs=inputs, model=asdict(MODEL)))






@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tok) -> dict[str, str]:
    return make_inputs(tmp_path_factory.mktemp("sft_inputs"), tok)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, inputs) -> Path:
    out = tmp_path_factory.mktemp("sft_uninterrupted")
    finish_job(start_job("stages.sft", sft_spec(out, inputs)))
    return out


@pytest.mark.slow
def test_sft_trains_on_assistant_tokens_and_measures_held_out_loss(reference):
    m = read_json(reference / "manifest.json")
    assert m["samples"] == 34 and m["heldout_samples"] == 6 and m["truncated"] == 0
    assert set(m["heldout_loss"]) == {"0", "1", "2"}  # before training, after each epoch
    assert m["heldout_loss"]["2"] < m["heldout_loss"]["0"]
    losses = [r["loss"] for r in map(json.loads, (reference / "metrics.jsonl").read_text()
                                     .splitlines()) if "loss" in r]
    assert len(losses) == m["final_step"] and losses[-1] < losses[0]
    assert m["model"]["seq_length"] == MODEL.seq_length


@pytest.mark.slow
def test_sft_resume_after_sigkill_is_bitwise_identical(reference, inputs, tmp_path):
    sigkill_at_first_checkpoint_then_rerun("stages.sft", sft_spec(tmp_path, inputs))
    got, want = read_json(tmp_path / "manifest.json"), read_json(reference / "manifest.json")
    assert got["params_sha256"] == want["params_sha256"]
    assert got["heldout_loss"] == want["heldout_loss"] and got["final_loss"] == want["final_loss"]


# --- eval scoring -----------------------------------------------------------------------------------

def test_eval_scores_known_outputs():
    from data_recipes.rewards import Task, load_tasks
    from data_recipes.code_tasks import make_code_tasks
    from stages.eval import answered, score

    prompts = [Task(str(i), p) for i, p in enumerate(
        ["What is 12 + 5?", "What is 9 * 9?", "What is 7 - 3?", "What is 2 + 2?"])]
    chat = ["<think>\n2 + 5 = 7\n</think>\n\nAnswer: 17",   # right
            "<think>\nAnswer: 81\n</think>\n\nAnswer: 18",  # the thinking is not the answer
            "Answer: 4",                                    # right, no thinking block
            "<think>\ncut off while thinking... Answer: 4"]  # never answered
    assert score(prompts, chat, "chat") == [True, False, True, False]
    completion = ["column 1: ...\nAnswer: 17", "Answer: 81", "Answer: 5", "4"]
    assert score(prompts, completion, "completion") == [True, True, False, True]
    assert answered(chat, "chat") == 0.75 and answered(completion, "completion") == 0.75
    code = load_tasks(PromptsConfig(kind="code", num=1, seed=0))
    right = next(t.solution for t in make_code_tasks(300, 0) if t.id == code[0].id)
    texts = [f"<think>\n\n</think>\n\n```python\n{right}```", "<think>\n</think>\n\nno code"]
    assert score(code * 2, texts, "chat", "code") == [True, False]
    assert answered(texts, "chat", "code") == 0.5


def test_pass_at_k_matches_its_definition():
    from stages.eval import pass_at_k

    for n, c, k in [(4, 0, 1), (4, 1, 1), (4, 1, 4), (5, 2, 3), (10, 3, 2)]:
        subsets = list(itertools.combinations([1] * c + [0] * (n - c), k))
        assert pass_at_k(n, c, k) == pytest.approx(np.mean([any(s) for s in subsets]))
    assert pass_at_k(4, 4, 1) == 1.0 and math.isclose(pass_at_k(4, 2, 1), 0.5)
