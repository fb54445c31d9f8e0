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


@dataclass
class PackPlan:
    """Every training sequence of a run as three flat arrays (8 bytes per sample per epoch, no
    Python object per sample): sequence i holds samples order[starts[i]:starts[i + 1]] and
    belongs to epoch epochs[i]."""

    order: np.ndarray
    starts: np.ndarray
    epochs: np.ndarray

    def __len__(self) -> int:
        return len(self.epochs)

    def __getitem__(self, i: int) -> Packed:
        return Packed(self.order[self.starts[i]:self.starts[i + 1]].tolist(), int(self.epochs[i]))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def slice(self, start: int, stop: int) -> list[Packed]:
        return [self[i] for i in range(start, min(stop, len(self)))]


def plan_packing(lengths: np.ndarray, seq_length: int, *, epochs: int = 1, seed: int = 0,
                 packing: bool = True, shuffle: bool = True,
                 pool: np.ndarray | None = None) -> PackPlan:
    """Sequences of at most `seq_length` predictions each, over `epochs` passes of `pool` (the
    sample indices of one epoch, repeats allowed; default: every sample once), planned from the
    token counts alone. A sample longer than seq_length + 1 tokens is cut (see `window`)."""
    lengths = np.asarray(lengths, np.int64)
    pool = np.arange(len(lengths)) if pool is None else np.asarray(pool, np.int64)
    orders, starts, seq_epochs, base = [], [], [], 0
    for epoch in range(epochs):
        order = pool[epoch_order(len(pool), seed, epoch)] if shuffle else pool
        need = np.minimum(lengths[order], seq_length + 1) - 1
        if packing:  # next fit: a sequence takes samples while their predictions fit
            cum = np.concatenate([[0], np.cumsum(need)])
            at, bounds = 0, []
            while at < len(order):
                bounds.append(at)
                end = int(np.searchsorted(cum, cum[at] + seq_length, side="right")) - 1
                at = max(end, at + 1)
        else:
            bounds = list(range(len(order)))
        orders.append(order)
        starts.append(np.asarray(bounds, np.int64) + base)
        seq_epochs.append(np.full(len(bounds), epoch, np.int32))
        base += len(order)
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
    return PackPlan(cat(orders, np.int64), np.append(cat(starts, np.int64), base),
                    cat(seq_epochs, np.int32))


def pack(lengths: list[int], seq_length: int, *, epochs: int = 1, seed: int = 0,
         packing: bool = True, shuffle: bool = True) -> list[Packed]:
    """plan_packing as a list of Packed sequences (small sample sets)."""
    return list(plan_packing(np.asarray(lengths), seq_length, epochs=epochs, seed=seed,
                             packing=packing, shuffle=shuffle))


def mixture_pool(sizes: list[int], weights: list[float], exclude: np.ndarray,
                 seed: int) -> np.ndarray:
    """One epoch's samples of datasets laid end to end (sizes), mixed Tulu-style: each sample of
    a dataset with weight w is taken floor(w) times, plus a fixed share w - floor(w) of them
    (chosen by `seed`, the same every epoch); `exclude` (held-out indices) are never taken."""
    parts, offset = [], 0
    excluded = np.zeros(sum(sizes), bool)
    excluded[np.asarray(exclude, np.int64)] = True
    for d, (n, w) in enumerate(zip(sizes, weights)):
        idx = offset + np.flatnonzero(~excluded[offset:offset + n])
        whole, frac = int(w), w - int(w)
        parts += [idx] * whole
        if frac > 0:
            pick = np.random.default_rng([seed, d]).permutation(len(idx))[:round(frac * len(idx))]
            parts.append(idx[np.sort(pick)])
        offset += n
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def window(ids: list[int], mask: list[int], seq_length: int) -> tuple[list[int], list[int]]:
    """A sample cut to seq_length + 1 tokens (the cut is counted by the caller)."""
    return ids[:seq_length + 1], mask[:seq_length + 1]


def build_sequence(encoded, packed: Packed, seq_length: int,
                   pad_id: int) -> dict[str, np.ndarray]:
    """tokens, labels, loss_mask, position_ids, segment (-1 = padding) of one packed sequence.

    `encoded[i]` is sample i's (token ids, loss mask): lists, or arrays from the SFT store."""
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
