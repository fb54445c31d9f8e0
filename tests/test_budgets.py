"""`pipeline plan`'s post-training budgets: every stage's tokens and GPU-hours from the recipe and
the printed assumptions (the arithmetic is redone here from the recipe's own numbers)."""

import pytest

from conftest import REPO
from pipeline.budgets import stage_budget
from pipeline.cli import main
from pipeline.graph import build_graph
from pipeline.validate import load_recipe
from stages.configs.model import ModelConfig, num_params

TINY = REPO / "recipes" / "tiny.yaml"


def test_rl_substage_budget_is_filter_plus_rollouts_at_the_assumed_throughput():
    recipe = load_recipe(TINY, ["stages.rl.launcher={gpus_per_node: 4}",
                                "plan.rollout_tokens_per_gpu_s=100", "plan.answer_fraction=0.25"])
    graph = build_graph(recipe)
    node = graph["rl.stem"]
    sub = node.config.substages[0]
    answer = sub.grpo.max_new_tokens * 0.25
    filtered = sub.prompts.num * sub.filter.samples * answer
    rollouts = sub.grpo.steps * sub.grpo.prompts_per_step * sub.grpo.group_size * answer
    params = num_params(ModelConfig(**node.model), graph["tokenizer"].config.vocab_size)
    flops = 6 * params * rollouts + 2 * params * rollouts  # trained + old log-probs
    expected = (filtered + rollouts) / 100 / 3600 + flops / (989e12 * 0.4) / 3600
    budget = stage_budget(recipe, graph, node)
    assert budget.gpu_hours == pytest.approx(expected, rel=1e-9)
    assert f"{sub.prompts.num:,} prompts x {sub.filter.samples}" in budget.lines[0]
    assert budget.lines[-1].startswith("GPU-hours:") and "on 4 GPUs" in budget.lines[-1]


def test_sft_budget_counts_the_mixed_samples_and_every_stage_is_in_the_plan(capsys):
    recipe = load_recipe(TINY, ["plan.sft_tokens_per_sample=64"])
    graph = build_graph(recipe)
    sft = graph["sft"].config
    data = graph["sft_data"].config
    samples = data.prompts.num + sum(p.num for p in data.more_prompts)
    budget = stage_budget(recipe, graph, graph["sft"])
    assert budget.lines[0].startswith(f"SFT: {samples} samples x {sft.epochs} epochs = ")
    assert budget.gpu_hours == 0 and budget.lines[-1] == "GPU-hours: none (CPU launcher)"

    assert main(["plan", str(TINY)]) == 0
    out = capsys.readouterr().out
    assert "GPU-hours per stage: none (CPU launchers); total 0.0" in out
    assert "assumptions: 40% MFU of 989 TFLOP/s per GPU" in out
    for name, node in graph.items():  # every training and eval stage prints its budget
        if node.kind in ("sft", "distill", "rl", "eval"):
            block = out.split(f"\n{name} [{node.kind}]", 1)[1].split("\n\n", 1)[0]
            assert "GPU-hours:" in block, name


def test_bad_plan_assumptions_are_key_errors(capsys):
    assert main(["plan", str(TINY), "plan.rollout_tokens_per_gpu_s=0"]) == 2
    assert capsys.readouterr().err.strip() == ("error: plan.rollout_tokens_per_gpu_s: 0.0, must be "
                                               "positive")
