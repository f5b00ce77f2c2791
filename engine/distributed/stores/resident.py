"""One rank's share of the task-vector store: its task group's task vectors over its layer shard.

Layout (what the fused kernel takes, as in supermerge.taskvectors.store but local):
    tau_local   [k_q, n]   task vectors of the rank's task group over layer shard p (n elements)
    base_piece  [S]        the base over the rank's own piece of the shard (fp32, zero-padded)
    offsets     [T_p + 1]  int64 segment offsets within the shard; segment s is part of tensor
                           `segment_tensor[s]`
Built by reading only the byte ranges of the shard from each checkpoint (one tensor part of one
expert at a time), so a rank reads about 1/P of every file and holds k N / R task-vector elements.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from supermerge.distributed.plan import Segment, ShardPlan
from supermerge.io.memory import nbytes
from supermerge.kernels import grouped_weighted_sum
from supermerge.taskvectors.source import TaskVectorSource
from supermerge.taskvectors.store import split_flat


def read_shard(
    source: TaskVectorSource,
    plan: ShardPlan,
    rank: int,
    take: Callable[[Segment, torch.Tensor, int, int], None],
    device: torch.device,
    progress: bool = False,
) -> torch.Tensor:
    """Read `rank`'s layer shard, one tensor part at a time.

    Calls take(segment, base, a, b) for each part, in order: base [hi - lo] is the base over the
    part (its dtype, CPU), [a, b) the part's place in the layer shard. Returns the rank's base
    piece [S] (fp32 on `device`, zero beyond N).
    """
    p, _ = plan.coords(rank)
    piece_lo = rank * plan.piece - plan.shard_range(p)[0]  # this rank's piece, within the shard
    base_piece = torch.zeros(plan.piece, dtype=torch.float32, device=device)
    for seg in tqdm(plan.segments(p), desc=f"rank {rank} shard", unit="tensor", disable=not progress):
        base = source.read_base(source.names[seg.tensor], (seg.lo, seg.hi))
        a, b = seg.start, seg.start + seg.hi - seg.lo
        take(seg, base, a, b)
        lo, hi = max(a, piece_lo), min(b, piece_lo + plan.piece)
        if lo < hi:
            base_piece[lo - piece_lo : hi - piece_lo] = base[lo - a : hi - a].to(device)
    return base_piece


def dense_parts(
    source: TaskVectorSource, rows: list[int], put: Callable[[int, int, torch.Tensor], None]
) -> Callable[[Segment, torch.Tensor, int, int], None]:
    """A `read_shard` take that reads the `rows` task vectors of each part and calls put(a, b,
    tau): tau [len(rows), b - a] (storage dtype, CPU)."""

    def take(seg: Segment, base: torch.Tensor, a: int, b: int) -> None:
        name = source.names[seg.tensor]
        tau = torch.empty(len(rows), b - a, dtype=source.storage_dtype)
        for j, i in enumerate(rows):
            tau[j] = source.task_vector(name, base, i, (seg.lo, seg.hi))
        put(a, b, tau)

    return take


def tau_weighted_sum(tau: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, impl: str) -> torch.Tensor:
    """[n] fp32 sum over the rows of tau [k_q, n] of tanh(w) x tau, w [k_q, T_c] one column per
    segment (offsets [T_c + 1]); differentiable w.r.t. w (the fused kernel `impl`)."""
    if tau.shape[1] == 0:
        return torch.zeros(0, device=tau.device)
    zero = torch.zeros(tau.shape[1], dtype=torch.float32, device=tau.device)
    return grouped_weighted_sum(zero, tau, w, offsets, impl)


@dataclass
class Chunk:
    """One layer group of a streamed (offloaded) shard, staged on the compute device.

    Attributes:
        lo, hi: element range within the layer shard.
        tau: [k_q, hi - lo] task vectors on the compute device.
        offsets: [T_c + 1] int64 segment offsets within the chunk (CPU).
        segments: slice of the shard's segments this chunk covers.
    """

    lo: int
    hi: int
    tau: torch.Tensor
    offsets: torch.Tensor
    segments: slice


@dataclass
class ShardLayout:
    """What every rank's store shares, resident or offloaded: where its shard sits in the body.

    Attributes:
        plan: the job's plan.
        rank: this rank's index in the plan.
        names, shapes: every merged tensor (for splitting the gathered full body).
        rows: indices of the tasks held (the task group).
        base_piece: [S] fp32 base over this rank's piece, zero beyond N.
        offsets: [T_p + 1] int64 segment offsets within the layer shard (CPU).
        segment_tensor: [T_p] int64 tensor index of each segment.
        base_dtype: dtype of the merged body.
    """

    plan: ShardPlan
    rank: int
    names: list[str]
    shapes: list[tuple[int, ...]]
    rows: list[int]
    base_piece: torch.Tensor
    offsets: torch.Tensor
    segment_tensor: torch.Tensor
    base_dtype: torch.dtype

    @staticmethod
    def fields(
        source: TaskVectorSource, plan: ShardPlan, rank: int, rows: list[int], base_piece: torch.Tensor
    ) -> dict:
        """The ShardLayout fields of `rank`'s shard of `source` under `plan`."""
        segments = plan.segments(plan.coords(rank)[0])
        shapes = [source.base.infos[n].shape for n in source.names]
        assert all(math.prod(s) == n for s, n in zip(shapes, plan.numels, strict=True))
        return {
            "plan": plan, "rank": rank, "names": list(source.names), "shapes": shapes, "rows": rows,
            "base_piece": base_piece,
            "offsets": plan.segment_offsets(plan.coords(rank)[0]),
            "segment_tensor": torch.tensor([s.tensor for s in segments], dtype=torch.int64),
            "base_dtype": source.merged_dtype,
        }  # fmt: skip

    @property
    def n_local(self) -> int:
        """Elements of the layer shard held (its unpadded length)."""
        return int(self.offsets[-1])

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of a full flat [N] buffer as the named tensors, in their shapes."""
        return split_flat(flat, self.names, self.shapes)


@dataclass
class ShardStore(ShardLayout):
    """A rank's base piece and task vectors, resident on its device (see module docstring).

    Attributes (beyond ShardLayout's):
        tau_local: [k_q, n] task vectors over the layer shard.
    """

    tau_local: torch.Tensor

    resident = True  # tau_local is on the compute device for the whole run

    @classmethod
    def build(
        cls,
        source: TaskVectorSource,
        plan: ShardPlan,
        rank: int,
        storage_dtype: torch.dtype,
        device: torch.device,
        progress: bool = False,
    ) -> ShardStore:
        """Read this rank's share of base and task vectors from `source`'s checkpoints."""
        p, q = plan.coords(rank)
        shard_lo, shard_hi = plan.shard_range(p)
        rows = plan.task_rows(q)
        tau_local = torch.empty(len(rows), shard_hi - shard_lo, dtype=storage_dtype, device=device)

        def put(a: int, b: int, tau: torch.Tensor) -> None:
            tau_local[:, a:b] = tau

        base_piece = read_shard(source, plan, rank, dense_parts(source, rows, put), device, progress)
        return cls(**cls.fields(source, plan, rank, rows, base_piece), tau_local=tau_local)

    def weighted_sum(self, w: torch.Tensor, impl: str) -> torch.Tensor:
        """[n] fp32 sum over the task group of tanh(w) x tau over the layer shard, differentiable
        w.r.t. w [k_q, T_p] (one column per segment; the fused kernel `impl`)."""
        return tau_weighted_sum(self.tau_local, w, self.offsets, impl)

    @property
    def task_vector_bytes(self) -> int:
        """Bytes of the task vectors held on the compute device."""
        return nbytes(self.tau_local)

    @property
    def nbytes(self) -> int:
        """Bytes of the task vectors and base piece held."""
        return nbytes(self.tau_local, self.base_piece)
