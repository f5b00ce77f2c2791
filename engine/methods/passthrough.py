"""Passthrough: one model's tensors as they are (mergekit `passthrough`), for layer stacking.

With `slices:` each output layer comes from one source layer (see supermerge.merge); passthrough
writes that layer unchanged, or scaled by `scale` (mergekit uses it to silence the output
projections of repeated layers: `scale: [{filter: o_proj, value: 0}, ...]`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from supermerge.errors import ConfigError
from supermerge.methods.base import ExpertParams, MergeMethod


class Passthrough(MergeMethod):
    """The single expert's tensor (base + its task vector), times `scale` when one is set.

    Params:
        scale: factor on the tensor (unitless; None: the tensor as it is). mergekit binds it per
            input; with one input that is the same as one value, which a slice or one of its
            sources may set (filters and gradients included).
    """

    name = "passthrough"
    per_expert = ()

    @dataclass(frozen=True)
    class Params:
        scale: float | None = None

    def __init__(self, params, experts: Sequence[ExpertParams], seed: int = 0) -> None:
        super().__init__(params, experts, seed)
        if len(self.experts) != 1:
            raise ConfigError(
                "experts", f"passthrough takes exactly one model per tensor, got {len(self.experts)}"
            )

    def merge(self, name: str, base: torch.Tensor, taus: Sequence[torch.Tensor]) -> torch.Tensor:
        (tau,) = taus
        # base + 0 is the base exactly: the usual case, the carrier being the model itself
        model = tau.add_(base)
        return model if self.params.scale is None else model.mul_(self.params.scale)
