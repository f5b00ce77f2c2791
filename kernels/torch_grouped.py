"""The memory-lean torch implementation of the grouped weighted sum (CPU, or CUDA without Triton).

The reference (`reference.py`) expands the coefficients to [k, N] and multiplies element-wise:
simple and the test oracle, but it allocates two k x N float32 temporaries and keeps one for
backward. This version works tensor by tensor with matrix-vector products, so its temporaries
are at most one tensor's k x n_t in float32, and backward recomputes nothing of size k x N:
    forward   out[seg_t]  = base[seg_t] + tanh(w[:, t]) @ tau[:, seg_t]
    backward  dw[:, t]    = sech(w[:, t])^2 * (tau[:, seg_t] @ g[seg_t])
in a fixed order (deterministic). Only w is differentiated. sech^2 is taken from w, not as
1 - tanh^2, which cancels in float32 for saturated coefficients (|w| > ~2).
"""

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx


def _segments(offsets: Tensor) -> list[tuple[int, int]]:
    bounds = offsets.tolist()
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _acc(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


class GroupedWeightedSumTorch(torch.autograd.Function):
    """``out = base + sum_i tanh(w[i, t]) * tau[i]`` on flat buffers, tensor by tensor."""

    @staticmethod
    def forward(ctx: FunctionCtx, base_flat: Tensor, tau_flat: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
        acc = torch.promote_types(torch.promote_types(base_flat.dtype, tau_flat.dtype), torch.float32)
        coef = torch.tanh(w.detach().to(acc))
        out = torch.empty_like(base_flat)
        segments = _segments(offsets)
        for t, (lo, hi) in enumerate(segments):
            args = (_acc(base_flat[lo:hi], acc), _acc(tau_flat[:, lo:hi], acc).T, coef[:, t])
            if out.dtype == acc:  # straight into out: no tensor-sized temporary, no copy
                torch.addmv(*args, out=out[lo:hi])
            else:
                out[lo:hi] = torch.addmv(*args)
        ctx.save_for_backward(tau_flat, w.detach().to(acc))
        ctx.segments, ctx.acc, ctx.w_dtype = segments, acc, w.dtype
        return out

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        tau_flat, w = ctx.saved_tensors
        dw = torch.empty_like(w)
        for t, (lo, hi) in enumerate(ctx.segments):
            dw[:, t] = torch.mv(_acc(tau_flat[:, lo:hi], ctx.acc), _acc(grad_out[lo:hi], ctx.acc))
        dw.mul_(torch.cosh(w).pow(-2))
        return None, None, dw.to(ctx.w_dtype), None


def grouped_weighted_sum_torch(base_flat: Tensor, tau_flat: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """Same contract as `grouped_weighted_sum`; differentiable w.r.t. ``w`` only."""
    return GroupedWeightedSumTorch.apply(base_flat, tau_flat, w, offsets)
