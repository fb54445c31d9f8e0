"""A preference pair as model input, and what the frozen models of distillation say about it.

A pair (prompt, positive, negative) is two chat rows; a batch of pairs idx is the rows [positives
of idx..., negatives of idx...], right-padded, with the loss mask on the answers' tokens. The
frozen initial student gives DPO's reference log-probs (computed once); the teacher gives logits,
online or as a top-k per token cached on disk (`teacher_topk_{values,indices}.npy`, row 2i the
positive of pair i, 2i + 1 its negative, memory-mapped), after which the teacher can be freed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from data_recipes.chat import Message, encode_chat, parse_assistant
from data_recipes.pairs import Pair
from stages.engine.losses import (logits_of, sequence_logps, token_divergence,
                                  token_divergence_topk, token_logps)


def encode_pair(tok, pair: Pair, seq_length: int) -> list[tuple[list[int], list[int]]]:
    """(ids, loss mask) of prompt + positive and of prompt + negative, cut to seq_length + 1."""
    out = []
    for answer in (pair.positive, pair.negative):
        ids, mask = encode_chat(tok, [Message("user", pair.prompt), parse_assistant(answer)])
        out.append((ids[:seq_length + 1], mask[:seq_length + 1]))
    return out


def make_batch(encoded: list[list[tuple[list[int], list[int]]]], idx: list[int], pad_id: int,
               device) -> dict[str, torch.Tensor]:
    """Rows [positives of idx..., negatives of idx...], right-padded to the longest row."""
    rows = [encoded[i][0] for i in idx] + [encoded[i][1] for i in idx]
    n = max(len(ids) for ids, _ in rows) - 1
    tokens = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), n)
    for r, (ids, m) in enumerate(rows):
        k = len(ids) - 1
        tokens[r, :k] = torch.tensor(ids[:-1])
        labels[r, :k] = torch.tensor(ids[1:])
        mask[r, :k] = torch.tensor(m[1:], dtype=torch.float)
    batch = {"tokens": tokens, "labels": labels, "loss_mask": mask,
             "position_ids": torch.arange(n).unsqueeze(0).expand(len(rows), -1),
             # causal; the padding is at the end of each row and outside the loss mask
             "attention_mask": torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool), diagonal=1)}
    return {k: v.to(device) for k, v in batch.items()}


class TeacherLogits:
    """The teacher's view of a micro-batch: online logits, or the saved top-k of every row."""

    def __init__(self, teacher=None, topk: tuple[np.ndarray, np.ndarray] | None = None):
        self.teacher, self.topk = teacher, topk

    @torch.no_grad()
    def divergence(self, student_logits, batch, idx: list[int], vocab_size: int,
                   loss_cfg) -> torch.Tensor:
        kw = dict(kind=loss_cfg.divergence, beta=loss_cfg.jsd_beta,
                  temperature=loss_cfg.temperature)
        if self.topk is None:
            t_logits = logits_of(self.teacher, batch, vocab_size)
            with torch.enable_grad():
                return token_divergence(student_logits, t_logits, **kw)
        values, indices = self.topk
        rows = [2 * i for i in idx] + [2 * i + 1 for i in idx]
        n = student_logits.shape[1]
        v = torch.from_numpy(np.ascontiguousarray(values[rows, :n])).to(student_logits.device)
        ix = torch.from_numpy(np.ascontiguousarray(indices[rows, :n])).long().to(v.device)
        with torch.enable_grad():
            return token_divergence_topk(student_logits, v, ix, **kw)


@torch.no_grad()
def reference_logps(model, encoded, pad_id: int, vocab_size: int, length_normalize: bool,
                    batch_size: int, device) -> list[list[float]]:
    """[positive, negative] sequence log-prob of every pair under `model` (the initial student)."""
    out = []
    for s in range(0, len(encoded), batch_size):
        idx = list(range(s, min(s + batch_size, len(encoded))))
        batch = make_batch(encoded, idx, pad_id, device)
        lp = sequence_logps(token_logps(logits_of(model, batch, vocab_size), batch["labels"]),
                              batch["loss_mask"], length_normalize)
        m = len(idx)
        out += [[float(lp[j]), float(lp[m + j])] for j in range(m)]
    return out


@torch.no_grad()
def write_teacher_topk(teacher, encoded, pad_id: int, vocab_size: int, k: int, seq_length: int,
                       batch_size: int, device, out: Path) -> None:
    """The teacher's top-k logits and ids of every row ([2 * pairs, seq_length, k], row 2i the
    positive of pair i, 2i + 1 its negative) as two .npy files, written through a memory map."""
    shape = (2 * len(encoded), seq_length, k)
    files = {name: out / f"teacher_topk_{name}.npy" for name in ("values", "indices")}
    arrays = {name: np.lib.format.open_memmap(path.with_suffix(".tmp.npy"), mode="w+",
                                              dtype=np.float32 if name == "values" else np.int32,
                                              shape=shape) for name, path in files.items()}
    for s in range(0, len(encoded), batch_size):
        idx = list(range(s, min(s + batch_size, len(encoded))))
        batch = make_batch(encoded, idx, pad_id, device)
        top = logits_of(teacher, batch, vocab_size).topk(k, dim=-1)
        n = batch["tokens"].shape[1]
        rows = [2 * i for i in idx] + [2 * i + 1 for i in idx]
        arrays["values"][rows, :n] = top.values.cpu().numpy()
        arrays["indices"][rows, :n] = top.indices.cpu().numpy()
    for name, path in files.items():
        arrays[name].flush()
        os.replace(path.with_suffix(".tmp.npy"), path)


def read_teacher_topk(out: Path) -> tuple[np.ndarray, np.ndarray] | None:
    files = [out / f"teacher_topk_{name}.npy" for name in ("values", "indices")]
    if not all(f.exists() for f in files):
        return None
    return tuple(np.load(f, mmap_mode="r") for f in files)
