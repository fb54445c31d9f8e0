"""The code checker: model-written Python run in the sandbox against asserts or stdin/stdout cases.

Assert tasks (data_recipes.code_tasks, HumanEval's `check(candidate)`): the last fenced Python block
of a response (or the whole response) is loaded as a module, then each test runs against it;
reward 1.0 only if every test passes and the run exits cleanly. Guards against the cheap reward
hacks: the report carries a per-run nonce (so `exit(0)` or printing "passed" earns nothing) and
`assert f(x) == y` is judged by the harness without trusting the result's `__eq__` (an object
that equals everything fails). A policy that reads the harness and digs the nonce out of its
frames could still cheat; that takes intent.

stdin/stdout cases (APPS, TACO, CodeContests, LiveCodeBench): the program runs once per case as
`__main__` in a fresh sandbox, with the case's input on stdin, under a time and a memory limit per
case; it passes a case when its output equals the expected one token by token (whitespace and
line breaks are not judged, as in those sets' own harnesses). The first failing case ends the run.
"""

from __future__ import annotations

import ast
import inspect
import json
import math
import re
import secrets
import sys  # noqa: F401 - used by _code_main, which runs in the sandbox
from dataclasses import dataclass
from functools import cache
from typing import Sequence

from data_recipes.parallel import parallel
from data_recipes.sandbox import SandboxLimits, run_python

CODE_LIMITS = SandboxLimits(cpu_seconds=3, wall_seconds=10, memory_mb=512, max_processes=8)

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
    return run_tests(extract_code(response), tests, limits=limits)


def run_tests(code: str, tests: Sequence[str], *,
              limits: SandboxLimits = CODE_LIMITS) -> CodeVerdict:
    """Load `code` as a module in the sandbox, then run each test (statements) against it."""
    nonce = secrets.token_hex(16)
    payload = json.dumps({"nonce": nonce, "code": code, "tests": list(tests)})
    res = run_python(_harness(), limits, payload)
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


@cache
def _harness() -> str:
    """The sandbox program of assert tests: the stdlib imports the functions use and their source."""
    return ("from __future__ import annotations\nimport ast, json, sys\n\n"
            + "\n\n".join(inspect.getsource(f) for f in (_same, _run_test, _code_main))
            + "\n_code_main()\n")


# --- stdin/stdout cases ---

@dataclass(frozen=True)
class IOCase:
    input: str
    output: str


def parse_io_cases(tests) -> list[IOCase] | None:
    """stdin/stdout cases from a dataset's `tests` value, None when it holds asserts instead.

    Takes [{"input", "output"}...] (LiveCodeBench, CodeContests rows), {"inputs": [...],
    "outputs": [...]} (APPS, TACO), or either as a JSON string."""
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError:
            return None
    if isinstance(tests, dict) and "inputs" in tests and "outputs" in tests:
        tests = [{"input": i, "output": o} for i, o in zip(tests["inputs"], tests["outputs"])]
    if isinstance(tests, (list, tuple)) and tests and all(
            isinstance(t, dict) and "input" in t and "output" in t for t in tests):
        return [IOCase(_text(t["input"]), _text(t["output"])) for t in tests]
    return None


def _text(value) -> str:
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


def same_output(got: str, want: str) -> bool:
    return got.split() == want.split()


def case_limits(seconds: float, memory_mb: int) -> SandboxLimits:
    """A case's limits: `seconds` of CPU (the interpreter's start-up gets wall-clock slack)."""
    return SandboxLimits(cpu_seconds=max(1, math.ceil(seconds)), wall_seconds=seconds + 5,
                         memory_mb=memory_mb, run_memory_mb=memory_mb, max_processes=8)


def score_io(response: str, cases: Sequence[IOCase], *, seconds: float = 2.0,
             memory_mb: int = 512) -> CodeVerdict:
    """Run the response's program on each case's stdin; every output must match."""
    code, limits = extract_code(response), case_limits(seconds, memory_mb)
    for i, case in enumerate(cases):
        res = run_python(code, limits, case.input)
        if not res.ok or not same_output(res.stdout, case.output):
            status = "failed" if res.ok else res.status
            detail = (res.stderr.strip()[-300:] if not res.ok else
                      f"case {i}: printed {res.stdout[:80]!r}, expected {case.output[:80]!r}")
            return CodeVerdict(0.0, status, tuple(range(i, len(cases))), detail)
    return CodeVerdict(1.0, "ok", (), "")


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
    return parallel(lambda rt: score_code(*rt, limits=limits), list(zip(responses, tests)),
                    max_workers)
