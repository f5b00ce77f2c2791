"""The merged body: theta_m = base + sum_i tanh(w(i, g(j))) * tau(i, j) for every tensor j.

W is the only trainable tensor. The weighted sum and its gradient run in the fused kernel
(`supermerge.kernels.grouped_weighted_sum`: Triton on CUDA, torch reference on CPU) over the
store's flat buffers, so one call merges the whole body.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import torch
from torch import nn

from supermerge.coefficients import CoefficientLayout
from supermerge.kernels import grouped_weighted_sum
from supermerge.store import TaskVectorStore


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


class MergedBody(nn.Module):
    """Learnable coefficients over a task-vector store.

    Args:
        store: base and task vectors in flat buffers.
        layout: column of W for each tensor.
        init: initial coefficient tanh(w), in (-1, 1); 0.3 equals task arithmetic with lambda 0.3.
        impl: kernel implementation ("auto" | "torch" | "triton").
    """

    def __init__(
        self, store: TaskVectorStore, layout: CoefficientLayout, init: float = 0.3, impl: str = "auto"
    ) -> None:
        super().__init__()
        if not -1 < init < 1:
            raise ValueError(f"init must be in (-1, 1), got {init}")
        self.store = store
        self.layout = layout
        self.impl = impl
        device = store.base_flat.device
        self.w = nn.Parameter(torch.full((store.k, layout.groups), math.atanh(init), device=device))
        self._merged: torch.Tensor | None = None

    def merged_flat(self) -> torch.Tensor:
        """[N] merged weights in the base's dtype, differentiable w.r.t. W."""
        s = self.store
        return grouped_weighted_sum(s.base_flat, s.tau_flat, self.layout.expand(self.w), s.offsets, self.impl)

    @property
    def names(self) -> list[str]:
        return self.store.names

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.store.split(flat)

    def forward(self) -> torch.Tensor:
        """[N] merged weights, detached; `backward` then sends their gradient to W."""
        self._merged = self.merged_flat()
        return self._merged.detach()

    def backward(self, grad: torch.Tensor) -> None:
        """Accumulate dLoss/dW into w.grad from dLoss/dmerged [N] of the last `forward`."""
        self._merged.backward(grad)
        self._merged = None

    lockstep = False  # one process: nothing to keep in step

    def training_pass(self, module: nn.Module) -> AbstractContextManager[dict[str, torch.Tensor]]:
        """Merged weights by name for the forwards of one step (of `module`, the task model's
        skeleton); their gradient reaches W on exit."""
        return full_body_pass(self)

    @contextmanager
    def inference_pass(self, module: nn.Module) -> Iterator[Mapping[str, torch.Tensor]]:
        """Merged weights by name for forwards without a graph."""
        yield self.merged_tensors()

    @property
    def tracked_bytes(self) -> int:
        """Bytes of the store, the merged body and its gradient."""
        merged = self.store.base_flat
        return self.store.nbytes + 2 * merged.numel() * merged.element_size()

    @torch.no_grad()
    def merged_tensors(self) -> dict[str, torch.Tensor]:
        """The merged weights by tensor name (views of one flat buffer), without a graph."""
        return self.store.split(self.merged_flat())

    def coefficients(self) -> torch.Tensor:
        """tanh(W), [k, G], detached fp32 on the CPU."""
        return torch.tanh(self.w.detach()).float().cpu()
