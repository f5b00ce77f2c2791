"""Triton weighted-sum kernels against the float64 torch reference.

On a machine without CUDA the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set
before the kernel module is first imported); with CUDA they run on the GPU.
"""

import importlib
import os
import sys
from types import ModuleType

import pytest
import torch

from supermerge.kernels import (
    grouped_weighted_sum,
    grouped_weighted_sum_reference,
    weighted_sum,
    weighted_sum_reference,
)
from tests.numerics import assert_w_gradient_close, offsets_of, w_gradient_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# ||out - ref|| / ||ref|| bounds for out in each dtype: fp32 arithmetic, else the output rounding.
FORWARD_RTOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}
ODD_GROUP_SIZES = [1, 3, 1000, 4097, 0, 17, 64, 129, 1, 555]


if DEVICE == "cpu" and "triton" not in sys.modules:
    # At collection, before any test imports triton: the interpreter must be chosen before the
    # first `import triton` in the process (triton.language's own functions are jitted then).
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def kernels() -> ModuleType:
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("triton was imported before TRITON_INTERPRET=1 could be set")
    pytest.importorskip("triton")
    return importlib.import_module("supermerge.kernels.weighted_sum_triton")


def _inputs(gen, dtype, n_tasks, n_elements, n_tensors=1):
    base = torch.randn(n_elements, generator=gen).to(device=DEVICE, dtype=dtype)
    tau = (0.1 * torch.randn(n_tasks, n_elements, generator=gen)).to(device=DEVICE, dtype=dtype)
    w = torch.randn(n_tasks, n_tensors, generator=gen).to(DEVICE)
    return base, tau, w


def _rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _poisoned(shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def _run_backward(kernels, plan, grad_out, tau, w, reduce_block=1024):
    dw = _poisoned(w.shape)
    partial = _poisoned((w.shape[0], plan.n_chunks))
    kernels.grouped_backward(grad_out, tau, w, plan, dw, partial, reduce_block=reduce_block)
    return dw


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_tasks", [1, 2, 7, 32])
def test_forward_writes_every_element_and_matches_float64_reference(kernels, gen, dtype, n_tasks):
    n = 3001  # not a multiple of the block: two full blocks and a masked tail
    base, tau, w = _inputs(gen, dtype, n_tasks, n)
    offsets = offsets_of([n])
    plan = kernels.build_chunk_plan(offsets, 1024, DEVICE)
    out = kernels.grouped_forward(base, tau, w, plan, _poisoned((n,), dtype))
    ref = grouped_weighted_sum_reference(base.double(), tau.double(), w.double(), offsets)
    assert not out.isnan().any()
    assert _rel_err(out, ref) < FORWARD_RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_tasks", [1, 2, 7, 32])
def test_backward_writes_every_coefficient_and_matches_float64_reference(kernels, gen, dtype, n_tasks):
    n = 3001
    base, tau, w = _inputs(gen, dtype, n_tasks, n)
    grad_out = torch.randn(n, generator=gen).to(device=DEVICE, dtype=dtype)
    offsets = offsets_of([n])
    dw = _run_backward(kernels, kernels.build_chunk_plan(offsets, 1024, DEVICE), grad_out, tau, w)
    assert_w_gradient_close(dw, *w_gradient_reference(base, tau, w, offsets, grad_out)[1:])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_kernels_handle_many_odd_sized_tensors(kernels, gen, dtype):
    # Block 64 with a reduction step of 4 partials: tensors span several blocks, share blocks
    # with neighbours, and need several second-stage steps; sizes 0 and 1 are included.
    n_tasks = 3
    offsets = offsets_of(ODD_GROUP_SIZES)
    n = int(offsets[-1])
    base, tau, w = _inputs(gen, dtype, n_tasks, n, n_tensors=len(ODD_GROUP_SIZES))
    grad_out = torch.randn(n, generator=gen).to(device=DEVICE, dtype=dtype)
    plan = kernels.build_chunk_plan(offsets, 64, DEVICE)
    out = kernels.grouped_forward(base, tau, w, plan, _poisoned((n,), dtype))
    dw = _run_backward(kernels, plan, grad_out, tau, w, reduce_block=4)
    ref, ref_dw, scale = w_gradient_reference(base, tau, w, offsets, grad_out)
    assert not out.isnan().any()
    assert _rel_err(out, ref) < FORWARD_RTOL[dtype]
    assert_w_gradient_close(dw, ref_dw, scale)


def test_backward_is_bitwise_identical_run_to_run(kernels, gen):
    offsets = offsets_of(ODD_GROUP_SIZES)
    n = int(offsets[-1])
    _, tau, w = _inputs(gen, torch.bfloat16, 5, n, n_tensors=len(ODD_GROUP_SIZES))
    grad_out = torch.randn(n, generator=gen).to(device=DEVICE, dtype=torch.bfloat16)
    plan = kernels.build_chunk_plan(offsets, 256, DEVICE)
    first = _run_backward(kernels, plan, grad_out, tau, w)
    assert torch.equal(first, _run_backward(kernels, plan, grad_out, tau, w))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weighted_sum_triton_autograd_matches_reference(kernels, gen, dtype):
    n_tasks, shape = 7, (33, 65)
    base = torch.randn(shape, generator=gen).to(device=DEVICE, dtype=dtype)
    taus = (0.1 * torch.randn(n_tasks, *shape, generator=gen)).to(device=DEVICE, dtype=dtype)
    w = torch.randn(n_tasks, generator=gen).to(DEVICE).requires_grad_()
    grad_out = torch.randn(shape, generator=gen).to(device=DEVICE, dtype=dtype)
    out = weighted_sum(base, taus, w, impl="triton")
    out.backward(grad_out)
    ref = weighted_sum_reference(base.double(), taus.double(), w.detach().double())
    assert out.shape == shape and out.dtype == dtype
    assert _rel_err(out, ref) < FORWARD_RTOL[dtype]
    assert w.grad.dtype == torch.float32
    one_tensor = offsets_of([base.numel()])
    _, ref_dw, scale = w_gradient_reference(
        base.flatten(), taus.flatten(1), w[:, None], one_tensor, grad_out.flatten()
    )
    assert_w_gradient_close(w.grad[:, None], ref_dw, scale)


def test_grouped_weighted_sum_triton_autograd_matches_reference(kernels, gen):
    offsets = offsets_of(ODD_GROUP_SIZES)
    n = int(offsets[-1])
    base, tau, w = _inputs(gen, torch.bfloat16, 4, n, n_tensors=len(ODD_GROUP_SIZES))
    w.requires_grad_()
    grad_out = torch.randn(n, generator=gen).to(device=DEVICE, dtype=torch.bfloat16)
    out = grouped_weighted_sum(base, tau, w, offsets, impl="triton")
    out.backward(grad_out)
    ref, ref_dw, scale = w_gradient_reference(base, tau, w, offsets, grad_out)
    assert out.dtype == torch.bfloat16
    assert _rel_err(out, ref) < FORWARD_RTOL[torch.bfloat16]
    assert_w_gradient_close(w.grad, ref_dw, scale)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_w_gradient_keeps_its_precision_for_saturated_coefficients(kernels, gen, impl):
    # 1 - tanh(w)^2 in float32 loses 2 ulps / sech(w)^2 (1e-5 relative at |w| = 3, all at 9);
    # the slope must come from w itself.
    n_tasks, sizes = 2, [64] * 19
    offsets = offsets_of(sizes)
    base, tau, _ = _inputs(gen, torch.float32, n_tasks, int(offsets[-1]))
    w = torch.linspace(-9.0, 9.0, len(sizes)).repeat(n_tasks, 1).to(DEVICE).requires_grad_()
    grad_out = torch.randn(base.shape, generator=gen).to(DEVICE)
    grouped_weighted_sum(base, tau, w, offsets, impl=impl).backward(grad_out)
    assert_w_gradient_close(w.grad, *w_gradient_reference(base, tau, w, offsets, grad_out)[1:])


def test_triton_impl_rejects_trainable_base(kernels, gen):
    base, tau, w = _inputs(gen, torch.float32, 2, 10)
    with pytest.raises(ValueError, match="differentiates w only"):
        weighted_sum(base.requires_grad_(), tau, w[:, 0], impl="triton")
