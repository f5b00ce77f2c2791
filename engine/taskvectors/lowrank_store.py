"""Task vectors kept as their adapters' own tensors where an expert is a PEFT adapter.

Per mergeable tensor j, seen as [m, n] (a 1-D tensor as [n, 1]): the base, then the k experts
sorted by what they add there:
- low-rank: a LoRA adapter whose whole update of j is s_i B_i A_i; the factors of all of them
  side by side, B [m, R] and A [R, n] (R = sum r_i), in the storage dtype: R (m + n) values;
- scaled: an IA3 adapter whose update is W0 (l_i - 1) along rows (or columns): its vector
  v_i = l_i - 1, [m] (or [n]);
- dense: any other nonzero update (a dense expert, a tensor an adapter saves whole), as a task
  vector [m, n] in the storage dtype;
- nothing: an adapter that does not touch j costs nothing.
So an all-adapter merge holds the base and k r (m + n) (LoRA) or k m (IA3) values per tensor,
not k m n.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from supermerge.io.adapters import AdapterCheckpoint
from supermerge.io.memory import nbytes
from supermerge.taskvectors.source import TaskVectorSource
from supermerge.taskvectors.store import flat_layout, split_flat


@dataclass
class LowRankTensor:
    """What the experts add to one tensor (see the module docstring).

    Attributes:
        lowrank: indices of the experts held as factors.
        b: [m, R] their B factors side by side (empty when none).
        a: [R, n] their A factors stacked.
        scales: [len(lowrank)] float32, each expert's LoRA scale s_i.
        rank_offsets: [len(lowrank) + 1] int64, expert lowrank[i]'s ranks [o_i, o_i+1).
        rows, row_vectors: IA3 experts scaling rows, and their v_i stacked [len(rows), m].
        cols, col_vectors: IA3 experts scaling columns, [len(cols), n].
        dense: indices of the experts held as dense task vectors.
        taus: [len(dense), m, n] their task vectors.
    """

    lowrank: list[int]
    b: torch.Tensor
    a: torch.Tensor
    scales: torch.Tensor
    rank_offsets: torch.Tensor
    rows: list[int]
    row_vectors: torch.Tensor
    cols: list[int]
    col_vectors: torch.Tensor
    dense: list[int]
    taus: torch.Tensor

    @property
    def nbytes(self) -> int:
        return nbytes(self.b, self.a, self.row_vectors, self.col_vectors, self.taus)


@dataclass
class LowRankStore:
    """The base as one flat buffer and each tensor's LowRankTensor.

    Attributes:
        names, shapes: the T merged tensors, in buffer order.
        base_flat: [N] base weights.
        tensors: one LowRankTensor per name.
        k: number of experts.
    """

    names: list[str]
    shapes: list[tuple[int, ...]]
    base_flat: torch.Tensor
    tensors: list[LowRankTensor]
    k: int

    @classmethod
    def build(
        cls,
        source: TaskVectorSource,
        storage_dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        progress: bool = False,
    ) -> LowRankStore:
        """Read the base and each expert's update of every mergeable tensor of `source`."""
        names, shapes, offsets = flat_layout(source)
        base_flat = torch.empty(int(offsets[-1]), dtype=source.merged_dtype, device=device)
        tensors = []
        for t, name in enumerate(tqdm(names, desc="task vectors", unit="tensor", disable=not progress)):
            base = source.read_base(name)
            base_flat[int(offsets[t]) : int(offsets[t + 1])] = base.reshape(-1)
            tensors.append(_tensor_updates(source, name, base, storage_dtype, device))
        return cls(names, shapes, base_flat, tensors, source.k)

    @property
    def task_vector_bytes(self) -> int:
        """Bytes of factors and dense task vectors held."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return self.task_vector_bytes + nbytes(self.base_flat)

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of a flat [N] buffer as the named tensors, in their shapes."""
        return split_flat(flat, self.names, self.shapes)


def side_by_side(
    bs: list[torch.Tensor],
    as_: list[torch.Tensor],
    scales: list[float],
    shape: tuple[int, int],
    dtype: torch.dtype,
    device: str | torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Experts' factors B_i [m, r_i], A_i [r_i, n] and scales as (B [m, R], A [R, n], scales
    [len] float32, rank_offsets [len + 1] int64), empty ones for no expert; shape is (m, n)."""
    m, n = shape
    ranks = [b.shape[1] for b in bs]
    return (
        torch.cat(bs, dim=1) if bs else torch.empty(m, 0, dtype=dtype, device=device),
        torch.cat(as_, dim=0) if as_ else torch.empty(0, n, dtype=dtype, device=device),
        torch.tensor(scales, dtype=torch.float32, device=device),
        torch.tensor([0, *ranks], dtype=torch.int64, device=device).cumsum(0),
    )


def _tensor_updates(
    source: TaskVectorSource, name: str, base: torch.Tensor, dtype: torch.dtype, device: str | torch.device
) -> LowRankTensor:
    """The experts' updates of tensor `name`, sorted into factors, IA3 vectors and dense task
    vectors."""
    lowrank, bs, as_, scales, dense, taus = [], [], [], [], [], []
    scaled: dict[int, tuple[list[int], list[torch.Tensor]]] = {0: ([], []), 1: ([], [])}
    m, n = (base.shape[0], base.numel() // base.shape[0]) if base.dim() else (1, 1)
    for i, expert in enumerate(source.experts):
        adapter = expert.checkpoint if isinstance(expert.checkpoint, AdapterCheckpoint) else None
        if adapter is not None and name not in adapter.deltas:
            continue  # the adapter leaves this tensor as the base has it
        factors = adapter.lora_factors(name) if adapter is not None and base.dim() == 2 else None
        scaling = adapter.ia3_scaling(name) if adapter is not None and base.dim() in (1, 2) else None
        if factors is not None:
            b, a, scale = factors
            lowrank.append(i)
            bs.append(b.to(device, dtype))
            as_.append(a.to(device, dtype))
            scales.append(scale)
        elif scaling is not None:
            vector, axis = scaling
            scaled[axis][0].append(i)
            scaled[axis][1].append(vector.to(device, dtype))
        else:
            tau = source.task_vector(name, base, i)
            if bool(tau.any()):
                dense.append(i)
                taus.append(tau.to(device, dtype))
            continue
        source.bytes_read += adapter.adapter_bytes(name)

    def stacked(vectors: list[torch.Tensor], size: int) -> torch.Tensor:
        return torch.stack(vectors) if vectors else torch.empty(0, size, dtype=dtype, device=device)

    b, a, scales_t, rank_offsets = side_by_side(bs, as_, scales, (m, n), dtype, device)
    return LowRankTensor(
        lowrank=lowrank,
        b=b,
        a=a,
        scales=scales_t,
        rank_offsets=rank_offsets,
        rows=scaled[0][0],
        row_vectors=stacked(scaled[0][1], m),
        cols=scaled[1][0],
        col_vectors=stacked(scaled[1][1], n),
        dense=dense,
        taus=torch.stack(taus) if taus else torch.empty(0, *base.shape, dtype=dtype, device=device),
    )
