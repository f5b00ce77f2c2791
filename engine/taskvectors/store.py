"""The task-vector store: base and k task vectors of the mergeable tensors in flat buffers.

Layout (what the fused kernel takes): T tensors concatenated in `names` order,
    base_flat [N]       base weights, in the base's float dtype (or fp32 where dtypes differ)
    tau_flat  [k, N]    task vectors, in the storage dtype; row i is expert i, contiguous
    offsets   [T + 1]   int64 element offsets on the CPU; tensor t is [offsets[t], offsets[t+1])
The store is filled by streaming: one tensor of one expert is read at a time, so building it
never holds a whole expert beyond the store itself ((k + 1) * N elements).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from supermerge.io.memory import nbytes
from supermerge.taskvectors.source import TaskVectorSource


@dataclass
class TaskVectorStore:
    """Flat base + task-vector buffers for the mergeable tensors (see module docstring).

    Attributes:
        names: the T tensor names, in buffer order.
        shapes: shape of each tensor.
        base_flat: [N] base weights.
        tau_flat: [k, N] task vectors.
        offsets: [T + 1] int64 offsets (CPU).
    """

    names: list[str]
    shapes: list[tuple[int, ...]]
    base_flat: torch.Tensor
    tau_flat: torch.Tensor
    offsets: torch.Tensor

    @classmethod
    def build(
        cls,
        source: TaskVectorSource,
        storage_dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        progress: bool = False,
    ) -> TaskVectorStore:
        """Stream base and task vectors of `source`'s mergeable tensors into flat buffers."""
        names, shapes, offsets = flat_layout(source)
        total = int(offsets[-1])
        base_flat = torch.empty(total, dtype=source.merged_dtype, device=device)
        tau_flat = torch.empty(source.k, total, dtype=storage_dtype, device=device)
        for t, name in enumerate(tqdm(names, desc="task vectors", unit="tensor", disable=not progress)):
            lo, hi = int(offsets[t]), int(offsets[t + 1])
            base = source.read_base(name)
            base_flat[lo:hi] = base.reshape(-1)
            for i, tau in enumerate(source.task_vectors(name, base)):
                tau_flat[i, lo:hi] = tau.reshape(-1)
        return cls(names, shapes, base_flat, tau_flat, offsets)

    @property
    def k(self) -> int:
        return self.tau_flat.shape[0]

    @property
    def task_vector_bytes(self) -> int:
        """Bytes of the task vectors held on the compute device."""
        return nbytes(self.tau_flat)

    @property
    def nbytes(self) -> int:
        """Bytes held by the base and task-vector buffers."""
        return nbytes(self.base_flat, self.tau_flat)

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of a flat [N] buffer as the named tensors, in their shapes."""
        return split_flat(flat, self.names, self.shapes)


def flat_layout(source: TaskVectorSource) -> tuple[list[str], list[tuple[int, ...]], torch.Tensor]:
    """`source`'s mergeable tensors back to back: names, shapes, [T + 1] int64 offsets (CPU)."""
    shapes = [source.base.infos[n].shape for n in source.names]
    offsets = torch.tensor([0, *(math.prod(s) for s in shapes)], dtype=torch.int64).cumsum(0)
    return list(source.names), shapes, offsets


def split_flat(
    flat: torch.Tensor, names: list[str], shapes: list[tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """Views of a flat [N] buffer (tensors concatenated in `names` order) as the named tensors."""
    out, start = {}, 0
    for name, shape in zip(names, shapes, strict=True):
        numel = math.prod(shape)
        out[name] = flat[start : start + numel].view(shape)
        start += numel
    return out
