"""Coefficient layout: which column of W each parameter tensor uses.

W is [k, G]: one row per task, one column per coefficient group. Granularities:
- "tensor": every tensor its own column (G = T, the default; the paper's layer-wise W);
- "block": tensors whose names match the same regex text share a column; e.g. the pattern
  ``encoder\\.layer\\.\\d+\\.`` gives one column per transformer block; unmatched tensors keep
  their own column;
- "task": one column for everything (G = 1, task-wise merging).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

GRANULARITIES = ("tensor", "block", "task")


@dataclass(frozen=True)
class CoefficientLayout:
    """Column labels and the column of each tensor.

    Attributes:
        labels: G column labels (tensor name, block text, or "all").
        column: [T] int64, column of tensor t (tensors in store order).
    """

    labels: list[str]
    column: torch.Tensor

    @classmethod
    def build(
        cls, names: Sequence[str], granularity: str = "tensor", blocks: Sequence[str] = ()
    ) -> CoefficientLayout:
        """Lay out columns for tensors `names` (see module docstring)."""
        if granularity == "task":
            return cls(["all"], torch.zeros(len(names), dtype=torch.int64))
        patterns = [re.compile(p) for p in blocks] if granularity == "block" else []
        labels: list[str] = []
        index: dict[str, int] = {}
        column = []
        for name in names:
            key = name
            for pattern in patterns:
                match = pattern.search(name)
                if match:
                    key = match.group(0)
                    break
            if key not in index:
                index[key] = len(labels)
                labels.append(key)
            column.append(index[key])
        return cls(labels, torch.tensor(column, dtype=torch.int64))

    @property
    def groups(self) -> int:
        return len(self.labels)

    def column_of(self, names: Sequence[str]) -> dict[str, str]:
        """Tensor name -> its column label (names in the order the layout was built with)."""
        return {n: self.labels[int(c)] for n, c in zip(names, self.column, strict=True)}

    def expand(self, w: torch.Tensor) -> torch.Tensor:
        """[k, G] -> [k, T]: each tensor's column of W (differentiable)."""
        return w.index_select(1, self.column.to(w.device))
