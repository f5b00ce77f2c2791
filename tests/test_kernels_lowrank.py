"""The low-rank weighted sum (kernels/lowrank.py) against float64 dense task vectors, across
factor dtypes, ranks (one expert of rank 1, one of rank 0) and shapes, with rounding-aware bounds:
each entry within a few float32 ulps of the sum of the magnitudes that make it."""

from __future__ import annotations

import pytest
import torch

from supermerge.kernels.lowrank import (
    lowrank_merge_,
    lowrank_weighted_sum,
    lowrank_weighted_sum_reference,
)

TOL = 2.0**-18  # float32 GEMM accumulation, relative to the sum of |terms|


def factors(ranks: list[int], m: int, n: int, dtype: torch.dtype, gen: torch.Generator):
    bs = [(torch.randn(m, r, generator=gen) * 0.1).to(dtype) for r in ranks]
    as_ = [(torch.randn(r, n, generator=gen) * 0.1).to(dtype) for r in ranks]
    offsets = torch.tensor([0, *torch.tensor(ranks).cumsum(0).tolist()], dtype=torch.int64)
    return bs, as_, torch.cat(bs, dim=1), torch.cat(as_, dim=0), offsets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("m", "n"), [(1, 1), (37, 19), (256, 96)])
@pytest.mark.parametrize("ranks", [[1], [4, 16, 8], [2, 0, 5]], ids=["one", "three", "with_rank_0"])
def test_lowrank_sum_and_its_gradient_equal_float64_dense_task_vectors(
    dtype: torch.dtype, m: int, n: int, ranks: list[int], gen: torch.Generator
) -> None:
    bs, as_, b, a, offsets = factors(ranks, m, n, dtype, gen)
    base = torch.randn(m, n, generator=gen)
    c = (torch.randn(len(ranks), generator=gen) * 2).requires_grad_()
    grad = torch.randn(m, n, generator=gen)

    out = lowrank_weighted_sum(base, b, a, c, offsets)
    (dc,) = torch.autograd.grad(out, c, grad)

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


def test_the_in_place_merge_writes_what_the_differentiable_one_returns(gen: torch.Generator) -> None:
    _, _, b, a, offsets = factors([3, 5], 40, 24, torch.bfloat16, gen)
    base, c = torch.randn(40, 24, generator=gen), torch.randn(2, generator=gen)
    out = base.clone()
    assert lowrank_merge_(out, b, a, c, offsets) is out
    torch.testing.assert_close(out, lowrank_weighted_sum(base, b, a, c, offsets), rtol=1e-6, atol=1e-6)
