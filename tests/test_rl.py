"""Multi-stage RL: sub-stages as DAG nodes, tasks and rewards, the pass-rate filter, and the GRPO
stage end to end (resume bitwise after SIGKILL, RL straight from a base model, a sub-stage with
nothing to learn). The loss pieces are checked in test_grpo_loss.py, the sandbox and verifiers in
test_sandbox.py / test_verifiers.py, KV-cache sampling in test_sft.py."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from data_recipes.oracles import ArithmeticOracle
from data_recipes.rewards import JudgeReward, build_reward, load_tasks
from pipeline.recipe import RecipeError
from pipeline.validate import load_recipe
from data_recipes.generators import GeneratorConfig
from stages.configs.rl import GRPOConfig, PassRateFilterConfig, RLConfig, RLSubstageConfig
from data_recipes.prompts import PromptsConfig
from data_recipes.rewards import RewardConfig
from stages.configs.base import PostTrainingLRConfig
from conftest import finish_job, sigkill_at_first_checkpoint_then_rerun, start_job
from stages.contract import StageSpec, read_json, save_spec
from test_distill import STUDENT, inputs, tok  # noqa: F401  (fixtures: a tokenizer, checkpoints)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny.yaml"


# --- sub-stages are stages ---------------------------------------------------------------------

def test_rl_substages_become_chained_stages_with_their_own_hashes():
    from pipeline.graph import build_graph

    recipe = load_recipe(TINY, ["workdir=/tmp/unused"])
    names = [n for n in recipe.stages if n.startswith("rl")]
    assert names == ["rl.stem", "rl.code", "rl.align"]
    assert [recipe.stages[n].init for n in names] == ["distill", "rl.stem", "rl.code"]
    assert recipe.stages["eval_rl"].init == "rl.align"  # `rl` means its last sub-stage
    before = {n: node.hash for n, node in build_graph(recipe).items()}
    changed = load_recipe(TINY, ["workdir=/tmp/unused", "stages.rl.substages.1.grpo.steps=3"])
    after = {n: node.hash for n, node in build_graph(changed).items()}
    assert [n for n in before if before[n] != after[n]] == ["rl.code", "rl.align", "eval_code_after",
                                                           "eval_rl"]


def test_rl_recipe_errors_name_the_substage_key():
    with pytest.raises(RecipeError) as e:
        load_recipe(TINY, ["stages.rl.substages.1.reward.kind=vibes",
                           "stages.rl.substages.2.filter.min_pass=0.95"])
    problems = dict(e.value.problems)
    assert "not a reward" in problems["stages.rl.substages[1].reward.kind"]
    assert "min_pass < max_pass" in problems["stages.rl.substages[2].filter.max_pass"]


def test_rl_straight_from_the_pretrained_model_validates():
    """Jan-nano style: no SFT, no distillation; a base model prompted like it was pretrained."""
    recipe = load_recipe(TINY, ["workdir=/tmp/unused", "stages.rl.init=pretrain",
                                "stages.rl.prompt_format=completion",
                                "stages.rl.stop=['\\nQuestion:']"])
    assert recipe.stages["rl.stem"].init == "pretrain"


# --- tasks and rewards ------------------------------------------------------------------------

def test_tasks_carry_what_verifies_them_and_rewards_score_them():
    arith = load_tasks(PromptsConfig(num=3, max_digits=1, seed=2))
    right = [f"Answer: {t.answer}" for t in arith for _ in range(2)]
    wrong = [f"Answer: {int(t.answer) + 1}" for t in arith for _ in range(2)]
    math = build_reward(RewardConfig(kind="math", workers=2))
    assert math.score(arith, right, 2) == [1.0] * 6 and math.score(arith, wrong, 2) == [0.0] * 6
    code = load_tasks(PromptsConfig(kind="code", num=2, seed=0))
    assert all("It must pass:\nassert" in t.prompt and len(t.tests) == 6 for t in code)
    solution = [f"```python\n{_solution(t)}\n```" for t in code]
    scores = build_reward(RewardConfig(kind="code", workers=2)).score(
        code, [solution[0], "def nope(): pass", solution[1], "```python\nwhile True: pass\n```"], 2)
    assert scores == [1.0, 0.0, 1.0, 0.0]


def _solution(task) -> str:
    from data_recipes.code_tasks import make_code_tasks

    return next(t.solution for t in make_code_tasks(300, 0) if t.id == task.id)


def test_pairwise_judge_rewards_are_win_rates_over_both_orders():
    task = load_tasks(PromptsConfig(num=1, max_digits=1, seed=2))
    ans = task[0].answer
    group = [f"Answer: {ans}", f"long work first\nAnswer: {ans}", "Answer: -1", "Answer: -1"]
    rewards = JudgeReward(ArithmeticOracle(GeneratorConfig())).score(task, group, 4)
    # right & short beats all; right & long beats the wrong ones; the two wrong tie each other
    assert rewards == [1.0, pytest.approx(2 / 3), pytest.approx(1 / 6), pytest.approx(1 / 6)]
    assert sum(rewards) == pytest.approx(2.0)  # every comparison hands out one point


def test_pass_rate_filter_keeps_the_prompts_between_the_bounds():
    from stages.rl import pass_rate_filter

    tasks = load_tasks(PromptsConfig(num=4, max_digits=1, seed=7))
    right_share = {tasks[0].prompt: 0.0, tasks[1].prompt: 0.25, tasks[2].prompt: 0.75,
                   tasks[3].prompt: 1.0}

    class Scripted:  # a policy whose k-th sample of a prompt is right for the first share of k
        def encode(self, task):
            return task.prompt

        def sample(self, prompts, sampling):
            return [(p, i % 4) for i, p in enumerate(prompts)]

        def final_text(self, new):
            prompt, k = new
            task = next(t for t in tasks if t.prompt == prompt)
            return f"Answer: {task.answer if k < 4 * right_share[prompt] else -1}"

    sub = RLSubstageConfig(name="s", filter=PassRateFilterConfig(samples=4, min_pass=0.1,
                                                                  max_pass=0.9))
    rows = pass_rate_filter(Scripted(), tasks, build_reward(RewardConfig(workers=2)), sub, 0)
    assert [r["pass_rate"] for r in rows] == [0.0, 0.25, 0.75, 1.0]
    assert [r["kept"] for r in rows] == [False, True, True, False]


def test_step_tasks_cycle_through_the_kept_prompts():
    from stages.rl import step_tasks

    kept = load_tasks(PromptsConfig(num=5, max_digits=1, seed=1))
    seen = [t.id for s in range(5) for t in step_tasks(kept, s, 3, seed=0)]
    assert sorted(seen[:15]) == sorted([t.id for t in kept] * 3)
    assert step_tasks(kept, 2, 3, 0) == step_tasks(kept, 2, 3, 0)


# --- the stage ----------------------------------------------------------------------------------

# A random model's answers are never right, but the oracle judge still ranks them (shorter wins),
# so the advantages are not all zero and GRPO trains: this is about the mechanics.
JUDGED = RLSubstageConfig(
    name="align", prompts=PromptsConfig(num=12, max_digits=1, seed=3),
    reward=RewardConfig(kind="judge", judge=GeneratorConfig(kind="oracle")),
    filter=PassRateFilterConfig(enabled=False),
    grpo=GRPOConfig(steps=4, prompts_per_step=2, group_size=4, updates_per_batch=2,
                    micro_batch_size=4, max_new_tokens=16, lr=PostTrainingLRConfig(max=1e-3, min=1e-3),
                    mask_truncated=False))  # a random model never stops: train on cut samples too
RL = RLConfig(tokenizer="tok", init="student", substages=[JUDGED], seed=9, checkpoint_every=2)


def rl_spec(out: Path, inputs: dict, cfg: RLConfig = RL) -> Path:
    return save_spec(StageSpec(name="rl.align", kind="rl", config=asdict(cfg), output_dir=str(out),
                               inputs={"tokenizer": inputs["tokenizer"], "init": inputs["student"]},
                               model=asdict(STUDENT)))






@pytest.fixture(scope="module")
def reference(tmp_path_factory, inputs) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("rl_uninterrupted")
    finish_job(start_job("stages.rl", rl_spec(out, inputs)))
    return out


@pytest.mark.slow
def test_grpo_stage_logs_every_step_and_every_rollout(reference):
    m = read_json(reference / "manifest.json")
    assert m["final_step"] == 4 and m["filter_kept"] == 12
    rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    assert len(steps) == 4
    for key in ("reward/std", "pass_rate", "response_length", "clip_frac", "entropy",
                "rollout_s", "train_s", "ratio_mean"):
        assert all(key in r for r in steps), key
    assert all(r["trained_tokens"] > 0 and r["entropy"] > 0 for r in steps)
    # two optimizer steps per rollout batch: the second is off-policy, so the ratio moved
    assert all(r["ratio_mean"] > 0 for r in steps)
    assert any(r["ratio_mean"] != pytest.approx(1.0, abs=1e-7) for r in steps)
    rollouts = [json.loads(line) for line in (reference / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 4 * 2 * 4
    for step in range(4):
        group = [r for r in rollouts if r["step"] == step][:4]
        assert sum(r["advantage"] for r in group) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.slow
def test_rl_substage_resume_after_sigkill_is_bitwise_identical(reference, inputs, tmp_path):  # noqa: F811
    sigkill_at_first_checkpoint_then_rerun("stages.rl", rl_spec(tmp_path, inputs))
    got, want = read_json(tmp_path / "manifest.json"), read_json(reference / "manifest.json")
    assert got["params_sha256"] == want["params_sha256"]
    assert got["final"]["reward/mean"] == want["final"]["reward/mean"]


@pytest.mark.slow
def test_rl_from_a_base_model_with_nothing_in_the_band_passes_the_weights_on(inputs, tmp_path):  # noqa: F811
    """Completion prompts (a base model) and a math reward a random model never earns: the filter
    drops every prompt, the sub-stage says so and hands on the starting weights unchanged."""
    sub = dataclasses.replace(JUDGED, name="stem", reward=RewardConfig(kind="math"),
                              filter=PassRateFilterConfig(samples=2))
    cfg = dataclasses.replace(RL, substages=[sub], prompt_format="completion")
    out = finish_job(start_job("stages.rl", rl_spec(tmp_path, inputs, cfg)))
    assert "filter kept 0/12 prompts (12 too hard" in out and "nothing to train" in out
    m = read_json(tmp_path / "manifest.json")
    assert m["filter_kept"] == 0 and m["filter_dropped_share"] == 1.0
    assert (tmp_path / "checkpoints").is_dir() and m["final_step"] == sub.grpo.steps


def test_an_http_judge_scores_pairs_and_ranks_rollouts_over_real_http(tmp_path):
    """The judge roles go through the generator interface: the same prompts reach a chat model."""
    from stages.serve import ChatServer
    from data_recipes.backends import build_generator
    from data_recipes.pairs import JudgeScorer, make_pairs

    task = load_tasks(PromptsConfig(num=1, max_digits=1, seed=2))
    ans = task[0].answer
    group = [f"Answer: {ans}", f"long work first\nAnswer: {ans}", "Answer: -1", "Answer: -1"]
    with ChatServer() as server:
        judge = build_generator(GeneratorConfig(kind="http", url=server.url, model="judge"),
                                tmp_path / "cache.jsonl")
        rewards = build_reward(RewardConfig(kind="judge"), judge).score(task, group, 4)
        pairs = make_pairs(["a"], [task[0].prompt], [group[:1]], [group[2:3]], JudgeScorer(judge),
                           0.5)
    assert rewards == [1.0, pytest.approx(2 / 3), pytest.approx(1 / 6), pytest.approx(1 / 6)]
    assert pairs[0].kept and pairs[0].margin == 1.0
    assert {role for role, _ in server.requests} == {"prefer", "score"}
    # 12 ordered comparisons, both orders; the two identical wrong answers make 5 of them repeats,
    # which the backend's cache answers without a request
    assert sum(role == "prefer" for role, _ in server.requests) == 12 - 5


def test_truncated_samples_get_no_loss():
    from stages.rl import make_batch

    batch = make_batch([([1, 2, 3], [4, 5], True), ([1, 2], [6, 7, 8], False)], 0, "cpu")
    # row 0: positions 2 and 3 predict the response tokens 4 and 5; row 1 is not trained at all
    assert batch["mask"].tolist() == [[False, False, True, True], [False, False, False, False]]
    assert batch["labels"][0, 2:4].tolist() == [4, 5]


@pytest.mark.slow
def test_rollouts_shared_out_over_two_data_parallel_ranks(inputs, tmp_path):  # noqa: F811
    """`launcher.nproc_per_node: 2`: each rank samples and scores its share of the prompts; the
    metrics are over both ranks and the checkpoint's common state agrees."""
    import os
    import subprocess
    import sys

    spec = rl_spec(tmp_path, inputs)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node=2", "-m", "stages.rl", "--spec", str(spec)],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "differs" not in run.stdout + run.stderr  # no rank-specific common state
    m = read_json(tmp_path / "manifest.json")
    assert m["final_step"] == 4 and m["final"]["trained_tokens"] > 0
    per_rank = [len((tmp_path / f).read_text().splitlines())
                for f in ("rollouts.jsonl", "rollouts.rank1.jsonl")]
    assert per_rank == [4 * 1 * 4, 4 * 1 * 4]  # 4 steps x 1 prompt per rank x 4 samples
