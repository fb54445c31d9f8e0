"""Where the few full-attention layers of a hybrid go: PostNAS's per-layer importance and beam search.

A layout is named by the set of layers that keep full attention (the others are linear). `score`
maps such a set to {task: score}, higher is better for every task; the search ranks layouts by
`combined`: each task's score rescaled so all-linear is 0 and all-full is 1 (the share of the
gap the layout recovers; -1 where all-full scores below all-linear), averaged over the tasks, so
tasks on different scales weigh alike.
Plain Python: the caller scores with whatever model it has (and caches, as `Scores` does).
"""

from __future__ import annotations

from itertools import combinations
from typing import Callable

Layout = frozenset


def layout_kinds(full: Layout, num_layers: int) -> list[str]:
    return ["full" if i in full else "linear" for i in range(num_layers)]


class Scores:
    """Per-task scores of layouts, each computed once; `combined` rescales by the two ends."""

    def __init__(self, score: Callable[[Layout], dict[str, float]], num_layers: int):
        self.score, self.num_layers, self.seen = score, num_layers, {}
        self.low = self.of(Layout())
        self.high = self.of(Layout(range(num_layers)))

    def of(self, full: Layout) -> dict[str, float]:
        full = Layout(full)
        if full not in self.seen:
            self.seen[full] = self.score(full)
        return self.seen[full]

    def combined(self, full: Layout) -> float:
        got = self.of(full)
        parts = []
        for task, value in got.items():
            gap = self.high[task] - self.low[task]
            # by the gap's size, not its sign: where all-linear beats all-full on a task (a
            # held-out loss can), a higher score must still rank higher
            parts.append((value - self.low[task]) / abs(gap) if gap else value - self.low[task])
        return sum(parts) / len(parts)


def _rank(scores: Scores, layouts) -> list[tuple[float, Layout]]:
    # ties broken by the layers' indices, so the search is deterministic
    return sorted(((scores.combined(s), s) for s in layouts), key=lambda x: (-x[0], sorted(x[1])))


def importance_table(scores: Scores) -> list[dict]:
    """One row per layer: the layout keeping only that layer full, scored per task."""
    return [{"layer": i, **scores.of(Layout({i})), "combined": scores.combined(Layout({i}))}
            for i in range(scores.num_layers)]


def beam_search(scores: Scores, keep_full: int, beam: int) -> tuple[Layout, list[dict]]:
    """Grow layouts one full layer per round, keeping the `beam` best; the best of the last round
    and the trace (every candidate of every round, with its score and whether it was kept)."""
    kept, trace = [Layout()], []
    for round_ in range(1, keep_full + 1):
        candidates = {s | {i} for s in kept for i in range(scores.num_layers) if i not in s}
        ranked = _rank(scores, candidates)
        kept = [s for _, s in ranked[:beam]]
        trace += [{"round": round_, "full_layers": sorted(s), "combined": c, **scores.of(s),
                   "kept": s in kept} for c, s in ranked]
    return kept[0], trace


def exhaustive_search(scores: Scores, keep_full: int) -> Layout:
    """The best of all placements of `keep_full` full layers (the check on the beam search)."""
    return _rank(scores, [Layout(c) for c in combinations(range(scores.num_layers), keep_full)])[0][1]


def worst_placement(scores: Scores, keep_full: int) -> Layout:
    return _rank(scores, [Layout(c) for c in
                          combinations(range(scores.num_layers), keep_full)])[-1][1]
