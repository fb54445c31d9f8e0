"""Math and code rewards (judged in the sandbox) and the tiny coding-task generator."""

import random
import time

import pytest

from data_recipes import arithmetic
from data_recipes.sandbox import SandboxLimits
from data_recipes.code_tasks import CodeTask, make_code_tasks
from data_recipes.verifiers import (answers_equal, extract_answer, extract_code, score_code,
                                    score_code_batch, score_math, score_math_batch)

# --- math ---


@pytest.mark.parametrize("response, answer", [
    ("Question: What is 2 + 2?\ncolumn 1: ...\nAnswer: 4", "4"),
    ("Answer: 3\nwait, no.\nAnswer: -7  ", "-7"),  # the last one counts
    ("so it is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),  # nested braces
    ("Answer: 12, i.e. \\boxed{12}", "12"),
    ("\\boxed{5} ... Answer: 6", "6"),  # whichever comes later
    ("**Answer:** 0.75", "0.75"),
    ("\\boxed{unclosed", None),
    ("I think it's 42.", None),
    ("Answer:\n", None),
])
def test_extract_answer(response, answer):
    assert extract_answer(response) == answer


EQUIVALENT = [
    ("4", "4"), ("0.75", "3/4"), ("\\frac{3}{4}", "0.75"), ("\\dfrac{\\frac{1}{2}}{3}", "1/6"),
    ("2*3+1", "7"), ("0.1+0.2", "0.3"), ("3.0", "3"), ("-0", "0"),
    ("1,234,567", "1234567"), ("x = 5", "5"), ("$12$", "12"), ("2^{10}", "1024"),
    ("2\\sqrt{2}", "sqrt(8)"), ("\\sqrt{16}", "4"), ("\\pi", "3.14159265358979"),
    ("2 \\cdot 3", "6"), ("−5", "-5"), ("(1, 2)", "(1,2)"), ("Yes", "yes"), ("7.", "7"),
]
DIFFERENT = [
    ("0.75", "3/5"), ("2*3+1", "6"), ("7", "-7"), ("1,234", "1.234"),
    ("\\sqrt{2}", "1.41421"), ("\\pi", "3.14"), ("", "0"), ("abc", "abd"), ("1/0", "1"),
    ("9**9**9", "9"), ("1e400", "1"), ("((((((((((((1", "1"), ("__import__('os')", "0"),
    ("True", "1"), ("(-8)**(1/3)", "-2"),
    ("1e3", "1000"),  # math-verify reads LaTeX, where 1e3 is 1·e·3 (the old checker said equal)
]


def test_equivalences_and_non_equivalences_in_the_sandbox():
    # ("1/3", "0.3333333333") moved to EQUIVALENT's side: math-verify compares numbers rounded to
    # 6 decimals (the old checker wanted 1e-9); tests/test_checkers.py pins the new table
    pairs = EQUIVALENT + [("1/3", "0.3333333333")] + DIFFERENT
    verdicts = answers_equal([p for p, _ in pairs], [r for _, r in pairs])
    wrong = [pair for pair, v, want in zip(pairs, verdicts, [True] * (len(EQUIVALENT) + 1)
                                            + [False] * len(DIFFERENT)) if v != want]
    assert wrong == []


def test_pathological_answer_costs_only_itself():
    slow = "*".join(["3**50000"] * 400)  # passes the size guard per power, not as a product
    # room for importing math-verify (~2 s) and its own 2 s timeouts, not for the product
    limits = SandboxLimits(cpu_seconds=15, wall_seconds=20, memory_mb=2048, max_processes=4)
    start = time.monotonic()
    verdicts = answers_equal(["7", slow, "1/2", None], ["7", "1", "0.5", "1"], limits=limits)
    assert verdicts == [True, False, True, False]
    assert time.monotonic() - start < 60


def test_score_math_agrees_with_the_arithmetic_checker():
    rng = random.Random(0)
    problems = [arithmetic.make_problem(rng, 3) for _ in range(6)]
    responses = [arithmetic.render(p) for p in problems]
    responses[1] = responses[1].rsplit("Answer:", 1)[0] + f"Answer: {problems[1]['answer'] + 1}"
    responses[2] = "no idea"
    rewards = score_math_batch(responses, [p["answer"] for p in problems], chunk=4)
    assert rewards == [float(arithmetic.check_answer(p["question"], r))
                       for p, r in zip(problems, responses)]
    assert rewards == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert score_math("The result is \\boxed{\\frac{6}{8}}", "0.75") == 1.0


# --- code ---

ADD3 = ("assert add3(1) == 4", "assert add3(-3) == 0", "assert add3(10) == 13",
        "assert add3(0) == 3")


def test_extract_code():
    assert extract_code("Sure:\n```python\ndef f():\n    return 1\n```\nDone.") \
        == "def f():\n    return 1\n"
    assert extract_code("```\nx = 1\n```\n```py\ndef g(): pass\n```\n```\nprint(g())\n```") \
        == "def g(): pass\n"  # the last block that defines something
    assert extract_code("def h(): return 2") == "def h(): return 2"
    assert extract_code("```python\ndef cut(): return") == "def cut(): return"  # unterminated


CODE_CASES = {  # response -> (reward, status)
    "Here you go:\n```python\ndef add3(x):\n    return x + 3\n```": (1.0, "ok"),
    "def add3(x): return x + 3\nif __name__ == '__main__':\n    print(add3(int(input())))":
        (1.0, "ok"),  # demo code under a main guard does not run
    "def add3(x):\n    return x + 2": (0.0, "failed"),
    "def add3(x):\n    return 4": (0.0, "failed"),  # passes only the first (public) test
    "def add3(x)\n    return x + 3": (0.0, "error"),  # syntax error
    "def add_three(x):\n    return x + 3": (0.0, "failed"),  # missing function
    "def add3(x):\n    while True:\n        pass": (0.0, "timeout"),
    "import time\ntime.sleep(60)": (0.0, "timeout"),
    # reward hacks
    "import sys\nsys.exit(0)": (0.0, "error"),
    "import os\nos._exit(0)": (0.0, "error"),
    "class Anything:\n    def __eq__(self, other):\n        return True\n"
    "def add3(x):\n    return Anything()": (0.0, "failed"),
    "import os\nprint('{\"error\": \"\", \"results\": [\"\", \"\", \"\", \"\"]}')\nos._exit(0)":
        (0.0, "error"),
}


def test_code_rewards():
    limits = SandboxLimits(cpu_seconds=1, wall_seconds=2, memory_mb=256, max_processes=4)
    responses = list(CODE_CASES)
    start = time.monotonic()
    rewards = score_code_batch(responses, [ADD3] * len(responses), limits=limits)
    assert time.monotonic() - start < 30  # the infinite loops were cut off
    assert {r: (w.reward, w.status) for r, w in zip(responses, rewards)} == CODE_CASES
    by_case = dict(zip(responses, rewards))
    assert by_case["def add3(x):\n    return 4"].failed == (1, 2, 3)
    assert "NameError" in by_case["def add_three(x):\n    return x + 3"].detail
    assert "SyntaxError" in by_case["def add3(x)\n    return x + 3"].detail
    assert by_case["def add3(x):\n    while True:\n        pass"].failed == (0, 1, 2, 3)


def test_reference_solutions_pass_and_a_wrong_one_fails():
    tasks = make_code_tasks(12, seed=1) + make_code_tasks(4, seed=1, split="heldout")
    rewards = score_code_batch([t.solution for t in tasks], [t.tests for t in tasks])
    assert [r.status for r in rewards] == ["ok"] * len(tasks)
    task = tasks[0]
    assert score_code(f"def {task.name}(*args):\n    return None", task.tests).reward == 0.0


# --- task generator ---


def test_tasks_are_deterministic_and_well_formed():
    tasks = make_code_tasks(40, seed=0)
    assert tasks == make_code_tasks(40, seed=0)
    assert [t.id for t in tasks] != [t.id for t in make_code_tasks(40, seed=1)]
    for t in tasks:
        assert isinstance(t, CodeTask) and f"`{t.name}(" in t.prompt
        assert len(t.public_tests) == 2 and len(t.private_tests) == 4
        assert len(set(t.tests)) == 6 and all(x.startswith(f"assert {t.name}(") for x in t.tests)
    # the same prompt always comes with the same tests, whatever the seed
    again = {t.prompt: t for t in make_code_tasks(300, seed=7)}
    assert all(again[t.prompt] == t for t in tasks if t.prompt in again)


def test_train_and_heldout_are_disjoint():
    train = make_code_tasks(1000, seed=0)
    heldout = make_code_tasks(1000, seed=0, split="heldout")
    assert {t.prompt for t in train}.isdisjoint(t.prompt for t in heldout)
    assert 0.1 < len(heldout) / (len(train) + len(heldout)) < 0.3  # heldout_fraction 0.2
    templates = {t.name.rstrip("0123456789_") for t in train + heldout}
    assert len(templates) >= 30
    with pytest.raises(ValueError, match="split"):
        make_code_tasks(1, seed=0, split="test")
