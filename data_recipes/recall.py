"""Key-value recall: a retrieval task only attention (or a state that keeps the pairs) can solve.

    recall: 48=73 19=05 66=42 ; 19=05

A document lists random key=value pairs, then asks one key; the answer is its value. Documents
for pretraining are the whole line; a scorer feeds `prompt` and checks the model's greedy
continuation against `answer`. Deterministic per seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class RecallExample:
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        return self.prompt + self.answer


def recall_example(rng: random.Random, pairs: int, key_digits: int = 2) -> RecallExample:
    keys = rng.sample(range(10 ** (key_digits - 1), 10 ** key_digits), pairs)
    values = [f"{rng.randrange(100):02d}" for _ in keys]
    asked = rng.randrange(pairs)
    listing = " ".join(f"{k}={v}" for k, v in zip(keys, values))
    return RecallExample(f"recall: {listing} ; {keys[asked]}=", values[asked])


def recall_examples(seed: int, n: int, pairs: int) -> list[RecallExample]:
    rng = random.Random(seed)
    return [recall_example(rng, pairs) for _ in range(n)]


def recall_documents(seed: int, documents: int, pairs: int) -> Iterator[str]:
    """Pretraining documents of the task (a recall source)."""
    rng = random.Random(seed)
    for _ in range(documents):
        yield recall_example(rng, pairs).text
