"""Interpolation on the sphere: slerp, nuslerp, multislerp, karcher, model_stock.

Definitions follow mergekit 0.1.5 (`mergekit/merge_methods/{slerp,nuslerp,multislerp,karcher,
model_stock}.py`), with its parameter names, defaults and fallbacks, so results compare tensor
for tensor. These methods act on the models themselves, or on task vectors when the base is a
real base model: each reconstructs expert_i = base + tau_i in place in its task-vector buffer
(the caller reads the task vectors fresh for every tensor), so besides base and the k task
vectors a method holds at most four buffers of the tensor's size (karcher), nothing k x numel.

`use_base` (nuslerp, multislerp, karcher) says whether the base is a real base model, as when a
mergekit config names a `base_model`. When it is false the base only carries the tensors (a
mergekit config without `base_model` is read with its first model as the base and also as an
expert whose task vector is zero) and takes no part in the merge:
- nuslerp, multislerp: true interpolates the task vectors and adds the result to the base;
  false interpolates the experts' weights themselves;
- karcher: true counts the base as one more model to average (after the experts); false
  averages the experts only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from supermerge.errors import ConfigError
from supermerge.methods.base import ExpertParams, MergeMethod


def _models(base: torch.Tensor, taus: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The experts' weights, base + tau_i, written into the task vectors' buffers."""
    return [tau.add_(base) for tau in taus]


def _norm(x: torch.Tensor, **kwargs) -> torch.Tensor:
    return torch.linalg.vector_norm(x, **kwargs)


def slerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> torch.Tensor:
    """Spherical interpolation from v0 (t = 0) to v1 (t = 1), each tensor flattened to one vector.

    Nearly colinear or antipodal pairs (|cos| > dot_threshold) are interpolated linearly. The
    norms are those of the raw tensors (taken as 1 when below eps), as in mergekit's `slerp`.

    Args:
        t: interpolation factor (unitless; outside [0, 1] extrapolates).
        v0, v1: tensors of one shape; v1 is overwritten with the result.
    Returns:
        v1, holding coef0 * v0 + coef1 * v1, shaped like v0.
    """
    a, b = v0.reshape(-1), v1.reshape(-1)
    norm_a, norm_b = _norm(a), _norm(b)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = (torch.dot(a, b) / (norm_a * norm_b)).clamp(-1, 1)
    if dot.abs() > dot_threshold:
        coef_a, coef_b = 1 - t, t
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        coef_a = (torch.sin((1 - t) * theta) / sin_theta).item()
        coef_b = (torch.sin(t * theta) / sin_theta).item()
    return v1.mul_(coef_b).add_(v0, alpha=coef_a)


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int | None, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of the vectors of v0 and v1 along `dim` (None: each tensor whole).

    Vectors with 1 - cos^2 <= eps^2 are interpolated linearly, as in mergekit's `nuslerp`.

    Args:
        t: interpolation factor from v0 (0) to v1 (1).
        v0, v1: tensors of one shape; both are overwritten, v0 with the result.
        dim: the axis the vectors lie along (0: columns of a matrix, -1: rows), or None.
    Returns:
        v0, holding the interpolation, shaped like v0.
    """
    a, b = (v0.reshape(-1), v1.reshape(-1)) if dim is None else (v0, v1)
    dim = -1 if dim is None else dim
    norm_a = _norm(a, dim=dim, keepdim=True).clamp(min=1e-7)
    norm_b = _norm(b, dim=dim, keepdim=True).clamp(min=1e-7)
    cos_theta = (torch.linalg.vecdot(a, b, dim=dim).unsqueeze(dim) / (norm_a * norm_b)).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.where(colinear, 1, torch.sin(theta))
    coef_a = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)
    return a.mul_(coef_a).add_(b.mul_(coef_b)).reshape(v0.shape)


def karcher_mean(points: Sequence[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """Equal-weight Karcher mean on the unit sphere, scaled by the points' mean norm.

    As mergekit's `karcher_merge_tensors` with alphas 1/n: points of norm <= tol take no part in
    the direction (all of them: zeros); the direction starts at the normalised mean of the unit
    vectors and takes up to max_iter Riemannian gradient steps, skipping points closer than tol
    radians, stopping once the step is shorter than tol.

    Args:
        points: n tensors of one shape, each tensor one vector; overwritten with their unit
            vectors.
        max_iter: most gradient steps.
        tol: norm, angle (radians) and step length below which a quantity counts as zero (> 0).
    Returns:
        mean(norms) * direction, shaped like the points (points[0] itself when n = 1).
    """
    if len(points) == 1:
        return points[0]
    norms = [_norm(p) for p in points]
    units = [p.div_(n).reshape(-1) for p, n in zip(points, norms, strict=True) if n > tol]
    if not units:
        return torch.zeros_like(points[0])
    alpha = 1 / len(units)
    mean, tangent, scratch = (torch.zeros_like(units[0]) for _ in range(3))
    for unit in units:
        mean.add_(torch.mul(unit, alpha, out=scratch))  # rounded before the sum, as mergekit's
    mean_norm = _norm(mean)
    mean = units[0].clone() if mean_norm < tol else mean.div_(mean_norm)
    for _ in range(max_iter):
        tangent.zero_()
        for unit in units:
            dot = torch.dot(mean, unit).clamp(-1, 1)
            theta = torch.acos(dot)
            if theta < tol:
                continue
            # unit - dot * mean first, as mergekit does: near-antipodal points multiply it by a
            # large theta / sin(theta)
            torch.sub(unit, mean, alpha=dot.item(), out=scratch)
            tangent.add_(scratch, alpha=(alpha * theta / torch.sin(theta)).item())
        tangent_norm = _norm(tangent)
        if tangent_norm < tol:
            break
        mean.mul_(torch.cos(tangent_norm).item()).add_(
            tangent, alpha=(torch.sin(tangent_norm) / tangent_norm).item()
        )
        unit_norm = _norm(mean)
        if unit_norm > tol:
            mean.div_(unit_norm)
    return mean.mul_((sum(norms) / len(points)).item()).reshape(points[0].shape)


class _Geometric(MergeMethod):
    """Checks the expert count, and that every expert has a weight where weights are required
    (when the method is built for a tensor, after its parameter values are resolved)."""

    min_experts: ClassVar[int] = 1
    max_experts: ClassVar[int | None] = None

    def __init__(self, params: Any, experts: Sequence[ExpertParams], seed: int = 0) -> None:
        super().__init__(params, experts, seed)
        k, low, high = len(self.experts), self.min_experts, self.max_experts
        if k < low or (high is not None and k > high):
            count = f"exactly {low}" if low == high else f"at least {low}"
            raise ConfigError("experts", f"{self.name} merges {count} expert(s) with the base, got {k}")
        if "weight" in self.per_expert:
            for i, e in enumerate(self.experts):
                if e.weight is None:
                    raise ConfigError(
                        f"experts[{i}].weight",
                        f"{self.name} needs a weight for every expert (method.weight or this)",
                    )

    @property
    def weights(self) -> list[float]:
        return [e.weight for e in self.experts]


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name}: must be positive, got {value}")


class Slerp(_Geometric):
    """Spherical interpolation from the base (t = 0) to the one expert (t = 1), mergekit `slerp`.

    Each tensor is one vector; nearly colinear pairs (|cos| > 0.9995) are interpolated linearly.
    """

    name = "slerp"
    per_expert = ()
    min_experts = max_experts = 1

    @dataclass(frozen=True)
    class Params:
        t: float | None = None

    def __init__(self, params: Any, experts: Sequence[ExpertParams], seed: int = 0) -> None:
        super().__init__(params, experts, seed)
        # checked here, not in Params: a tensor's t may come from a scope other than the method
        # block (a slice's parameters), and mergekit asks for it per tensor too
        if self.params.t is None:
            raise ConfigError(
                "method.t", "slerp needs t, the interpolation factor from the base (0) to the expert (1)"
            )

    def merge(self, name: str, base: torch.Tensor, taus: Sequence[torch.Tensor]) -> torch.Tensor:
        return slerp(self.params.t, base, *_models(base, taus))


class Nuslerp(_Geometric):
    """Spherical interpolation of two experts with t = w_2 / (w_1 + w_2), mergekit `nuslerp`.

    Params:
        weight: per expert (required, no default, as in mergekit); t = 0.5 when the weights sum
            to (nearly) zero.
        nuslerp_flatten: each tensor as one vector (takes precedence over row_wise).
        nuslerp_row_wise: otherwise, the vectors lie along dim 0 (true) or the last dim (false).
        use_base: interpolate the task vectors and add them to the base (true), or the experts'
            weights (false); see the module docstring.
    """

    name = "nuslerp"
    min_experts = max_experts = 2

    @dataclass(frozen=True)
    class Params:
        weight: float | None = None
        nuslerp_flatten: bool = True
        nuslerp_row_wise: bool = False
        use_base: bool = True

    def merge(self, name: str, base: torch.Tensor, taus: Sequence[torch.Tensor]) -> torch.Tensor:
        p = self.params
        w0, w1 = self.weights
        total = w0 + w1
        t = 0.5 if abs(total) < 1e-6 else w1 / total
        dim = None if p.nuslerp_flatten else (0 if p.nuslerp_row_wise else -1)
        if p.use_base:
            return nuslerp(t, *taus, dim).add_(base)
        return nuslerp(t, *_models(base, taus), dim)


class Multislerp(_Geometric):
    """Weighted interpolation of k experts on the hypersphere, mergekit `multislerp`.

    The direction is the normalised weighted mean of the unit vectors (each tensor one vector),
    the norm the weighted mean of the norms. mergekit then maps the weighted sum of the tangent
    vectors at that direction back to the sphere; that sum is zero in exact arithmetic
    (sum_i w_i (u_i - (u_i . m) m) = M - |M| m with M = sum_i w_i u_i, m = M / |M|), so the map
    is the identity and is left out. One expert: that expert. Two experts whose weighted
    directions cancel: their weighted sum (mergekit's fallback); more: an error.

    Params:
        weight: per expert (required, no default, as in mergekit).
        normalize_weights: divide the weights by their sum.
        eps: added to each norm before dividing; a mean direction shorter than eps is zero.
        use_base: interpolate the task vectors and add them to the base (true), or the experts'
            weights (false); see the module docstring.
    """

    name = "multislerp"

    @dataclass(frozen=True)
    class Params:
        weight: float | None = None
        normalize_weights: bool = True
        eps: float = 1e-8
        use_base: bool = True

        def __post_init__(self) -> None:
            _check_positive("eps", self.eps)

    def merge(self, name: str, base: torch.Tensor, taus: Sequence[torch.Tensor]) -> torch.Tensor:
        p = self.params
        if len(taus) == 1:
            return _models(base, taus)[0]
        vectors = list(taus) if p.use_base else _models(base, taus)
        weights = self.weights
        if p.normalize_weights:
            total = sum(weights)
            if total == 0:
                raise ConfigError("method.weight", "multislerp: the expert weights sum to zero")
            weights = [w / total for w in weights]
        norms = [_norm(v) for v in vectors]
        mean, term = torch.zeros_like(base), torch.empty_like(base)
        for v, w, n in zip(vectors, weights, norms, strict=True):
            # each term rounded before the sum, as mergekit's: then directions that cancel exactly
            # (antipodal experts, equal weights) sum to exactly zero and take the fallback
            mean.add_(torch.mul(v, (w / (n + p.eps)).item(), out=term))
        mean_norm = _norm(mean)
        if mean_norm < p.eps:
            if len(vectors) != 2:
                raise ConfigError(
                    "method.weight",
                    f"multislerp: tensor '{name}': the weighted mean of the experts' directions is zero "
                    "(antipodal experts with balancing weights); use other weights",
                )
            merged = vectors[0].mul_(weights[0]).add_(vectors[1].mul_(weights[1]))
        else:
            mean_of_norms = sum(n * w for n, w in zip(norms, weights, strict=True))
            merged = mean.mul_((mean_of_norms / mean_norm).item())
        return merged.add_(base) if p.use_base else merged


class Karcher(_Geometric):
    """Equal-weight Karcher (Riemannian) mean of the models on the hypersphere, mergekit `karcher`.

    Params:
        max_iter: most gradient steps.
        tol: norm, angle (radians) and step length below which a quantity counts as zero.
        use_base: the base is one of the models averaged, after the experts (true), or only
            carries the tensors (false); see the module docstring.
    """

    name = "karcher"
    per_expert = ()

    @dataclass(frozen=True)
    class Params:
        max_iter: int = 10
        tol: float = 1e-5
        use_base: bool = True

        def __post_init__(self) -> None:
            if self.max_iter < 0:
                raise ValueError(f"max_iter: must be 0 or more, got {self.max_iter}")
            _check_positive("tol", self.tol)

    def merge(self, name: str, base: torch.Tensor, taus: Sequence[torch.Tensor]) -> torch.Tensor:
        points = _models(base, taus) + ([base.clone()] if self.params.use_base else [])
        return karcher_mean(points, self.params.max_iter, self.params.tol)


class ModelStock(_Geometric):
    """Model Stock (arXiv 2403.19522), mergekit `model_stock`: base + t * mean_i tau_i.

    cos is the mean pairwise cosine of the task vectors, t = k cos / (1 + (k - 1) cos), and t = 0
    (the base) where the denominator is below 1e-6 in magnitude. `filter_wise`: one cos and t per
    row (vectors along the last dim; a 1-D tensor is one row) instead of one per tensor.
    """

    name = "model_stock"
    per_expert = ()
    min_experts = 2

    @dataclass(frozen=True)
    class Params:
        filter_wise: bool = False

    def merge(self, name: str, base: torch.Tensor, taus: Sequence[torch.Tensor]) -> torch.Tensor:
        vectors = [tau.reshape(-1) if not self.params.filter_wise or tau.dim() < 2 else tau for tau in taus]
        norms = [_norm(v, dim=-1) for v in vectors]
        cosines = [
            (torch.linalg.vecdot(a, b, dim=-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
            for i, a in enumerate(vectors)
            for j, b in enumerate(vectors[i + 1 :], start=i + 1)
        ]
        cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
        k = len(vectors)
        denominator = 1 + (k - 1) * cos_theta
        singular = denominator.abs() < 1e-6
        t = torch.where(singular, 0, k * cos_theta / torch.where(singular, 1, denominator))
        mixed = taus[0]
        for tau in taus[1:]:
            mixed.add_(tau)
        return mixed.reshape(t.shape[:-1] + (-1,)).mul_(t / k).reshape(base.shape).add_(base)
