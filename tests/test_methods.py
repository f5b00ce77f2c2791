"""Training-free merge methods against float64 references written out from their definitions."""

from __future__ import annotations

import pytest
import torch

from supermerge.errors import ConfigError
from supermerge.methods import REGISTRY, build_method
from supermerge.methods.sparsify import Rescale, magnitude_trim, random_drop

K = 3


@pytest.fixture
def tensors(gen: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A fresh random base [40, 30] and K task vectors in fp32, from the test's printed seed."""
    return torch.randn(40, 30, generator=gen), [torch.randn(40, 30, generator=gen) for _ in range(K)]


def run(method, base: torch.Tensor, taus: list[torch.Tensor], name: str = "t") -> torch.Tensor:
    """method.merge on copies: merge may overwrite its inputs."""
    return method.merge(name, base.clone(), [t.clone() for t in taus])


def experts(**per_expert) -> list[dict]:
    return [{"name": f"e{i}", **{k: v[i] for k, v in per_expert.items()}} for i in range(K)]


def ties_reference(base, taus, weights, densities, lam, normalize=True):
    """TIES from the paper/mergekit definition, in float64, element by element where it matters."""
    b = base.double()
    trimmed = []
    for t, d in zip(taus, densities, strict=True):
        t = t.double().flatten()
        keep = max(1, int(d * t.numel()))
        threshold_idx = t.abs().argsort(descending=True)[:keep]
        out = torch.zeros_like(t)
        out[threshold_idx] = t[threshold_idx]
        trimmed.append(out.view_as(base))
    w = torch.tensor(weights, dtype=torch.float64)
    weighted = torch.stack(trimmed) * w.view(-1, 1, 1)
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = (weighted.sign() == elected).double()
    mixed = (weighted * agree).sum(0)
    if normalize:
        divisor = (w.view(-1, 1, 1) * agree).sum(0)
        mixed = mixed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return b + lam * mixed


# The parameters and expert counts of the methods that need them (the others: defaults, K experts).
NEEDS = {"slerp": ({"t": 0.5}, 1), "nuslerp": ({"weight": 1.0}, 2), "multislerp": ({"weight": 1.0}, K)}
NEEDS |= {"passthrough": ({}, 1)}


def test_every_registered_method_returns_finite_fp32_of_base_shape(tensors) -> None:
    base, taus = tensors
    for name in REGISTRY:
        params, k = NEEDS.get(name, ({}, K))
        out = run(build_method(name, params, experts()[:k]), base, taus[:k])
        assert out.shape == base.shape and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_average_is_the_weighted_mean_of_experts(tensors) -> None:
    base, taus = tensors
    w = [1.0, 2.0, 0.5]
    out = run(build_method("average", {}, experts(weight=w)), base, taus)
    models = [base.double() + t.double() for t in taus]
    ref = sum(wi * m for wi, m in zip(w, models, strict=True)) / sum(w)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)


def test_task_arithmetic_adds_lambda_times_weighted_sum(tensors) -> None:
    base, taus = tensors
    w = [0.3, -0.7, 1.1]
    out = run(build_method("task_arithmetic", {"lambda": 0.4}, experts(weight=w)), base, taus)
    ref = base.double() + 0.4 * sum(wi * t.double() for wi, t in zip(w, taus, strict=True))
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("densities", [(0.2, 0.2, 0.2), (0.1, 0.5, 1.0)])
def test_ties_matches_trim_elect_disjoint_mean_reference(tensors, densities) -> None:
    base, taus = tensors
    w = [1.0, 0.5, 2.0]
    method = build_method("ties", {"lambda": 0.9}, experts(weight=w, density=densities))
    out = run(method, base, taus)
    ref = ties_reference(base, taus, w, densities, 0.9)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_magnitude_trim_keeps_exactly_the_largest_fraction(gen: torch.Generator) -> None:
    tau = torch.randn(1000, generator=gen)
    out = magnitude_trim(tau, 0.25)
    kept = out != 0
    assert int(kept.sum()) == 250
    assert tau[kept].abs().min() >= tau[~kept].abs().max()


def test_random_drop_is_seeded_and_keeps_about_density(gen: torch.Generator) -> None:
    tau = torch.randn(200_000, generator=gen)
    a = random_drop(tau.clone(), 0.3, Rescale.NONE, seed=7)
    b = random_drop(tau.clone(), 0.3, Rescale.NONE, seed=7)
    c = random_drop(tau.clone(), 0.3, Rescale.NONE, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    kept = (a != 0).double().mean().item()
    assert abs(kept - 0.3) < 0.005  # 200k Bernoulli(0.3) draws: std of the mean is 0.001
    assert torch.equal(a[a != 0], tau[a != 0])


@pytest.mark.parametrize("rescale", [Rescale.L1, Rescale.INVERSE_DENSITY])
def test_random_drop_rescale_modes(rescale: Rescale, gen: torch.Generator) -> None:
    tau = torch.randn(50_000, generator=gen)
    out = random_drop(tau.clone(), 0.4, rescale, seed=1)
    mask = out != 0
    if rescale is Rescale.L1:
        torch.testing.assert_close(out.abs().sum(), tau.abs().sum(), rtol=1e-5, atol=0)
    else:
        torch.testing.assert_close(out[mask], tau[mask] / 0.4)


def test_dare_masks_differ_per_expert_and_tensor_but_repeat_per_seed(tensors) -> None:
    base, taus = tensors
    same = [taus[0]] * K
    method = build_method("dare_linear", {"density": 0.5, "rescale": "none"}, experts(), seed=3)
    masks = [method._sparsified("t", same[i], i) != 0 for i in range(K)]
    assert not torch.equal(masks[0], masks[1])
    assert torch.equal(method._sparsified("t", taus[0], 0), method._sparsified("t", taus[0], 0))
    assert not torch.equal(method._sparsified("u", taus[0], 0) != 0, masks[0])
    again = build_method("dare_linear", {"density": 0.5, "rescale": "none"}, experts(), seed=3)
    torch.testing.assert_close(run(again, base, taus), run(method, base, taus))


def test_dare_ties_with_full_density_equals_unnormalised_ties(tensors) -> None:
    base, taus = tensors
    dare = run(build_method("dare_ties", {"density": 1.0, "lambda": 0.7}, experts()), base, taus)
    ref = ties_reference(base, taus, [1.0] * K, [1.0] * K, 0.7, normalize=False)
    torch.testing.assert_close(dare.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name, params, per_expert, field",
    [
        ("nope", {}, {}, "method.name"),
        ("ties", {"densty": 0.5}, {}, "method.densty"),
        ("ties", {"density": 0.0}, {}, "method.density"),
        ("ties", {"lambda": "big"}, {}, "method.lambda"),
        ("dare_ties", {"rescale": "l3"}, {}, "method.rescale"),
        ("ties", {}, {"density": (0.5, 2.0, 0.5)}, "experts[1].density"),
        ("average", {}, {"density": (0.5, 0.5, 0.5)}, "experts[0].density"),
    ],
)
def test_bad_method_parameters_name_the_field(name, params, per_expert, field) -> None:
    with pytest.raises(ConfigError) as info:
        build_method(name, params, experts(**per_expert))
    assert info.value.field == field
