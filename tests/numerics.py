"""Kernel-test helpers: flat-buffer offsets, and the w-gradient of a grouped weighted sum checked
against float64 with a rounding-aware bound.

dw[i, t] = sech(w[i, t])^2 * sum_{n in t} g[n] tau[i, n] is a dot product: with random signs it
cancels, so ||dw - ref|| / ||ref|| has no fixed bound (one task, a saturated w, a short tensor:
the CI run of 2026-11-30 failed twice that way). Float32 accumulation errs by at most a few
ulps of sech^2 * sum |g| |tau| per entry, so each entry is checked against that scale instead.
"""

import torch
from torch import Tensor

from supermerge.kernels import grouped_weighted_sum_reference

# float32 accumulation in blocks (Triton) or blocked BLAS (torch.mv): measured <= 2.5e-7 of the
# scale in 2400 random draws (both impls, three dtypes, w ~ 3 N(0, 1), tensors up to 3000);
# a wrong tensor, task or slope errs by ~1/sqrt(n) of the scale or more.
ACCUMULATION_TOL = 2.0**-18


def offsets_of(sizes: list[int]) -> Tensor:
    """[T + 1] int64 offsets of tensors of `sizes` elements stored back to back."""
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int64)


def w_gradient_reference(
    base: Tensor, tau: Tensor, w: Tensor, offsets: Tensor, grad_out: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Float64 forward [N], exact dw [k, T] and its rounding scale sech^2 * sum |g| |tau| [k, T].

    grad_out is taken as given, in its own dtype: the gradient that reaches a kernel through an
    output in bfloat16 is already rounded to bfloat16, and the oracle sees the same values.
    """
    out, dw = _reference(base.double(), tau.double(), w, offsets, grad_out.double())
    _, scale = _reference(base.double(), tau.double().abs(), w, offsets, grad_out.double().abs())
    return out, dw, scale


def _reference(base: Tensor, tau: Tensor, w: Tensor, offsets: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    w64 = w.detach().double().requires_grad_(True)
    out = grouped_weighted_sum_reference(base, tau, w64, offsets)
    (dw,) = torch.autograd.grad(out, w64, g)
    return out.detach(), dw


def assert_w_gradient_close(dw: Tensor, ref: Tensor, scale: Tensor) -> None:
    """Every entry within ACCUMULATION_TOL of its scale; names the worst entry otherwise."""
    assert not dw.isnan().any(), "dw has NaN entries (unwritten poison?)"
    err = (dw.double().cpu() - ref.cpu()).abs()
    bound = ACCUMULATION_TOL * scale.cpu()
    if not (err <= bound).all():
        worst = int((err - bound).argmax())
        i, t = divmod(worst, dw.shape[-1]) if dw.dim() == 2 else (worst, 0)
        raise AssertionError(
            f"dw[{i}, {t}] = {dw.flatten()[worst].item():.9g}, float64 {ref.flatten()[worst].item():.9g}: "
            f"error {err.flatten()[worst].item():.3g} > bound {bound.flatten()[worst].item():.3g} "
            f"(= {ACCUMULATION_TOL:.3g} x sech^2 * sum |g| |tau|)"
        )
