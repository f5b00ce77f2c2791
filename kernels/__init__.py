"""Fused tanh-weighted sums of task vectors (Triton on CUDA, memory-lean torch elsewhere).

Public API: :func:`weighted_sum`, :func:`grouped_weighted_sum` and their pure-torch references.
Without Triton the grouped sum runs `torch_grouped` (the reference where base or tau need a
gradient) and the one-tensor sum runs the reference. Triton is imported only when the Triton
implementation is selected.
"""

from supermerge.kernels.dispatch import (
    IMPL_ENV_VAR,
    grouped_weighted_sum,
    select_impl,
    weighted_sum,
)
from supermerge.kernels.reference import grouped_weighted_sum_reference, weighted_sum_reference

__all__ = [
    "IMPL_ENV_VAR",
    "grouped_weighted_sum",
    "grouped_weighted_sum_reference",
    "select_impl",
    "weighted_sum",
    "weighted_sum_reference",
]
