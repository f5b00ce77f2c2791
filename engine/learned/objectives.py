"""Objectives for learning W, each summed over the rows of a batch's logits (the trainer divides
by the task's number of examples). Rows are examples for classifiers and completion tokens for
causal LMs (`supermerge.learned.task_models`), so a causal LM's loss per example is summed over
its completion.

- `cross_entropy`: supervised: -log p(target) per row (labels, or the completion's next tokens;
  the SuperMerge paper's).
- `distill`: label-free: KL(expert || merged) per row, from the task's expert's top-k logits
  computed once before training (`supermerge.learned.teacher`), at a temperature.
- `entropy`: Shannon entropy of the predicted distribution, unlabelled (AdaMerging's).
- a user hook: "package.module:function" taking (logits [M, C], targets [M] or None) and
  returning a scalar summed over the rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from supermerge.learned.data import TopK
from supermerge.plugins import import_object

Objective = Callable[[torch.Tensor, torch.Tensor | TopK | None], torch.Tensor]


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits to fp32 for the loss; fp32 / fp64 stay as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Sum over rows of -log p(target); logits [M, C] (any float dtype), labels [M] int64."""
    if labels is None:
        raise ValueError("cross_entropy needs labels")
    return F.cross_entropy(_upcast(logits), labels, reduction="sum")


def entropy(logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over rows of the entropy (nats) of softmax(logits); labels are ignored."""
    logp = F.log_softmax(_upcast(logits), dim=-1)
    return -(logp.exp() * logp).sum()


def distill(logits: torch.Tensor, teacher: TopK | None, temperature: float = 1.0) -> torch.Tensor:
    """Sum over rows of temperature^2 * KL(p || q): p the expert's distribution renormalised over
    its top-k ids, q the merged model's softmax over all C classes, both at `temperature`.

    Args:
        logits: [M, C] the merged model's logits.
        teacher: [M, k] the expert's top-k ids and logits at the same rows.
    """
    if teacher is None:
        raise ValueError("distill needs the experts' targets")
    t = temperature
    log_p = F.log_softmax(teacher.logits.float() / t, dim=-1)
    log_q = F.log_softmax(_upcast(logits) / t, dim=-1).gather(1, teacher.ids)
    return (log_p.exp() * (log_p - log_q)).sum() * t * t


BUILTIN: dict[str, Objective] = {"cross_entropy": cross_entropy, "distill": distill, "entropy": entropy}


def resolve_objective(name: str, temperature: float = 1.0) -> Objective:
    """A built-in objective by name (distill at `temperature`), or a user hook."""
    if name == "distill":
        return functools.partial(distill, temperature=temperature)
    if name in BUILTIN:
        return BUILTIN[name]
    return import_object(name, "method.objective")


def needs_labels(name: str) -> bool:
    """Whether the objective reads labels (user hooks are assumed to)."""
    return name not in ("entropy", "distill")
