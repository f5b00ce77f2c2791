"""One rank's share of the task vectors where experts are LoRA adapters: their factors, not tau.

The plan is the dense store's (`ShardPlan`: layer shard p, task group q); only what is held per
part differs. A part (segment) is the element range [lo, hi) of one tensor [m, n] (row-major),
so it lies within rows [r0, r1) = [lo // n, ceil(hi / n)). For each task of the group:
- LoRA on that tensor: its B rows [r0, r1) and its whole A, r_i (r1 - r0 + n) values, and the
  part is (B_i[r0:r1] A_i) flattened, minus the lo - r0 n elements before it and the ones after
  (where that is fewer values than the part: `plan.factors_pay`; else as below);
- an adapter that leaves the tensor as it is: nothing;
- anything else (a dense expert, IA3, a tensor an adapter saves whole): its task vector over the
  part, hi - lo values, as the dense store holds it.
The sum over the group is differentiable w.r.t. the coefficients (`weighted_sum`), the LoRA terms
through `kernels.lowrank` (one GEMM [r1 - r0, R] x [R, n] forward, one [R, r1 - r0] x [r1 - r0, n]
backward): the ranks' traffic is the dense plan's, their memory the factors'. Not counted by the
plan: during a step each part's float32 product [r1 - r0, n] (and, with a 16-bit storage dtype, a
float32 copy of its task-vector parts) lives until the backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from supermerge.distributed.plan import Segment, ShardPlan, factors_pay
from supermerge.distributed.stores.resident import ShardLayout, read_shard
from supermerge.io.adapters import AdapterCheckpoint
from supermerge.io.memory import nbytes
from supermerge.kernels.lowrank import lowrank_weighted_sum
from supermerge.taskvectors.lowrank_store import side_by_side
from supermerge.taskvectors.source import TaskVectorSource


@dataclass
class PartUpdates:
    """What the task group adds to one part (see the module docstring).

    Attributes:
        size: elements of the part (hi - lo).
        row_range: (r0, r1), the tensor's rows the part touches; skip = lo - r0 n elements of them
            come before the part.
        skip: see row_range.
        lowrank: positions (in the task group) of the tasks held as factors.
        b: [r1 - r0, R] their B rows side by side; a: [R, n] their A stacked.
        scales: [len(lowrank)] float32 LoRA scales; rank_offsets: [len(lowrank) + 1] int64.
        dense: positions of the tasks held as task vectors; taus: [len(dense), size].
    """

    size: int
    row_range: tuple[int, int]
    skip: int
    lowrank: list[int]
    b: torch.Tensor
    a: torch.Tensor
    scales: torch.Tensor
    rank_offsets: torch.Tensor
    dense: list[int]
    taus: torch.Tensor

    def weighted_sum(self, c: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        """[size] fp32 sum of c [k_q] x the part's task vectors, differentiable w.r.t. c (the
        coefficients themselves; `impl` picks the low-rank kernels)."""
        out = torch.zeros(self.size, dtype=torch.float32, device=c.device)
        if self.dense:
            out = out + c[self.dense] @ self.taus.float()
        if self.lowrank:  # the rows the part touches, [r1 - r0, n], then the part's elements of them
            coefficients = c[self.lowrank] * self.scales
            product = lowrank_weighted_sum(None, self.b, self.a, coefficients, self.rank_offsets, impl)
            out = out + product.reshape(-1)[self.skip : self.skip + self.size]
        return out

    @property
    def nbytes(self) -> int:
        return nbytes(self.b, self.a, self.taus)


@dataclass
class LowRankShardStore(ShardLayout):
    """A rank's base piece and its task group's updates of each part, resident on its device.

    Attributes (beyond ShardLayout's):
        parts: one PartUpdates per segment of the layer shard.
    """

    parts: list[PartUpdates]

    resident = True

    @classmethod
    def build(
        cls,
        source: TaskVectorSource,
        plan: ShardPlan,
        rank: int,
        storage_dtype: torch.dtype,
        device: torch.device,
        progress: bool = False,
    ) -> LowRankShardStore:
        """Read this rank's share: base piece, factor rows and task-vector parts (`plan.held` must
        say how each update is held)."""
        if not plan.held:
            raise ValueError("a LowRankShardStore needs a plan with `held` (LoRA experts)")
        rows = plan.task_rows(plan.coords(rank)[1])
        parts: list[PartUpdates] = []

        def take(seg: Segment, base: torch.Tensor, a: int, b: int) -> None:
            parts.append(_part_updates(source, plan, seg, base, rows, storage_dtype, device))

        base_piece = read_shard(source, plan, rank, take, device, progress)
        return cls(**cls.fields(source, plan, rank, rows, base_piece), parts=parts)

    def weighted_sum(self, w: torch.Tensor, impl: str) -> torch.Tensor:
        """[n] fp32 sum over the task group of tanh(w) x tau over the layer shard, differentiable
        w.r.t. w [k_q, T_p] (one column per segment; `impl` picks the low-rank kernels)."""
        if not self.parts:
            return torch.zeros(0, device=self.base_piece.device)
        c = torch.tanh(w)
        return torch.cat([part.weighted_sum(c[:, s], impl) for s, part in enumerate(self.parts)])

    @property
    def task_vector_bytes(self) -> int:
        """Bytes of the factors and task-vector parts held on the compute device."""
        return sum(part.nbytes for part in self.parts)

    @property
    def nbytes(self) -> int:
        return self.task_vector_bytes + nbytes(self.base_piece)


def held_rank(source: TaskVectorSource, name: str, i: int) -> int:
    """How expert i's update of tensor `name` is held (ShardPlan.held): r > 0 as LoRA factors of
    rank r (a 2-D tensor whose whole update is one LoRA product), 0 as a task vector, -1 not at all
    (an adapter that leaves the tensor as the base has it). From the adapter's header, except an
    embedding PEFT saved whole beside its factors, which is compared with the base's once."""
    adapter = source.experts[i].checkpoint
    if not isinstance(adapter, AdapterCheckpoint):
        return 0
    if name not in adapter.deltas:
        return -1
    return (adapter.lora_rank(name) or 0) if len(source.base.infos[name].shape) == 2 else 0


def _part_updates(
    source: TaskVectorSource,
    plan: ShardPlan,
    seg: Segment,
    base: torch.Tensor,
    tasks: list[int],
    dtype: torch.dtype,
    device: torch.device,
) -> PartUpdates:
    """The updates of one part by the task group's `tasks`, as factor rows or task-vector parts
    (as `plan.held` and `factors_pay` say)."""
    name, n = source.names[seg.tensor], plan.row_lengths[seg.tensor]
    r0, r1 = seg.lo // n, -(-seg.hi // n)
    lowrank, bs, as_, scales, dense, taus = [], [], [], [], [], []
    for j, i in enumerate(tasks):
        held = plan.held[seg.tensor][i]
        if factors_pay(held, seg.lo, seg.hi, n):
            adapter = source.experts[i].checkpoint
            b, a, scale = adapter.lora_factors(name)
            lowrank.append(j)
            bs.append(b[r0:r1].to(device, dtype))
            as_.append(a.to(device, dtype))
            scales.append(scale)
            source.bytes_read += adapter.adapter_bytes(name)
        elif held >= 0:
            dense.append(j)
            taus.append(source.task_vector(name, base, i, (seg.lo, seg.hi)).to(device, dtype))
    size = seg.hi - seg.lo
    b, a, scales_t, rank_offsets = side_by_side(bs, as_, scales, (r1 - r0, n), dtype, device)
    return PartUpdates(
        size=size,
        row_range=(r0, r1),
        skip=seg.lo - r0 * n,
        lowrank=lowrank,
        b=b,
        a=a,
        scales=scales_t,
        rank_offsets=rank_offsets,
        dense=dense,
        taus=torch.stack(taus) if taus else torch.empty(0, size, dtype=dtype, device=device),
    )
