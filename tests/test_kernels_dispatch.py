"""Choice between the Triton and the torch implementation."""

import sys
import types

import pytest
import torch

from supermerge.kernels import IMPL_ENV_VAR, grouped_weighted_sum, grouped_weighted_sum_reference, select_impl
from supermerge.kernels.dispatch import triton_available
from tests.numerics import offsets_of

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(autouse=True)
def no_env_override(monkeypatch):
    monkeypatch.delenv(IMPL_ENV_VAR, raising=False)


def test_auto_picks_torch_for_cpu_tensors():
    assert select_impl("auto", CPU) == "torch"


@pytest.fixture
def triton_imports(monkeypatch):
    """Call with True or False: from then on `import triton` succeeds (a stub module) or fails."""

    def make(importable: bool) -> None:
        monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton") if importable else None)
        triton_available.cache_clear()

    yield make
    triton_available.cache_clear()  # later tests see the real triton again


@pytest.mark.parametrize(("importable", "expected"), [(True, "triton"), (False, "torch")])
def test_auto_picks_triton_for_cuda_tensors_only_when_triton_imports(triton_imports, importable, expected):
    triton_imports(importable)
    assert select_impl("auto", CUDA) == expected
    assert select_impl("auto", CPU) == "torch"


@pytest.mark.parametrize("how", ["argument", "env var"])
def test_the_choice_changes_which_implementation_runs(monkeypatch, gen, how):
    """Seen from outside: the Triton path refuses float64 inputs (or, outside Triton's interpreter,
    CPU tensors), while the torch path computes them and gives the float64 reference's result."""
    pytest.importorskip("triton")
    offsets = offsets_of([5, 1, 7])
    base = torch.randn(13, generator=gen, dtype=torch.float64)
    tau = torch.randn(3, 13, generator=gen, dtype=torch.float64)
    w = torch.randn(3, 3, generator=gen)
    reference = grouped_weighted_sum_reference(base, tau, w, offsets)

    def merge(choice: str) -> torch.Tensor:
        if how == "env var":
            monkeypatch.setenv(IMPL_ENV_VAR, choice)
            return grouped_weighted_sum(base, tau, w, offsets)
        return grouped_weighted_sum(base, tau, w, offsets, impl=choice)

    with pytest.raises((TypeError, RuntimeError), match="triton impl"):
        merge("triton")
    torch.testing.assert_close(merge("torch"), reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merge("auto"), reference, rtol=1e-12, atol=1e-12)  # CPU tensors: torch


@pytest.mark.parametrize("forced", ["torch", "triton"])
def test_env_var_overrides_auto(monkeypatch, forced):
    monkeypatch.setenv(IMPL_ENV_VAR, forced)
    assert select_impl("auto", CPU) == forced
    assert select_impl("auto", CUDA) == forced


def test_explicit_impl_wins_over_env_var(monkeypatch):
    monkeypatch.setenv(IMPL_ENV_VAR, "triton")
    assert select_impl("torch", CUDA) == "torch"


def test_unknown_impl_is_rejected(monkeypatch):
    with pytest.raises(ValueError, match="impl must be one of"):
        select_impl("cuda", CPU)
    monkeypatch.setenv(IMPL_ENV_VAR, "fast")
    with pytest.raises(ValueError, match=IMPL_ENV_VAR):
        select_impl("auto", CPU)
