"""Loss and accuracy curves as PNG (matplotlib, headless)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: works on machines without a display
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write a figure atomically, so a crash never leaves a truncated PNG."""
    from .io import atomic_path

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
    finally:
        _pyplot().close(fig)
    return path


def plot_curves(histories: Mapping[str, object], path: str | os.PathLike) -> Path:
    """Loss (left) and accuracy (right), a colour per run: training per step (thin, smoothed
    over a few steps) and the test set after each epoch (circles), so that even a one-epoch
    run shows how it learned. ``histories`` maps a label to a ``common.train.History``."""
    plt = _pyplot()
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for index, (label, history) in enumerate(histories.items()):
        colour = f"C{index}"
        steps, rows = history.steps, history.rows
        progress = [step["epoch"] for step in steps]
        for axis, metric in ((loss_ax, "loss"), (acc_ax, "acc")):
            axis.plot(progress, _smooth([step[metric] for step in steps]), "-", lw=1, alpha=0.8, color=colour,
                      label=f"{label} train (per step)")
            axis.plot([row["epoch"] for row in rows], [row[f"test_{metric}"] for row in rows], "o-", ms=6,
                      color=colour, label=f"{label} test (per epoch)")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    for axis in (loss_ax, acc_ax):
        axis.set_xlim(left=0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    return save_figure(fig, path)


def _smooth(values: Sequence[float]) -> list[float]:
    """Running mean over the last ~2% of the steps (at least 1): readable, and never ahead of the data."""
    window = max(1, len(values) // 50)
    total, out = 0.0, []
    for index, value in enumerate(values):
        total += value - (values[index - window] if index >= window else 0.0)
        out.append(total / min(index + 1, window))
    return out
