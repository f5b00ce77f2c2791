"""W's Adam: the same floats as torch.optim.Adam, a state that resumes exactly, clear refusals."""

from __future__ import annotations

import pytest
import torch

from supermerge.errors import SupermergeError
from supermerge.learned.adam import Adam


def _steps(optimizer, param: torch.Tensor, grads: list[torch.Tensor]) -> None:
    for grad in grads:
        optimizer.zero_grad()
        param.grad = grad.clone()
        optimizer.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_steps_equal_torch_optim_adam_bit_for_bit(dtype: torch.dtype, gen: torch.Generator) -> None:
    start = torch.randn(5, 7, generator=gen, dtype=dtype)
    grads = [torch.randn(5, 7, generator=gen, dtype=dtype) * 10 ** (i % 5 - 2) for i in range(40)]
    ours, theirs = start.clone().requires_grad_(), start.clone().requires_grad_()
    _steps(Adam(ours, lr=0.05), ours, grads)
    _steps(torch.optim.Adam([theirs], lr=0.05, foreach=False), theirs, grads)
    assert not torch.equal(ours, start)
    assert torch.equal(ours, theirs)


def test_a_restored_state_continues_as_if_never_stopped(gen: torch.Generator) -> None:
    start = torch.randn(3, 4, generator=gen)
    grads = [torch.randn(3, 4, generator=gen) for _ in range(12)]
    whole = start.clone().requires_grad_()
    _steps(Adam(whole, lr=0.1), whole, grads)
    first = start.clone().requires_grad_()
    stopped = Adam(first, lr=0.1)
    _steps(stopped, first, grads[:5])
    state = stopped.state_dict()
    second = first.detach().clone().requires_grad_()
    resumed = Adam(second, lr=0.1)
    resumed.load_state_dict(state)
    _steps(resumed, second, grads[5:])
    assert torch.equal(second, whole)


def test_a_state_of_another_format_or_shape_is_refused_by_name() -> None:
    w = torch.ones(2, 3, requires_grad=True)
    with pytest.raises(SupermergeError, match="fields"):
        Adam(w, lr=0.1).load_state_dict({"state": {}, "param_groups": []})
    bad = {"steps": 3, "exp_avg": torch.ones(3, 2), "exp_avg_sq": torch.ones(2, 3)}
    with pytest.raises(SupermergeError, match="exp_avg has shape"):
        Adam(w, lr=0.1).load_state_dict(bad)
