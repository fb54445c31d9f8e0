"""The arithmetic task: worked steps are arithmetically right, the verifier is exact."""

import random
import re

import pytest

from data_recipes.arithmetic import check_answer, iter_arithmetic_documents, make_problem, render

ADD = re.compile(r"column \d+: (\d) \+ (\d) \+ carry (\d) = (\d+), write (\d), carry (\d)")
SUB_OK = re.compile(r"column \d+: (\d) - borrow (\d) = (-?\d+), (-?\d+) - (\d) = (\d+), "
                    r"write (\d), borrow 0")
SUB_BORROW = re.compile(r"column \d+: (\d) - borrow (\d) = (-?\d+) < (\d), borrow 10: "
                        r"(\d+) - (\d) = (\d+), write (\d), borrow 1")
PARTIAL = re.compile(r"partial: (\d+) \* (\d+) = (\d+)")
SUM = re.compile(r"sum: ([\d +]+) = (\d+)")


def check_steps(p: dict) -> None:
    """Re-derive every step from the operands and check its arithmetic and its chaining."""
    a, op, b, steps = p["a"], p["op"], p["b"], p["steps"]
    if op == "+":
        written, carry = [], 0
        for i, step in enumerate(steps):
            if step.startswith("final carry"):
                assert i == len(steps) - 1 and carry == 1 and step == "final carry: write 1"
                written.append(1)
                continue
            x, y, c, total, w, c_out = map(int, ADD.fullmatch(step).groups())
            assert (x, y) == ((a // 10 ** i) % 10, (b // 10 ** i) % 10)
            assert c == carry and total == x + y + c and w == total % 10 and c_out == total // 10
            written.append(w)
            carry = c_out
        assert carry == 0 or steps[-1].startswith("final carry")
        assert int("".join(map(str, reversed(written)))) == a + b
    elif op == "-":
        written, borrow = [], 0
        for i, step in enumerate(steps):
            x, y = (a // 10 ** i) % 10, (b // 10 ** i) % 10
            if m := SUB_BORROW.fullmatch(step):
                d, bor, top, y2, top10, y3, diff, w = map(int, m.groups())
                assert top == d - bor and top < y2 and top10 == top + 10 and diff == top10 - y3
                borrow_out = 1
            else:
                d, bor, top, top2, y2, diff, w = map(int, SUB_OK.fullmatch(step).groups())
                assert top == top2 == d - bor and top >= y2 and diff == top - y2
                borrow_out = 0
            assert d == x and y2 == y and bor == borrow and w == diff
            written.append(w)
            borrow = borrow_out
        assert borrow == 0
        assert int("".join(map(str, reversed(written)))) == a - b
    else:
        partials = []
        for i, step in enumerate(steps[:-1]):
            x, m, prod = map(int, PARTIAL.fullmatch(step).groups())
            assert x == a and m == ((b // 10 ** i) % 10) * 10 ** i and prod == x * m
            partials.append(prod)
        terms, total = SUM.fullmatch(steps[-1]).groups()
        assert [int(t) for t in terms.split(" + ")] == partials
        assert int(total) == sum(partials) == a * b
    assert p["answer"] == {"+": a + b, "-": a - b, "*": a * b}[op]


def test_worked_steps_are_correct_over_many_seeds():
    ops = set()
    for seed in range(200):
        rng = random.Random(seed)
        for _ in range(10):
            p = make_problem(rng, max_digits=6)
            check_steps(p)
            ops.add(p["op"])
            assert len(str(p["a"])) <= 6 and len(str(p["b"])) <= 6
    assert ops == {"+", "-", "*"}


def test_render_ends_with_answer_and_checks():
    p = make_problem(random.Random(7), 5)
    doc = render(p)
    assert doc.startswith(f"Question: {p['question']}\n")
    assert doc.splitlines()[-1] == f"Answer: {p['answer']}"
    assert check_answer(doc, doc)


def test_check_answer_accepts_right_rejects_wrong():
    assert check_answer("What is 12 + 30?", "Answer: 42")
    assert check_answer("What is 12 + 30?", "42")
    assert check_answer("What is 100 - 1?", "column...\nAnswer: 99\n")
    assert check_answer("What is 123 * 45?", "Answer: 5535")
    assert not check_answer("What is 12 + 30?", "Answer: 43")
    assert not check_answer("What is 123 * 45?", "Answer: 5536")
    assert not check_answer("What is 12 + 30?", "I think it is 42 or so")
    assert not check_answer("What is 12 + 30?", "")
    assert not check_answer("no question here", "Answer: 42")
    # the last answer line counts: a model can't hedge with several
    assert not check_answer("What is 12 + 30?", "Answer: 42\nAnswer: 41")
    assert check_answer("What is 12 + 30?", "Answer: 41\nAnswer: 42")


def test_verifier_agrees_with_generator():
    for doc in iter_arithmetic_documents(300, seed=3, max_digits=4):
        question, answer = doc.splitlines()[0], doc.splitlines()[-1]
        assert check_answer(question, answer)
        wrong = int(answer.removeprefix("Answer: ")) + 1
        assert not check_answer(question, f"Answer: {wrong}")


def test_deterministic_and_seed_dependent():
    a = list(iter_arithmetic_documents(50, seed=1, max_digits=4))
    assert a == list(iter_arithmetic_documents(50, seed=1, max_digits=4))
    assert a != list(iter_arithmetic_documents(50, seed=2, max_digits=4))
    assert len(a) == 50


def test_max_digits_validated():
    with pytest.raises(ValueError, match="max_digits"):
        make_problem(random.Random(0), 0)


def test_ops_limit_the_operators_and_keep_the_default_stream():
    rng = random.Random(3)
    ops = {make_problem(rng, 2, "+-")["op"] for _ in range(300)}
    assert ops == {"+", "-"}
    # the default draws exactly what it drew before `ops` existed (recipes' data must not move)
    rng = random.Random(5)
    assert [make_problem(rng, 3)["question"] for _ in range(4)] == [
        "What is 55 * 961?", "What is 642 * 7?", "What is 153 + 1?", "What is 79 - 41?"]
    for bad in ("", "+/", "++"):
        with pytest.raises(ValueError, match="ops: must be distinct operators"):
            make_problem(random.Random(0), 2, bad)


def test_step_checker_catches_a_wrong_step():
    """The checker above is only worth something if a corrupted step fails it."""
    rng = random.Random(0)
    problems = {}
    while len(problems) < 3:
        p = make_problem(rng, 4)
        problems.setdefault(p["op"], p)
    for p in problems.values():
        bad = dict(p, steps=list(p["steps"]))
        bad["steps"][0] = re.sub(r"write (\d)", lambda m: f"write {(int(m[1]) + 1) % 10}",
                                 bad["steps"][0]) if p["op"] != "*" else \
            re.sub(r"= (\d+)$", lambda m: f"= {int(m[1]) + 1}", bad["steps"][0])
        assert bad["steps"] != p["steps"]
        with pytest.raises(AssertionError):
            check_steps(bad)
