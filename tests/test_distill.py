"""Dual Preference Distillation: the pair filter, the tokenizer check, the teacher's cached top-k,
and the stage end to end (it learns toward the teacher, and resumes bitwise after SIGKILL).

The loss terms themselves are checked in test_distill_loss.py.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from data_recipes.arithmetic import iter_arithmetic_documents
from data_recipes.chat import SPECIAL_TOKENS
from data_recipes.generators import parse_score
from data_recipes.oracles import ArithmeticOracle
from data_recipes.pairs import ArithmeticVerifier, JudgeScorer, make_pairs
from data_recipes.tokenizer_loading import SentencePieceTokenizer, tokenizer_mismatch
from data_recipes.tokenizer_training import train_sentencepiece
from stages.configs.post_training import DistillConfig, DistillLossConfig
from data_recipes.generators import GeneratorConfig
from stages.configs.model import ModelConfig
from data_recipes.pairs import PairFilterConfig
from data_recipes.prompts import PromptsConfig
from stages.configs.base import PostTrainingLRConfig
from conftest import finish_job, sigkill_at_first_checkpoint_then_rerun, start_job
from stages.contract import StageSpec, read_json, save_spec

REPO = Path(__file__).resolve().parents[1]
STUDENT = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=88, num_attention_heads=4,
                      num_query_groups=2, seq_length=128)
TEACHER = ModelConfig(num_layers=3, hidden_size=48, ffn_hidden_size=128, num_attention_heads=4,
                      num_query_groups=2, seq_length=128)


# --- the pair filter -----------------------------------------------------------------------------

RIGHT, WRONG = "<think>\n3 + 4\n</think>\n\nAnswer: 7", "<think>\n3 + 4\n</think>\n\nAnswer: 8"


def test_verifier_filter_keeps_right_teacher_vs_wrong_student_only():
    prompts = ["What is 3 + 4?"] * 4
    teacher = [[WRONG, RIGHT], [RIGHT, RIGHT], [WRONG, WRONG], [RIGHT, WRONG]]
    student = [[RIGHT, WRONG], [RIGHT, RIGHT], [WRONG, WRONG], ["Answer: 7\n", "no answer"]]
    pairs = make_pairs(["a", "b", "c", "d"], prompts, teacher, student, ArithmeticVerifier(), 1.0)
    assert [p.kept for p in pairs] == [True, False, False, True]
    a, b, c, d = pairs
    assert (a.positive, a.negative) == (RIGHT, WRONG)  # the teacher's best, the student's worst
    assert a.teacher_scores == [0.0, 1.0] and a.student_scores == [1.0, 0.0]
    assert b.margin == 0.0 and c.margin == 0.0  # the student is always right / the teacher never
    assert d.negative == "no answer"
    # a negative margin threshold keeps everything (used by the stage test below)
    assert all(p.kept for p in make_pairs(["a", "b", "c", "d"], prompts, teacher, student,
                                          ArithmeticVerifier(), -1.0))


def test_judge_filter_uses_the_generator_interface_and_its_margin():
    oracle = JudgeScorer(ArithmeticOracle(GeneratorConfig()))
    pairs = make_pairs(["a"], ["What is 3 + 4?"], [[RIGHT]], [[WRONG]], oracle, 0.5)
    assert pairs[0].kept and pairs[0].margin == 1.0
    assert parse_score("Score: 7") == 0.7 and parse_score("Score: 12") == 1.0
    assert parse_score("I like it") == 0.0


# --- tokenizers ------------------------------------------------------------------------------------

def train_tok(root: Path, name: str, vocab: int, seed: int = 0) -> SentencePieceTokenizer:
    path = train_sentencepiece([iter_arithmetic_documents(1500, seed, 3)], root / name, vocab,
                               special_tokens=SPECIAL_TOKENS)
    return SentencePieceTokenizer(path)


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> SentencePieceTokenizer:
    return train_tok(tmp_path_factory.mktemp("tok"), "tok", 400)


def test_tokenizer_mismatch_names_the_difference(tok, tmp_path):
    assert tokenizer_mismatch(tok, SentencePieceTokenizer(tok.model_file)) is None
    other = train_tok(tmp_path, "other", 380)
    assert tokenizer_mismatch(tok, other) == "vocab sizes differ (400 vs 380)"
    same_size = train_tok(tmp_path, "same_size", 400, seed=7)
    why = tokenizer_mismatch(tok, same_size)
    assert why and why.startswith("token ")


def test_recipe_with_a_teacher_trained_on_another_tokenizer_is_rejected(write_recipe):
    from pipeline.recipe import RecipeError
    from pipeline.validate import load_recipe

    text = (REPO / "recipes" / "tiny.yaml").read_text()
    recipe = write_recipe(text.replace("workdir: runs/tiny", "workdir: /tmp/unused"))
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe, ["stages.teacher_sft.tokenizer=other_tok",
                             "stages.other_tok={kind: tokenizer, sources: [code]}"])
    problems = dict(e.value.problems)
    assert "tokenizer 'other_tok', not 'tokenizer'" in problems["stages.distill.teacher"]
    assert "teacher_tokenizer" in problems["stages.distill.teacher"]


# --- the stage -------------------------------------------------------------------------------------

def save_stage(root: Path, name: str, model_cfg: ModelConfig, vocab: int, seed: int) -> str:
    """A stage dir holding a weights-only checkpoint of a randomly initialised model."""
    from stages.engine.hf.importer import save_weights
    from stages.engine.model import build_model

    torch.manual_seed(seed)
    model = build_model(model_cfg, vocab, model_cfg.seq_length)
    save_weights(model, root / name / "checkpoints")
    (root / name / "manifest.json").write_text(json.dumps({"model": asdict(model_cfg)}))
    return str(root / name)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tok, megatron_world) -> dict[str, str]:
    root = tmp_path_factory.mktemp("distill_inputs")
    (root / "tok").mkdir()
    (root / "tok" / "manifest.json").write_text(json.dumps({"model_file": tok.model_file}))
    return {"tokenizer": str(root / "tok"),
            "student": save_stage(root, "student", STUDENT, tok.vocab_size, 1),
            "teacher": save_stage(root, "teacher", TEACHER, tok.vocab_size, 2)}


# Random models write nonsense, so the filter keeps every pair (margin >= -1): this is about the
# training mechanics. What the filter keeps is tested above.
DISTILL = DistillConfig(
    tokenizer="tok", student="student", teacher="teacher",
    prompts=PromptsConfig(num=20, seed=3, max_digits=1), teacher_samples=2, student_samples=2,
    max_new_tokens=16, filter=PairFilterConfig(min_margin=-1.0), epochs=3, global_batch_size=4,
    micro_batch_size=2, lr=PostTrainingLRConfig(max=3e-3, min=3e-5, warmup_steps=1), heldout_pairs=4,
    seed=5, shard_size=8, checkpoint_every=4, log_every=2)


def distill_spec(out: Path, inputs: dict[str, str], cfg: DistillConfig = DISTILL) -> Path:
    return save_spec(StageSpec(name="distill", kind="distill", config=asdict(cfg),
                               output_dir=str(out), inputs=inputs, model=asdict(STUDENT)))






@pytest.fixture(scope="module")
def reference(tmp_path_factory, inputs) -> Path:
    out = tmp_path_factory.mktemp("distill_uninterrupted")
    finish_job(start_job("stages.distill", distill_spec(out, inputs)))
    return out


@pytest.mark.slow
def test_distill_samples_pairs_and_moves_the_student_toward_the_teacher(reference):
    m = read_json(reference / "manifest.json")
    assert m["pairs_sampled"] == 20 and m["pairs_kept"] == 20 and m["pairs_heldout"] == 4
    pairs = [json.loads(line) for line in (reference / "pairs.jsonl").read_text().splitlines()]
    assert all(len(p["teacher_answers"]) == 2 and len(p["student_answers"]) == 2 for p in pairs)
    assert m["final_step"] == 3 * 16 // 4
    held = m["heldout"]  # before training, then after each epoch
    assert set(held) == {"0", "1", "2", "3"}
    for key in ("heldout/kd_positive", "heldout/kd_negative"):
        assert held["3"][key] < 0.8 * held["0"][key], (key, held)
    rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss/dpo" in r]
    assert len(steps) == m["final_step"]
    for key in ("loss/positive_kd", "loss/negative_kd", "dpo/accuracy", "dpo/margin", "lr"):
        assert all(key in r for r in steps)
    assert steps[0]["loss/dpo"] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy == reference
    assert m["model"]["num_layers"] == 2 and m["teacher_model"]["num_layers"] == 3


@pytest.mark.slow
def test_distill_resume_after_sigkill_is_bitwise_identical(reference, inputs, tmp_path):
    out = sigkill_at_first_checkpoint_then_rerun("stages.distill", distill_spec(tmp_path, inputs))
    assert "to sample" not in out  # the pairs were finished before the kill: reused, not resampled
    got, want = read_json(tmp_path / "manifest.json"), read_json(reference / "manifest.json")
    assert got["params_sha256"] == want["params_sha256"]
    assert got["heldout"] == want["heldout"] and got["final"]["loss"] == want["final"]["loss"]


@pytest.mark.slow
def test_a_teacher_tokenizer_mismatch_fails_before_any_work(inputs, tmp_path):
    other = train_tok(tmp_path, "other", 380)
    (tmp_path / "other_tok").mkdir()
    (tmp_path / "other_tok" / "manifest.json").write_text(
        json.dumps({"model_file": other.model_file}))
    cfg = dataclasses.replace(DISTILL, teacher_tokenizer="other_tok")
    out = tmp_path / "run"
    spec = distill_spec(out, {**inputs, "teacher_tokenizer": str(tmp_path / "other_tok")}, cfg)
    log = finish_job(start_job("stages.distill", spec), expect=1)
    assert "teacher_tokenizer: the teacher's tokenizer is not the student's: vocab sizes differ " \
           "(400 vs 380)" in log
    assert not (out / "records").exists() and not (out / "checkpoints").exists()


def test_cached_top_k_with_k_equal_to_the_vocab_gives_the_online_divergence(inputs, tok, tmp_path):
    """The teacher's top-k written once and read back memory-mapped gives, at k = vocab, the
    same per-token divergence as the teacher computed online."""
    from data_recipes.pairs import Pair
    from stages.engine.losses import logits_of
    from stages.engine.pair_batches import (TeacherLogits, encode_pair, make_batch,
                                            read_teacher_topk, write_teacher_topk)
    from stages.engine.generate import load_checkpoint_model

    teacher = load_checkpoint_model(inputs["teacher"], TEACHER, tok.vocab_size)
    student = load_checkpoint_model(inputs["student"], STUDENT, tok.vocab_size)
    pairs = [Pair(str(i), f"What is {i} + 2?", f"Answer: {i + 2}", f"Answer: {i}", 1, 0, True,
                  [], [], [], []) for i in range(3)]
    encoded = [encode_pair(tok, p, 128) for p in pairs]
    write_teacher_topk(teacher, encoded, tok.pad_id, tok.vocab_size, tok.vocab_size, 128, 2,
                       "cpu", tmp_path)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        loss_cfg = DistillLossConfig(divergence=kind, temperature=1.5)
        batch = make_batch(encoded, [2, 0], tok.pad_id, "cpu")
        with torch.no_grad():
            s_logits = logits_of(student, batch, tok.vocab_size)
            online = TeacherLogits(teacher).divergence(s_logits, batch, [2, 0], tok.vocab_size,
                                                       loss_cfg)
            cached = TeacherLogits(topk=read_teacher_topk(tmp_path)).divergence(
                s_logits, batch, [2, 0], tok.vocab_size, loss_cfg)
        mask = batch["loss_mask"].bool()
        torch.testing.assert_close(cached[mask], online[mask], rtol=1e-4, atol=1e-5)
