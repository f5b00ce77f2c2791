"""The memory-lean torch grouped path against the float64 reference: values, gradient, memory."""

import pytest
import torch

from supermerge.kernels.torch_grouped import grouped_weighted_sum_torch
from tests.numerics import assert_w_gradient_close, offsets_of, w_gradient_reference

TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def group(gen, n_tasks, sizes, dtype):
    offsets = offsets_of(sizes)
    n = int(offsets[-1])
    base = torch.randn(n, generator=gen).to(dtype)
    tau = torch.randn(n_tasks, n, generator=gen).to(dtype)
    w = torch.randn(n_tasks, len(sizes), generator=gen)
    return base, tau, w, offsets


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("n_tasks", [1, 2, 7, 32])
def test_forward_and_w_gradient_match_the_float64_reference(gen, dtype, n_tasks) -> None:
    base, tau, w, offsets = group(gen, n_tasks, [1, 33, 0, 257, 1000, 5], dtype)
    w.requires_grad_(True)
    out = grouped_weighted_sum_torch(base, tau, w, offsets)
    assert out.dtype == dtype and torch.isfinite(out).all()
    g = torch.randn(out.shape, generator=gen).to(dtype)
    (dw,) = torch.autograd.grad(out, w, g)

    ref, dw_ref, scale = w_gradient_reference(base, tau, w, offsets, g)
    assert rel(out, ref) < TOLERANCE[dtype]
    assert_w_gradient_close(dw, dw_ref, scale)


def test_gradcheck_in_float64(gen) -> None:
    base, tau, w, offsets = group(gen, 3, [4, 1, 6], torch.float64)
    w = w.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w_: grouped_weighted_sum_torch(base, tau, w_, offsets), (w,))


def test_gradient_is_bitwise_deterministic(gen) -> None:
    base, tau, w, offsets = group(gen, 8, [4096, 77, 3000], torch.float32)
    w.requires_grad_(True)
    g = torch.randn(base.shape, generator=gen)
    grads = [
        torch.autograd.grad(grouped_weighted_sum_torch(base, tau, w, offsets), w, g)[0] for _ in range(3)
    ]
    assert all(torch.equal(grads[0], d) for d in grads[1:])


def test_saves_nothing_of_size_k_by_n_for_backward(gen) -> None:
    base, tau, w, offsets = group(gen, 16, [20_000, 30_000], torch.float32)
    w.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        grouped_weighted_sum_torch(base, tau, w, offsets)
    # tau itself is saved (no copy: the same storage), and the [k, T] coefficients
    assert all(t.numel() <= w.numel() or t.data_ptr() == tau.data_ptr() for t in saved)
