"""Write the small local files recipes/nanbeige3b_cpu.yaml reads, in the formats of the flagship's
Hugging Face datasets (the same field names), so the twin exercises the same readers and checkers.

    python recipes/data/make_nanbeige3b_cpu.py      # -> recipes/data/nanbeige3b_cpu/*.jsonl

Deterministic (fixed seeds, the Python standard library's own text): the files are committed, and
rerunning this script rewrites them byte for byte. The text is the standard library's code and
docstrings; the math is generated arithmetic with worked steps (data_recipes.arithmetic), so the
twin's refinement server (stages/serve.py, an arithmetic oracle) can draft and judge it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from data_recipes.arithmetic import make_problem, render
from data_recipes.sources import iter_documents

OUT = Path(__file__).resolve().parent / "nanbeige3b_cpu"


def _write(name: str, rows) -> None:
    path = OUT / f"{name}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    print(f"{path.relative_to(OUT.parents[2])}: {path.stat().st_size:,} bytes")


def _stdlib(part: str, n: int, skip: int = 0) -> list[str]:
    docs = iter_documents({"kind": "stdlib", "part": part, "max_docs": n + skip})
    return [d[:2000] for d in docs][skip:]


def _problems(seed: int, n: int, max_digits: int = 1) -> list[dict]:
    rng = random.Random(seed)
    return [make_problem(rng, max_digits) for _ in range(n)]


def _worked(p: dict) -> str:
    return "\n".join([*p["steps"], f"Answer: {p['answer']}"])


# stdin/stdout programs in LiveCodeBench's row format: a statement and JSON-encoded cases
_PROGRAMS = [
    ("Read two integers a and b on one line and print their sum.", lambda a, b: a + b),
    ("Read two integers a and b on one line and print their difference a - b.", lambda a, b: a - b),
    ("Read two integers a and b on one line and print their product.", lambda a, b: a * b),
    ("Read two integers a and b on one line and print the larger one.", max),
    ("Read two integers a and b on one line and print the smaller one.", min),
]


def _code_rows(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        text, fn = _PROGRAMS[i % len(_PROGRAMS)]
        cases = []
        for _ in range(3):
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            cases.append({"input": f"{a} {b}\n", "output": f"{fn(a, b)}\n", "testtype": "stdin"})
        rows.append({"question_content": f"{text} (Problem {i + 1}.)",
                     "public_test_cases": json.dumps(cases), "platform": "local"})
    return rows


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    # pretraining sources: fineweb-edu / gutenberg / arxiv / cosmopedia rows have `text`,
    # starcoderdata `content`, OpenThoughts `conversations` ([{from, value}])
    _write("web", ({"text": t} for t in _stdlib("docstrings", 150)))
    _write("books", ({"text": t} for t in _stdlib("docstrings", 60, skip=150)))
    _write("code", ({"content": t} for t in _stdlib("code", 100)))
    _write("web_hq", ({"text": render(p)} for p in _problems(10, 800)))
    _write("papers", ({"text": render(p)} for p in _problems(11, 400, max_digits=2)))
    _write("math", ({"text": render(p)} for p in _problems(12, 800)))
    _write("synthetic", ({"text": render(p)} for p in _problems(13, 400)))
    _write("long_cot", ({"conversations": [{"from": "user", "value": p["question"]},
                                           {"from": "assistant", "value": _worked(p)}]}
                        for p in _problems(14, 400)))
    # post-training sets: Tulu 3's `messages`, GSM8K's question/answer ("... #### N"),
    # MATH-500's and OpenR1-Math's problem/answer, LiveCodeBench's question_content/cases
    _write("tulu3", ({"messages": [{"role": "user", "content": p["question"]},
                                   {"role": "assistant", "content": _worked(p)}]}
                     for p in _problems(20, 400)))
    _write("gsm8k", ({"question": p["question"], "answer": f"{_worked(p)}\n#### {p['answer']}"}
                     for p in _problems(21, 100)))
    _write("math500", ({"problem": p["question"], "answer": str(p["answer"])}
                       for p in _problems(22, 100)))
    _write("openr1_math", ({"problem": p["question"], "answer": str(p["answer"])}
                           for p in _problems(23, 200)))
    _write("livecodebench", _code_rows(24, 40))


if __name__ == "__main__":
    main()
