"""The QA checker: exact match, token F1 and substring match after SQuAD's answer normalisation.

normalize_answer is the official SQuAD v1.1 evaluation script's definition (lower case, drop
punctuation, drop the articles a/an/the, collapse whitespace), as are exact_match and f1 (token
multiset overlap) and the max over a question's several gold answers. It is not imported because
that script is not packaged: HF `evaluate` fetches it from the hub at run time, and tests and
jobs stay offline. substring_match is Search-R1's `subem` (a normalised gold answer appears
anywhere in the normalised prediction), which the tool-use RL recipes (Jan-nano) reward with.

The prediction is the response's final answer (its `Answer:` line or last `\\boxed{}`), else the
whole response.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Callable, Sequence

from data_recipes.math_check import extract_answer

_PUNCTUATION = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD v1.1's evaluate script)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def substring_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(gold) in normalize_answer(prediction))


QA_METRICS: dict[str, Callable[[str, str], float]] = {
    "em": exact_match, "f1": f1, "substring": substring_match}


def qa_prediction(response: str) -> str:
    return extract_answer(response) or response.strip()


def golds_of(answer) -> list[str]:
    """A reference's gold answers: one string, or any of a list of them."""
    return [str(a) for a in answer] if isinstance(answer, (list, tuple)) else [str(answer)]


def score_qa(response: str, answer, metric: str = "em") -> float:
    """The best score of the response's answer over the gold answers."""
    pred, fn = qa_prediction(response), QA_METRICS[metric]
    return max((fn(pred, g) for g in golds_of(answer)), default=0.0)


def score_qa_batch(responses: Sequence[str], answers: Sequence, metric: str = "em") -> list[float]:
    return [score_qa(r, a, metric) for r, a in zip(responses, answers)]
