"""PNG plots of an FG-WSD schedule (from the schedule alone, before any training): LR and mixture
over tokens, phase boundaries marked. Logged to MLflow at the start of a pretrain stage."""

from __future__ import annotations

import os
from pathlib import Path

from schedulers.fg_wsd import FGWSDSchedule
from schedulers.mixture import all_sources


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(8, 3.5))


def _mark_phases(ax, schedule: FGWSDSchedule) -> None:
    for phase in schedule.phases:
        ax.axvline(phase.start_tokens, color="grey", lw=0.6, ls="--")
        ax.text(phase.start_tokens, 1.0, f" {phase.name}", transform=ax.get_xaxis_transform(),
                fontsize=7, va="bottom", rotation=20)


def plot_lr(schedule: FGWSDSchedule, path: str | os.PathLike) -> Path:
    plt, fig, ax = _figure()
    # ~2000 points are plenty for a full-scale run's millions of steps; keep the corners exact
    total = schedule.total_steps
    corners = {schedule.warmup_steps, schedule.decay_start_step, total}
    steps = sorted(set(range(0, total + 1, max(1, total // 2000))) | corners)
    ax.plot([schedule.tokens_at(s) for s in steps], [schedule.lr(s) for s in steps])
    _mark_phases(ax, schedule)
    ax.set_xlabel("tokens")
    ax.set_ylabel("learning rate")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_mixture(schedule: FGWSDSchedule, path: str | os.PathLike) -> Path:
    plt, fig, ax = _figure()
    sources = all_sources(schedule)
    # two points per phase (its start and end) draw each phase's weights as a flat band
    xs = [t for p in schedule.phases for t in (p.start_tokens, p.start_tokens + p.tokens)]
    ys = [[p.weights.get(s, 0.0) for p in schedule.phases for _ in (0, 1)] for s in sources]
    ax.stackplot(xs, ys, labels=sources)
    _mark_phases(ax, schedule)
    ax.set_xlabel("tokens")
    ax.set_ylabel("mixture weight")
    ax.set_ylim(0, 1)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
