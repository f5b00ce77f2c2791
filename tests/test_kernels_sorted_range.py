"""The compiled magnitude trim (kernels/sorted_range.cpp) against its definition: torch's CPU
argsort of |tau|, on fresh random inputs full of ties, in every dtype it takes.

The parity tests (test_mergekit_parity_sparsify.py) run it through the merge methods against
mergekit; these test the kernel alone, at every kind of kept range: one end open or both, the
first partition's sides kept whole, dropped whole or replayed further.
"""

from __future__ import annotations

import logging

import pytest
import torch

from supermerge.kernels import sorted_range_cpu


@pytest.fixture(autouse=True)
def compiled() -> None:
    if sorted_range_cpu.library() is None:
        pytest.skip("no C++ compiler here: the compiled trim is not built")


def tied(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """n values with many equal magnitudes (both signs, some zeros) in `dtype`."""
    if dtype == torch.float32:
        values = torch.randint(-9, 10, (n,), generator=gen).float()
    else:  # differences of half-precision weights, as the task vectors of bf16 experts are
        values = (torch.randn(n, generator=gen) * 0.02).to(dtype) - (torch.randn(n, generator=gen) * 0.02).to(
            dtype
        )
    return values.to(dtype)


def expected(values: torch.Tensor, lo: int, hi: int, descending: bool) -> torch.Tensor:
    """`values` with every entry torch's argsort of |values| puts outside [lo, hi) zeroed."""
    order = torch.argsort(values.abs().float(), descending=descending)
    out = values.clone()
    out[order[:lo]] = 0
    out[order[hi:]] = 0
    return out


def ranges(n: int, gen: torch.Generator) -> list[tuple[int, int]]:
    """Kept ranges of every shape: from the top, to the bottom, inside, one entry, all but one."""
    a = int(torch.randint(1, n // 2, (1,), generator=gen))
    b = int(torch.randint(n // 2, n, (1,), generator=gen))
    return [(0, a), (0, b), (a, n), (a, b), (b - 1, b), (1, n - 1), (0, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n", [17, 40, 1000, 70001])
@pytest.mark.parametrize("descending", [True, False])
def test_compiled_trim_keeps_the_entries_torchs_argsort_puts_in_the_range(
    dtype: torch.dtype, n: int, descending: bool, gen: torch.Generator
) -> None:
    values = tied(n, dtype, gen)
    for lo, hi in ranges(n, gen):
        ours = values.clone()
        sorted_range_cpu.keep_sorted_range(ours, lo, hi, descending)
        theirs = expected(values, lo, hi, descending)
        differ = int(((ours != 0) ^ (theirs != 0)).sum())
        assert torch.equal(ours, theirs), f"[{lo}, {hi}): {differ} entries differ"


def test_compiled_trim_of_distinct_values_keeps_the_largest(gen: torch.Generator) -> None:
    values = torch.randn(100_003, generator=gen)
    ours = values.clone()
    sorted_range_cpu.keep_sorted_range(ours, 0, 30_000, True)
    threshold = values.abs().kthvalue(100_003 - 30_000 + 1).values
    assert torch.equal(ours != 0, values.abs() >= threshold)


def test_tensors_it_cannot_take_are_left_to_the_torch_replay() -> None:
    assert sorted_range_cpu.supports(torch.ones(100))
    assert not sorted_range_cpu.supports(torch.ones(100, dtype=torch.float64))
    assert not sorted_range_cpu.supports(torch.ones(10, 10).t().reshape(-1)[::2])


def test_a_failed_build_falls_back_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails every build
    monkeypatch.setenv("SUPERMERGE_CACHE", str(tmp_path))
    with caplog.at_level(logging.WARNING):
        assert sorted_range_cpu.library.__wrapped__() is None
    assert "sorted_range.cpp failed" in caplog.text
    assert not list((tmp_path / "native").glob("*.so"))  # nothing half-built left behind
