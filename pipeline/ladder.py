"""The eval ladder: every eval stage's headline scores in DAG order, read from their manifests.

`pipeline run` prints it at the end and logs it on the parent MLflow run (`ladder.json` and a
`ladder.png` plot), so a recipe's claim that each stage helps (base < SFT < DPD < RL) is one look.
A plain eval's scores are its greedy exact match and the share of answers in the expected form; a
benchmark eval's are each benchmark's accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.graph import StageNode
from stages.contract import MANIFEST


def ladder_rows(graph: dict[str, StageNode]) -> list[dict[str, Any]]:
    """One row per finished eval stage, in graph (DAG) order: {stage, init, scores}."""
    rows = []
    for name, node in graph.items():
        path = node.output_dir / MANIFEST
        if node.kind != "eval" or not path.is_file():
            continue
        manifest = json.loads(path.read_text())
        if "benchmarks" in manifest:
            scores = {b: r["accuracy"] for b, r in manifest["benchmarks"].items()}
        else:
            scores = {k: manifest[k] for k in ("exact_match", "answered") if k in manifest}
        rows.append({"stage": name, "init": node.config.init, "scores": scores})
    return rows


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every score name, in first-seen order."""
    return list(dict.fromkeys(k for r in rows for k in r["scores"]))


def format_ladder(rows: list[dict[str, Any]]) -> str:
    columns = _columns(rows)
    w = max([len(r["stage"]) + len(r["init"]) + 3 for r in rows] + [5])
    lines = ["eval ladder (DAG order):", f"  {'stage':<{w}} " + " ".join(f"{c:>11}" for c in columns)]
    for r in rows:
        label = f"{r['stage']} ({r['init']})"
        lines.append(f"  {label:<{w}} " + " ".join(
            f"{r['scores'][c]:>11.3f}" if c in r["scores"] else f"{'-':>11}" for c in columns))
    return "\n".join(lines)


def plot_ladder(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = _columns(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows)), 4))
    x = range(len(rows))
    for c in columns:
        ax.plot([i for i, r in zip(x, rows) if c in r["scores"]],
                [r["scores"][c] for r in rows if c in r["scores"]], marker="o", label=c)
    ax.set_xticks(list(x), [r["stage"] for r in rows], rotation=30, ha="right")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("score")
    ax.set_title("held-out scores after each stage (DAG order)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
