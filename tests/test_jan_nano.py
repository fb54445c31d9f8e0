"""recipes/jan_nano.yaml (issue 15): import Qwen3-4B -> RL with tools (a tool-use sub-stage, then
a correctness sub-stage, thinking off) -> the QA eval with and without tools -> export with YaRN
for 128K. It validates and plans given Qwen3-4B's config.json and a tool corpus; bad tool
settings are one error line naming the key; the export adds YaRN to a checkpoint trained without
it, and transformers' YaRN Qwen3 reloads it with our logits past the original context."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from data_recipes.tool_corpus import write_tool_corpus
from pipeline.cli import main
from pipeline.recipe import RecipeError
from pipeline.validate import load_recipe
from stages.contract import write_json_atomic
from test_hf import QWEN3_4B

RECIPE = "recipes/jan_nano.yaml"


@pytest.fixture
def jan_nano_env(tmp_path, monkeypatch) -> list[str]:
    """Qwen3-4B's published config.json (nothing downloaded), a tool corpus and question files
    in the environment variables the recipe reads; the overrides every load uses."""
    (tmp_path / "Qwen3-4B").mkdir()
    write_json_atomic(tmp_path / "Qwen3-4B" / "config.json", QWEN3_4B)
    corpus, questions = write_tool_corpus(tmp_path / "corpus", seed=0, n_towns=3)
    for var, value in (("JAN_NANO_BASE", tmp_path / "Qwen3-4B"), ("JAN_NANO_CORPUS", corpus),
                       ("JAN_NANO_QUESTIONS", questions), ("JAN_NANO_EVAL", questions)):
        monkeypatch.setenv(var, str(value))
    return [f"workdir={tmp_path / 'runs'}"]


def test_jan_nano_recipe_validates_and_plans(jan_nano_env, capsys):
    from pipeline.graph import build_graph

    graph = build_graph(load_recipe(RECIPE, jan_nano_env))
    assert [(n, g.kind) for n, g in graph.items()] == [
        ("base", "import"), ("rl.tool_use", "rl"), ("rl.correctness", "rl"), ("eval", "eval"),
        ("export", "export")]
    tool_use, correctness = graph["rl.tool_use"].config, graph["rl.correctness"].config
    assert tool_use.init == "base" and correctness.init == "rl.tool_use"  # RL without SFT
    assert tool_use.thinking == correctness.thinking == "off"
    first, second = tool_use.substages[0], correctness.substages[0]
    assert (first.reward.format_weight, first.reward.tool_weight) == (0.2, 0.2)
    assert (second.reward.format_weight, second.reward.tool_weight) == (0.0, 0.0)
    assert first.tools.tools == second.tools.tools == ["search", "visit"]
    assert first.max_turns == 5 and first.grpo.updates_per_batch == 4
    assert graph["eval"].config.init == "rl.correctness" and graph["eval"].config.tools
    export = graph["export"]
    assert export.config.init == "rl.correctness"
    assert (export.model["rope_scaling"], export.model["rope_scaling_factor"] *
            export.model["rope_original_context"]) == ("yarn", 131072)
    assert graph["rl.tool_use"].model["rope_scaling"] is None  # RL trains at the native RoPE
    assert main(["plan", RECIPE, *jan_nano_env]) == 0
    out = capsys.readouterr().out
    assert "rl.correctness [rl]  <- base, rl.tool_use" in out and "of 80 GB" in out


def test_jan_nano_bad_tool_settings_name_the_key(jan_nano_env, tmp_path, capsys, monkeypatch):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(RecipeError) as e:
        load_recipe(RECIPE, jan_nano_env + ["stages.rl.substages.0.tools.tools=[search,browse]",
                                            "stages.rl.substages.1.max_turns=0",
                                            f"stages.eval.tools.corpus={missing}"])
    assert dict(e.value.problems) == {
        "stages.rl.substages[0].tools.tools[1]": "'browse' is not a tool; one of search, visit",
        "stages.rl.substages[1].max_turns": "0, must be at least 1",
        "stages.eval.tools.corpus": f"{missing} does not exist"}
    assert main(["plan", RECIPE, *jan_nano_env,
                 f"stages.rl.substages.1.tools.corpus={missing}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: stages.rl.substages[1].tools.corpus: {missing} does not exist"]
    with pytest.raises(RecipeError) as e:
        load_recipe(RECIPE, jan_nano_env + ["stages.eval.max_turns=0"])
    assert dict(e.value.problems) == {"stages.eval.max_turns": "0, must be at least 1"}
    monkeypatch.delenv("JAN_NANO_CORPUS")
    with pytest.raises(RecipeError, match="JAN_NANO_CORPUS is not set"):
        load_recipe(RECIPE, jan_nano_env)


def test_export_adds_yarn_to_a_checkpoint_trained_without_it(megatron_world, tmp_path):
    """As the recipe's export does: an RL checkpoint (native RoPE) exported with the recipe's
    YaRN model writes Qwen3's YaRN rope_scaling and 4x the original context, and transformers
    reloads it with our YaRN logits (<= 1e-4) past the original context; the weights are the
    checkpoint's. Exporting the import stage itself with YaRN is refused (a model that is not
    the imported one)."""
    import dataclasses

    import transformers

    from data_recipes.config_fields import from_dict
    from stages.configs.model import ModelConfig
    from stages.engine.hf.exporter import export_stage
    from test_hf import VOCAB, build_from, import_dir, make_hf_model, our_logits

    original = 64
    make_hf_model("qwen3", tmp_path / "hf", rope_theta=10000.0)
    produced = import_dir(tmp_path / "hf", tmp_path / "import")
    native = from_dict(ModelConfig, produced["model"])
    assert native.rope_scaling is None
    # the RL stage's output: the same weights under an rl manifest (as stages.rl writes one)
    shutil.copytree(tmp_path / "import", tmp_path / "rl")
    write_json_atomic(tmp_path / "rl" / "manifest.json",
                      {"kind": "rl", "model": produced["model"]})
    yarn = dataclasses.replace(native, rope_scaling="yarn", rope_scaling_factor=4.0,
                               rope_original_context=original)
    export_stage(tmp_path / "rl", tmp_path / "import", yarn, tmp_path / "out", "float32")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0,
                                       "beta_slow": 1.0,
                                       "original_max_position_embeddings": original}
    assert written["max_position_embeddings"] == 4 * original
    tokens = torch.randint(0, VOCAB, (2, 4 * original), generator=torch.Generator().manual_seed(3))
    ours = our_logits(build_from(tmp_path / "import", yarn, VOCAB), tokens)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                             dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = back(tokens).logits
    print(f"YaRN export of a native-RoPE checkpoint: max |logit diff| vs transformers "
          f"{(ours - theirs).abs().max().item():.2e}")
    assert (ours - theirs).abs().max() <= 1e-4
    native_logits = our_logits(build_from(tmp_path / "import", native, VOCAB), tokens)
    assert (native_logits - theirs).abs().max() > 1e-2  # YaRN is in the export, not a no-op
    with pytest.raises(ValueError, match="rope_scaling: recipe 'yarn', checkpoint None"):
        export_stage(tmp_path / "import", tmp_path / "import", yarn, tmp_path / "out2")


def test_plan_counts_every_tool_turn_and_the_evals_pass_without_tools(jan_nano_env):
    """A tool-loop answer is up to max_turns x max_new_tokens within max_tokens, and the QA eval
    answers once more without tools (redone here from the recipe's own numbers)."""
    from pipeline.budgets import _human, stage_budget
    from pipeline.graph import build_graph

    recipe = load_recipe(RECIPE, jan_nano_env)
    graph = build_graph(recipe)
    plan = recipe.plan
    node = graph["rl.tool_use"]
    sub = node.config.substages[0]
    per_rollout = min(sub.max_turns * sub.grpo.max_new_tokens,
                      sub.max_tokens or node.model["seq_length"]) * plan.answer_fraction
    rollouts = sub.grpo.steps * sub.grpo.prompts_per_step * sub.grpo.group_size * per_rollout
    assert f"= {_human(rollouts)} rollout tokens" in stage_budget(recipe, graph, node).lines[1]
    ev = graph["eval"].config
    with_tools = min(ev.max_turns * ev.max_new_tokens, ev.max_tokens or
                     graph["eval"].model["seq_length"]) * plan.answer_fraction
    generated = ev.prompts.num * ((1 + ev.samples) * with_tools +
                                  ev.max_new_tokens * plan.answer_fraction)
    line = stage_budget(recipe, graph, graph["eval"]).lines[0]
    assert "with tools" in line and "+ 1 without" in line
    assert stage_budget(recipe, graph, graph["eval"]).gpu_hours == pytest.approx(
        generated / plan.rollout_tokens_per_gpu_s / 3600, rel=1e-9)
