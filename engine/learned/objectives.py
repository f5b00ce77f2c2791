"""Objectives for learning W, each summed over a batch (the trainer divides by the task's size).

- `cross_entropy`: supervised, on labelled validation examples (the SuperMerge paper's).
- `entropy`: Shannon entropy of the predicted distribution, unlabelled (AdaMerging's).
- a user hook: "package.module:function" taking (logits [B, C], labels [B] or None) and
  returning a scalar summed over the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from supermerge.plugins import import_object

Objective = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits to fp32 for the loss; fp32 / fp64 stay as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Sum over the batch of -log p(label); logits [B, C] (any float dtype), labels [B] int64."""
    if labels is None:
        raise ValueError("cross_entropy needs labels")
    return F.cross_entropy(_upcast(logits), labels, reduction="sum")


def entropy(logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over the batch of the entropy (nats) of softmax(logits); labels are ignored."""
    logp = F.log_softmax(_upcast(logits), dim=-1)
    return -(logp.exp() * logp).sum()


BUILTIN: dict[str, Objective] = {"cross_entropy": cross_entropy, "entropy": entropy}


def resolve_objective(name: str) -> Objective:
    """A built-in objective by name, or a user hook 'package.module:function'."""
    if name in BUILTIN:
        return BUILTIN[name]
    return import_object(name, "method.objective")


def needs_labels(name: str) -> bool:
    """Whether the objective reads labels (user hooks are assumed to)."""
    return name != "entropy"
