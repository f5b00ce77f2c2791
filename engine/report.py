"""Pictures and JSON that explain a learned merge: coefficient heatmap, loss curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)


def plot_heatmap(
    path: Path, matrix: Sequence[Sequence[float]], rows: Sequence[str], columns: Sequence[str], title: str
) -> None:
    """Tasks x coefficient-columns heatmap of tanh(W) in [-1, 1] (diverging colours)."""
    width = min(2 + 0.12 * len(columns), 40)
    fig, ax = plt.subplots(figsize=(width, 1.2 + 0.4 * len(rows)))
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(rows)), rows)
    step = max(1, len(columns) // 60)
    ax.set_xticks(range(0, len(columns), step), [columns[i] for i in range(0, len(columns), step)])
    ax.tick_params(axis="x", labelrotation=90, labelsize=6)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="coefficient tanh(w)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_losses(path: Path, curves: dict[str, list[dict[str, float]]]) -> None:
    """Per-task loss over steps, one panel per trained node (flat runs have one)."""
    fig, axes = plt.subplots(len(curves), 1, figsize=(7, 2.6 * len(curves)), squeeze=False)
    for ax, (node, losses) in zip(axes[:, 0], curves.items(), strict=True):
        for task in losses[0] if losses else []:
            ax.plot(range(1, len(losses) + 1), [step[task] for step in losses], label=task)
        ax.set_title(node)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
