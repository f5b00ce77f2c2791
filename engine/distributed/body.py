"""The merged body over sharded task vectors: the distributed SuperMerge step's tensor traffic.

A `supermerge.learned.body.Body` like `MergedBody` (plus forward / backward / split for the
full-body pass), so `CoefficientTrainer` runs either. W [k, G] is replicated: every rank
applies the same all-reduced dW with the same Adam, so W stays identical without broadcasts.
The data flow is in `supermerge.distributed.plan`'s docstring.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from supermerge.distributed.comm import Comm
from supermerge.distributed.layer_gather import GatheredTensors, LayerGather, Owners, find_units
from supermerge.distributed.stores.lowrank import LowRankShardStore
from supermerge.distributed.stores.nvme import NvmeShardStore
from supermerge.distributed.stores.resident import ShardStore, tau_weighted_sum
from supermerge.distributed.stores.zero import ZeroShardStore
from supermerge.learned.body import Body, full_body_pass
from supermerge.learned.coefficients import CoefficientLayout

Store = ShardStore | LowRankShardStore | ZeroShardStore | NvmeShardStore


class ShardedBody(Body):
    """Learnable coefficients over the task-vector shards of every rank of `comm`.

    Args:
        store: this rank's share of the task vectors, resident (ShardStore; LowRankShardStore
            for LoRA experts as factors) or offloaded through DeepSpeed or to NVMe and streamed
            (ZeroShardStore, NvmeShardStore).
        layout: column of W for each tensor (global).
        comm: the ranks training this merge (the plan's ranks, in order).
        shard_comm: the Q ranks holding the same layer shard (this rank's task group among them).
        init: initial coefficient tanh(w).
        impl: kernel implementation.
        gather: "body" (the whole merged body all-gathered once per step) or "layer" (each
            module's merged tensors gathered just before it runs: supermerge.distributed.layer_gather).
        gather_ahead: layer mode: units whose gathers start before they are needed (0: none).
    """

    def __init__(
        self,
        store: Store,
        layout: CoefficientLayout,
        comm: Comm,
        shard_comm: Comm,
        init: float = 0.3,
        impl: str = "auto",
        gather: str = "body",
        gather_ahead: int = 0,
    ) -> None:
        device = store.base_piece.device
        super().__init__(store, len(store.plan.tasks), layout, init, impl, device)
        self.store: Store = store
        self.comm, self.shard_comm = comm, shard_comm
        self.gather, self.gather_ahead = gather, gather_ahead
        self.gathered_peak_bytes = 0
        self._units: dict[int, list] = {}
        self._schedules: dict[tuple[int, bool], list[int]] = {}  # (module, training): last pass's gathers
        self._rows = torch.tensor(store.rows, dtype=torch.int64, device=device)
        self._columns = layout.column[store.segment_tensor].to(device)
        self._partial: torch.Tensor | None = None

    def _coefficients(self, segments: slice) -> torch.Tensor:
        """W's entries of this rank's tasks for `segments` of the layer shard: [k_q, segments]."""
        return self.w.index_select(0, self._rows).index_select(1, self._columns[segments])

    def _partial_sum(self, tau: torch.Tensor, offsets: torch.Tensor, segments: slice) -> torch.Tensor:
        """[n] fp32 sum over this rank's tasks of tanh(w) tau, for `segments` of the layer shard."""
        return tau_weighted_sum(tau, self._coefficients(segments), offsets, self.impl)

    def _local_partial(self) -> torch.Tensor:
        """[n] fp32 partial sum over the layer shard; resident stores keep the graph for backward,
        streamed (offloaded) ones recompute it chunk by chunk in `backward`."""
        store = self.store
        if store.resident:
            return store.weighted_sum(self._coefficients(slice(None)), self.impl)
        partial = torch.empty(store.n_local, dtype=torch.float32, device=store.base_piece.device)
        with torch.no_grad():
            for chunk in store.chunks():
                partial[chunk.lo : chunk.hi] = self._partial_sum(chunk.tau, chunk.offsets, chunk.segments)
        return partial

    def _merged_piece(self) -> torch.Tensor:
        """[S] this rank's piece of the merged body (the body's dtype): the local partial sum over
        the layer shard, reduce-scattered over the shard's Q ranks, plus the base piece."""
        plan, store = self.store.plan, self.store
        partial = self._local_partial()
        self._partial = partial if partial.requires_grad else None
        shard = torch.zeros(plan.shard_size, dtype=torch.float32, device=partial.device)
        shard[: partial.numel()] = partial.detach()
        piece = torch.empty(plan.piece, dtype=torch.float32, device=partial.device)
        self.shard_comm.reduce_scatter(piece, shard, "partial")
        return piece.add_(store.base_piece).to(store.base_dtype)

    def _grad_to_w(self, grad_piece: torch.Tensor) -> None:
        """dLoss/dW of the job in `w.grad` (all ranks alike) from this rank's fp32 gradient piece [S]."""
        shard = torch.empty(self.store.plan.shard_size, dtype=torch.float32, device=grad_piece.device)
        self.shard_comm.all_gather(shard, grad_piece, "grad shard")
        if self._partial is not None:
            self._partial.backward(shard[: self._partial.numel()])
            self._partial = None
        elif not self.store.resident:
            for chunk in self.store.chunks():
                partial = self._partial_sum(chunk.tau, chunk.offsets, chunk.segments)
                if partial.requires_grad:
                    partial.backward(shard[chunk.lo : chunk.hi])
        if self.w.grad is None:
            self.w.grad = torch.zeros_like(self.w)
        self.comm.all_reduce(self.w.grad, "dW")

    def forward(self) -> torch.Tensor:
        """[N] full merged body (detached), gathered from every rank's piece."""
        plan = self.store.plan
        piece = self._merged_piece()
        full = torch.empty(plan.ranks * plan.piece, dtype=piece.dtype, device=piece.device)
        self.comm.all_gather(full, piece, "merged")
        return full[: plan.n]

    def backward(self, grad: torch.Tensor) -> None:
        """Turn this rank's dLoss/dmerged [N] into the job's dLoss/dW in `w.grad` (all ranks alike)."""
        plan = self.store.plan
        padded = torch.zeros(plan.ranks * plan.piece, dtype=torch.float32, device=grad.device)
        padded[: plan.n] = grad
        piece = torch.empty(plan.piece, dtype=torch.float32, device=grad.device)
        self.comm.reduce_scatter(piece, padded, "grad")
        self._grad_to_w(piece)

    @property
    def lockstep(self) -> bool:
        """True when every rank must run the same forwards in the same order (layer gathers)."""
        return self.gather == "layer"

    def _owners(self, piece: torch.Tensor) -> Owners:
        grad_piece = torch.zeros(self.store.plan.piece, dtype=torch.float32, device=piece.device)
        return Owners(self.comm, self.store.plan.piece, piece, grad_piece)

    @contextmanager
    def _gathered(self, module: nn.Module, owners: Owners) -> Iterator[dict[str, torch.Tensor]]:
        """Layer mode: `module`'s forwards gather each unit from `owners` as it runs (no tensors
        to pass in: the hooks put them in place)."""
        if id(module) not in self._units:
            self._units[id(module)] = find_units(module, self.names, self.store.shapes)
        kind = (id(module), torch.is_grad_enabled())
        schedule = self._schedules.get(kind, [])
        ahead = self.gather_ahead if self.comm.size > 1 else 0  # one rank: gathers are local copies
        gather = LayerGather(self._units[id(module)], owners, self.store.base_dtype, schedule, ahead)
        with gather.installed():
            yield {}
        self._schedules[kind] = gather.gathers
        self.gathered_peak_bytes = max(self.gathered_peak_bytes, gather.peak_bytes)

    @contextmanager
    def training_pass(self, module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
        """Merged weights by name for the forwards of one step (layer mode: none, the hooks put
        each unit in place as it runs); their gradient reaches W on exit (collective)."""
        if self.gather == "body":
            with full_body_pass(self) as leaves:
                yield leaves
            return
        owners = self._owners(self._merged_piece())
        with self._gathered(module, owners) as params:
            yield params
        self._grad_to_w(owners.grad_piece)

    @contextmanager
    def inference_pass(self, module: nn.Module) -> Iterator[Mapping[str, torch.Tensor]]:
        """Merged weights by name for forwards without a graph (collective)."""
        with torch.no_grad():
            if self.gather == "body":
                yield self.merged_tensors()
                return
            with self._gathered(module, self._owners(self._merged_piece())) as params:
                yield params

    @torch.no_grad()
    def merged_tensors(self) -> Mapping[str, torch.Tensor]:
        """The full merged weights by tensor name, without a graph (collective: every rank calls it;
        layer mode: each tensor is gathered when asked for, and every rank must ask for the same
        names in the same order)."""
        if self.gather == "body":
            return self.split(self.forward())
        owners = self._owners(self._merged_piece())
        return GatheredTensors(self.names, self.store.shapes, owners, self.store.base_dtype)

    @property
    def tracked_bytes(self) -> int:
        """Bytes of the shard and of the merged weights and gradients held for a step: body mode,
        the gathered body and its gradient (with its fp32 staging); layer mode, the merged piece,
        its fp32 gradient and the most the gathered units took at once (measured)."""
        plan = self.store.plan
        itemsize = self.store.base_dtype.itemsize
        if self.gather == "body":
            return self.store.nbytes + plan.ranks * plan.piece * (2 * itemsize + 4)
        return self.store.nbytes + plan.piece * (itemsize + 4) + self.gathered_peak_bytes
