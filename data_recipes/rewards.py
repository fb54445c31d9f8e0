"""RL tasks and their rewards: what a GRPO sub-stage samples from and how a rollout is scored.

A `Task` is a prompt plus what verifies an answer to it: the reference answer (math) or asserts
(code). Rewards score a batch of responses (the final answer, thinking block removed):
  math   the final answer equals the reference (data_recipes.verifiers, in a sandbox)
  code   the response's function passes every public and private assert (in a sandbox)
  judge  a pairwise judge compares every two samples of a prompt's group, in both orders (so
         a judge's bias for the first answer cancels); a sample's reward is its win rate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Protocol

from data_recipes import arithmetic
from data_recipes.code_tasks import make_code_tasks
from data_recipes.config_fields import unhashed
from data_recipes.generators import Generator, GeneratorConfig
from data_recipes.prompts import PromptsConfig, load_prompts
from data_recipes.verifiers import score_code_batch, score_math_batch


@dataclass
class RewardConfig:
    """How a sub-stage scores a rollout."""

    kind: str = "math"
    """math (final answer vs the reference, checked in a sandbox) | code (the response's function
    run against the task's public and private asserts in a sandbox) | judge (a pairwise judge
    compares every two samples of a group, both orders; reward = the sample's win rate)."""
    judge: GeneratorConfig = field(default_factory=GeneratorConfig)
    """judge: the backend: engine (the rl stage's `judge` checkpoint), http, or the arithmetic
    oracle (prefers a right answer, then the shorter one: a programmatic stand-in for a
    preference model)."""
    workers: int = unhashed(8)
    """Sandboxes run at once."""

    def __post_init__(self):
        if self.kind not in ("math", "code", "judge"):
            raise ValueError(f"kind: {self.kind!r} is not a reward; one of math, code, judge")


@dataclass(frozen=True)
class Task:
    id: str
    prompt: str
    answer: str | None = None
    """math: the reference final answer."""
    tests: tuple[str, ...] = ()
    """code: asserts the response's code must pass (public ones are also in the prompt)."""


def load_tasks(cfg: PromptsConfig) -> list[Task]:
    """The prompt set with each prompt's verification data."""
    if cfg.kind == "code":
        return [Task(t.id, t.prompt_with_tests, tests=t.tests)
                for t in make_code_tasks(cfg.num, cfg.seed, cfg.split, cfg.heldout_fraction)]
    prompts = load_prompts(cfg)
    if cfg.kind == "arithmetic":
        return [Task(p.id, p.text, answer=str(arithmetic.solve(p.text)["answer"])) for p in prompts]
    answers = {}
    with open(cfg.path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if cfg.answer_field in row:
                    answers[row[cfg.field]] = str(row[cfg.answer_field])
    return [Task(p.id, p.text, answer=answers.get(p.text)) for p in prompts]


class Reward(Protocol):
    def score(self, tasks: list[Task], responses: list[str], group_size: int) -> list[float]:
        """A reward per response; responses come in groups of `group_size` per task."""


class MathReward:
    def __init__(self, workers: int):
        self.workers = workers

    def score(self, tasks, responses, group_size):
        missing = [t.id for t in tasks if t.answer is None]
        if missing:
            raise ValueError(f"reward: math needs a reference answer; {len(missing)} prompts have "
                             "none (prompts.answer_field)")
        refs = [t.answer for t in tasks for _ in range(group_size)]
        return score_math_batch(responses, refs, max_workers=self.workers)


class CodeReward:
    def __init__(self, workers: int):
        self.workers = workers

    def score(self, tasks, responses, group_size):
        tests = [t.tests for t in tasks for _ in range(group_size)]
        return [r.reward for r in score_code_batch(responses, tests, max_workers=self.workers)]


class JudgeReward:
    """Round-robin within each group: G * (G - 1) judge calls per prompt, batched."""

    def __init__(self, judge: Generator):
        self.judge = judge

    def score(self, tasks, responses, group_size):
        g = group_size
        calls = [(k, i, j) for k in range(len(tasks)) for i in range(g) for j in range(g) if i != j]
        prefs = self.judge.prefer([tasks[k].prompt for k, _, _ in calls],
                                  [responses[k * g + i] for k, i, _ in calls],
                                  [responses[k * g + j] for k, _, j in calls])
        wins = [0.0] * len(responses)
        for (k, i, j), p in zip(calls, prefs):  # p: how much the judge prefers i (shown as A)
            wins[k * g + i] += p
            wins[k * g + j] += 1.0 - p
        return [w / (2 * (g - 1)) for w in wins]


def build_reward(cfg: RewardConfig, judge: Generator | None = None) -> Reward:
    if cfg.kind == "math":
        return MathReward(cfg.workers)
    if cfg.kind == "code":
        return CodeReward(cfg.workers)
    if judge is None:
        raise ValueError("reward.judge: no judge backend was built")
    return JudgeReward(judge)
