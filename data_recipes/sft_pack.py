"""SFT samples -> fixed-length training sequences, packed several to a sequence.

A sample of n tokens trains n-1 next-token predictions (inputs ids[:-1], targets ids[1:], the
target counted where its loss-mask bit is 1, i.e. it is an assistant token). Packing lays samples
end to end in a fixed order (one shuffled pass per epoch) and starts a new sequence when the next
one does not fit; each keeps its own positions (from 0) and a segment id, from which the attention
mask blocks attention across samples. Everything is a pure function of the samples, seed and
sizes, so step N's batch is the same after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Packed:
    """One training sequence: which samples it holds and from which epoch it came."""

    samples: list[int]
    epoch: int


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


def pack(lengths: list[int], seq_length: int, *, epochs: int = 1, seed: int = 0,
         packing: bool = True, shuffle: bool = True) -> list[Packed]:
    """Sequences of at most `seq_length` predictions each, over `epochs` passes of the samples.

    `lengths` are token counts; a sample longer than seq_length + 1 tokens is cut (see `window`).
    """
    out: list[Packed] = []
    for epoch in range(epochs):
        order = epoch_order(len(lengths), seed, epoch) if shuffle else list(range(len(lengths)))
        current: list[int] = []
        used = 0
        for i in order:
            need = min(lengths[i], seq_length + 1) - 1
            if current and (not packing or used + need > seq_length):
                out.append(Packed(current, epoch))
                current, used = [], 0
            current.append(i)
            used += need
        if current:
            out.append(Packed(current, epoch))
    return out


def window(ids: list[int], mask: list[int], seq_length: int) -> tuple[list[int], list[int]]:
    """A sample cut to seq_length + 1 tokens (the cut is counted by the caller)."""
    return ids[:seq_length + 1], mask[:seq_length + 1]


def build_sequence(encoded: list[tuple[list[int], list[int]]], packed: Packed, seq_length: int,
                   pad_id: int) -> dict[str, np.ndarray]:
    """tokens, labels, loss_mask, position_ids, segment (-1 = padding) of one packed sequence."""
    tokens = np.full(seq_length, pad_id, np.int64)
    labels = np.full(seq_length, pad_id, np.int64)
    loss_mask = np.zeros(seq_length, np.float32)
    position_ids = np.zeros(seq_length, np.int64)
    segment = np.full(seq_length, -1, np.int64)
    at = 0
    for seg, i in enumerate(packed.samples):
        ids, mask = window(*encoded[i], seq_length)
        n = len(ids) - 1
        tokens[at:at + n] = ids[:-1]
        labels[at:at + n] = ids[1:]
        loss_mask[at:at + n] = mask[1:]
        position_ids[at:at + n] = np.arange(n)
        segment[at:at + n] = seg
        at += n
    position_ids[at:] = np.arange(seq_length - at)  # padding: a harmless run of its own
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
            "position_ids": position_ids, "segment": segment}


def attention_mask(segment: np.ndarray) -> np.ndarray:
    """[b, 1, s, s] bool, True = masked: causal, and no attention across samples of a sequence.

    Padding (segment -1) attends causally among itself; its loss mask is 0.
    """
    s = segment.shape[-1]
    causal = np.triu(np.ones((s, s), bool), k=1)
    other = segment[:, :, None] != segment[:, None, :]
    return (causal[None] | other)[:, None]
