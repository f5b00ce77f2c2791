"""Triton kernels for the low-rank weighted sum (kernels/lowrank.py) and its coefficient gradient.

For one tensor [m, n] with the experts' factors side by side, B [m, R] (already scaled by each
column's coefficient) and A [R, n]:
    forward   out = base + B A            tiles of [BLOCK_M, BLOCK_N], R in steps of BLOCK_R; the
              base tile (if any) is read and the out tile written once, in the epilogue: 2 m n
              element moves, also when out is another buffer than base (torch: 4 m n);
    backward  per_rank[rho] = sum_n A[rho, n] (B^T G)[rho, n]
              tiles of [BLOCK_R, BLOCK_N] of B^T G, m in steps of BLOCK_M, multiplied by the A tile
              and summed over the tile's columns in registers: one [n / BLOCK_N, R] partial per
              column block, summed afterwards in a fixed order (deterministic, no atomics); the
              [R, n] product is never written.
Arithmetic in float32 ("ieee" dot products, as torch's default float32 matmul), whatever the
factors' and base's dtypes. Element offsets are int64 (tensors of 2^31 elements and more).
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_M = 64
BLOCK_N = 64
BLOCK_R = 32


@triton.jit
def _merge_kernel(
    base_ptr, b_ptr, a_ptr, out_ptr, M, N, R,
    stride_base, stride_bm, stride_br, stride_ar, stride_an, stride_out,
    HAS_BASE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        b = tl.load(b_ptr + rm[:, None] * stride_bm + rr[None, :] * stride_br,
                    mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)  # fmt: skip
        a = tl.load(a_ptr + rr[:, None] * stride_ar + rn[None, :] * stride_an,
                    mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)  # fmt: skip
        acc += tl.dot(b.to(tl.float32), a.to(tl.float32), input_precision="ieee")
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if HAS_BASE:
        acc += tl.load(base_ptr + rm[:, None] * stride_base + rn[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
    tl.store(out_ptr + rm[:, None] * stride_out + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_kernel(
    g_ptr, b_ptr, a_ptr, partial_ptr, M, N, R,
    stride_g, stride_bm, stride_br, stride_ar, stride_an,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    rr = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rn = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        bt = tl.load(b_ptr + rm[None, :] * stride_bm + rr[:, None] * stride_br,
                     mask=(rm[None, :] < M) & (rr[:, None] < R), other=0.0)  # fmt: skip
        g = tl.load(g_ptr + rm[:, None] * stride_g + rn[None, :],
                    mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)  # fmt: skip
        acc += tl.dot(bt.to(tl.float32), g.to(tl.float32), input_precision="ieee")
    a = tl.load(a_ptr + rr[:, None] * stride_ar + rn[None, :] * stride_an,
                mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)  # fmt: skip
    per_rank = tl.sum(acc * a.to(tl.float32), axis=1)
    tl.store(partial_ptr + tl.program_id(1) * R + rr, per_rank, mask=rr < R)


def _rows_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_factors(m: int, n: int, b: Tensor, a: Tensor) -> None:
    if b.dim() != 2 or a.dim() != 2 or b.shape[0] != m or a.shape != (b.shape[1], n):
        raise ValueError(f"expected b [{m}, R] and a [R, {n}]; got {tuple(b.shape)}, {tuple(a.shape)}")


def merge_triton(base: Tensor | None, b: Tensor, a: Tensor, out: Tensor) -> Tensor:
    """out = base + b @ a (float32 accumulation, in `out`'s dtype); out [m, n] with unit column
    stride, base [m, n] (may be out; None: zero), b [m, R] (scaled), a [R, n]."""
    m, n = out.shape
    _check_factors(m, n, b, a)
    if out.stride(-1) != 1:
        raise ValueError("out must have a unit column stride")
    if base is not None:
        if base.shape != out.shape:
            raise ValueError(f"base {tuple(base.shape)} and out {tuple(out.shape)} differ")
        base = _rows_contiguous(base)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
    _merge_kernel[grid](
        out if base is None else base, b, a, out, m, n, b.shape[1],
        0 if base is None else base.stride(0), b.stride(0), b.stride(1), a.stride(0), a.stride(1),
        out.stride(0), HAS_BASE=base is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R,
    )  # fmt: skip
    return out


def rank_grad_triton(grad: Tensor, b: Tensor, a: Tensor) -> Tensor:
    """[R] float32: sum((b^T grad) * a, dim=1) for grad [m, n], b [m, R], a [R, n]."""
    grad = _rows_contiguous(grad)
    m, n = grad.shape
    _check_factors(m, n, b, a)
    r = b.shape[1]
    if r == 0 or grad.numel() == 0:
        return torch.zeros(r, dtype=torch.float32, device=grad.device)
    partial = torch.empty(triton.cdiv(n, BLOCK_N), r, dtype=torch.float32, device=grad.device)
    grid = (triton.cdiv(r, BLOCK_R), triton.cdiv(n, BLOCK_N))
    _grad_kernel[grid](
        grad, b, a, partial, m, n, r,
        grad.stride(0), b.stride(0), b.stride(1), a.stride(0), a.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R,
    )  # fmt: skip
    return partial.sum(dim=0)
