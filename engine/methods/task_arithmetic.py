"""Weight averaging, task arithmetic, TIES, DARE and DARE-TIES.

All but averaging are instances of mergekit's "generalized task arithmetic": sparsify each
task vector, weight it, optionally keep only entries that agree with the elected sign, sum,
optionally divide by the summed weights of the kept entries, scale by lambda, add to base.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from supermerge.methods.base import MergeMethod, tensor_seed
from supermerge.methods.sparsify import Rescale, magnitude_trim, random_drop


def _check_density(density: float) -> None:
    if not 0 < density <= 1:
        raise ValueError(f"density: must be in (0, 1], got {density}")


class Average(MergeMethod):
    """Weight averaging: sum_i w_i expert_i / sum_i w_i (mergekit `linear`, normalize on)."""

    name = "average"

    @dataclass(frozen=True)
    class Params:
        weight: float = 1.0

    def merge(self, name: str, base: torch.Tensor, taus: Sequence[torch.Tensor]) -> torch.Tensor:
        total = sum(e.weight for e in self.experts)
        if abs(total) < 1e-8:
            raise ValueError("average: expert weights sum to zero")
        mixed = torch.zeros_like(base)
        for expert, tau in zip(self.experts, taus, strict=True):
            mixed.add_(tau, alpha=expert.weight / total)
        return mixed.add_(base)


class GeneralizedTaskArithmetic(MergeMethod):
    """Sparsify, weight, (elect sign), sum, (normalise), scale by lambda; see module docstring."""

    per_expert = ("weight", "density")
    sparsify: str | None = None  # "magnitude" | "random" | None
    sign_consensus: bool = False

    def _sparsified(self, name: str, tau: torch.Tensor, index: int) -> torch.Tensor:
        expert = self.experts[index]
        if self.sparsify == "magnitude":
            return magnitude_trim(tau, expert.density)
        if self.sparsify == "random":
            seed = tensor_seed(self.seed, expert.name, name)
            return random_drop(tau, expert.density, Rescale(self.params.rescale), seed)
        return tau

    def merge(self, name: str, base: torch.Tensor, taus: Sequence[torch.Tensor]) -> torch.Tensor:
        """See MergeMethod.merge; `taus` are modified in place (the caller reads them fresh).

        Memory: besides base and the k task vectors, one accumulator, and for TIES a sign mask
        and the divisor; nothing of size k x numel is stacked.
        """
        weighted = [
            self._sparsified(name, tau, i).mul_(e.weight)
            for i, (e, tau) in enumerate(zip(self.experts, taus, strict=True))
        ]
        mixed = torch.zeros_like(base)
        for delta in weighted:
            mixed.add_(delta)
        if self.sign_consensus:
            positive = mixed >= 0  # the elected sign: that of the summed weighted deltas
            mixed.zero_()
            divisor = torch.zeros_like(base)
            for e, delta in zip(self.experts, weighted, strict=True):
                agree = torch.where(positive, delta > 0, delta < 0)  # zeros never agree
                mixed.add_(delta.mul_(agree))
                divisor.add_(agree.to(base.dtype), alpha=e.weight)
            divisor.masked_fill_(divisor == 0, 1)
        else:
            total = sum(e.weight for e in self.experts)
            divisor = 1.0 if abs(total) < 1e-8 else total
        if self.params.normalize:
            mixed.div_(divisor)
        if self.params.lam != 1:
            mixed.mul_(self.params.lam)
        return mixed.add_(base)


def _rescale_value(value: object) -> str:
    """Accept mergekit's boolean `rescale` as well as the explicit names."""
    if value is True:
        return Rescale.L1.value
    if value is False:
        return Rescale.NONE.value
    names = [r.value for r in Rescale]
    if value not in names:
        raise ValueError(f"rescale: must be true, false or one of {names}, got {value!r}")
    return str(value)


class TaskArithmetic(GeneralizedTaskArithmetic):
    """base + lambda * sum_i w_i tau_i."""

    name = "task_arithmetic"
    per_expert = ("weight",)

    @dataclass(frozen=True)
    class Params:
        lam: float = 1.0
        weight: float = 1.0
        normalize: bool = False


class Ties(GeneralizedTaskArithmetic):
    """TIES-merging: trim to `density` by magnitude, elect sign, disjoint mean, scale by lambda."""

    name = "ties"
    sparsify = "magnitude"
    sign_consensus = True

    @dataclass(frozen=True)
    class Params:
        density: float = 1.0
        lam: float = 1.0
        weight: float = 1.0
        normalize: bool = True

        def __post_init__(self) -> None:
            _check_density(self.density)


@dataclass(frozen=True)
class DareParams:
    """DARE parameters: keep probability `density` (drop rate = 1 - density), rescale mode."""

    density: float = 1.0
    lam: float = 1.0
    weight: float = 1.0
    normalize: bool = False
    rescale: str | bool = "l1"

    def __post_init__(self) -> None:
        _check_density(self.density)
        object.__setattr__(self, "rescale", _rescale_value(self.rescale))


class DareLinear(GeneralizedTaskArithmetic):
    """DARE: random drop with keep probability `density`, rescale, weighted sum, lambda."""

    name = "dare_linear"
    sparsify = "random"
    Params = DareParams


class DareTies(GeneralizedTaskArithmetic):
    """DARE-TIES: DARE's random drop and rescale, then TIES' sign election."""

    name = "dare_ties"
    sparsify = "random"
    sign_consensus = True
    Params = DareParams
