"""Triton kernels for the grouped tanh-weighted sum and its gradient with respect to ``w``.

Layout (T tensors concatenated into flat buffers):
    base [N], tau [k, N] row-major, w [k, T] float32, offsets [T + 1] int64.
Work is split on a global grid of BLOCK-element blocks; a *chunk* is the part of one tensor that
lies in one block, so every program touches exactly one tensor. Chunks that fill their block are
BLOCK-aligned and take an unmasked path the compiler can vectorise (16-byte accesses).

Forward: one launch, one program per chunk, reads base and each tau row once, writes out.
Backward: one launch reads g and each tau row once and writes per-chunk partial dot products
``partial[i, c] = sum_n g[n] tau[i, n]``; a second, tiny launch sums each tensor's partials in a
fixed order, so ``dw`` is bitwise reproducible (no atomics).
"""

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

# Best or within noise of best on an H100 for k = 2 and 8 at n = 2^24 (benchmarks/kernel_notes.md).
DEFAULT_BLOCK = 2048
DEFAULT_NUM_WARPS = 8
DEFAULT_TASKS_PER_STEP = 4
_REDUCE_BLOCK = 1024


@dataclass(frozen=True)
class ChunkPlan:
    """Chunk tables on the device of the data.

    Attributes:
        block: elements per block (power of two).
        offsets: ``[T + 1]`` int64 tensor element offsets.
        chunk_tensor: ``[C]`` int32, tensor index of each chunk; chunks are sorted by tensor.
        chunk_block: ``[C]`` int32, block index of each chunk (its elements lie in
            ``[block * b, block * (b + 1))``).
        tensor_chunks: ``[T + 1]`` int32, chunks of tensor ``t`` are
            ``tensor_chunks[t]:tensor_chunks[t + 1]`` (empty for a zero-size tensor).
    """

    block: int
    offsets: Tensor
    chunk_tensor: Tensor
    chunk_block: Tensor
    tensor_chunks: Tensor

    @property
    def n_chunks(self) -> int:
        return self.chunk_tensor.numel()

    @property
    def n_tensors(self) -> int:
        return self.offsets.numel() - 1


@functools.lru_cache(maxsize=64)
def _cached_plan(offsets: tuple[int, ...], block: int, device: torch.device) -> ChunkPlan:
    starts = torch.tensor(offsets[:-1], dtype=torch.int64)
    ends = torch.tensor(offsets[1:], dtype=torch.int64)
    first = starts // block
    counts = torch.where(ends > starts, (ends - 1) // block - first + 1, 0)
    tensor_chunks = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])
    n_chunks = int(tensor_chunks[-1])
    chunk_tensor = torch.repeat_interleave(torch.arange(len(counts)), counts, output_size=n_chunks)
    chunk_block = first[chunk_tensor] + torch.arange(n_chunks) - tensor_chunks[chunk_tensor]
    return ChunkPlan(
        block=block,
        offsets=torch.tensor(offsets, dtype=torch.int64, device=device),
        chunk_tensor=chunk_tensor.to(device=device, dtype=torch.int32),
        chunk_block=chunk_block.to(device=device, dtype=torch.int32),
        tensor_chunks=tensor_chunks.to(device=device, dtype=torch.int32),
    )


def build_chunk_plan(offsets: Tensor | Sequence[int], block: int, device: torch.device | str) -> ChunkPlan:
    """Chunk tables for ``offsets`` (``[T + 1]`` element offsets, read on the host) on ``device``.

    Cached per (offsets, block, device), so repeated steps over the same group pay no
    host-to-device copy.
    """
    if block <= 0 or block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    if isinstance(offsets, Tensor):
        offsets = offsets.tolist()
    return _cached_plan(tuple(offsets), block, torch.device(device))


@triton.jit
def _tanh(x):
    # libdevice.tanh does not run in the Triton interpreter; this form saturates to +-1.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _sech2(x):
    # d tanh/dx from x itself: 1 - tanh(x)^2 cancels in float32 once |x| > ~2 (relative error
    # 2u / sech^2, 1e-5 at |x| = 3); 4e / (1 + e)^2 with e = exp(-2|x|) keeps a few ulps everywhere.
    e = tl.exp(-2.0 * tl.abs(x))
    return 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def _chunk_bounds(offsets_ptr, chunk_tensor_ptr, chunk_block_ptr, chunk, BLOCK: tl.constexpr):
    """Tensor index, element indices of the chunk's block, and the chunk's [lo, hi) range."""
    t = tl.load(chunk_tensor_ptr + chunk)
    block_start = tl.load(chunk_block_ptr + chunk).to(tl.int64) * BLOCK
    lo = tl.maximum(tl.load(offsets_ptr + t), block_start)
    hi = tl.minimum(tl.load(offsets_ptr + t + 1), block_start + BLOCK)
    idx = block_start + tl.arange(0, BLOCK)
    return t, idx, lo, hi, (lo == block_start) & (hi == block_start + BLOCK)


@triton.jit
def _task_rows(tau_ptr, w_ptr, idx, mask, t, first_task, n_elements, n_tensors, K, TASKS):
    """Coefficients ``tanh(w[rows, t])`` [TASKS] and tau rows [TASKS, BLOCK] (fp32, 0 past K)."""
    rows = first_task + tl.arange(0, TASKS)
    row_mask = rows < K
    coef = _tanh(tl.load(w_ptr + rows * n_tensors + t, mask=row_mask, other=0.0))
    # TASKS rows per load keep several independent loads in flight per thread.
    ptrs = tau_ptr + rows.to(tl.int64)[:, None] * n_elements + idx[None, :]
    tau = tl.load(ptrs, mask=row_mask[:, None] & mask[None, :], other=0.0)
    return rows, row_mask, coef, tau.to(tl.float32)


@triton.jit
def _forward_tile(base_ptr, tau_ptr, w_ptr, out_ptr, idx, mask, t, n_elements, n_tensors, K, TASKS):
    acc = tl.load(base_ptr + idx, mask=mask).to(tl.float32)
    for first_task in range(0, K, TASKS):
        _, _, coef, tau = _task_rows(
            tau_ptr, w_ptr, idx, mask, t, first_task, n_elements, n_tensors, K, TASKS
        )
        acc += tl.sum(coef[:, None] * tau, axis=0)
    tl.store(out_ptr + idx, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _forward_kernel(
    base_ptr,
    tau_ptr,
    w_ptr,
    out_ptr,
    offsets_ptr,
    chunk_tensor_ptr,
    chunk_block_ptr,
    n_elements,
    n_tensors,
    K,
    BLOCK: tl.constexpr,
    TASKS: tl.constexpr,
):
    t, idx, lo, hi, full = _chunk_bounds(
        offsets_ptr, chunk_tensor_ptr, chunk_block_ptr, tl.program_id(0), BLOCK
    )
    # Two calls of one tile so the full-block case has a provably uniform mask (vector loads).
    if full:
        _forward_tile(
            base_ptr,
            tau_ptr,
            w_ptr,
            out_ptr,
            idx,
            tl.full([BLOCK], 1, tl.int1),
            t,
            n_elements,
            n_tensors,
            K,
            TASKS,
        )
    else:
        _forward_tile(
            base_ptr,
            tau_ptr,
            w_ptr,
            out_ptr,
            idx,
            (idx >= lo) & (idx < hi),
            t,
            n_elements,
            n_tensors,
            K,
            TASKS,
        )


@triton.jit
def _partial_dot_tile(
    g_ptr,
    tau_ptr,
    w_ptr,
    partial_ptr,
    chunk,
    idx,
    mask,
    t,
    n_elements,
    n_tensors,
    n_chunks,
    K,
    TASKS,
):
    g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    for first_task in range(0, K, TASKS):
        rows, row_mask, _, tau = _task_rows(
            tau_ptr, w_ptr, idx, mask, t, first_task, n_elements, n_tensors, K, TASKS
        )
        dots = tl.sum(g[None, :] * tau, axis=1)
        tl.store(partial_ptr + rows * n_chunks + chunk, dots, mask=row_mask)


@triton.jit
def _partial_dot_kernel(
    g_ptr,
    tau_ptr,
    w_ptr,
    partial_ptr,
    offsets_ptr,
    chunk_tensor_ptr,
    chunk_block_ptr,
    n_elements,
    n_tensors,
    n_chunks,
    K,
    BLOCK: tl.constexpr,
    TASKS: tl.constexpr,
):
    chunk = tl.program_id(0)
    t, idx, lo, hi, full = _chunk_bounds(offsets_ptr, chunk_tensor_ptr, chunk_block_ptr, chunk, BLOCK)
    if full:
        _partial_dot_tile(
            g_ptr,
            tau_ptr,
            w_ptr,
            partial_ptr,
            chunk,
            idx,
            tl.full([BLOCK], 1, tl.int1),
            t,
            n_elements,
            n_tensors,
            n_chunks,
            K,
            TASKS,
        )
    else:
        _partial_dot_tile(
            g_ptr,
            tau_ptr,
            w_ptr,
            partial_ptr,
            chunk,
            idx,
            (idx >= lo) & (idx < hi),
            t,
            n_elements,
            n_tensors,
            n_chunks,
            K,
            TASKS,
        )


@triton.jit
def _reduce_partials_kernel(
    partial_ptr, w_ptr, dw_ptr, tensor_chunks_ptr, n_chunks, n_tensors, RBLOCK: tl.constexpr
):
    t = tl.program_id(0)
    i = tl.program_id(1)
    first = tl.load(tensor_chunks_ptr + t)
    last = tl.load(tensor_chunks_ptr + t + 1)
    acc = tl.zeros([RBLOCK], dtype=tl.float32)
    for start in range(first, last, RBLOCK):
        cols = start + tl.arange(0, RBLOCK)
        acc += tl.load(partial_ptr + i * n_chunks + cols, mask=cols < last, other=0.0)
    slope = _sech2(tl.load(w_ptr + i * n_tensors + t))
    tl.store(dw_ptr + i * n_tensors + t, slope * tl.sum(acc, axis=0))


def _tasks_per_step(n_tasks: int, most: int) -> int:
    return min(triton.next_power_of_2(n_tasks), most)


def grouped_forward(
    base: Tensor,
    tau: Tensor,
    w: Tensor,
    plan: ChunkPlan,
    out: Tensor,
    num_warps: int = DEFAULT_NUM_WARPS,
    tasks_per_step: int = DEFAULT_TASKS_PER_STEP,
) -> Tensor:
    """Write ``out[n] = base[n] + sum_i tanh(w[i, t(n)]) * tau[i, n]`` into ``out``.

    Args:
        base: ``[N]`` contiguous, float32 / bfloat16 / float16.
        tau: ``[k, N]`` contiguous, any of those dtypes.
        w: ``[k, T]`` contiguous float32 raw coefficients.
        plan: chunk tables from :func:`build_chunk_plan` for the group's offsets.
        out: ``[N]`` output buffer (caller-allocated), usually ``base.dtype``.
        num_warps: warps per program.
        tasks_per_step: most tau rows loaded together per loop step (power of two).
    """
    n_tasks, n_tensors = w.shape
    if plan.n_chunks:
        _forward_kernel[(plan.n_chunks,)](
            base,
            tau,
            w,
            out,
            plan.offsets,
            plan.chunk_tensor,
            plan.chunk_block,
            base.numel(),
            n_tensors,
            n_tasks,
            BLOCK=plan.block,
            TASKS=_tasks_per_step(n_tasks, tasks_per_step),
            num_warps=num_warps,
        )
    return out


def grouped_backward(
    grad_out: Tensor,
    tau: Tensor,
    w: Tensor,
    plan: ChunkPlan,
    dw: Tensor,
    partial: Tensor,
    num_warps: int = DEFAULT_NUM_WARPS,
    tasks_per_step: int = DEFAULT_TASKS_PER_STEP,
    reduce_block: int = _REDUCE_BLOCK,
) -> Tensor:
    """Write ``dw[i, t] = sech(w[i, t])^2 * sum_{n in t} grad_out[n] * tau[i, n]``.

    Args:
        grad_out: ``[N]`` contiguous gradient of the loss w.r.t. the forward output.
        tau: ``[k, N]`` contiguous task vectors.
        w: ``[k, T]`` contiguous float32 raw coefficients.
        plan: chunk tables from :func:`build_chunk_plan`.
        dw: ``[k, T]`` float32 output buffer (caller-allocated).
        partial: ``[k, plan.n_chunks]`` float32 scratch for per-chunk dot products.
        num_warps, tasks_per_step: as in :func:`grouped_forward`.
        reduce_block: partials summed per step of the second stage (power of two).
    """
    n_tasks, n_tensors = w.shape
    if plan.n_chunks:
        _partial_dot_kernel[(plan.n_chunks,)](
            grad_out,
            tau,
            w,
            partial,
            plan.offsets,
            plan.chunk_tensor,
            plan.chunk_block,
            grad_out.numel(),
            n_tensors,
            plan.n_chunks,
            n_tasks,
            BLOCK=plan.block,
            TASKS=_tasks_per_step(n_tasks, tasks_per_step),
            num_warps=num_warps,
        )
    _reduce_partials_kernel[(n_tensors, n_tasks)](
        partial, w, dw, plan.tensor_chunks, plan.n_chunks, n_tensors, RBLOCK=reduce_block
    )
    return dw
