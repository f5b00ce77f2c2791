"""The weighted sum of LoRA task vectors and its coefficient gradient, without a dense tau.

For one tensor of shape [m, n] and k LoRA experts with tau_i = B_i A_i (B_i [m, r_i], A_i
[r_i, n], the LoRA scale folded into the coefficient), side by side:
    B [m, R], A [R, n], R = sum_i r_i; expert i owns columns (of B) / rows (of A) [o_i, o_i+1)
    forward   merged = base + (B * c_cols) @ A                 one GEMM, [m, R] x [R, n]
    backward  dL/dc_i = <G, B_i A_i> = sum((B^T G) * A)[o_i:o_i+1] per expert,
              G = dL/dmerged [m, n]                              one GEMM, [R, m] x [m, n]
where c_cols repeats c_i over expert i's r_i columns. Arithmetic in float32 whatever the
factors' storage dtype; temporaries are [m, R] and [R, n] (the factors' size), never [k, m, n].
`lowrank_weighted_sum` is differentiable w.r.t. c only.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx


def column_coefficients(c: Tensor, rank_offsets: Tensor) -> Tensor:
    """c [k] repeated over each expert's rank columns: [R]."""
    return torch.repeat_interleave(c, rank_offsets.diff(), output_size=int(rank_offsets[-1]))


def lowrank_merge(base: Tensor, b: Tensor, a: Tensor, c: Tensor, rank_offsets: Tensor) -> Tensor:
    """base + sum_i c_i B_i A_i in float32, [m, n] (see the module docstring)."""
    return lowrank_merge_(base.to(torch.float32, copy=True), b, a, c, rank_offsets)


def lowrank_merge_(out: Tensor, b: Tensor, a: Tensor, c: Tensor, rank_offsets: Tensor) -> Tensor:
    """out += sum_i c_i B_i A_i, in place (out float32 [m, n]); returns out."""
    scaled = b.float() * column_coefficients(c.float(), rank_offsets)
    return out.addmm_(scaled, a.float())


def lowrank_coefficient_grad(grad: Tensor, b: Tensor, a: Tensor, rank_offsets: Tensor) -> Tensor:
    """<grad, B_i A_i> for each expert i, [k] float32."""
    per_rank = (b.float().t() @ grad.float()).mul_(a.float()).sum(dim=1)  # [R]
    return torch.segment_reduce(per_rank, "sum", offsets=rank_offsets)


class LowRankWeightedSum(torch.autograd.Function):
    """``base + sum_i c_i B_i A_i`` differentiable w.r.t. c."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, base: Tensor, b: Tensor, a: Tensor, c: Tensor, rank_offsets: Tensor
    ) -> Tensor:
        ctx.save_for_backward(b, a, rank_offsets)
        return lowrank_merge(base, b, a, c, rank_offsets)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[None, None, None, Tensor, None]:
        b, a, rank_offsets = ctx.saved_tensors
        return None, None, None, lowrank_coefficient_grad(grad, b, a, rank_offsets), None


def lowrank_weighted_sum(base: Tensor, b: Tensor, a: Tensor, c: Tensor, rank_offsets: Tensor) -> Tensor:
    """base [m, n] + sum_i c[i] B_i A_i, float32; B [m, R], A [R, n], rank_offsets [k + 1] int64
    (on the factors' device), c [k]; differentiable w.r.t. c."""
    return LowRankWeightedSum.apply(base, b, a, c, rank_offsets)


def lowrank_weighted_sum_reference(base: Tensor, bs: list[Tensor], as_: list[Tensor], c: Tensor) -> Tensor:
    """The same in float64 from each expert's dense tau_i = B_i A_i: the test oracle."""
    out = base.double().clone()
    for ci, b, a in zip(c.double(), bs, as_, strict=True):
        out += ci * (b.double() @ a.double())
    return out
