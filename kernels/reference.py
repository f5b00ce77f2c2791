"""Pure-torch reference of the tanh-weighted sum of task vectors.

The test oracle. Without Triton, `weighted_sum` runs it, and so does `grouped_weighted_sum` when
base or tau need a gradient (otherwise it runs `torch_grouped`). Autograd through these functions
gives the gradient with respect to every input; the fused path only differentiates ``w``.
"""

import functools

import torch
from torch import Tensor


def _accumulation_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 when any input is float64 (gradcheck, float64 oracles)."""
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)


def check_weighted_sum_shapes(base: Tensor, taus: Tensor, w: Tensor) -> None:
    """Raise ValueError unless base is [*s], taus [k, *s] and w [k]."""
    if taus.shape[1:] != base.shape or w.shape != taus.shape[:1]:
        raise ValueError(
            f"expected base [*s], taus [k, *s], w [k]; got {tuple(base.shape)}, "
            f"{tuple(taus.shape)}, {tuple(w.shape)}"
        )


def weighted_sum_reference(base: Tensor, taus: Tensor, w: Tensor) -> Tensor:
    """``base + sum_i tanh(w_i) * taus[i]`` accumulated in float32 (float64 if any input is).

    Args:
        base: ``[*shape]`` base parameter, float32 / bfloat16 / float16 (or float64).
        taus: ``[k, *shape]`` task vectors (expert - base), any floating dtype.
        w: ``[k]`` raw (pre-tanh) merge coefficients, dimensionless.

    Returns:
        ``[*shape]`` merged parameter in ``base.dtype``.
    """
    check_weighted_sum_shapes(base, taus, w)
    acc = _accumulation_dtype(base, taus, w)
    delta = torch.tensordot(torch.tanh(w.to(acc)), taus.to(acc), dims=1)
    return (base.to(acc) + delta).to(base.dtype)


def grouped_weighted_sum_reference(base_flat: Tensor, tau_flat: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """Weighted sum over T tensors stored back to back in flat buffers.

    Tensor ``t`` occupies elements ``offsets[t]:offsets[t + 1]`` and uses coefficient column
    ``w[:, t]``: ``out[n] = base_flat[n] + sum_i tanh(w[i, t]) * tau_flat[i, n]``.

    Args:
        base_flat: ``[N]`` concatenated base parameters, float32 / bfloat16 / float16.
        tau_flat: ``[k, N]`` concatenated task vectors, row ``i`` is task ``i``.
        w: ``[k, T]`` raw (pre-tanh) coefficients, one column per tensor.
        offsets: ``[T + 1]`` int64 element offsets, ``offsets[0] == 0``, ``offsets[-1] == N``.

    Returns:
        ``[N]`` merged parameters in ``base_flat.dtype``.
    """
    n_tasks, n_tensors = w.shape
    if tau_flat.shape != (n_tasks, base_flat.numel()) or offsets.shape != (n_tensors + 1,):
        raise ValueError(
            f"expected base_flat [N], tau_flat [k, N], w [k, T], offsets [T+1]; got "
            f"{tuple(base_flat.shape)}, {tuple(tau_flat.shape)}, {tuple(w.shape)}, "
            f"{tuple(offsets.shape)}"
        )
    acc = _accumulation_dtype(base_flat, tau_flat, w)
    sizes = torch.diff(offsets.to(device=base_flat.device, dtype=torch.int64))
    tensor_of_element = torch.repeat_interleave(
        torch.arange(n_tensors, device=base_flat.device), sizes, output_size=base_flat.numel()
    )
    coef = torch.tanh(w.to(acc))[:, tensor_of_element]
    return (base_flat.to(acc) + (coef * tau_flat.to(acc)).sum(0)).to(base_flat.dtype)
