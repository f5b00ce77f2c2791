"""User hooks the tests name in YAML ("tests.hooks:<function>")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAN_FROM_CALL = 10**9  # the objective's calls from this one on return NaN (tests set it)
calls = 0


def nan_later(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Cross entropy until call NAN_FROM_CALL, NaN from then on: a run whose loss turns non-finite."""
    global calls
    calls += 1
    loss = F.cross_entropy(logits.float(), labels, reduction="sum")
    return loss * float("nan") if calls >= NAN_FROM_CALL else loss
