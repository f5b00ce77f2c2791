"""Choice between the Triton and the torch implementation."""

import pytest
import torch

from supermerge.kernels import IMPL_ENV_VAR, select_impl
from supermerge.kernels.dispatch import triton_available

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(autouse=True)
def no_env_override(monkeypatch):
    monkeypatch.delenv(IMPL_ENV_VAR, raising=False)


def test_auto_picks_torch_for_cpu_tensors():
    assert select_impl("auto", CPU) == "torch"


def test_auto_picks_triton_for_cuda_tensors_when_triton_imports():
    assert select_impl("auto", CUDA) == ("triton" if triton_available() else "torch")


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
