"""The pure-torch reference against an explicit float64 loop, and its autograd gradient."""

import pytest
import torch

from supermerge.kernels import (
    grouped_weighted_sum,
    grouped_weighted_sum_reference,
    weighted_sum,
    weighted_sum_reference,
)
from supermerge.kernels.torch_grouped import grouped_weighted_sum_torch
from tests.numerics import offsets_of


def _loop_weighted_sum(base, taus, w):
    out = base.double().clone()
    for i in range(len(w)):
        out += torch.tanh(w[i].double()) * taus[i].double()
    return out


@pytest.mark.parametrize("n_tasks", [1, 2, 7, 32])
def test_weighted_sum_reference_equals_explicit_loop(gen, n_tasks):
    base = torch.randn(5, 7, generator=gen)
    taus = torch.randn(n_tasks, 5, 7, generator=gen)
    w = torch.randn(n_tasks, generator=gen)
    out = weighted_sum_reference(base, taus, w)
    ref = _loop_weighted_sum(base, taus, w)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_weighted_sum_reference_accumulates_in_fp32_and_returns_base_dtype(gen, dtype):
    base = torch.randn(4097, generator=gen).to(dtype)
    taus = (0.1 * torch.randn(32, 4097, generator=gen)).to(dtype)
    w = torch.randn(32, generator=gen)
    out = weighted_sum_reference(base, taus, w)
    ref = _loop_weighted_sum(base, taus, w)
    assert out.dtype == dtype
    # Rounding to the output dtype (at most an ulp, relative) plus the fp32 accumulation error,
    # which only shows where base and the terms cancel to well under an output-dtype ulp.
    scale = base.double().abs() + taus.double().abs().sum(0)
    fp32_error = 64 * torch.finfo(torch.float32).eps * scale
    assert ((out.double() - ref).abs() <= ref.abs() * torch.finfo(dtype).eps + fp32_error).all()


def test_grouped_reference_equals_per_tensor_reference(gen):
    sizes = [1, 3, 0, 1000, 17]
    offsets = offsets_of(sizes)
    n_tasks = 5
    base = torch.randn(int(offsets[-1]), generator=gen)
    tau = torch.randn(n_tasks, int(offsets[-1]), generator=gen)
    w = torch.randn(n_tasks, len(sizes), generator=gen)
    out = grouped_weighted_sum_reference(base, tau, w, offsets)
    bounds = offsets.tolist()
    for t, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        expected = weighted_sum_reference(base[a:b], tau[:, a:b], w[:, t])
        torch.testing.assert_close(out[a:b], expected)


def test_weighted_sum_reference_passes_gradcheck_in_float64(gen):
    base = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    taus = torch.randn(3, 6, 5, generator=gen, dtype=torch.float64)
    w = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w_: weighted_sum_reference(base, taus, w_), (w,))


def test_grouped_reference_passes_gradcheck_in_float64(gen):
    offsets = offsets_of([1, 4, 0, 9])
    n = int(offsets[-1])
    base = torch.randn(n, generator=gen, dtype=torch.float64)
    tau = torch.randn(3, n, generator=gen, dtype=torch.float64)
    w = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w_: grouped_weighted_sum_reference(base, tau, w_, offsets), (w,))


def test_public_api_on_cpu_uses_the_torch_paths(gen):
    offsets = offsets_of([3, 5])
    base = torch.randn(8, generator=gen)
    tau = torch.randn(2, 8, generator=gen)
    w = torch.randn(2, 2, generator=gen)
    out = grouped_weighted_sum(base, tau, w, offsets, impl="torch")
    assert torch.equal(out, grouped_weighted_sum_torch(base, tau, w, offsets))
    torch.testing.assert_close(out, grouped_weighted_sum_reference(base, tau, w, offsets))
    assert torch.equal(
        weighted_sum(base, tau, w[:, 0], impl="torch"), weighted_sum_reference(base, tau, w[:, 0])
    )


@pytest.mark.parametrize(
    ("base_shape", "taus_shape", "w_shape"),
    [((4,), (2, 5), (2,)), ((4,), (2, 4), (3,)), ((2, 3), (2, 3, 2), (2,))],
)
def test_weighted_sum_rejects_mismatched_shapes(base_shape, taus_shape, w_shape):
    with pytest.raises(ValueError, match="expected base"):
        weighted_sum(torch.zeros(base_shape), torch.zeros(taus_shape), torch.zeros(w_shape))


def test_grouped_weighted_sum_rejects_bad_offsets():
    base, tau, w = torch.zeros(8), torch.zeros(2, 8), torch.zeros(2, 2)
    with pytest.raises(ValueError, match="offsets"):
        grouped_weighted_sum(base, tau, w, torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="offsets"):
        grouped_weighted_sum(base, tau, w, torch.tensor([0, 3, 8], dtype=torch.int32))
