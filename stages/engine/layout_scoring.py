"""What postnas distils on and scores layouts with: windows of a prepare stage's tokens, key-value
recall accuracy, held-out next-token loss.

Recall accuracy is teacher-forced: an example counts when every answer token is the argmax given
the tokens before it, which is exactly when greedy decoding from the prompt writes the answer
(the answer's tokens are those after the longest common prefix of the prompt's and the whole
text's tokenizations, so a token spanning the prompt/answer boundary is part of the answer).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data_recipes.indexed_shards import token_dtype
from data_recipes.recall import RecallExample


class TokenWindows:
    """Random windows of `length` tokens from a prepare stage's shards (a shard picked in
    proportion to its tokens), drawn from a given numpy Generator: reproducible by its seed."""

    def __init__(self, manifest: dict, length: int):
        dtype = token_dtype(manifest["vocab_size"])
        self.shards = [np.memmap(f"{s['prefix']}.bin", dtype=dtype, mode="r")
                       for s in manifest["shards"].values()]
        self.length = length
        sizes = np.array([len(s) for s in self.shards], dtype=np.float64)
        if (sizes < length + 1).all():
            raise ValueError(f"data: no shard holds {length + 1} tokens (seq_length + 1)")
        sizes[sizes < length + 1] = 0
        self.weights = sizes / sizes.sum()

    def sample(self, rng: np.random.Generator, n: int) -> torch.Tensor:
        rows = []
        for shard in rng.choice(len(self.shards), size=n, p=self.weights):
            start = rng.integers(0, len(self.shards[shard]) - self.length)
            rows.append(np.asarray(self.shards[shard][start:start + self.length], dtype=np.int64))
        return torch.from_numpy(np.stack(rows))


def causal_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """[b, s, padded vocab] logits of a plain causal forward."""
    n = tokens.shape[1]
    mask = torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool, device=tokens.device), diagonal=1)
    positions = torch.arange(n, device=tokens.device)[None].expand_as(tokens)
    return model(tokens, positions, mask, runtime_gather_output=True)


def recall_batch(tok, examples: list[RecallExample]) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [n, T] right-padded, answer mask [n, T]: True where a token is an answer's)."""
    rows, masks = [], []
    for ex in examples:
        prompt, full = tok.encode(ex.prompt), tok.encode(ex.text)
        common = 0
        while common < min(len(prompt), len(full)) and prompt[common] == full[common]:
            common += 1
        rows.append(full)
        masks.append([False] * common + [True] * (len(full) - common))
    width = max(len(r) for r in rows)
    pad = tok.pad_id if isinstance(tok.pad_id, int) and tok.pad_id >= 0 else 0  # after the answer
    tokens = torch.full((len(rows), width), pad)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, masks)):
        tokens[i, :len(r)] = torch.tensor(r)
        mask[i, :len(m)] = torch.tensor(m)
    return tokens, mask


@torch.no_grad()
def recall_accuracy(model, tokens: torch.Tensor, answer: torch.Tensor, vocab_size: int,
                    batch: int = 16) -> float:
    correct = 0
    for i in range(0, len(tokens), batch):
        t, m = tokens[i:i + batch], answer[i:i + batch]
        predicted = causal_logits(model, t)[..., :vocab_size].argmax(-1)
        hit = (predicted[:, :-1] == t[:, 1:]) | ~m[:, 1:]  # the token at p is predicted at p-1
        correct += int(hit.all(-1).sum())
    return correct / len(tokens)


@torch.no_grad()
def mean_loss(model, windows: torch.Tensor, vocab_size: int, batch: int = 8) -> float:
    """Mean next-token cross-entropy over windows [n, seq + 1]."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch]
        logits = causal_logits(model, w[:, :-1])[..., :vocab_size].float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(),
                                                 reduction="sum")
        total, count = total + float(loss), count + w[:, 1:].numel()
    return total / count


def plot_importance(rows: list[dict], tasks: list[str], path: str | Path) -> Path:
    """Layer x task heat map of the single-full-layer scores (each task's column rescaled)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    values = np.array([[r[t] for t in tasks] for r in rows], dtype=np.float64)
    span = values.max(0) - values.min(0)
    scaled = (values - values.min(0)) / np.where(span > 0, span, 1.0)
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(tasks), 1.0 + 0.35 * len(rows)))
    ax.imshow(scaled, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(len(rows)), [f"layer {r['layer']}" for r in rows])
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7, color="white")
    ax.set_title("kept full alone: score per task")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
