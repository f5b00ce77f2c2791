"""The scheduler: how the k x N task-vector matrix is laid over R ranks, and what that costs.

Mesh: R = P layer shards x Q task groups; rank r has coordinates (p, q) = divmod(r, Q).
- The N merged elements (tensors concatenated in the base checkpoint's order: in a safetensors
  file, sorted names, so mostly runs of whole layers) are
  padded to R * S and cut into R pieces of S elements; layer shard p is pieces p*Q .. p*Q+Q-1,
  i.e. elements [p Q S, (p + 1) Q S).
- The k tasks are cut into Q contiguous groups; rank (p, q) holds the task vectors of group q
  over layer shard p, and the base over its own piece: k N / R task-vector elements per rank.

One training step (supermerge.distributed.body):
  forward   partial(p, q) = sum_{i in q} tanh(w_i) tau_i over shard p          local, fused kernel
            reduce_scatter over the Q ranks of shard p -> merged piece (+ base)  (Q > 1 only)
            all_gather over all R ranks -> the full merged body [N]
  backward  reduce_scatter of dLoss/dmerged over all R ranks -> gradient piece
            all_gather over the Q ranks of shard p -> gradient of shard p     (Q > 1 only)
            local dot products with the group's task vectors -> partial dW [k, G]
            all_reduce of dW (k x G floats: the only term that grows with k)
so the tensor traffic per step is O(N), independent of k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from supermerge.errors import SupermergeError
from supermerge.io.memory import human_bytes


def layer_groups(offsets: torch.Tensor, elements: int) -> list[slice]:
    """Consecutive runs of whole segments (given by their offsets [T + 1]) of at least `elements`
    elements each (the last may be smaller): the layer groups an offloaded shard streams."""
    bounds = offsets.tolist()
    groups, first = [], 0
    for s in range(len(bounds) - 1):
        if bounds[s + 1] - bounds[first] >= elements or s == len(bounds) - 2:
            groups.append(slice(first, s + 1))
            first = s + 1
    return groups


def row_length(shape: tuple[int, ...]) -> int:
    """n of a tensor seen as [m, n] rows (a 1-D tensor as one row)."""
    return math.prod(shape[1:]) if len(shape) > 1 else max(1, math.prod(shape))


def factor_elements(rank: int, lo: int, hi: int, n: int) -> int:
    """Values of rank-`rank` LoRA factors that make the part [lo, hi) of a tensor with rows of n
    elements: B's rows the part touches and all of A, rank (ceil(hi / n) - floor(lo / n) + n)."""
    return rank * (-(-hi // n) - lo // n + n)


def factors_pay(held: int, lo: int, hi: int, n: int) -> bool:
    """Whether an update `held` as factors of rank held > 0 (see ShardPlan.held) is kept as
    factors over the part [lo, hi): when they take fewer values than its task vector, hi - lo."""
    return held > 0 and factor_elements(held, lo, hi, n) < hi - lo


def held_elements(held: int, lo: int, hi: int, n: int) -> int:
    """Values a rank holds for the part [lo, hi) of one task's update: its factors where they pay,
    else its task vector (hi - lo); nothing for held = -1."""
    if factors_pay(held, lo, hi, n):
        return factor_elements(held, lo, hi, n)
    return hi - lo if held >= 0 else 0


@dataclass(frozen=True)
class Segment:
    """The part of one tensor that falls in a layer shard.

    Attributes:
        tensor: index of the tensor (store order).
        lo, hi: element range [lo, hi) within the flattened tensor.
        start: offset of element lo within the shard.
    """

    tensor: int
    lo: int
    hi: int
    start: int


@dataclass(frozen=True, kw_only=True)
class ShardPlan:
    """The layout of one distributed learned merge (see module docstring).

    Attributes:
        names: the T merged tensor names, in order.
        numels: elements of each tensor.
        tasks: the k task names.
        ranks: R.
        task_groups: Q (P = R / Q layer shards).
        storage_itemsize: bytes per task-vector element.
        base_itemsize: bytes per merged (base) element.
        columns: G, the columns of W.
        offload: where task-vector shards live: "none" (the compute device), "cpu" or "nvme".
        memory_per_rank: the bytes a rank may use (0: unchecked).
        gather: "body" (the merged body all-gathered once per step) or "layer" (each gather unit
            of the model gathered just before use: supermerge.distributed.layer_gather).
        largest_unit: elements of the model's largest gather unit (layer mode).
        gather_ahead: units gathered ahead of use (layer mode prefetch).
        held: [T][k] how each task's update of each tensor is held when experts are LoRA
            adapters (`stores.lowrank.held_rank`: rank r > 0 as factors where they pay, 0 as a
            task vector, -1 not at all); empty: every update as a task vector.
        row_lengths: [T] elements per row of each tensor seen as [m, n] (with `held`).
        prefetch_elements: offloaded stores stream their shard in layer groups of whole tensor
            parts of at least this many elements (`layer_groups`), two groups staged at a time.
    """

    names: list[str]
    numels: list[int]
    tasks: list[str]
    ranks: int
    task_groups: int
    storage_itemsize: int
    base_itemsize: int
    columns: int
    offload: str = "none"
    memory_per_rank: int = 0
    gather: str = "body"
    largest_unit: int = 0
    prefetch_elements: int = 2**22
    gather_ahead: int = 0
    held: tuple[tuple[int, ...], ...] = ()
    row_lengths: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.ranks < 1:
            raise SupermergeError(f"ranks: must be at least 1, got {self.ranks}")
        if self.ranks % self.task_groups:
            raise SupermergeError(
                f"distributed.task_groups: {self.task_groups} does not divide the {self.ranks} ranks"
            )
        if self.task_groups > len(self.tasks):
            raise SupermergeError(
                f"distributed.task_groups: {self.task_groups} groups for only {len(self.tasks)} tasks"
            )

    @property
    def n(self) -> int:
        """N, merged elements."""
        return sum(self.numels)

    @property
    def layer_shards(self) -> int:
        """P."""
        return self.ranks // self.task_groups

    @property
    def piece(self) -> int:
        """S: elements per rank piece (N padded to R S)."""
        return max(1, math.ceil(self.n / self.ranks))

    @property
    def shard_size(self) -> int:
        """Q S: elements per layer shard (padded)."""
        return self.task_groups * self.piece

    def coords(self, rank: int) -> tuple[int, int]:
        """(layer shard p, task group q) of a rank."""
        return divmod(rank, self.task_groups)

    def shard_range(self, p: int) -> tuple[int, int]:
        """Unpadded element range [lo, hi) of layer shard p (may be empty at the tail)."""
        lo = min(p * self.shard_size, self.n)
        return lo, min(lo + self.shard_size, self.n)

    def segments(self, p: int) -> list[Segment]:
        """The tensor parts that make up layer shard p, in order."""
        lo, hi = self.shard_range(p)
        result, start = [], 0
        for t, numel in enumerate(self.numels):
            a, b = max(lo, start), min(hi, start + numel)
            if a < b:
                result.append(Segment(t, a - start, b - start, a - lo))
            start += numel
        return result

    def segment_offsets(self, p: int) -> torch.Tensor:
        """[T_p + 1] int64 offsets of layer shard p's segments within the shard."""
        return torch.tensor([0, *[s.hi - s.lo for s in self.segments(p)]], dtype=torch.int64).cumsum(0)

    def task_rows(self, q: int) -> list[int]:
        """Indices of the tasks of group q (contiguous, sizes differing by at most one)."""
        k, groups = len(self.tasks), self.task_groups
        lo = q * (k // groups) + min(q, k % groups)
        return list(range(lo, lo + k // groups + (q < k % groups)))

    def task_vector_elements(self, rank: int) -> int:
        """Task-vector values (or factor values, see `held`) a rank holds."""
        p, q = self.coords(rank)
        lo, hi = self.shard_range(p)
        rows = self.task_rows(q)
        if not self.held:
            return len(rows) * (hi - lo)
        return sum(
            held_elements(self.held[s.tensor][i], s.lo, s.hi, self.row_lengths[s.tensor])
            for s in self.segments(p)
            for i in rows
        )

    @property
    def task_vector_bytes(self) -> int:
        """Bytes of task vectors (factors) held over all ranks."""
        return sum(self.task_vector_elements(r) for r in range(self.ranks)) * self.storage_itemsize

    def memory(self, rank: int) -> dict[str, int]:
        """Bytes a rank holds while training, by what they are for."""
        p, q = self.coords(rank)
        lo, hi = self.shard_range(p)
        tau = self.task_vector_elements(rank) * self.storage_itemsize
        b = self.base_itemsize
        resident = {
            "task vectors": tau if self.offload == "none" else 0,
            "base piece": self.piece * b,
            "partial sums (fp32)": 2 * (hi - lo) * 4,
        }
        if self.gather == "body":
            resident["merged body"] = self.ranks * self.piece * b
            resident["gradient"] = self.ranks * self.piece * (b + 4) + self.piece * 4
        else:
            resident["merged piece"] = self.piece * b
            resident["gradient piece and shard (fp32)"] = (self.piece + self.shard_size) * 4
            resident["largest layer gathered, with its gradient"] = self.largest_unit * (2 * b + 4)
            if self.gather_ahead and self.ranks > 1:
                resident[f"layers gathered ahead ({self.gather_ahead})"] = (
                    self.gather_ahead * self.largest_unit * b
                )
        resident["W and Adam"] = 3 * len(self.tasks) * self.columns * 4
        if self.offload != "none":
            offsets = self.segment_offsets(p)
            bounds = offsets.tolist()
            largest = max(
                (bounds[g.stop] - bounds[g.start] for g in layer_groups(offsets, self.prefetch_elements)),
                default=0,
            )
            staged = 2 * len(self.task_rows(q)) * largest * self.storage_itemsize
            resident["staged layer groups (2)"] = staged
            resident[f"task vectors ({self.offload}, offloaded)"] = tau
        return resident

    def comm_per_step(self, passes: int = 1) -> dict[str, int]:
        """Bytes each rank sends per training step, by tag (ring algorithms; see CommStats).

        Layer mode gathers and reduces the body once per forward/backward pass: `passes` is the
        number of micro-batches a rank runs per step, and the "merged" figure is the most it can
        be (units whose ops save no weights are not gathered again in backward).
        """
        r, q = self.ranks, self.task_groups
        shard = self.shard_size * 4
        body = (r - 1) / r * self.n if self.gather == "layer" else (r - 1) * self.piece
        gathers = 2 * passes if self.gather == "layer" else 1
        result = {
            "merged": int(gathers * body * self.base_itemsize),
            "grad": int((passes if self.gather == "layer" else 1) * body * 4),
            "dW": int(2 * (r - 1) / r * len(self.tasks) * self.columns * 4),
        }
        if q > 1:
            result["partial"] = int((q - 1) / q * shard)
            result["grad shard"] = int((q - 1) * self.piece * 4)
        return result if r > 1 else {}

    def describe(self, max_names: int = 4) -> str:
        """The plan as text: the mesh, each rank's tensors, tasks and bytes, the traffic per step."""
        lines = [
            f"plan: {self.ranks} rank(s) = {self.layer_shards} layer shard(s) x {self.task_groups} task "
            f"group(s); k = {len(self.tasks)} tasks, N = {self.n:,} merged elements in {len(self.names)} "
            f"tensors, W [{len(self.tasks)}, {self.columns}]; task vectors"
            f"{' (LoRA as factors)' * bool(self.held)} {human_bytes(self.task_vector_bytes)} in all, "
            f"offload: {self.offload}"
        ]
        for rank in range(self.ranks):
            p, q = self.coords(rank)
            lo, hi = self.shard_range(p)
            segs = self.segments(p)
            shown = [
                self.names[s.tensor] + ("" if s.hi - s.lo == self.numels[s.tensor] else f"[{s.lo}:{s.hi}]")
                for s in segs[:max_names]
            ]
            more = f" ... (+{len(segs) - max_names} more)" if len(segs) > max_names else ""
            rows = self.task_rows(q)
            memory = self.memory(rank)
            total = sum(v for k, v in memory.items() if "offloaded" not in k)
            lines.append(
                f"rank {rank} (layer shard {p}, task group {q}): elements [{lo:,}, {hi:,}) = "
                f"{len(segs)} tensor part(s): {', '.join(shown)}{more}"
            )
            lines.append(f"  tasks {[self.tasks[i] for i in rows]}")
            lines.append(
                "  memory: "
                + ", ".join(f"{k} {human_bytes(v)}" for k, v in memory.items())
                + f"; resident total {human_bytes(total)}"
                + (
                    f" ({'within' if total <= self.memory_per_rank else 'ABOVE'} the "
                    f"{human_bytes(self.memory_per_rank)} per rank)"
                    if self.memory_per_rank
                    else ""
                )
            )
        comm = self.comm_per_step()
        per = "per step and rank"
        if self.gather == "layer":
            per = (
                "per micro-batch pass and rank (layer gathers; a step is ceil(micro-batches / ranks) "
                f"passes; largest gather unit {self.largest_unit:,} elements)"
            )
        lines.append(
            f"communication {per}: "
            + (", ".join(f"{k} {human_bytes(v)}" for k, v in comm.items()) if comm else "none (one rank)")
            + " (tensor traffic O(N), independent of k; only dW grows with k)"
        )
        return "\n".join(lines)
