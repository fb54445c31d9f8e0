"""Preference pairs for Dual Preference Distillation: a teacher's positive, the student's negative.

For every prompt the teacher samples some answers and the student samples some. Each answer is
scored (the task's verifier: 1 right, 0 wrong; or a judge's 0-10 rating scaled to [0, 1]). The
teacher's best answer is the positive, the student's worst the negative, and the pair is kept only
when the positive wins by at least `min_margin` (Nanbeige4-3B's pairwise filter). A prompt the
student already answers perfectly, or that the teacher never gets right, yields no kept pair.

Answers are the assistant text as sampled (thinking block + final answer). Every candidate and its
score is kept with the pair (provenance), so a filter decision can be audited afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from data_recipes import arithmetic
from data_recipes.generators import Generator, GeneratorConfig, answer_only
from data_recipes.prompts import TASKS as CHECKERS, Task


@dataclass
class PairFilterConfig:
    """Which sampled (positive, negative) pairs DPD trains on: the positive must clearly win."""

    kind: str = "verifier"
    """verifier (a checker of data_recipes.verifiers: 1 right, 0 wrong; qa_f1 in between) |
    judge (a generator backend rates each answer 0-10, scaled to [0, 1]; http, or the arithmetic
    oracle)."""
    task: str = "arithmetic"
    """verifier: the checker that scores answers (arithmetic | math | code | qa | qa_f1 |
    qa_substring | humaneval), or `prompts`: each prompt's own (its set's `task`)."""
    judge: GeneratorConfig = field(default_factory=GeneratorConfig)
    """judge: the backend that rates answers."""
    min_margin: float = 1.0
    """Keep a pair when score(positive) - score(negative) >= this (verifier: 1 = right vs wrong)."""

    def __post_init__(self):
        if self.kind not in ("verifier", "judge"):
            raise ValueError(f"kind: {self.kind!r} is not a pair filter; one of verifier, judge")
        if self.kind == "verifier" and self.task not in CHECKERS + ("prompts",):
            raise ValueError(f"task: {self.task!r} has no verifier; one of "
                             f"{', '.join(CHECKERS)}, prompts")


@dataclass
class Pair:
    id: str
    """The prompt's id."""
    prompt: str
    positive: str
    negative: str
    positive_score: float
    negative_score: float
    kept: bool
    teacher_answers: list[str]
    teacher_scores: list[float]
    student_answers: list[str]
    student_scores: list[float]

    @property
    def margin(self) -> float:
        return self.positive_score - self.negative_score


class Scorer(Protocol):
    def score(self, prompts: list[str], answers: list[str]) -> list[float]:
        """A score in [0, 1] for each (prompt, full assistant answer)."""


class ArithmeticVerifier:
    """The arithmetic task's exact checker on the final answer (the thinking block is ignored)."""

    def score(self, prompts: list[str], answers: list[str]) -> list[float]:
        return [float(arithmetic.check_answer(p, answer_only(a))) for p, a in zip(prompts, answers)]


class TaskVerifier:
    """A checker (data_recipes.verifiers.check) on the final answer, as rewards and eval use it.

    `tasks` are the prompt set's: a prompt's text finds its task (answer, tests, own checker)."""

    def __init__(self, tasks: list[Task], checker: str | None = None):
        self.tasks = {t.prompt: t for t in tasks}
        self.checker = checker

    def score(self, prompts: list[str], answers: list[str]) -> list[float]:
        from data_recipes.verifiers import check  # the sandbox stays out of config imports

        return check([self.tasks[p] for p in prompts], [answer_only(a) for a in answers],
                     checker=self.checker)


def build_scorer(cfg: PairFilterConfig, tasks: list[Task], judge: Generator | None = None):
    """The filter's scorer: the arithmetic checker as before, another checker, or the judge."""
    if cfg.kind == "judge":
        if judge is None:
            raise ValueError("filter.judge: no judge backend was built")
        return JudgeScorer(judge)
    if cfg.task == "arithmetic":
        return ArithmeticVerifier()
    return TaskVerifier(tasks, None if cfg.task == "prompts" else cfg.task)


class JudgeScorer:
    """A judge backend (the generator interface's `score` role) rates every answer."""

    def __init__(self, judge: Generator):
        self.judge = judge

    def score(self, prompts: list[str], answers: list[str]) -> list[float]:
        return self.judge.score(prompts, [answer_only(a) for a in answers])


def make_pairs(ids: list[str], prompts: list[str], teacher_answers: list[list[str]],
               student_answers: list[list[str]], scorer: Scorer, min_margin: float) -> list[Pair]:
    """One pair per prompt (kept or not). `teacher_answers[i]` are prompt i's teacher samples.

    Ties go to the first sample, so the choice is a pure function of the samples."""
    flat_p, flat_a = [], []
    for p, t, s in zip(prompts, teacher_answers, student_answers):
        flat_p += [p] * (len(t) + len(s))
        flat_a += list(t) + list(s)
    scores = iter(scorer.score(flat_p, flat_a))  # one batched call: a judge backend batches it
    pairs = []
    for pid, p, t, s in zip(ids, prompts, teacher_answers, student_answers):
        ts = [next(scores) for _ in t]
        ss = [next(scores) for _ in s]
        best = max(range(len(t)), key=lambda i: (ts[i], -i))
        worst = min(range(len(s)), key=lambda i: (ss[i], i))
        pairs.append(Pair(pid, p, t[best], s[worst], ts[best], ss[worst],
                          ts[best] - ss[worst] >= min_margin, list(t), ts, list(s), ss))
    return pairs
