"""Stable ids and the train/held-out split of generated prompts, both by a hash of the text.

Every generated prompt set (arithmetic questions, tiny coding tasks) splits the same way, so an
eval on `heldout` never sees a prompt that `train` gave to SFT or RL, whatever the seeds and sizes.
"""

from __future__ import annotations

import hashlib


def text_id(text: str) -> str:
    """The sha256 of the text, first 16 hex digits: the same prompt has the same id in every run."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def in_heldout(text: str, fraction: float) -> bool:
    return int(text_id(text), 16) / 16 ** 16 < fraction
