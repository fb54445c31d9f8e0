"""Prompt sets for SFT data, RL, DPD and eval, and the tasks (prompt + what checks it) they hold.

Kinds: generated arithmetic questions or tiny coding tasks (two disjoint splits, decided by a hash
of the prompt text, so an eval on `heldout` never sees a prompt `train` gave to SFT), rows of a
jsonl/parquet file or a Hugging Face dataset (a field map picks the prompt or chat messages, the
answer, the tests and the system prompt), or a `mix` of several sets by weight. A set's `task`
names the checker its answers go to (data_recipes.verifiers.CHECKERS).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from typing import Any, Optional

from data_recipes import arithmetic
from data_recipes.chat import Message
from data_recipes.code_tasks import make_code_tasks
from data_recipes.config_fields import added
from data_recipes.prompt_files import FILE_KINDS, first_row, iter_rows
from data_recipes.splits import in_heldout, text_id

KINDS = ("arithmetic", "code", "mix") + FILE_KINDS
TASKS = ("arithmetic", "math", "code", "qa", "qa_f1", "qa_substring", "humaneval")
"""Checker names (data_recipes.verifiers.CHECKERS): qa is exact match after SQuAD normalisation,
qa_f1 its token F1, qa_substring the normalised gold answer anywhere in the answer."""


@dataclass
class PromptsConfig:
    """A set of prompts: generated (arithmetic, code), rows of a file or dataset, or a mix."""

    kind: str = "arithmetic"
    """arithmetic | code (tiny Python function tasks with asserts) | jsonl | parquet | hf |
    mix (the `sets` below, by weight)"""
    num: int = 256
    """At most this many prompts (mix: in all)."""
    split: str = "train"
    """arithmetic, code: train | heldout; the two are disjoint (by a hash of the prompt)."""
    heldout_fraction: float = 0.1
    seed: int = 0
    """Generated sets: the generator's seed; mix: the order the sets' prompts are interleaved."""
    max_digits: int = 2
    ops: str = added("+-*")
    """arithmetic: the operators questions draw from."""
    path: Optional[str] = None
    """jsonl, parquet: a file or a directory of them."""
    field: str = "prompt"
    """The prompt text's field (the user turn)."""
    answer_field: str = "answer"
    """The reference answer (math, qa: a string or a list of acceptable ones), when rows have one."""
    name: Optional[str] = added()
    """hf: a hub id, a builder ("json", "parquet") with `data_files`, or a local directory."""
    hf_config: Optional[str] = added()
    hf_split: str = added("train")
    data_files: Optional[list[str]] = added()
    messages_field: Optional[str] = added()
    """Chat messages ([{role, content}], OpenAI style) instead of a prompt text: the conversation up
    to its last user turn is the prompt (later turns, a reference reply, are dropped)."""
    tests_field: Optional[str] = added()
    """code: asserts (a list of statements), or stdin/stdout cases ([{input, output}] or
    {inputs: [...], outputs: [...]}, also as a JSON string)."""
    system_field: Optional[str] = added()
    system_prompt: Optional[str] = added()
    """A system prompt for every prompt of the set (a row's `system_field` wins)."""
    task: Optional[str] = added()
    """The checker: arithmetic | math | code | qa | qa_f1 | qa_substring | humaneval. None: by
    kind (arithmetic: arithmetic, code: code, a file: math)."""
    case_seconds: float = added(2.0)
    """code, stdin/stdout cases: CPU seconds per case."""
    case_memory_mb: int = added(512)
    """code, stdin/stdout cases: memory per case."""
    weight: float = added(1.0)
    """A member of a mix: its share of `num`."""
    sets: list[PromptsConfig] = added(factory=list)
    """mix: the member sets (each with its own kind, fields, task and weight)."""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind: {self.kind!r} is not a prompt set kind; one of "
                             f"{', '.join(KINDS)}")
        if self.split not in ("train", "heldout"):
            raise ValueError(f"split: {self.split!r}; one of train, heldout")
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"task: {self.task!r} is not a checker; one of {', '.join(TASKS)}")
        if self.num < 1:
            raise ValueError(f"num: {self.num}, must be at least 1")
        arithmetic.check_ops(self.ops)
        if self.weight <= 0:
            raise ValueError(f"weight: {self.weight}, must be > 0")
        if self.case_seconds <= 0 or self.case_memory_mb <= 0:
            raise ValueError("case_seconds: the per-case limits must be > 0")
        if (self.kind == "mix") != bool(self.sets):
            raise ValueError("sets: a mix names its member sets, and only a mix has them")
        if self.kind in ("jsonl", "parquet"):
            if not self.path:
                raise ValueError(f"path: a {self.kind} prompt set needs a path")
            self.path = os.path.abspath(os.path.expanduser(self.path))  # like source paths
            if not os.path.exists(self.path):
                raise ValueError(f"path: {self.path} does not exist")
        if self.kind == "hf" and not self.name:
            raise ValueError("name: an hf prompt set needs a dataset name")
        if self.kind in FILE_KINDS:
            self._check_fields()

    def _check_fields(self) -> None:
        """Before any job: the first row must have the prompt (or messages) field."""
        try:
            first = first_row(self)
        except ValueError as e:  # a row that is not JSON: "file:line: why"
            raise ValueError(f"path: {e}") from None
        if first is None and self.kind != "hf":
            raise ValueError(f"path: {self.path} holds no {self.kind} rows")
        if first is not None and self.prompt_key() not in first[1]:
            where, row = first
            raise ValueError(f"{'messages_field' if self.messages_field else 'field'}: {where} "
                             f"has none of the mapped fields ({self.prompt_key()}); it has "
                             f"{', '.join(row) or 'nothing'}")

    def prompt_key(self) -> str:
        return self.messages_field or self.field

    def checker(self) -> str:
        return self.task or {"arithmetic": "arithmetic", "code": "code"}.get(self.kind, "math")


@dataclass(frozen=True)
class Prompt:
    id: str
    """Stable across runs: the sha256 of the text (first 16 hex digits)."""
    text: str


@dataclass(frozen=True)
class Task:
    """A prompt and what checks an answer to it."""

    id: str
    prompt: str
    """The user turn (what a completion template's {prompt} gets)."""
    answer: Any = None
    """math, qa: the reference final answer (qa: a string or a tuple of acceptable ones)."""
    tests: tuple = ()
    """code: asserts the response's code must pass (public ones are also in the prompt), or
    stdin/stdout cases (data_recipes.code_check.IOCase); humaneval: the test code to run."""
    checker: str = ""
    """Which checker judges it (data_recipes.verifiers.CHECKERS); "" leaves it to the caller."""
    system: Optional[str] = None
    history: tuple = ()
    """Chat turns before the prompt, as (role, content) pairs."""
    context: str = ""
    """humaneval: the code the answer continues (the function's signature and docstring)."""
    limits: tuple[float, int] = (2.0, 512)
    """stdin/stdout cases: (CPU seconds, MB of memory) per case."""

    def chat(self) -> list[Message]:
        """The conversation a chat model is asked: system prompt, earlier turns, the prompt."""
        system = [Message("system", self.system)] if self.system else []
        return system + [Message(r, c) for r, c in self.history] + [Message("user", self.prompt)]


def split_heldout(items: list, ids: list[str], n: int) -> tuple[list, list]:
    """(train, heldout) of `items`: the n with the smallest hashes of their ids are held out, so
    the split does not depend on the order or the number of items."""
    rank = sorted(range(len(items)), key=lambda i: hashlib.sha256(ids[i].encode()).hexdigest())
    held = set(rank[:n])
    return ([x for i, x in enumerate(items) if i not in held],
            [x for i, x in enumerate(items) if i in held])


def load_prompts(cfg: PromptsConfig) -> list[Prompt]:
    """At most `cfg.num` distinct prompts, in a fixed order."""
    if cfg.kind == "arithmetic":
        return _arithmetic(cfg)
    return [Prompt(t.id, t.prompt) for t in load_tasks(cfg)]


def load_tasks(cfg: PromptsConfig) -> list[Task]:
    """The prompt set with each prompt's checker and what it needs (answer, tests)."""
    if cfg.kind == "code":  # the task's public asserts are part of its prompt
        return [Task(t.id, t.prompt_with_tests, tests=t.tests, checker="code")
                for t in make_code_tasks(cfg.num, cfg.seed, cfg.split, cfg.heldout_fraction)]
    if cfg.kind == "arithmetic":
        return [Task(p.id, p.text, answer=str(arithmetic.solve(p.text)["answer"]),
                     checker=cfg.checker()) for p in _arithmetic(cfg)]
    if cfg.kind == "mix":
        return _mix(cfg)
    out: dict[str, Task] = {}
    for where, row in iter_rows(cfg):
        task = _task_of(cfg, where, row)
        out.setdefault(task.id, task)
        if len(out) >= cfg.num:
            break
    return list(out.values())


def _arithmetic(cfg: PromptsConfig) -> list[Prompt]:
    rng = random.Random(cfg.seed)
    want_heldout = cfg.split == "heldout"
    seen: dict[str, Prompt] = {}
    tries = 0
    while len(seen) < cfg.num and tries < 50 * cfg.num + 1000:
        tries += 1
        text = arithmetic.make_problem(rng, cfg.max_digits, cfg.ops)["question"]
        if text not in seen and in_heldout(text, cfg.heldout_fraction) == want_heldout:
            seen[text] = Prompt(text_id(text), text)
    return list(seen.values())


def _task_of(cfg: PromptsConfig, where: str, row: dict) -> Task:
    from data_recipes.code_check import parse_io_cases  # the sandbox stays out of config imports

    key = cfg.prompt_key()
    if key not in row:
        raise ValueError(f"prompts.{'messages_field' if cfg.messages_field else 'field'}: {where} "
                         f"has none of the mapped fields ({key}); it has {', '.join(row)}")
    system = row.get(cfg.system_field) if cfg.system_field else None
    system = system or cfg.system_prompt
    history: tuple = ()
    if cfg.messages_field:
        turns = [(str(m["role"]), str(m["content"])) for m in _messages(row[key], where)]
        last_user = max((i for i, (r, _) in enumerate(turns) if r == "user"), default=None)
        if last_user is None:
            raise ValueError(f"prompts.messages_field: {where}: no user turn")
        if turns[0][0] == "system":
            system, turns, last_user = system or turns[0][1], turns[1:], last_user - 1
        history, text = tuple(turns[:last_user]), turns[last_user][1]
    else:
        text = row[key]
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"prompts.{key}: {where}: the prompt is not a non-empty string")
    answer = row.get(cfg.answer_field)
    answer = tuple(map(str, answer)) if isinstance(answer, (list, tuple)) else (
        None if answer is None else str(answer))
    tests: tuple = ()
    if cfg.tests_field and row.get(cfg.tests_field) is not None:
        raw = row[cfg.tests_field]
        cases = parse_io_cases(raw)
        tests = tuple(cases) if cases is not None else tuple(
            [raw] if isinstance(raw, str) else map(str, raw))
    ident = text_id(json.dumps([system, history, text]) if system or history else text)
    return Task(ident, text, answer, tests, cfg.checker(), system, history,
                limits=(cfg.case_seconds, cfg.case_memory_mb))


def _messages(value, where: str) -> list[dict]:
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, list) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise ValueError(f"prompts.messages_field: {where}: not a list of {{role, content}}")
    return value


def _mix(cfg: PromptsConfig) -> list[Task]:
    """Each member gives its share of `num` (largest remainder), interleaved by a seeded shuffle."""
    total = sum(s.weight for s in cfg.sets)
    exact = [cfg.num * s.weight / total for s in cfg.sets]
    quota = [int(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: quota[i] - exact[i])[:cfg.num - sum(quota)]:
        quota[i] += 1
    tasks: dict[str, Task] = {}
    for member, n in zip(cfg.sets, quota):
        if n:
            for t in load_tasks(_with_num(member, n)):
                tasks.setdefault(t.id, t)
    out = list(tasks.values())
    random.Random(cfg.seed).shuffle(out)
    return out


def _with_num(cfg: PromptsConfig, num: int) -> PromptsConfig:
    import dataclasses

    return dataclasses.replace(cfg, num=num)
