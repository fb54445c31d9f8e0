"""Prompt sets for SFT data, eval and (later) RL: generated arithmetic questions or a jsonl file.

Arithmetic prompts come in two disjoint splits, decided by a hash of the question text, so an eval
on `heldout` never sees a question that `train` gave to SFT, whatever the seeds and sizes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from typing import Optional

from data_recipes.arithmetic import make_problem
from data_recipes.code_tasks import make_code_tasks
from data_recipes.splits import in_heldout, text_id


@dataclass
class PromptsConfig:
    """A set of prompts: generated arithmetic questions (split train / heldout) or a jsonl file."""

    kind: str = "arithmetic"
    """arithmetic | code (tiny Python function tasks with asserts) | jsonl"""
    num: int = 256
    """At most this many prompts."""
    split: str = "train"
    """arithmetic: train | heldout; the two are disjoint (by a hash of the question)."""
    heldout_fraction: float = 0.1
    seed: int = 0
    max_digits: int = 2
    path: Optional[str] = None
    """jsonl: the file; each line an object with the prompt under `field`."""
    field: str = "prompt"
    answer_field: str = "answer"
    """jsonl: the reference answer (for a math reward), when the lines have one."""

    def __post_init__(self):
        if self.kind not in ("arithmetic", "code", "jsonl"):
            raise ValueError(f"kind: {self.kind!r} is not a prompt set kind; one of arithmetic, "
                             "code, jsonl")
        if self.split not in ("train", "heldout"):
            raise ValueError(f"split: {self.split!r}; one of train, heldout")
        if self.kind == "jsonl":
            if not self.path:
                raise ValueError("path: a jsonl prompt set needs a path")
            self.path = os.path.abspath(os.path.expanduser(self.path))  # like source paths
            if not os.path.isfile(self.path):
                raise ValueError(f"path: {self.path} does not exist")


@dataclass(frozen=True)
class Prompt:
    id: str
    """Stable across runs: the sha256 of the text (first 16 hex digits)."""
    text: str


def split_heldout(items: list, ids: list[str], n: int) -> tuple[list, list]:
    """(train, heldout) of `items`: the n with the smallest hashes of their ids are held out, so
    the split does not depend on the order or the number of items."""
    rank = sorted(range(len(items)), key=lambda i: hashlib.sha256(ids[i].encode()).hexdigest())
    held = set(rank[:n])
    return ([x for i, x in enumerate(items) if i not in held],
            [x for i, x in enumerate(items) if i in held])


def load_prompts(cfg: PromptsConfig) -> list[Prompt]:
    """At most `cfg.num` distinct prompts, in a fixed order."""
    if cfg.kind == "jsonl":
        return _from_jsonl(cfg)
    if cfg.kind == "code":  # the task's public asserts are part of its prompt
        return [Prompt(t.id, t.prompt_with_tests)
                for t in make_code_tasks(cfg.num, cfg.seed, cfg.split, cfg.heldout_fraction)]
    rng = random.Random(cfg.seed)
    want_heldout = cfg.split == "heldout"
    seen: dict[str, Prompt] = {}
    tries = 0
    while len(seen) < cfg.num and tries < 50 * cfg.num + 1000:
        tries += 1
        text = make_problem(rng, cfg.max_digits)["question"]
        if text not in seen and in_heldout(text, cfg.heldout_fraction) == want_heldout:
            seen[text] = Prompt(text_id(text), text)
    return list(seen.values())


def _from_jsonl(cfg: PromptsConfig) -> list[Prompt]:
    out: dict[str, Prompt] = {}
    with open(cfg.path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[cfg.field]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"prompts.path: {cfg.path}:{lineno}: not a JSON object with a "
                                 f"{cfg.field!r} field") from None
            out.setdefault(text, Prompt(text_id(text), text))
            if len(out) >= cfg.num:
                break
    return list(out.values())
