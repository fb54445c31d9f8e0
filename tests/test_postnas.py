"""The postnas stage: the search on its own, the stage end to end (layout, importance, hybrid
checkpoint a later stage can start from), resume after SIGKILL (bitwise), bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import finish_job, start_job
from data_recipes.arithmetic import iter_arithmetic_documents
from data_recipes.recall import recall_documents
from data_recipes.tokenizer_loading import SentencePieceTokenizer
from data_recipes.tokenizer_training import train_sentencepiece
from stages.configs.base import PostTrainingLRConfig
from stages.configs.model import ModelConfig
from stages.configs.postnas import PostNASConfig
from stages.contract import StageSpec, read_json, save_spec
from stages.engine.layout_search import (Layout, Scores, beam_search, exhaustive_search,
                                         importance_table, worst_placement)

REPO = Path(__file__).resolve().parents[1]
BASE = ModelConfig(num_layers=4, hidden_size=32, ffn_hidden_size=88, num_attention_heads=4,
                   num_query_groups=2, seq_length=48)
POSTNAS = PostNASConfig(tokenizer="tok", init="base", data="data", keep_full=2, beam=2, steps=6,
                        global_batch_size=4, micro_batch_size=2, score_samples=8,
                        lr=PostTrainingLRConfig(max=3e-3, min=3e-4), checkpoint_every=2,
                        log_every=2, seed=3)


# --- the search alone ------------------------------------------------------------------------------

def additive(weights: dict[int, float], pair_bonus: dict[frozenset, float] = {}):
    def score(full: Layout) -> dict[str, float]:
        bonus = sum(v for pair, v in pair_bonus.items() if pair <= full)
        return {"a": sum(weights[i] for i in full) + bonus, "b": -float(len(full))}
    return score


def test_beam_search_finds_the_best_placement_and_traces_its_rounds():
    scores = Scores(additive({0: 0.1, 1: 0.9, 2: 0.3, 3: 0.5}), 4)
    best, trace = beam_search(scores, keep_full=2, beam=2)
    assert sorted(best) == [1, 3] == sorted(exhaustive_search(scores, 2))
    assert [r["full_layers"] for r in trace if r["round"] == 1 and r["kept"]] == [[1], [3]]
    assert {r["round"] for r in trace} == {1, 2}
    table = importance_table(scores)
    assert [round(r["a"], 6) for r in table] == [0.1, 0.9, 0.3, 0.5]
    # rescaled: all-linear 0, all-full +1 on "a" (full is better) and -1 on "b" (full is worse)
    assert scores.combined(Layout()) == 0 and scores.combined(Layout(range(4))) == 0


def test_where_all_linear_beats_all_full_a_better_score_still_ranks_higher():
    # held-out loss can favour all-linear (postnas's bench saw it); the rescale must not invert
    losses = {frozenset(): 1.47, frozenset({0}): 1.57, frozenset({1}): 1.49, frozenset({2}): 1.48,
              frozenset(range(3)): 1.64}
    scores = Scores(lambda full: {"loss": -losses[frozenset(full)]}, 3)
    assert sorted(exhaustive_search(scores, 1)) == [2]  # the lowest loss of the placements
    assert sorted(worst_placement(scores, 1)) == [0]


def test_a_beam_of_one_can_miss_what_a_wider_beam_finds():
    # layers 0 and 2 are weak alone but strong together: greedy takes 1 first
    score = additive({0: 0.2, 1: 0.5, 2: 0.2, 3: 0.0}, {frozenset({0, 2}): 1.0})
    narrow, _ = beam_search(Scores(score, 4), keep_full=2, beam=1)
    wide, _ = beam_search(Scores(score, 4), keep_full=2, beam=4)
    assert sorted(wide) == [0, 2] == sorted(exhaustive_search(Scores(score, 4), 2))
    assert sorted(narrow) != [0, 2]


def test_bad_postnas_config_is_one_line_naming_the_key():
    with pytest.raises(ValueError, match=r"^tasks\[1\]: 'mmlu' is not a postnas task; one of "
                                         r"recall, loss$"):
        dataclasses.replace(POSTNAS, tasks=["recall", "mmlu"])
    with pytest.raises(ValueError, match=r"^keep_full: 4, must be below the model's 4 layers"):
        dataclasses.replace(POSTNAS, keep_full=4).check_layers(4)


QWEN3_1_7B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 2048,
              "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16,
              "num_key_value_heads": 8, "head_dim": 128, "rope_theta": 1000000,
              "rms_norm_eps": 1e-06, "tie_word_embeddings": True, "vocab_size": 151936,
              "hidden_act": "silu", "eos_token_id": 151645}


@pytest.fixture
def jet_recipe(write_recipe, tmp_path, monkeypatch) -> Path:
    """recipes/jet_nemotron.yaml with a local model directory (its config.json) and data paths."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps(QWEN3_1_7B))
    (tmp_path / "text.txt").write_text("some text\n")
    (tmp_path / "chats.jsonl").write_text("")
    monkeypatch.setenv("JET_BASE_MODEL", str(tmp_path / "base"))
    monkeypatch.setenv("JET_TEXT", str(tmp_path / "text.txt"))
    monkeypatch.setenv("JET_CHATS", str(tmp_path / "chats.jsonl"))
    return write_recipe((REPO / "recipes" / "jet_nemotron.yaml").read_text())


def test_the_jet_nemotron_recipe_validates_and_plans(jet_recipe):
    from pipeline.graph import build_graph
    from pipeline.validate import load_recipe

    recipe = load_recipe(jet_recipe)
    assert recipe.stages["postnas"].keep_full == 2
    assert "postnas" in build_graph(recipe)


@pytest.mark.parametrize("override, key, message", [
    ("stages.postnas.keep_full=28", "stages.postnas.keep_full", "28, must be below the model's "
                                                               "28 layers"),
    ("stages.postnas.tasks=[recall,mmlu]", "stages.postnas.tasks[1]",
     "'mmlu' is not a postnas task; one of recall, loss"),
    ("stages.hybrid_sft.model={layout: [full, mamba]}", "stages.hybrid_sft.model.layout",
     "2 entries for num_layers 28; one per layer"),
    ("stages.hybrid_sft.model={num_layers: 2, layout: [full, mamba]}",
     "stages.hybrid_sft.model.layout[1]", "'mamba' is not a layer kind; one of full, linear"),
])
def test_bad_postnas_input_is_one_line_naming_the_key(jet_recipe, override, key, message):
    from pipeline.recipe import RecipeError
    from pipeline.validate import load_recipe

    with pytest.raises(RecipeError) as e:
        load_recipe(jet_recipe, [override])
    problems = dict(e.value.problems)
    assert problems.get(key) == message, problems


def test_every_training_step_samples_a_linear_layer():
    from stages.postnas import step_draws

    class NoWindows:
        def sample(self, rng, n):
            return None

    cfg = dataclasses.replace(POSTNAS, linear_probability=0.05)
    draws = [step_draws(cfg, step, 4, NoWindows())[0] for step in range(200)]
    assert all("linear" in paths for paths in draws)
    assert draws == [step_draws(cfg, step, 4, NoWindows())[0] for step in range(200)]


# --- the stage -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inputs(tmp_path_factory, megatron_world) -> dict[str, str]:
    from stages.engine.hf.importer import save_weights
    from stages.engine.model import build_model

    root = tmp_path_factory.mktemp("postnas_inputs")
    docs = list(recall_documents(0, 400, 6)) + list(iter_arithmetic_documents(400, 0, 2))
    path = train_sentencepiece([iter(docs)], root / "tok", 320)
    tok = SentencePieceTokenizer(path)
    (root / "tok").mkdir(exist_ok=True)
    (root / "tok" / "manifest.json").write_text(json.dumps({"model_file": path}))
    ids = np.concatenate([tok.encode(d) + [tok.eod_id] for d in docs]).astype(np.uint16)
    (root / "data").mkdir()
    ids.tofile(root / "data" / "mix.bin")
    (root / "data" / "manifest.json").write_text(json.dumps({
        "vocab_size": tok.vocab_size, "shards": {"mix": {"prefix": str(root / "data" / "mix")}}}))
    torch.manual_seed(0)
    save_weights(build_model(BASE, tok.vocab_size, BASE.seq_length), root / "base" / "checkpoints")
    (root / "base" / "manifest.json").write_text(json.dumps({"model": asdict(BASE)}))
    return {name: str(root / name) for name in ("tok", "data", "base")}


def postnas_spec(out: Path, inputs: dict[str, str]) -> Path:
    return save_spec(StageSpec(name="postnas", kind="postnas", config=asdict(POSTNAS),
                               output_dir=str(out), model=asdict(BASE),
                               inputs={"tokenizer": inputs["tok"], "init": inputs["base"],
                                       "data": inputs["data"]}))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, inputs) -> Path:
    out = tmp_path_factory.mktemp("postnas_uninterrupted")
    finish_job(start_job("stages.postnas", postnas_spec(out, inputs)))
    return out


@pytest.mark.slow
def test_postnas_writes_a_layout_its_tables_and_a_hybrid_later_stages_load(reference, inputs):
    from stages.engine import checkpoint as ckpt
    from stages.engine.model import build_model

    m = read_json(reference / "manifest.json")
    assert m["final_step"] == 6
    assert m["layout"].count("full") == 2 and len(m["layout"]) == 4
    assert [i for i, k in enumerate(m["layout"]) if k == "full"] == m["full_layers"]
    last = [r for r in m["beam_trace"] if r["round"] == 2]
    assert max(last, key=lambda r: r["combined"])["full_layers"] == m["full_layers"]
    assert [r["layer"] for r in m["importance"]] == [0, 1, 2, 3]
    assert all({"recall", "loss", "combined"} <= set(r) for r in m["importance"])
    assert {r["round"] for r in m["beam_trace"]} == {1, 2}
    assert m["kv_bytes_per_token_hybrid"] * 2 == m["kv_bytes_per_token_original"]
    assert m["model"]["layout"] == m["layout"]
    # the all-full layout is the original model: its loss is the base model's own
    tok = SentencePieceTokenizer(read_json(Path(inputs["tok"]) / "manifest.json")["model_file"])
    hybrid_cfg = ckpt.checkpoint_model({}, m, None)
    hybrid = build_model(hybrid_cfg, tok.vocab_size, hybrid_cfg.seq_length)
    ckpt.load_model_weights_only(str(reference), hybrid)  # what init: of sft/rl/eval does
    assert ckpt.params_sha256(hybrid) == m["params_sha256"]
    assert (reference / "importance.png").stat().st_size > 0
    rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert sum("kl" in r for r in rows) == 6


@pytest.mark.slow
def test_all_full_scores_are_the_base_models(reference, inputs):
    from stages.engine import checkpoint as ckpt
    from stages.engine.layout_scoring import TokenWindows, mean_loss
    from stages.engine.model import build_model

    m = read_json(reference / "manifest.json")
    tok = SentencePieceTokenizer(read_json(Path(inputs["tok"]) / "manifest.json")["model_file"])
    base = build_model(BASE, tok.vocab_size, BASE.seq_length).eval()
    ckpt.load_model_weights_only(inputs["base"], base)
    windows = TokenWindows(read_json(Path(inputs["data"]) / "manifest.json"), BASE.seq_length + 1)
    heldout = windows.sample(np.random.default_rng([POSTNAS.seed, 29]), POSTNAS.score_samples)
    assert m["all_full"]["loss"] == -mean_loss(base, heldout, tok.vocab_size)


@pytest.mark.slow
def test_postnas_resume_after_sigkill_is_bitwise_identical(reference, inputs, tmp_path):
    from stages.engine.checkpoint import latest_checkpoint

    spec = postnas_spec(tmp_path, inputs)
    proc = start_job("stages.postnas", spec)
    deadline = time.time() + 180
    while latest_checkpoint(tmp_path / "super" / "checkpoints") is None:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "manifest.json").exists()
    assert "resumed from" in finish_job(start_job("stages.postnas", spec))
    got, want = read_json(tmp_path / "manifest.json"), read_json(reference / "manifest.json")
    for key in ("params_sha256", "final_kl", "importance", "beam_trace", "layout", "all_linear"):
        assert got[key] == want[key], key
