"""Key-value recall: a retrieval task only attention (or a state that keeps the pairs) can solve.

    recall: m=4 y=8 n=7 b=6 ; n=7 y=8 n=7

A document lists key=value pairs (distinct letters, digits), then asks keys; each answer is its
value. A scorer feeds `prompt` (the text up to the first asked key's `=`) and checks the model's
greedy continuation against `answer`. Deterministic per seed.

Why one token per key and per value: with two-digit keys and values ("48=73", four tokens a pair)
the bench's 4-layer base never learnt to bind a value to its key (5.5% recall after 1500 steps,
bench/postnas.py). Why several queries per document: each is another answer token to learn from.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Iterator

MAX_PAIRS = len(string.ascii_lowercase)


@dataclass(frozen=True)
class RecallExample:
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return self.prompt + self.answer


def check_pairs(pairs: int) -> None:
    if not 1 <= pairs <= MAX_PAIRS:
        raise ValueError(f"pairs: must be 1 to {MAX_PAIRS} (distinct letters), got {pairs}")


def _listing(rng: random.Random, pairs: int) -> tuple[list[str], list[str]]:
    check_pairs(pairs)
    keys = rng.sample(string.ascii_lowercase, pairs)
    return keys, [str(rng.randrange(10)) for _ in keys]


def _text(keys: list[str], values: list[str], asked: list[int]) -> str:
    listing = " ".join(f"{k}={v}" for k, v in zip(keys, values))
    return f"recall: {listing} ;" + "".join(f" {keys[i]}={values[i]}" for i in asked)


def recall_document(rng: random.Random, pairs: int, queries: int = 1) -> str:
    """A listing of `pairs`, then `queries` keys drawn from it at random (repeats allowed)."""
    keys, values = _listing(rng, pairs)
    return _text(keys, values, [rng.randrange(pairs) for _ in range(queries)])


def recall_example(rng: random.Random, pairs: int) -> RecallExample:
    text = recall_document(rng, pairs)
    return RecallExample(text[:-1], text[-1])  # the answer is the last digit


def recall_examples(seed: int, n: int, pairs: int) -> list[RecallExample]:
    rng = random.Random(seed)
    return [recall_example(rng, pairs) for _ in range(n)]


def recall_documents(seed: int, documents: int, pairs: int, queries: int = 1) -> Iterator[str]:
    """Pretraining documents of the task (a recall source)."""
    rng = random.Random(seed)
    for _ in range(documents):
        yield recall_document(rng, pairs, queries)
