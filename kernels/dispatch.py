"""Public entry points: pick the Triton or the torch implementation and check shapes."""

import functools
import os
from typing import Literal

import torch
from torch import Tensor

from supermerge.kernels.reference import (
    check_weighted_sum_shapes,
    grouped_weighted_sum_reference,
    weighted_sum_reference,
)
from supermerge.kernels.torch_grouped import grouped_weighted_sum_torch

Impl = Literal["auto", "torch", "triton"]
IMPL_ENV_VAR = "SUPERMERGE_KERNEL_IMPL"
_IMPLS = ("auto", "torch", "triton")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def triton_available() -> bool:
    """True when ``import triton`` works in this process."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def select_impl(impl: str, device: torch.device) -> Literal["torch", "triton"]:
    """Resolve ``impl`` for tensors on ``device``.

    ``"auto"`` reads ``$SUPERMERGE_KERNEL_IMPL`` first (``auto`` / ``torch`` / ``triton``); when
    that is unset or ``auto`` it picks Triton for CUDA tensors if triton imports, else torch.
    An explicit ``"torch"`` or ``"triton"`` argument wins over the variable.
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = os.environ.get(IMPL_ENV_VAR, "auto")
        if impl not in _IMPLS:
            raise ValueError(f"${IMPL_ENV_VAR} must be one of {_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    return impl  # type: ignore[return-value]


def require_triton_runs_on(device: torch.device) -> None:
    """Raise unless Triton kernels can run on `device` (CPU only in the Triton interpreter)."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "the triton impl runs CPU tensors only in the Triton interpreter: set "
            "TRITON_INTERPRET=1 before supermerge.kernels first imports triton"
        )


def _triton_grouped(
    base_flat: Tensor, tau_flat: Tensor, w: Tensor, offsets: Tensor | tuple[int, ...]
) -> Tensor:
    from supermerge.kernels.autograd import GroupedWeightedSumFunction
    from supermerge.kernels.weighted_sum_triton import DEFAULT_BLOCK, build_chunk_plan

    require_triton_runs_on(base_flat.device)
    if base_flat.dtype not in _TRITON_DTYPES or tau_flat.dtype not in _TRITON_DTYPES:
        raise TypeError(f"triton impl supports {_TRITON_DTYPES}; got {base_flat.dtype}, {tau_flat.dtype}")
    if base_flat.requires_grad or tau_flat.requires_grad:
        raise ValueError("the triton impl differentiates w only; base and tau must be frozen")
    plan = build_chunk_plan(offsets, DEFAULT_BLOCK, base_flat.device)
    return GroupedWeightedSumFunction.apply(base_flat.contiguous(), tau_flat.contiguous(), w, plan)


def grouped_weighted_sum(
    base_flat: Tensor, tau_flat: Tensor, w: Tensor, offsets: Tensor, impl: str = "auto"
) -> Tensor:
    """``out[n] = base_flat[n] + sum_i tanh(w[i, t]) * tau_flat[i, n]`` for n in tensor t.

    T parameter tensors are concatenated: tensor ``t`` is ``base_flat[offsets[t]:offsets[t+1]]``.
    One Triton launch covers the whole group (plus a tiny reduction launch in backward).

    Args:
        base_flat: ``[N]`` base parameters, float32 / bfloat16 / float16.
        tau_flat: ``[k, N]`` task vectors (expert - base), row ``i`` contiguous per task.
        w: ``[k, T]`` raw (pre-tanh) coefficients, float32; may require grad.
        offsets: ``[T + 1]`` int64 element offsets, ``offsets[0] == 0``, ``offsets[-1] == N``.
            Read on the host to build (and cache) the chunk tables: keep it on the CPU to avoid a
            device sync.
        impl: ``"auto"`` | ``"torch"`` | ``"triton"``, see :func:`select_impl`.

    Returns:
        ``[N]`` merged parameters in ``base_flat.dtype``, differentiable w.r.t. ``w`` (float32
        accumulation; the gradient is deterministic run to run).
    """
    n_tasks, n_tensors = w.shape
    if base_flat.dim() != 1 or tau_flat.shape != (n_tasks, base_flat.numel()):
        raise ValueError(
            f"expected base_flat [N], tau_flat [k, N] with k = w.shape[0] = {n_tasks}; got "
            f"{tuple(base_flat.shape)}, {tuple(tau_flat.shape)}"
        )
    if offsets.shape != (n_tensors + 1,) or offsets.dtype != torch.int64:
        raise ValueError(f"offsets must be int64 [T + 1] = [{n_tensors + 1}], got {offsets}")
    if select_impl(impl, base_flat.device) == "torch":
        if base_flat.requires_grad or tau_flat.requires_grad:  # the reference differentiates all
            return grouped_weighted_sum_reference(base_flat, tau_flat, w, offsets)
        return grouped_weighted_sum_torch(base_flat, tau_flat, w, offsets)
    return _triton_grouped(base_flat, tau_flat, w, offsets)


def weighted_sum(base: Tensor, taus: Tensor, w: Tensor, impl: str = "auto") -> Tensor:
    """``base + sum_i tanh(w_i) * taus[i]`` for one parameter tensor.

    Args:
        base: ``[*shape]`` base parameter, float32 / bfloat16 / float16.
        taus: ``[k, *shape]`` task vectors (expert - base).
        w: ``[k]`` raw (pre-tanh) coefficients, float32; may require grad.
        impl: ``"auto"`` | ``"torch"`` | ``"triton"``, see :func:`select_impl`.

    Returns:
        ``[*shape]`` merged parameter in ``base.dtype`` (float32 accumulation), differentiable
        w.r.t. ``w``.
    """
    check_weighted_sum_shapes(base, taus, w)
    if select_impl(impl, base.device) == "torch":
        return weighted_sum_reference(base, taus, w)
    offsets = (0, base.numel())
    out = _triton_grouped(base.reshape(-1), taus.reshape(len(w), -1), w.reshape(-1, 1), offsets)
    return out.view(base.shape)
