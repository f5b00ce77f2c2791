"""The low-rank weighted sum (kernels/lowrank.py) against float64 dense task vectors, across
implementations (torch on CPU; Triton on CUDA, or in its interpreter without CUDA), factor
dtypes, ranks (one expert of rank 1, one of rank 0) and shapes, with rounding-aware bounds: each
entry within a few float32 ulps of the sum of the magnitudes that make it. Outputs the kernels
write are poisoned (NaN) first."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from supermerge.kernels.lowrank import (
    lowrank_merge_,
    lowrank_merge_into,
    lowrank_weighted_sum,
    lowrank_weighted_sum_reference,
)

TOL = 2.0**-18  # float32 GEMM accumulation, relative to the sum of |terms|
IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"))]  # fmt: skip


def device_of(impl: str) -> torch.device:
    """Where an impl's test tensors live: Triton on CUDA when there is one (else its interpreter,
    which tests/conftest.py turns on), torch on the CPU."""
    return torch.device("cuda" if impl == "triton" and torch.cuda.is_available() else "cpu")


def factors(ranks: list[int], m: int, n: int, dtype: torch.dtype, gen: torch.Generator):
    bs = [(torch.randn(m, r, generator=gen) * 0.1).to(dtype) for r in ranks]
    as_ = [(torch.randn(r, n, generator=gen) * 0.1).to(dtype) for r in ranks]
    offsets = torch.tensor([0, *torch.tensor(ranks).cumsum(0).tolist()], dtype=torch.int64)
    return bs, as_, torch.cat(bs, dim=1), torch.cat(as_, dim=0), offsets


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("m", "n"), [(1, 1), (37, 19), (130, 96)])
@pytest.mark.parametrize("ranks", [[1], [4, 16, 8], [2, 0, 35]], ids=["one", "three", "with_rank_0"])
def test_lowrank_sum_and_its_gradient_equal_float64_dense_task_vectors(
    impl: str, dtype: torch.dtype, m: int, n: int, ranks: list[int], gen: torch.Generator
) -> None:
    bs, as_, b, a, offsets = factors(ranks, m, n, dtype, gen)
    base = torch.randn(m, n, generator=gen)
    c = (torch.randn(len(ranks), generator=gen) * 2).requires_grad_()
    grad = torch.randn(m, n, generator=gen)

    dev = device_of(impl)
    on = [t.to(dev) for t in (base, b, a, offsets, grad)]
    out = lowrank_weighted_sum(on[0], on[1], on[2], c.to(dev), on[3], impl)
    (dc,) = torch.autograd.grad(out, c, on[4])
    out, dc = out.cpu(), dc.cpu()

    want = lowrank_weighted_sum_reference(base, bs, as_, c.detach())
    terms = zip(c.detach().double(), bs, as_, strict=True)
    scale = base.double().abs() + sum(
        ci.abs() * (bi.double().abs() @ ai.double().abs()) for ci, bi, ai in terms
    )
    assert out.dtype == torch.float32
    assert ((out.double() - want).abs() <= TOL * scale + 1e-30).all()
    for i, (bi, ai) in enumerate(zip(bs, as_, strict=True)):
        tau = bi.double() @ ai.double()
        exact = (grad.double() * tau).sum()
        bound = TOL * (grad.double().abs() * (bi.double().abs() @ ai.double().abs())).sum() + 1e-30
        assert abs(dc[i].double() - exact) <= bound, f"expert {i}: {dc[i].item()} vs {exact.item()}"


def test_only_the_coefficients_get_a_gradient(gen: torch.Generator) -> None:
    _, _, b, a, offsets = factors([3, 2], 8, 5, torch.float32, gen)
    base = torch.randn(8, 5, generator=gen).requires_grad_()
    c = torch.randn(2, generator=gen).requires_grad_()
    lowrank_weighted_sum(base, b, a, c, offsets).sum().backward()
    assert c.grad is not None and base.grad is None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("into", ["itself", "another buffer", "zero"])
def test_the_merge_into_a_poisoned_buffer_writes_what_the_differentiable_one_returns(
    impl: str, into: str, gen: torch.Generator
) -> None:
    dev = device_of(impl)
    _, _, b, a, offsets = factors([3, 5], 70, 24, torch.bfloat16, gen)
    base, c = torch.randn(70, 24, generator=gen), torch.randn(2, generator=gen)
    want = lowrank_weighted_sum(None if into == "zero" else base, b, a, c, offsets, "torch")
    b, a, offsets, c = b.to(dev), a.to(dev), offsets.to(dev), c.to(dev)
    if into == "itself":
        out = base.to(dev)
        assert lowrank_merge_(out, b, a, c, offsets, impl) is out
    else:
        out = torch.full((70, 24), float("nan"), device=dev)
        source = None if into == "zero" else base.to(dev, torch.bfloat16)  # any float dtype
        assert lowrank_merge_into(out, source, b, a, c, offsets, impl) is out
        if source is not None:  # (the bfloat16 base the kernel read, against the float32 oracle)
            want = want - base + base.to(torch.bfloat16).float()
    torch.testing.assert_close(out.cpu(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_the_triton_merge_writes_every_entry_of_a_poisoned_output(
    out_dtype: torch.dtype, gen: torch.Generator
) -> None:
    from supermerge.kernels.lowrank_triton import merge_triton

    dev = device_of("triton")
    _, _, b, a, _ = factors([7, 9], 67, 70, torch.float32, gen)
    base = torch.randn(67, 70, generator=gen)
    out = torch.full((67, 70), float("nan"), dtype=out_dtype, device=dev)
    merge_triton(base.to(dev), b.to(dev), a.to(dev), out)
    out = out.cpu()
    want = (base.double() + b.double() @ a.double()).to(out_dtype)
    torch.testing.assert_close(out, want, rtol=1e-5 if out_dtype == torch.float32 else 8e-3, atol=1e-5)


def test_auto_keeps_the_low_rank_kernels_on_torch_until_triton_is_asked_for(monkeypatch) -> None:
    from supermerge.kernels.lowrank import lowrank_impl

    cuda = torch.device("cuda")
    monkeypatch.delenv("SUPERMERGE_KERNEL_IMPL", raising=False)
    assert lowrank_impl("auto", cuda) == "torch" and lowrank_impl("triton", cuda) == "triton"
    monkeypatch.setenv("SUPERMERGE_KERNEL_IMPL", "triton")
    assert lowrank_impl("auto", cuda) == "triton" and lowrank_impl("torch", cuda) == "torch"
