"""Weight averaging, and mergekit's "generalized task arithmetic" family: task arithmetic, TIES,
DARE, DARE-TIES, Model Breadcrumbs (+TIES), DELLA (+linear); and SCE.

Generalized task arithmetic (mergekit `generalized_task_arithmetic.py`, whose parameter names and
defaults each method keeps): sparsify each task vector (sparsify.py), weight it, optionally keep
only entries that agree with the elected sign (that of the sum of the weighted task vectors), sum,
optionally divide by the summed weights of the kept entries (all weights without sign election),
scale by lambda, add to base.

`int8_mask` is accepted where mergekit takes it and changes nothing: it sets the dtype of
mergekit's masks, which are bool here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from supermerge.methods.base import MergeMethod, tensor_seed
from supermerge.methods.sparsify import (
    Rescale,
    magnitude_outliers_trim,
    magnitude_ranked_drop,
    magnitude_trim,
    random_drop,
    variance_topk_mask,
)

SLICE = 1 << 20  # elements combined at a time across the experts (bounds the temporaries)


def _check_density(density: float) -> None:
    if not 0 < density <= 1:
        raise ValueError(f"density: must be in (0, 1], got {density}")


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


class Average(MergeMethod):
    """Weight averaging (mergekit `linear`): sum_i w_i expert_i / sum_i w_i (no division if not normalize)."""

    name = "average"

    @dataclass(frozen=True)
    class Params:
        weight: float = 1.0
        normalize: bool = True

    def merge(self, name: str, base: torch.Tensor, taus: Sequence[torch.Tensor]) -> torch.Tensor:
        """See MergeMethod.merge; the sum is made in the first task vector's memory."""
        weights = [e.weight for e in self.experts]
        total = sum(weights)
        if self.params.normalize:  # sum_i w_i / W tau_i + base
            if abs(total) < 1e-8:
                raise ValueError("average: expert weights sum to zero")
            weights, base_weight = [w / total for w in weights], 1.0
        else:  # sum_i w_i (base + tau_i)
            base_weight = total
        mixed = taus[0].mul_(weights[0])
        for weight, tau in zip(weights[1:], taus[1:], strict=True):
            mixed.add_(tau, alpha=weight)
        return mixed.add_(base, alpha=base_weight)


class GeneralizedTaskArithmetic(MergeMethod):
    """Sparsify, weight, (elect sign), sum, (normalise), scale by lambda; see module docstring.

    Subclasses set `sign_consensus` and sparsify in `_sparsified`. Computes in its inputs' dtype
    as mergekit does (`computes_in_dtype`): the weights are held in that dtype, every sum over the
    experts accumulates in fp32 and is rounded once (torch's sum over a stacked dim), every other
    operation rounds as mergekit's does; in fp32 this is plain fp32 arithmetic.
    """

    per_expert = ("weight", "density")
    sign_consensus: ClassVar[bool] = False
    computes_in_dtype = True

    def _sparsified(self, name: str, tau: torch.Tensor, index: int) -> torch.Tensor:
        """Expert `index`'s task vector for tensor `name`, sparsified (tau itself, possibly
        modified in place, or a new tensor)."""
        return tau

    def merge(self, name: str, base: torch.Tensor, taus: Sequence[torch.Tensor]) -> torch.Tensor:
        """See MergeMethod.merge; the merged tensor is made in `base`'s memory.

        Memory: besides base and the k task vectors, temporaries of SLICE elements (the sum,
        sign, agreement and divisor are computed slice by slice); nothing of size k x numel.
        Each expert's sparsification holds its own temporaries first (magnitude trims:
        sparsify.keep_sorted_range_, about one task vector).
        """
        weights = torch.tensor([e.weight for e in self.experts], dtype=base.dtype).tolist()
        weighted = [
            self._sparsified(name, tau, i).mul_(weight).reshape(-1)
            for i, (weight, tau) in enumerate(zip(weights, taus, strict=True))
        ]
        flat = base.view(-1)  # the merged tensor is made in base's memory, slice by slice
        for start in range(0, base.numel(), SLICE):
            end = min(start + SLICE, base.numel())
            flat[start:end].add_(self._combine([delta[start:end] for delta in weighted], weights))
        return base

    def _combine(self, deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
        """lambda * the (sign-elected, normalised) sum of one slice of the weighted deltas, in
        their dtype; `weights` are the experts' weights, held in that dtype."""
        dtype = deltas[0].dtype
        total = torch.zeros(deltas[0].shape, dtype=torch.float32, device=deltas[0].device)
        for delta in deltas:
            total.add_(delta)
        if self.sign_consensus:
            positive = total >= 0  # the elected sign: that of the summed weighted deltas
            total.zero_()
            divisor = torch.zeros_like(total)
            for weight, delta in zip(weights, deltas, strict=True):
                agree = torch.where(positive, delta > 0, delta < 0)  # zeros never agree
                total.add_(delta.mul_(agree))
                divisor.add_(agree, alpha=weight)
            divisor = divisor.to(dtype)
            divisor.masked_fill_(divisor == 0, 1)
        else:
            divisor = torch.tensor(weights, dtype=dtype).sum().item()
            divisor = 1.0 if abs(divisor) < 1e-8 else divisor
        mixed = total.to(dtype)
        if self.params.normalize:
            mixed.div_(divisor)
        if self.params.lam != 1:
            mixed.mul_(self.params.lam)
        return mixed


class TaskArithmetic(GeneralizedTaskArithmetic):
    """base + lambda * sum_i w_i tau_i."""

    name = "task_arithmetic"
    per_expert = ("weight",)

    @dataclass(frozen=True)
    class Params:
        lam: float = 1.0
        weight: float = 1.0
        normalize: bool = False
        int8_mask: bool = False


@dataclass(frozen=True)
class TiesParams:
    """TIES: keep the `density` fraction of largest |tau|, optionally rescaled to its L1 norm."""

    density: float = 1.0
    lam: float = 1.0
    weight: float = 1.0
    normalize: bool = True
    rescale: str | bool = "none"
    int8_mask: bool = False

    def __post_init__(self) -> None:
        _check_density(self.density)
        object.__setattr__(self, "rescale", _rescale_value(self.rescale))


class Ties(GeneralizedTaskArithmetic):
    """TIES-merging: trim to `density` by magnitude, elect sign, disjoint mean, scale by lambda.

    The trim keeps exactly mergekit's entries, ties of magnitude included (sparsify.py).
    """

    name = "ties"
    sign_consensus = True
    Params = TiesParams

    def _sparsified(self, name: str, tau: torch.Tensor, index: int) -> torch.Tensor:
        return magnitude_trim(tau, self.experts[index].density, Rescale(self.params.rescale))


@dataclass(frozen=True)
class DareParams:
    """DARE parameters: keep probability `density` (drop rate = 1 - density), rescale mode."""

    density: float = 1.0
    lam: float = 1.0
    weight: float = 1.0
    normalize: bool = False
    rescale: str | bool = "l1"
    int8_mask: bool = False

    def __post_init__(self) -> None:
        _check_density(self.density)
        object.__setattr__(self, "rescale", _rescale_value(self.rescale))


class _Dare(GeneralizedTaskArithmetic):
    """Random drop with keep probability `density`, seeded per (seed, expert, tensor)."""

    Params = DareParams

    def _sparsified(self, name: str, tau: torch.Tensor, index: int) -> torch.Tensor:
        expert = self.experts[index]
        seed = tensor_seed(self.seed, expert.name, name)
        return random_drop(tau, expert.density, Rescale(self.params.rescale), seed)


class DareLinear(_Dare):
    """DARE: random drop with keep probability `density`, rescale, weighted sum, lambda."""

    name = "dare_linear"


class DareTies(_Dare):
    """DARE-TIES: DARE's random drop and rescale, then TIES' sign election."""

    name = "dare_ties"
    sign_consensus = True


@dataclass(frozen=True)
class BreadcrumbsParams:
    """Model Breadcrumbs: drop the `gamma` fraction of largest |tau| (outliers) and keep the
    `density` fraction below them (mergekit's defaults: gamma 0.01, no normalisation or
    rescale)."""

    density: float = 1.0
    gamma: float = 0.01
    lam: float = 1.0
    weight: float = 1.0
    normalize: bool = False
    rescale: str | bool = "none"
    int8_mask: bool = False

    def __post_init__(self) -> None:
        _check_density(self.density)
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma: must be in [0, 1], got {self.gamma}")
        object.__setattr__(self, "rescale", _rescale_value(self.rescale))


class _Breadcrumbs(GeneralizedTaskArithmetic):
    """Magnitude trim of both ends (sparsify.magnitude_outliers_trim), exact as TIES' is."""

    Params = BreadcrumbsParams
    per_expert = ("weight", "density", "gamma")

    def _sparsified(self, name: str, tau: torch.Tensor, index: int) -> torch.Tensor:
        expert, p = self.experts[index], self.params
        return magnitude_outliers_trim(tau, expert.density, expert.gamma, Rescale(p.rescale))


class Breadcrumbs(_Breadcrumbs):
    """Model Breadcrumbs: outlier and small-magnitude trim, weighted sum, lambda."""

    name = "breadcrumbs"


class BreadcrumbsTies(_Breadcrumbs):
    """Model Breadcrumbs' trim with TIES' sign election."""

    name = "breadcrumbs_ties"
    sign_consensus = True


@dataclass(frozen=True)
class DellaParams:
    """DELLA: keep each entry with a probability in [density - epsilon, density + epsilon] rising
    with its magnitude rank (MagPrune), rescaled; density +- epsilon must lie in (0, 1) when
    density < 1 (mergekit's rule)."""

    density: float = 1.0
    epsilon: float = 0.15
    lam: float = 1.0
    weight: float = 1.0
    normalize: bool = True
    rescale: str | bool = "l1"
    int8_mask: bool = False

    def __post_init__(self) -> None:
        _check_density(self.density)
        if self.density < 1 and not 0 < self.density - self.epsilon < self.density + self.epsilon < 1:
            raise ValueError(
                f"epsilon: density +- epsilon must lie in (0, 1), got density {self.density}, "
                f"epsilon {self.epsilon}"
            )
        object.__setattr__(self, "rescale", _rescale_value(self.rescale))


@dataclass(frozen=True)
class DellaLinearParams(DellaParams):
    """DELLA without sign election: mergekit does not normalise it by default."""

    normalize: bool = False


class _Della(GeneralizedTaskArithmetic):
    """MagPrune (sparsify.magnitude_ranked_drop), seeded per (seed, expert, tensor) as DARE."""

    per_expert = ("weight", "density", "epsilon")

    def _sparsified(self, name: str, tau: torch.Tensor, index: int) -> torch.Tensor:
        expert, p = self.experts[index], self.params
        seed = tensor_seed(self.seed, expert.name, name)
        return magnitude_ranked_drop(tau, expert.density, expert.epsilon, Rescale(p.rescale), seed)


class Della(_Della):
    """DELLA: MagPrune, rescale, TIES' sign election, normalised weighted sum, lambda."""

    name = "della"
    sign_consensus = True
    Params = DellaParams


class DellaLinear(_Della):
    """DELLA's MagPrune and rescale, then a weighted sum and lambda."""

    name = "della_linear"
    Params = DellaLinearParams


class Sce(MergeMethod):
    """SCE (mergekit `sce`): select, calculate, erase, merge.

    Select: keep the `select_topk` fraction of elements where the task vectors vary most
    (sparsify.variance_topk_mask). Calculate: expert i's weight is the mean square of its
    (selected) task vector over the sum of those (1/k each when that sum is below 1e-6). Erase:
    keep the entries that agree with the elected sign. Merge: base + sum_i w_i tau_i / sum_i w_i
    over the kept entries (the divisor clamped to at least 1e-6). No per-expert parameters.
    """

    name = "sce"
    per_expert = ()

    @dataclass(frozen=True)
    class Params:
        select_topk: float = 1.0
        int8_mask: bool = False

        def __post_init__(self) -> None:
            if not 0 < self.select_topk <= 1:
                raise ValueError(f"select_topk: must be in (0, 1], got {self.select_topk}")

    def merge(self, name: str, base: torch.Tensor, taus: Sequence[torch.Tensor]) -> torch.Tensor:
        """See MergeMethod.merge; `taus` are modified in place. Memory: with select_topk < 1, the
        k x numel stack torch.var needs (as in mergekit), then two buffers of base's size."""
        mask = variance_topk_mask(list(taus), self.params.select_topk)
        if mask is not None:
            for tau in taus:
                tau.mul_(mask)
        mixed = torch.zeros_like(base)
        for tau in taus:
            mixed.add_(tau)
        positive = mixed >= 0
        weights = torch.stack([tau.square().mean() for tau in taus])
        weight_sum = weights.sum().item()
        weights = torch.full_like(weights, 1 / len(taus)) if abs(weight_sum) < 1e-6 else weights / weight_sum
        mixed.zero_()
        divisor = torch.zeros_like(base)
        for weight, tau in zip(weights.tolist(), taus, strict=True):
            agree = torch.where(positive, tau > 0, tau < 0)
            mixed.add_(tau.mul_(agree), alpha=weight)
            divisor.add_(agree.to(base.dtype), alpha=weight)
        return mixed.div_(divisor.clamp_(min=1e-6)).add_(base)
