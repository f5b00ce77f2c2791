"""The merged body: theta_m = base + sum_i tanh(w(i, g(j))) * tau(i, j) for every tensor j.

`Body` is what the trainer and the learned merge use: W (the only trainable tensor), passes
that hand the merged weights to a task model's forwards and send their gradient back to W,
and the merged tensors for writing. `MergedBody` is the one-process body over a whole
`TaskVectorStore`; `supermerge.distributed.body.ShardedBody` is the same over a rank's shard.
The weighted sum and its gradient run in the fused kernel (`supermerge.kernels`: Triton on
CUDA, the torch grouped path elsewhere) over the store's flat buffers, so one call merges the
whole body.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import torch
from torch import nn

from supermerge.io.memory import nbytes
from supermerge.kernels import grouped_weighted_sum
from supermerge.learned.coefficients import CoefficientLayout
from supermerge.taskvectors.store import TaskVectorStore


class FullBody(Protocol):
    """A body whose forward gives the whole merged body [N] and whose backward takes its gradient."""

    names: list[str]

    def forward(self) -> torch.Tensor: ...

    def backward(self, grad: torch.Tensor) -> None: ...

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]: ...


@contextmanager
def full_body_pass(body: FullBody) -> Iterator[dict[str, torch.Tensor]]:
    """One training pass over the whole merged body: yields it as one leaf per tensor; when the
    caller's backward passes are done, sends their summed gradient to W (`body.backward`).

    The leaves share the merged storage and their .grad are views of one flat buffer, so autograd
    accumulates each tensor's gradient in place and nothing of size N is allocated per tensor (a
    single leaf with views would expand every view's gradient to N).
    """
    merged = body.forward()
    grad = torch.zeros_like(merged)
    leaves = {}
    for name, view, grad_view in zip(
        body.names, body.split(merged).values(), body.split(grad).values(), strict=True
    ):
        leaf = view.requires_grad_()
        leaf.grad = grad_view
        leaves[name] = leaf
    yield leaves
    for leaf, grad_view in zip(leaves.values(), body.split(grad).values(), strict=True):
        if leaf.grad is not grad_view:  # autograd replaced it instead of adding in place
            grad_view.copy_(leaf.grad)
    body.backward(grad)


class StoreView(Protocol):
    """What every body's store offers: the merged tensors' names and views of a flat body."""

    names: list[str]

    @property
    def task_vector_bytes(self) -> int: ...

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]: ...


class Body(nn.Module, ABC):
    """Learnable coefficients W [k, G] over task vectors, and the merged weights they give.

    Args:
        store: the task vectors (all of them, or this rank's shard).
        k: number of task vectors (rows of W).
        layout: column of W for each tensor.
        init: initial coefficient tanh(w), in (-1, 1); 0.3 equals task arithmetic with lambda 0.3.
        impl: kernel implementation ("auto" | "torch" | "triton").
        device: where W lives (the compute device).
    """

    lockstep: bool  # every rank must run the same forwards in the same order (layer gathers)

    def __init__(
        self,
        store: StoreView,
        k: int,
        layout: CoefficientLayout,
        init: float,
        impl: str,
        device: torch.device,
    ) -> None:
        super().__init__()
        if not -1 < init < 1:
            raise ValueError(f"init must be in (-1, 1), got {init}")
        self.store, self.layout, self.impl = store, layout, impl
        self.w = nn.Parameter(torch.full((k, layout.groups), math.atanh(init), device=device))

    @property
    def names(self) -> list[str]:
        """The merged tensors' names, in buffer order."""
        return self.store.names

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of a full flat [N] body as the named tensors."""
        return self.store.split(flat)

    @property
    def task_vector_bytes(self) -> int:
        """Bytes of task vectors this process holds on its compute device."""
        return self.store.task_vector_bytes

    @property
    @abstractmethod
    def tracked_bytes(self) -> int:
        """Bytes of task vectors, merged weights and their gradients held for a step."""

    @abstractmethod
    def training_pass(self, module: nn.Module) -> AbstractContextManager[dict[str, torch.Tensor]]:
        """Merged weights by name for the forwards of one step (of `module`, the task model's
        skeleton); their gradient reaches W (`w.grad`) on exit."""

    @abstractmethod
    def inference_pass(self, module: nn.Module) -> AbstractContextManager[Mapping[str, torch.Tensor]]:
        """Merged weights by name for forwards without a graph."""

    @abstractmethod
    def merged_tensors(self) -> Mapping[str, torch.Tensor]:
        """The merged weights by tensor name, without a graph."""

    def coefficients(self) -> torch.Tensor:
        """tanh(W), [k, G], detached fp32 on the CPU."""
        return torch.tanh(self.w.detach()).float().cpu()


class WholeBody(Body):
    """A one-process body whose `forward` merges the whole body [N] and whose `backward` takes its
    gradient (FullBody): one training pass is `full_body_pass`."""

    lockstep = False  # one process: nothing to keep in step
    store: TaskVectorStore | StoreView

    @abstractmethod
    def forward(self) -> torch.Tensor:
        """[N] merged weights, detached; `backward` then sends their gradient to W."""

    @abstractmethod
    def backward(self, grad: torch.Tensor) -> None:
        """Accumulate dLoss/dW into w.grad from dLoss/dmerged [N] of the last `forward`."""

    def training_pass(self, module: nn.Module) -> AbstractContextManager[dict[str, torch.Tensor]]:
        return full_body_pass(self)

    @contextmanager
    def inference_pass(self, module: nn.Module) -> Iterator[Mapping[str, torch.Tensor]]:
        yield self.merged_tensors()

    @property
    def tracked_bytes(self) -> int:
        """Bytes of the store, the merged body and its gradient."""
        return self.store.nbytes + 2 * nbytes(self.store.base_flat)


class MergedBody(WholeBody):
    """The one-process body: coefficients over a whole task-vector store.

    Args:
        store: base and task vectors in flat buffers.
        layout, init, impl: as for Body.
    """

    def __init__(
        self, store: TaskVectorStore, layout: CoefficientLayout, init: float = 0.3, impl: str = "auto"
    ) -> None:
        super().__init__(store, store.k, layout, init, impl, store.base_flat.device)
        self.store: TaskVectorStore = store
        self._merged: torch.Tensor | None = None

    def merged_flat(self) -> torch.Tensor:
        """[N] merged weights in the base's dtype, differentiable w.r.t. W."""
        s = self.store
        return grouped_weighted_sum(s.base_flat, s.tau_flat, self.layout.expand(self.w), s.offsets, self.impl)

    def forward(self) -> torch.Tensor:
        """[N] merged weights, detached; `backward` then sends their gradient to W."""
        self._merged = self.merged_flat()
        return self._merged.detach()

    def backward(self, grad: torch.Tensor) -> None:
        """Accumulate dLoss/dW into w.grad from dLoss/dmerged [N] of the last `forward`."""
        self._merged.backward(grad)
        self._merged = None

    @torch.no_grad()
    def merged_tensors(self) -> dict[str, torch.Tensor]:
        """The merged weights by tensor name (views of one flat buffer), without a graph."""
        return self.store.split(self.merged_flat())
