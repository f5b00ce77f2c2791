"""Pictures and JSON that explain a learned merge: coefficient heatmap, loss curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType


def _pyplot() -> ModuleType:
    """pyplot on the headless backend, imported when a picture is drawn (about 0.5 s: every rank
    imports this module, only the leader draws)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heatmap(
    path: Path, matrix: Sequence[Sequence[float]], rows: Sequence[str], columns: Sequence[str], title: str
) -> None:
    """Tasks x coefficient-columns heatmap of tanh(W) in [-1, 1] (diverging colours)."""
    width = min(max(6.0, 2 + 0.12 * len(columns)), 40)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(width, max(3.0, 1.6 + 0.4 * len(rows))))
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(rows)), rows)
    step = max(1, len(columns) // 60)
    ax.set_xticks(range(0, len(columns), step), [columns[i] for i in range(0, len(columns), step)])
    ax.tick_params(axis="x", labelrotation=90, labelsize=6)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="coefficient tanh(w)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_losses(path: Path, curves: dict[str, list[dict[str, float]]]) -> None:
    """Per-task loss over steps, one panel per trained node (flat runs have one)."""
    plt = _pyplot()
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


def plot_accuracy_bars(path: Path, accuracy: dict[str, dict[str, float]], title: str) -> None:
    """Grouped bars: test accuracy per method (groups) and task (bars)."""
    methods = list(accuracy)
    tasks = list(next(iter(accuracy.values())))
    width = 0.8 / len(tasks)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(methods)), 3.5))
    for j, task in enumerate(tasks):
        xs = [i + (j - (len(tasks) - 1) / 2) * width for i in range(len(methods))]
        ax.bar(xs, [accuracy[m][task] for m in methods], width, label=task)
    ax.set_xticks(range(len(methods)), methods, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=7, ncols=len(tasks))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
