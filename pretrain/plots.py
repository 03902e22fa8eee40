"""Training curves as a PNG: what a person looks at first, written at the end of every run.

Plots the rows the trainer appends to ``metrics.jsonl`` (``pretrain.history``; train rows carry
``loss``, eval rows ``eval/loss``), so a resumed run plots its whole history, not only the part
since the resume.
"""

from __future__ import annotations

import math
from pathlib import Path

from pretrain.history import read_metrics

__all__ = ["plot_training_curves", "read_metrics"]  # read_metrics: callers import it from here

TRAIN_PANELS = (("loss", "train loss"), ("grad_norm", "grad norm"), ("lr", "learning rate"))


def _stage_starts(train_rows: list[dict[str, float]]) -> list[tuple[int, int]]:
    """(step, stage) where a new curriculum stage begins, after the first."""
    starts, previous = [], None
    for row in train_rows:
        stage = int(row.get("stage", 0))
        if previous is not None and stage != previous:
            starts.append((int(row["step"]), stage))
        previous = stage
    return starts


def plot_training_curves(rows: list[dict[str, float]], out_path: Path, title: str = "") -> Path:
    """Plot loss (train and eval), grad norm, LR and tokens/s against the step.

    Args:
        rows: metrics rows, each with ``step`` (as in ``metrics.jsonl``).
        out_path: the PNG to write (parent directories are created).
        title: figure title, e.g. the run name.

    Returns:
        ``out_path``.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval/loss" in r]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    panels = (*TRAIN_PANELS, ("tokens_per_s", "tokens/s"))
    for ax, (key, label) in zip(axes.flat, panels):
        points = [(r["step"], r[key]) for r in train if key in r and math.isfinite(r[key])]
        if points:
            ax.plot(*zip(*points), label="train", lw=1.2)
        if key == "loss" and evals:
            ax.plot([r["step"] for r in evals], [r["eval/loss"] for r in evals], "o-", label="eval")
            ax.legend()
        for step, stage in _stage_starts(train):
            ax.axvline(step, color="grey", ls=":", lw=0.8)
            if key == "loss":
                ax.annotate(
                    f"stage {stage}",
                    (step, 1.0),
                    xycoords=("data", "axes fraction"),
                    fontsize=7,
                    va="top",
                    rotation=90,
                    color="grey",
                )
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
