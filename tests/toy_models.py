"""A toy task family with a known best merge, for SuperMerge tests (CPU, seconds).

Model: x [8] -> l1 (8 -> 16) -> ReLU -> l2 (16 -> 16) -> ReLU -> head (16 -> 4 classes).
Task "a" is solved by base + 0.9 * useful_a on l1, task "b" by base + 0.9 * useful_b on l2:
both tasks' labels come from the same teacher body, theta* = base + 0.9 (useful_a + useful_b),
each with its own head. Expert a = base + useful_a (l1) + noise_a (l2); expert b = base +
noise_b (l1) + useful_b (l2). The best merge keeps a's l1 and b's l2 (coefficients 0.9) and
drops the noise (0): task arithmetic cannot, a learned per-layer merge can.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

IN, HIDDEN, CLASSES = 8, 16, 4
TRUE = 0.9


class ToyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(IN, HIDDEN)
        self.l2 = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.l2(torch.relu(self.l1(x)))))


def make_mlp() -> nn.Module:
    """Factory named in YAML as tests.toy_models:make_mlp."""
    return ToyMLP()


def build_toy_suite(root: Path, seed: int = 0, n_val: int = 128, n_test: int = 512, dtype=torch.float32):
    """Write base, experts a and b (with heads) and their data under `root`.

    Returns:
        (base_dir, {task: expert_dir}, {task: val_file}, {task: (x_test, y_test)})
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(dtype)

    base = {
        "l1.weight": randn(HIDDEN, IN, scale=IN**-0.5), "l1.bias": randn(HIDDEN, scale=0.1),
        "l2.weight": randn(HIDDEN, HIDDEN, scale=HIDDEN**-0.5), "l2.bias": randn(HIDDEN, scale=0.1),
    }  # fmt: skip
    useful = {"a": ("l1.weight", randn(HIDDEN, IN, scale=1.5 * IN**-0.5)),
              "b": ("l2.weight", randn(HIDDEN, HIDDEN, scale=1.5 * HIDDEN**-0.5))}  # fmt: skip
    noise = {"a": ("l2.weight", randn(HIDDEN, HIDDEN, scale=2.0 * HIDDEN**-0.5)),
             "b": ("l1.weight", randn(HIDDEN, IN, scale=2.0 * IN**-0.5))}  # fmt: skip
    teacher = dict(base)
    for name, delta in useful.values():
        teacher[name] = teacher[name] + TRUE * delta
    heads = {
        t: {
            "head.weight": randn(CLASSES, HIDDEN, scale=2 * HIDDEN**-0.5),
            "head.bias": randn(CLASSES, scale=0.1),
        }
        for t in ("a", "b")
    }
    root.mkdir(parents=True, exist_ok=True)
    base_dir = root / "base"
    base_dir.mkdir(exist_ok=True)
    save_file(base, str(base_dir / "model.safetensors"))
    experts, val, test = {}, {}, {}
    model = ToyMLP().to(dtype)
    for task in ("a", "b"):
        state = dict(base)
        for name, delta in (useful[task], noise[task]):
            state[name] = state[name] + delta
        expert_dir = root / f"expert_{task}"
        expert_dir.mkdir(exist_ok=True)
        save_file({**state, **heads[task]}, str(expert_dir / "model.safetensors"))
        experts[task] = expert_dir
        model.load_state_dict({**teacher, **heads[task]})
        with torch.no_grad():
            x = randn(n_val + n_test, IN)
            y = model(x).argmax(-1)
        val[task] = root / f"{task}.pt"
        torch.save({"x": x[:n_val], "y": y[:n_val]}, val[task])
        test[task] = (x[n_val:], y[n_val:])
    return base_dir, experts, val, test


@torch.no_grad()
def toy_accuracy(body: dict[str, torch.Tensor], head: dict[str, torch.Tensor], x, y) -> float:
    """Accuracy of the MLP with `body` weights and a task's `head` on (x, y)."""
    model = ToyMLP().to(x.dtype)
    model.load_state_dict({**body, **head})
    return float((model(x).argmax(-1) == y).double().mean())
