"""Multi-digit arithmetic with worked steps: a programmatic, verifiable task.

Every document is a question, the column-by-column work a person would write down, and a final
`Answer: N` line. The same `check_answer` verifier scores model outputs later (eval, RL rewards),
so the answer format here is the contract:

    Question: What is 487 + 96?
    column 1: 7 + 6 + carry 0 = 13, write 3, carry 1
    ...
    Answer: 583

Deterministic: the same (seed, max_digits) gives the same documents on any machine.
"""

from __future__ import annotations

import random
import re
from typing import Iterator

OPS = ("+", "-", "*")

_QUESTION = re.compile(r"What is (\d+) ([+\-*]) (\d+)\?")
_ANSWER = re.compile(r"Answer:\s*(-?\d+)\s*$", re.MULTILINE)


def _number(rng: random.Random, digits: int) -> int:
    if digits == 1:
        return rng.randint(0, 9)
    return rng.randint(10 ** (digits - 1), 10 ** digits - 1)


def _digits(n: int, width: int) -> list[int]:
    """Digits of n, least significant first, zero-padded to width."""
    return [(n // 10 ** i) % 10 for i in range(width)]


def _add_steps(a: int, b: int) -> list[str]:
    width = max(len(str(a)), len(str(b)))
    steps, carry = [], 0
    for i, (x, y) in enumerate(zip(_digits(a, width), _digits(b, width)), start=1):
        total = x + y + carry
        steps.append(f"column {i}: {x} + {y} + carry {carry} = {total}, "
                     f"write {total % 10}, carry {total // 10}")
        carry = total // 10
    if carry:
        steps.append(f"final carry: write {carry}")
    return steps


def _sub_steps(a: int, b: int) -> list[str]:
    """Column subtraction with borrows; requires a >= b."""
    width = len(str(a))
    steps, borrow = [], 0
    for i, (x, y) in enumerate(zip(_digits(a, width), _digits(b, width)), start=1):
        top = x - borrow
        if top < y:
            steps.append(f"column {i}: {x} - borrow {borrow} = {top} < {y}, borrow 10: "
                         f"{top + 10} - {y} = {top + 10 - y}, write {top + 10 - y}, borrow 1")
            borrow = 1
        else:
            steps.append(f"column {i}: {x} - borrow {borrow} = {top}, {top} - {y} = {top - y}, "
                         f"write {top - y}, borrow 0")
            borrow = 0
    return steps


def _mul_steps(a: int, b: int) -> list[str]:
    """Long multiplication: one partial product per digit of b, then their sum."""
    steps, partials = [], []
    for i, d in enumerate(_digits(b, len(str(b)))):
        partial = a * d * 10 ** i
        steps.append(f"partial: {a} * {d * 10 ** i} = {partial}")
        partials.append(partial)
    steps.append("sum: " + " + ".join(map(str, partials)) + f" = {sum(partials)}")
    return steps


def make_problem(rng: random.Random, max_digits: int, ops: str = "+-*") -> dict:
    """One random problem: {question, steps, answer, a, op, b}; operands have 1..max_digits digits,
    the operator is one of `ops`."""
    if max_digits < 1:
        raise ValueError(f"max_digits must be >= 1, got {max_digits}")
    check_ops(ops)
    op = rng.choice(ops)
    a = _number(rng, rng.randint(1, max_digits))
    b = _number(rng, rng.randint(1, max_digits))
    if op == "-" and a < b:  # keep answers non-negative so column borrowing always ends cleanly
        a, b = b, a
    return {"question": f"What is {a} {op} {b}?", **_solution(a, op, b), "a": a, "op": op, "b": b}


def check_ops(ops: str) -> None:
    if not ops or any(op not in OPS for op in ops) or len(set(ops)) != len(ops):
        raise ValueError(f"ops: must be distinct operators from {''.join(OPS)!r}, got {ops!r}")


def _solution(a: int, op: str, b: int) -> dict:
    steps = {"+": _add_steps, "-": _sub_steps, "*": _mul_steps}[op](a, b)
    return {"steps": steps, "answer": _apply(a, op, b)}


def solve(question_text: str) -> dict | None:
    """{steps, answer} of the first `What is A op B?` in the text, or None if there is none."""
    q = _QUESTION.search(question_text)
    if q is None:
        return None
    return _solution(int(q.group(1)), q.group(2), int(q.group(3)))


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def render(problem: dict) -> str:
    return "\n".join([f"Question: {problem['question']}", *problem["steps"],
                      f"Answer: {problem['answer']}"])


def iter_arithmetic_documents(num_docs: int, seed: int, max_digits: int,
                              ops: str = "+-*") -> Iterator[str]:
    rng = random.Random(seed)
    for _ in range(num_docs):
        yield render(make_problem(rng, max_digits, ops))


def check_answer(question_text: str, answer_text: str) -> bool:
    """Exact verifier: does the last `Answer: N` line (or a bare integer) equal the true result?

    question_text may be the question alone or a whole rendered document.
    """
    solved = solve(question_text)
    if solved is None:
        return False
    truth = solved["answer"]
    answers = _ANSWER.findall(answer_text)
    if answers:
        given = answers[-1]
    elif re.fullmatch(r"\s*-?\d+\s*", answer_text):
        given = answer_text
    else:
        return False
    return int(given) == truth
