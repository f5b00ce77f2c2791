"""Sparsification of task vectors: magnitude trimming (TIES) and random drop (DARE).

Definitions follow mergekit 0.1.5 (`mergekit/sparsify.py`) so results compare tensor for tensor:
- magnitude: keep the max(1, int(density * numel)) largest |tau|;
- random: keep each element with probability `density` (Bernoulli), from a seeded generator;
- rescale after dropping: "l1" rescales the kept values so the L1 norm equals the original's
  (mergekit's `rescale: true`), "inverse_density" divides by density (the DARE paper's 1/(1-p)),
  "none" keeps them as they are.
"""

from __future__ import annotations

from enum import Enum

import torch


class Rescale(str, Enum):
    NONE = "none"
    L1 = "l1"
    INVERSE_DENSITY = "inverse_density"


def rescale_masked(
    tau: torch.Tensor, mask: torch.Tensor, rescale: Rescale, density: float, eps: float = 1e-7
) -> torch.Tensor:
    """tau * mask, rescaled as `rescale` says (see module docstring)."""
    masked = tau * mask
    if rescale is Rescale.L1:
        before, after = tau.abs().sum(), masked.abs().sum()
        if before < eps or after < eps:
            return masked
        return masked * (before / after)
    if rescale is Rescale.INVERSE_DENSITY:
        return masked / density
    return masked


def magnitude_trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the largest-magnitude fraction `density` of `tau`, zero the rest (TIES trim).

    Args:
        tau: task vector, any shape, fp32.
        density: fraction kept, in (0, 1].
    """
    if density >= 1:
        return tau
    if tau.numel() == 0:
        return tau.clone()
    keep = max(1, int(density * tau.numel()))
    mask = torch.zeros(tau.numel(), dtype=torch.bool, device=tau.device)
    mask[torch.argsort(tau.abs().reshape(-1), descending=True)[:keep]] = True
    return tau * mask.reshape_as(tau)


def random_drop(tau: torch.Tensor, density: float, rescale: Rescale, seed: int) -> torch.Tensor:
    """Drop each element of `tau` with probability 1 - density, then rescale (DARE).

    Args:
        tau: task vector, any shape, fp32, on CPU or GPU.
        density: keep probability, in (0, 1].
        rescale: how to compensate for the dropped mass.
        seed: seeds a generator on tau's device; the same seed gives the same mask.
    """
    if density >= 1:
        return tau
    generator = torch.Generator(device=tau.device).manual_seed(seed)
    mask = torch.bernoulli(torch.full_like(tau, density), generator=generator)
    return rescale_masked(tau, mask, rescale, density)
