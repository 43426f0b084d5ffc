"""Loss and accuracy curves as PNG (matplotlib, headless)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping, Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: works on machines without a display
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write a figure atomically, so a crash never leaves a truncated PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
        _pyplot().close(fig)
    return path


def plot_curves(histories: Mapping[str, Sequence[Mapping[str, float]]], path: str | os.PathLike) -> Path:
    """One figure: loss (left) and accuracy (right) per epoch, train dashed, test solid, a colour per run."""
    plt = _pyplot()
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for index, (label, rows) in enumerate(histories.items()):
        colour = f"C{index}"
        epochs = [row["epoch"] for row in rows]
        for axis, metric in ((loss_ax, "loss"), (acc_ax, "acc")):
            axis.plot(epochs, [row[f"train_{metric}"] for row in rows], "--o", color=colour, label=f"{label} train")
            axis.plot(epochs, [row[f"test_{metric}"] for row in rows], "-o", color=colour, label=f"{label} test")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1))
    for axis in (loss_ax, acc_ax):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    return save_figure(fig, path)
