"""Verifiable rewards for RL (GRPO): math answers and Python functions, judged in the sandbox.

Math: the final answer is the last `\\boxed{...}` or `Answer: ...` of a response (the contract of
data_recipes.arithmetic). It equals the reference when both evaluate to the same number. No sympy
(we do not want the dependency): a small evaluator over Python's `ast` keeps integers, decimals
and fractions exact (`Fraction`), so 3/4 == 0.75 and 2*3+1 == 7 exactly; sqrt, pi and e fall back
to floats compared at 1e-9; anything else is compared as normalized text. It runs in the sandbox
with time and memory limits, because answers are model output and `9**9**9` parses.

Code: the last fenced Python block of a response (or the whole response) is loaded as a module,
then each test assert runs against it; reward 1.0 only if every test passes and the run exits
cleanly. Guards against the cheap reward hacks: the report carries a per-run nonce (so `exit(0)`
or printing "passed" earns nothing) and `assert f(x) == y` is judged by the harness without
trusting the result's `__eq__` (an object that equals everything fails). A policy that reads
the harness and digs the nonce out of its frames could still cheat; that takes intent. The
tiny coding tasks with such asserts are data_recipes.code_tasks.

    python -c "from data_recipes.verifiers import *; print(score_math('Answer: 0.75', '3/4'))"
"""

from __future__ import annotations

import ast
import inspect
import json
import math
import operator
import os
import re
import secrets
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from functools import cache
from typing import Callable, Sequence

from data_recipes.sandbox import SandboxLimits, run_python

MATH_LIMITS = SandboxLimits(cpu_seconds=2, wall_seconds=10, memory_mb=256, max_processes=4)
CODE_LIMITS = SandboxLimits(cpu_seconds=3, wall_seconds=10, memory_mb=512, max_processes=8)

# --- math ---

_ANSWER = re.compile(r"Answer:(?:\*\*)?[ \t]*(.+?)[ \t]*$", re.MULTILINE)  # **Answer:** too


def extract_answer(response: str) -> str | None:
    """The last `\\boxed{...}` (braces balanced) or `Answer: ...` line, whichever comes later."""
    found = [(m.start(), m.group(1)) for m in _ANSWER.finditer(response)]
    start = response.rfind("\\boxed{")
    if start >= 0:
        depth, i = 0, start + len("\\boxed")
        for j in range(i, len(response)):
            depth += {"{": 1, "}": -1}.get(response[j], 0)
            if depth == 0:
                found.append((start, response[i + 1:j]))
                break
    return max(found)[1].strip() if found else None


# _normalize, _evaluate and _equal run in the sandbox (shipped as source by _program): they may
# use only each other and the names _program imports (ast, json, math, operator, re, sys, Fraction).
def _normalize(text: str) -> str:
    s = text.strip().lower().rstrip(".")
    for pattern, repl in ((r"\\text\{[^{}]*\}|\\[,;:!]|\\left|\\right|\\displaystyle|\$", ""),
                          (r"−", "-"), (r"×|\\times|\\cdot", "*"), (r"÷", "/"),
                          (r"π|\\pi", "pi"), (r"\\sqrt(\d+)", r"sqrt(\1)"), (r"\^", "**"),
                          (r"^[a-z]\s*=", ""), (r"\s+", "")):
        s = re.sub(pattern, repl, s)
    for _ in range(10):  # innermost first: \frac{\frac{1}{2}}{3}
        s, n = re.subn(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}|\\sqrt\{([^{}]*)\}",
                       lambda m: f"sqrt({m[3]})" if m[3] is not None else f"({m[1]})/({m[2]})", s)
        if not n:
            break
    s = s.replace("{", "(").replace("}", ")")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # 1,234,567
        s = s.replace(",", "")
    return re.sub(r"(\d|\))(?=pi|sqrt|\()", r"\1*", s)  # 2pi, 3sqrt(2), 2(3+1)


def _evaluate(s: str) -> Fraction | float:
    def ev(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            text = ast.get_source_segment(s, node)  # the literal: 0.1 is 1/10 exactly, not a float
            if abs(int(re.split("e", text + "e0")[1])) > 1000:
                raise ValueError(f"exponent too large: {text[:40]}")  # 1e99999999 is a big int
            return Fraction(text)
        if isinstance(node, ast.Name) and node.id in ("pi", "e"):
            return getattr(math, node.id)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            return -ev(node.operand) if isinstance(node.op, ast.USub) else ev(node.operand)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "sqrt" and len(node.args) == 1 and not node.keywords):
            x = ev(node.args[0])
            if isinstance(x, Fraction) and x >= 0:
                n, d = math.isqrt(x.numerator), math.isqrt(x.denominator)
                if n * n == x.numerator and d * d == x.denominator:
                    return Fraction(n, d)
            return math.sqrt(x)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult,
                                                                 ast.Div, ast.Pow)):
            a, b = ev(node.left), ev(node.right)
            if not isinstance(node.op, ast.Pow):
                return {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
                        ast.Div: operator.truediv}[type(node.op)](a, b)
            exact = isinstance(a, Fraction) and isinstance(b, Fraction) and b.denominator == 1
            bits = max(abs(a.numerator).bit_length(), a.denominator.bit_length()) if exact else 0
            if exact and bits * abs(b) <= 100_000:  # 2**100000 is fine, 9**9**9 is not
                return a ** b
            return math.pow(a, b)
        raise ValueError(f"not a number: {ast.unparse(node)[:40]}")
    return ev(ast.parse(s, mode="eval").body)


def _equal(pred: str, ref: str) -> bool:
    p, r = _normalize(pred), _normalize(ref)
    if p == r:
        return True
    try:
        x, y = _evaluate(p), _evaluate(r)
    except (ValueError, TypeError, SyntaxError, ArithmeticError, RecursionError, MemoryError):
        return False
    if isinstance(x, Fraction) and isinstance(y, Fraction):
        return x == y
    return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)


def _math_main() -> None:
    print(json.dumps([_equal(p, r) for p, r in json.loads(sys.stdin.read())]))


def answers_equal(preds: Sequence[str | None], refs: Sequence[str], *,
                  limits: SandboxLimits = MATH_LIMITS, chunk: int = 64,
                  max_workers: int | None = None) -> list[bool]:
    """Pairwise equivalence, `chunk` pairs per sandbox run, runs in parallel.

    A chunk that fails (one pathological answer ate the time or memory) is redone pair by pair,
    so a bad answer only ever costs itself its reward.
    """
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} answers for {len(refs)} references")
    todo = [i for i, p in enumerate(preds) if p is not None]
    program = _program((_normalize, _evaluate, _equal, _math_main), "_math_main()")

    def judge(idx: list[int]) -> list[bool]:
        res = run_python(program, limits, json.dumps([[preds[i], refs[i]] for i in idx]))
        try:
            verdicts = json.loads(res.stdout) if res.ok else None
        except json.JSONDecodeError:
            verdicts = None
        if isinstance(verdicts, list) and len(verdicts) == len(idx):
            return [v is True for v in verdicts]
        return [False] if len(idx) == 1 else [v for i in idx for v in judge([i])]

    out = [False] * len(preds)
    chunks = [todo[k:k + chunk] for k in range(0, len(todo), chunk)]
    for idx, verdicts in zip(chunks, _parallel(judge, chunks, max_workers)):
        for i, v in zip(idx, verdicts):
            out[i] = v
    return out


def score_math_batch(responses: Sequence[str], references: Sequence[str], **kw) -> list[float]:
    """1.0 where the response's final answer equals the reference, else 0.0."""
    return [float(ok) for ok in answers_equal([extract_answer(r) for r in responses],
                                              [str(x) for x in references], **kw)]


def score_math(response: str, reference: str, **kw) -> float:
    return score_math_batch([response], [reference], **kw)[0]


# --- code ---

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)


def extract_code(response: str) -> str:
    """The last fenced block that defines something (else the last block, else everything)."""
    blocks = _FENCE.findall(response)
    return ([b for b in blocks if "def " in b] or blocks or [response])[-1]


@dataclass(frozen=True)
class CodeVerdict:
    """How one response did against its tests: its reward and why."""

    reward: float
    """1.0 when the code loaded, every test passed and the run exited cleanly, else 0.0."""
    status: str
    """ok | failed (some tests) | error (the code did not load) | a sandbox status (timeout...)."""
    failed: tuple[int, ...]
    """Indices of the tests that failed or never ran."""
    detail: str
    """The first failure, or the end of stderr."""


def _same(got, want) -> bool:  # runs in the sandbox
    """got == want without trusting got's __eq__, when want is a plain builtin value."""
    numbers = (bool, int, float, complex)
    if type(want) not in numbers + (str, bytes, list, tuple, dict, set, frozenset, type(None)):
        return got == want  # a test expecting its own class has to trust that class
    if type(want) in numbers:
        return type(got) in numbers and got == want
    if type(got) is not type(want):
        return False
    if type(want) in (list, tuple):
        return len(got) == len(want) and all(_same(g, w) for g, w in zip(got, want))
    if type(want) is dict:
        return got.keys() == want.keys() and all(_same(got[k], want[k]) for k in want)
    return got == want


def _run_test(test: str, ns: dict) -> None:  # runs in the sandbox
    for stmt in ast.parse(test).body:
        t = stmt.test if isinstance(stmt, ast.Assert) else None
        if isinstance(t, ast.Compare) and len(t.ops) == 1 and isinstance(t.ops[0], ast.Eq):
            got, want = (eval(compile(ast.Expression(x), "<test>", "eval"), ns)
                         for x in (t.left, t.comparators[0]))
            if not _same(got, want):
                raise AssertionError(f"{ast.unparse(t.left)} gave {repr(got)[:80]}, "
                                     f"expected {repr(want)[:80]}")
        else:
            exec(compile(ast.Module([stmt], []), "<test>", "exec"), ns)


def _code_main() -> None:  # runs in the sandbox
    payload = json.loads(sys.stdin.read())
    nonce, ns, error, results = payload.pop("nonce"), {"__name__": "solution"}, "", []
    try:  # __name__ is not "__main__": demo code under a main guard stays out of it
        exec(compile(payload["code"], "<solution>", "exec"), ns)
    except BaseException as e:  # SystemExit too: a solution that exits has failed
        error = f"{type(e).__name__}: {e}"[:300]
    for test in payload["tests"] if not error else []:
        try:
            _run_test(test, ns)
            results.append("")
        except BaseException as e:
            results.append(f"{type(e).__name__}: {e}"[:300])
    print("\n" + nonce + json.dumps({"error": error, "results": results}), flush=True)


def score_code(response: str, tests: Sequence[str], *,
               limits: SandboxLimits = CODE_LIMITS) -> CodeVerdict:
    """Load the response's code in the sandbox and run the asserts in `tests` against it."""
    nonce = secrets.token_hex(16)
    payload = json.dumps({"nonce": nonce, "code": extract_code(response), "tests": list(tests)})
    res = run_python(_program((_same, _run_test, _code_main), "_code_main()"), limits, payload)
    report = _report(res.stdout, nonce)
    everything = tuple(range(len(tests)))
    if report is None:
        detail = res.stderr.strip()[-300:] or f"no test report ({res.status})"
        return CodeVerdict(0.0, res.status if not res.ok else "error", everything, detail)
    if report["error"]:
        return CodeVerdict(0.0, "error", everything, report["error"])
    failed = tuple(i for i, e in enumerate(report["results"]) if e)
    status = "failed" if failed else res.status
    detail = report["results"][failed[0]] if failed else res.stderr.strip()[-300:]
    return CodeVerdict(float(status == "ok"), status, failed, detail)


def _report(stdout: str, nonce: str) -> dict | None:
    """The harness's last line, which only it can start with the nonce; None if it never came."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(nonce):
            try:
                return json.loads(line[len(nonce):])
            except json.JSONDecodeError:
                return None
    return None


def score_code_batch(responses: Sequence[str], tests: Sequence[Sequence[str]], *,
                     limits: SandboxLimits = CODE_LIMITS,
                     max_workers: int | None = None) -> list[CodeVerdict]:
    """score_code for each (response, tests) pair, on a bounded thread pool."""
    if len(responses) != len(tests):
        raise ValueError(f"{len(responses)} responses for {len(tests)} test lists")
    return _parallel(lambda rt: score_code(*rt, limits=limits), list(zip(responses, tests)),
                     max_workers)


# --- helpers ---

@cache
def _program(functions: tuple[Callable, ...], call: str) -> str:
    """A sandbox program: the stdlib imports the functions use, their sources and a call."""
    head = ("from __future__ import annotations\nimport ast, json, math, operator, re, sys\n"
            "from fractions import Fraction\n\n")
    return head + "\n\n".join(inspect.getsource(f) for f in functions) + f"\n{call}\n"


def _parallel(fn: Callable, items: list, max_workers: int | None) -> list:
    """fn over items on a bounded thread pool (each call mostly waits on a sandbox process)."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    workers = max_workers or min(len(items), 32, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))
