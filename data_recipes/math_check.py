"""The math checker: a response's final answer against a reference, judged by HF's `math-verify`.

The final answer is the last `\\boxed{...}` or `Answer: ...` line of a response, whichever comes
later (the contract of data_recipes.arithmetic; a response without one is wrong). math-verify
parses both sides (LaTeX through latex2sympy, plain expressions through sympy) and compares them
symbolically and numerically: `\\frac12` = `1/2`, `(x+1)^2` = `x^2+2x+1`, `\\{1,2\\}` = `\\{2,1\\}`,
`\\log_2 8` = `3`, intervals, percents, `\\text{(B)}` = `B`. A reference that is a whole worked
solution gives its own final answer: its last `\\boxed{}`/`Answer:`, or what follows GSM8K's `####`.

It runs in the sandbox (answers are model output, and sympy will happily evaluate `9^{9^{9}}`):
`chunk` pairs per sandbox run, because importing math-verify (sympy, the ANTLR LaTeX parser)
costs ~2.5 s and each check then costs milliseconds; a CPU-time budget per pair bounds a slow
parse or comparison, and a chunk that still fails is redone pair by pair, so a pathological
answer only costs itself its reward.

    python -c "from data_recipes.math_check import score_math; print(score_math('Answer: 0.75', '3/4'))"
"""

from __future__ import annotations

import json
import re
import sysconfig
from functools import cache
from typing import Sequence

from data_recipes.sandbox import SandboxLimits, run_python
from data_recipes.parallel import parallel

# importing sympy + latex2sympy takes ~2.5 s of CPU (and 48-64 MB of address space): a chunk of
# pairs shares one import; the rest is room for sympy's own work within math-verify's timeouts
MATH_LIMITS = SandboxLimits(cpu_seconds=60, wall_seconds=120, memory_mb=1024,
                            run_memory_mb=1024, max_processes=4)
CHECK_CPU_S = 2.0
"""CPU seconds one pair (both parses and the comparison) may take before it counts as unequal."""

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


def reference_answer(reference: str) -> str:
    """The final answer of a reference: itself, or a worked solution's boxed/Answer:/#### answer."""
    if "####" in reference:  # GSM8K: "...reasoning...\n#### 72"
        return reference.rsplit("####", 1)[1].strip().replace(",", "")
    return extract_answer(reference) or reference.strip()


# _latex and _judge_all run in the sandbox (shipped as source by _program).
def _latex(answer: str) -> str:
    """An answer as math-verify's LaTeX extractor reads it: in $...$, Python's ** as ^."""
    s = answer.strip().strip("$").strip().replace("**", "^")
    return f"${s}$" if s else ""


class _OutOfTime(BaseException):
    """A pair's CPU budget is spent (a BaseException: sympy's `except Exception` cannot eat it)."""


def _out_of_time(signum, frame):
    raise _OutOfTime()


def _judge_all(pairs: list, cpu_seconds: float) -> list:
    import logging
    import signal

    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    # math-verify's own timeouts count wall-clock seconds (signal.alarm): on a loaded machine a
    # right answer that needs 0.7 s of sympy ran past them. A CPU-time timer does not depend on
    # the load, so the verdict does not either.
    signal.signal(signal.SIGPROF, _out_of_time)
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled": we know
    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    out = []
    for pred, ref in pairs:
        try:
            signal.setitimer(signal.ITIMER_PROF, cpu_seconds)
            gold = parse(_latex(ref), extraction_config=configs, parsing_timeout=None)
            got = parse(_latex(pred), extraction_config=configs, parsing_timeout=None)
            out.append(bool(gold and got and verify(gold, got, timeout_seconds=None)))
        except (Exception, _OutOfTime):  # any failure of the checker on an answer is a "no"
            out.append(False)
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
    return out


@cache
def _program() -> str:
    import inspect

    # the sandbox runs `python -I -S`: no site-packages unless we put them on the path
    return ("import json, sys\n"
            f"sys.path.append({sysconfig.get_paths()['purelib']!r})\n\n"
            + "\n\n".join(inspect.getsource(f) for f in (_latex, _OutOfTime, _out_of_time,
                                                          _judge_all))
            + f"\nprint(json.dumps(_judge_all(json.loads(sys.stdin.read()), {CHECK_CPU_S})))\n")


def answers_equal(preds: Sequence[str | None], refs: Sequence[str], *,
                  limits: SandboxLimits = MATH_LIMITS, chunk: int = 64,
                  max_workers: int | None = None) -> list[bool]:
    """Pairwise equivalence of final answers (None: no answer, never equal), in the sandbox."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} answers for {len(refs)} references")
    todo = [i for i, p in enumerate(preds) if p is not None and str(p).strip()]

    def judge(idx: list[int]) -> list[bool]:
        res = run_python(_program(), limits, json.dumps([[preds[i], refs[i]] for i in idx]))
        try:
            verdicts = json.loads(res.stdout) if res.ok else None
        except json.JSONDecodeError:
            verdicts = None
        if isinstance(verdicts, list) and len(verdicts) == len(idx):
            return [v is True for v in verdicts]
        return [False] if len(idx) == 1 else [v for i in idx for v in judge([i])]

    out = [False] * len(preds)
    chunks = [todo[k:k + chunk] for k in range(0, len(todo), chunk)]
    for idx, verdicts in zip(chunks, parallel(judge, chunks, max_workers)):
        for i, v in zip(idx, verdicts):
            out[i] = v
    return out


def score_math_batch(responses: Sequence[str], references: Sequence[str], **kw) -> list[float]:
    """1.0 where the response's final answer equals the reference's, else 0.0."""
    return [float(ok) for ok in answers_equal([extract_answer(r) for r in responses],
                                              [reference_answer(str(x)) for x in references], **kw)]


def score_math(response: str, reference: str, **kw) -> float:
    return score_math_batch([response], [reference], **kw)[0]
