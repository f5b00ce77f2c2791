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

Implementations (`impl`):
- "torch": addmm / mm (cuBLAS on CUDA). out = base + ... into another buffer copies base into
  out, then the GEMM reads and writes out: 4 m n element moves (2 m n in place);
- "triton" (kernels/lowrank_triton.py): base read and out written once, in the GEMM's epilogue:
  2 m n either way; the backward never writes the [R, n] product B^T G.
"auto" is torch everywhere: the Triton kernels are tested (in the interpreter without a GPU) but
not yet measured against cuBLAS on a GPU (benchmarks/bench_lowrank_kernel.py); impl="triton" or
$SUPERMERGE_KERNEL_IMPL=triton selects them.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from supermerge.kernels.dispatch import IMPL_ENV_VAR, require_triton_runs_on, select_impl


def lowrank_impl(impl: str, device: torch.device) -> Literal["torch", "triton"]:
    """Resolve `impl` for the low-rank kernels: "auto" (with $SUPERMERGE_KERNEL_IMPL unset or
    auto) is torch; otherwise as `select_impl`."""
    if impl == "auto" and os.environ.get(IMPL_ENV_VAR, "auto") == "auto":
        return "torch"
    chosen = select_impl(impl, device)
    if chosen == "triton":
        require_triton_runs_on(device)
    return chosen


def column_coefficients(c: Tensor, rank_offsets: Tensor, total: int) -> Tensor:
    """c [k] repeated over each expert's rank columns: [R], R = `total` (given, so the device
    never has to report rank_offsets[-1])."""
    return torch.repeat_interleave(c, rank_offsets.diff(), output_size=total)


def lowrank_merge_into(
    out: Tensor,
    base: Tensor | None,
    b: Tensor,
    a: Tensor,
    c: Tensor,
    rank_offsets: Tensor,
    impl: str = "auto",
) -> Tensor:
    """out = base + sum_i c_i B_i A_i, float32 [m, n]; base [m, n] in any float dtype, `out`
    itself (in place), or None (zero). Returns out."""
    scaled = b.float() * column_coefficients(c.float(), rank_offsets, b.shape[1])
    if lowrank_impl(impl, out.device) == "triton":
        from supermerge.kernels.lowrank_triton import merge_triton

        return merge_triton(base, scaled, a, out)
    if base is None:
        return torch.mm(scaled, a.float(), out=out)
    if base is out:
        return out.addmm_(scaled, a.float())
    return torch.addmm(base.float(), scaled, a.float(), out=out)


def lowrank_merge_(
    out: Tensor, b: Tensor, a: Tensor, c: Tensor, rank_offsets: Tensor, impl: str = "auto"
) -> Tensor:
    """out += sum_i c_i B_i A_i, in place (out float32 [m, n]); returns out."""
    return lowrank_merge_into(out, out, b, a, c, rank_offsets, impl)


def lowrank_coefficient_grad(
    grad: Tensor, b: Tensor, a: Tensor, rank_offsets: Tensor, impl: str = "auto"
) -> Tensor:
    """<grad, B_i A_i> for each expert i, [k] float32."""
    if lowrank_impl(impl, grad.device) == "triton":
        from supermerge.kernels.lowrank_triton import rank_grad_triton

        per_rank = rank_grad_triton(grad, b, a)  # [R]
    else:
        per_rank = (b.float().t() @ grad.float()).mul_(a.float()).sum(dim=1)  # [R]
    return torch.segment_reduce(per_rank, "sum", offsets=rank_offsets)


class LowRankWeightedSum(torch.autograd.Function):
    """``base + sum_i c_i B_i A_i`` differentiable w.r.t. c."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        base: Tensor | None,
        b: Tensor,
        a: Tensor,
        c: Tensor,
        rank_offsets: Tensor,
        impl: str,
    ) -> Tensor:
        ctx.save_for_backward(b, a, rank_offsets)
        ctx.impl = impl
        out = torch.empty(b.shape[0], a.shape[1], dtype=torch.float32, device=b.device)
        return lowrank_merge_into(out, base, b, a, c, rank_offsets, impl)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        b, a, rank_offsets = ctx.saved_tensors
        return None, None, None, lowrank_coefficient_grad(grad, b, a, rank_offsets, ctx.impl), None, None


def lowrank_weighted_sum(
    base: Tensor | None, b: Tensor, a: Tensor, c: Tensor, rank_offsets: Tensor, impl: str = "auto"
) -> Tensor:
    """base [m, n] (None: zero) + sum_i c[i] B_i A_i, float32; B [m, R], A [R, n], rank_offsets
    [k + 1] int64 (on the factors' device), c [k]; differentiable w.r.t. c."""
    return LowRankWeightedSum.apply(base, b, a, c, rank_offsets, impl)


def lowrank_weighted_sum_reference(base: Tensor, bs: list[Tensor], as_: list[Tensor], c: Tensor) -> Tensor:
    """The same in float64 from each expert's dense tau_i = B_i A_i: the test oracle."""
    out = base.double().clone()
    for ci, b, a in zip(c.double(), bs, as_, strict=True):
        out += ci * (b.double() @ a.double())
    return out
