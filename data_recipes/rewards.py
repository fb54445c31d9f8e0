"""RL tasks and their rewards: what a GRPO sub-stage samples from and how a rollout is scored.

A `Task` (data_recipes.prompts) is a prompt plus what verifies an answer to it: the reference
answer (math, qa) or tests (code). Rewards score a batch of responses (the final answer, thinking
block removed) with the checkers of data_recipes.verifiers, as pair filters and eval do:
  math   the final answer equals the reference (math-verify, in a sandbox)
  code   the response's program passes every assert / stdin-stdout case (in a sandbox)
  qa, qa_f1, qa_substring   SQuAD-normalised exact match, token F1, substring match
  task   each prompt's own checker (its prompt set's `task`), so a mixed set scores each its way
  judge  a pairwise judge compares every two samples of a prompt's group, in both orders (so
         a judge's bias for the first answer cancels); a sample's reward is its win rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from data_recipes.config_fields import added, unhashed
from data_recipes.generators import Generator, GeneratorConfig
from data_recipes.prompts import Task, load_tasks  # noqa: F401 - the tasks rewards score
from data_recipes.verifiers import CHECKERS, check

REWARD_KINDS = ("math", "code", "qa", "qa_f1", "qa_substring", "task", "judge")


@dataclass
class RewardConfig:
    """How a sub-stage scores a rollout."""

    kind: str = "math"
    """math (final answer vs the reference, math-verify in a sandbox) | code (the response's program
    against the task's asserts or stdin/stdout cases in a sandbox) | qa | qa_f1 | qa_substring
    (SQuAD-normalised) | task (each prompt's own checker, its set's `task`) | judge (a pairwise
    judge compares every two samples of a group, both orders; reward = the sample's win rate)."""
    judge: GeneratorConfig = field(default_factory=GeneratorConfig)
    """judge: the backend: engine (the rl stage's `judge` checkpoint), http, or the arithmetic
    oracle (prefers a right answer, then the shorter one: a programmatic stand-in for a
    preference model)."""
    workers: int = unhashed(8)
    """Sandboxes run at once."""
    format_weight: float = added(0.0)
    """Multi-turn tool rollouts (the sub-stage's `tools`): added to the reward when the rollout ends
    with an answer turn closed by <|im_end|> and every tool call parsed (Jan-nano: 0.2)."""
    tool_weight: float = added(0.0)
    """Tool rollouts: times the share of tool calls that ran without error (0 without calls;
    Jan-nano's tool-execution term: 0.2)."""

    def __post_init__(self):
        if self.kind not in REWARD_KINDS:
            raise ValueError(f"kind: {self.kind!r} is not a reward; one of {', '.join(REWARD_KINDS)}")


class Reward(Protocol):
    def score(self, tasks: list[Task], responses: list[str], group_size: int) -> list[float]:
        """A reward per response; responses come in groups of `group_size` per task."""


class CheckerReward:
    """A checker's score of each response (`task`: each prompt's own checker)."""

    def __init__(self, kind: str, workers: int):
        self.checker = None if kind == "task" else kind
        self.workers = workers

    def score(self, tasks, responses, group_size):
        try:
            return check([t for t in tasks for _ in range(group_size)], responses,
                         checker=self.checker, max_workers=self.workers)
        except ValueError as e:
            raise ValueError(f"reward: {e}") from None


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
    if cfg.kind in CHECKERS or cfg.kind == "task":
        return CheckerReward(cfg.kind, cfg.workers)
    if judge is None:
        raise ValueError("reward.judge: no judge backend was built")
    return JudgeReward(judge)
