"""A task family with a known best merge: the built-in demo suite and the SuperMerge tests' oracle.

Model: four parallel branches, branches.l: x [8] -> ReLU(Linear(8 -> 16)), concatenated [64] ->
head (64 -> 4). Task i's head reads branch i only, and its labels are the predictions of the
teacher branch base_i + 0.9 * useful_i. Expert i = base + useful_i (on branch i) + noise_i (on
branch (i + 1) mod n, which its own task ignores): each expert is good at its task, and the
best merge keeps every expert's useful branch at 0.9 and drops its noise (coefficient 0), while
task arithmetic adds every noise into some other task's branch. Runs in seconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

IN, HIDDEN, CLASSES, BRANCHES = 8, 16, 4, 4
TRUE = 0.9
FACTORY = "supermerge.demo.toy:make_mlp"
TASK_NAMES = ("a", "b", "c", "d")


class ToyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.branches = nn.ModuleList([nn.Linear(IN, HIDDEN) for _ in range(BRANCHES)])
        self.head = nn.Linear(BRANCHES * HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([torch.relu(branch(x)) for branch in self.branches], dim=-1))


def make_mlp() -> nn.Module:
    """The factory named in YAML as supermerge.demo.toy:make_mlp."""
    return ToyMLP()


@dataclass
class ToySuite:
    """Paths and held-out data of a written toy suite.

    Attributes:
        base: base model folder.
        experts: task -> expert folder (weights with the task's head).
        validation: task -> .pt file with `x` [n_val, 8] and `y` [n_val].
        test: task -> (x [n_test, 8], y [n_test]).
    """

    base: Path
    experts: dict[str, Path]
    validation: dict[str, Path]
    test: dict[str, tuple[torch.Tensor, torch.Tensor]]


def build_toy_suite(
    root: Path, n_tasks: int = 2, seed: int = 0, n_val: int = 128, n_test: int = 512, dtype=torch.float32
) -> ToySuite:
    """Write base, n_tasks experts (with heads) and validation data under `root`."""
    if not 2 <= n_tasks <= BRANCHES:
        raise ValueError(f"n_tasks must be in 2..{BRANCHES}")
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=gen)).to(dtype)

    scale = IN**-0.5
    base = {}
    for i in range(BRANCHES):
        base[f"branches.{i}.weight"] = randn(HIDDEN, IN, scale=scale)
        base[f"branches.{i}.bias"] = randn(HIDDEN, scale=0.1)
    tasks = TASK_NAMES[:n_tasks]
    useful = {t: randn(HIDDEN, IN, scale=1.5 * scale) for t in tasks}
    noise = {t: randn(HIDDEN, IN, scale=2.0 * scale) for t in tasks}
    teacher = dict(base)
    for i, t in enumerate(tasks):
        teacher[f"branches.{i}.weight"] = teacher[f"branches.{i}.weight"] + TRUE * useful[t]
    root.mkdir(parents=True, exist_ok=True)
    (root / "base").mkdir(exist_ok=True)
    save_file(base, str(root / "base" / "model.safetensors"))
    suite = ToySuite(root / "base", {}, {}, {})
    model = ToyMLP().to(dtype)
    for i, t in enumerate(tasks):
        reads = torch.zeros(CLASSES, BRANCHES * HIDDEN, dtype=dtype)  # task i reads branch i only
        reads[:, i * HIDDEN : (i + 1) * HIDDEN] = randn(CLASSES, HIDDEN, scale=2 * HIDDEN**-0.5)
        head = {"head.weight": reads, "head.bias": randn(CLASSES, scale=0.1)}
        state = dict(base)
        state[f"branches.{i}.weight"] = state[f"branches.{i}.weight"] + useful[t]
        noisy = f"branches.{(i + 1) % n_tasks}.weight"
        state[noisy] = state[noisy] + noise[t]
        suite.experts[t] = root / f"expert_{t}"
        suite.experts[t].mkdir(exist_ok=True)
        save_file({**state, **head}, str(suite.experts[t] / "model.safetensors"))
        model.load_state_dict({**teacher, **head})
        with torch.no_grad():
            x = randn(n_val + n_test, IN, scale=1.0)
            y = model(x).argmax(-1)
        suite.validation[t] = root / f"{t}.pt"
        torch.save({"x": x[:n_val], "y": y[:n_val]}, suite.validation[t])
        suite.test[t] = (x[n_val:], y[n_val:])
    return suite


@torch.no_grad()
def toy_accuracy(
    body: dict[str, torch.Tensor], head: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> float:
    """Accuracy of the toy MLP with `body` weights and a task's `head` on (x, y)."""
    model = ToyMLP().to(x.dtype)
    model.load_state_dict({**body, **head})
    return float((model(x).argmax(-1) == y).double().mean())
