"""The learned methods' parameters: SuperMerge and AdaMerging (trained, not per-tensor rules).

Their YAML `method:` block takes every field below: the optimisation settings (`TrainConfig`,
what the trainer reads) and the merge's layout. The run itself is `supermerge.learned_merge`;
its parts are in `supermerge.learned`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from supermerge.learned.coefficients import GRANULARITIES
from supermerge.learned.objectives import BUILTIN

STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of a learned merge.

    Attributes:
        steps: Adam steps on W.
        lr: Adam learning rate.
        batch_size: micro-batch size in examples (bounds activation memory, not the step).
        objective: "cross_entropy", "distill", "entropy" or "package.module:function".
        temperature: softmax temperature of `distill`.
        top_k: expert logits kept per row as `distill`'s targets (the rest of the expert's
            distribution is dropped and the kept part renormalised).
        early_stop_patience: stop after this many steps without improvement (0: never).
        early_stop_min_delta: improvement of the mean loss that resets the patience.
        checkpoint_every: save the training state every this many steps.
    """

    steps: int = 100
    lr: float = 0.01
    batch_size: int = 32
    objective: str = "cross_entropy"
    temperature: float = 1.0
    top_k: int = 64
    early_stop_patience: int = 0
    early_stop_min_delta: float = 1e-4
    checkpoint_every: int = 10


def _check_coefficient(value: float, field: str) -> None:
    if not -1 < value < 1:
        raise ValueError(f"{field}: must be in (-1, 1) (it is tanh(w)), got {value}")


@dataclass(frozen=True)
class SuperMergeParams(TrainConfig):
    """The learned methods' YAML parameters (TrainConfig's plus these).

    Attributes:
        granularity: "tensor" | "block" | "task" (see supermerge.learned.coefficients).
        blocks: regexes grouping tensors into blocks (granularity "block").
        init: initial coefficient tanh(w) (0.3 = task arithmetic with lambda 0.3).
        validation_size: examples kept per task (the paper: 32).
        storage_dtype: dtype of the task vectors in memory (float32 | bfloat16 | float16).
        group_size: hierarchical group size g (0: flat).
        groups: explicit first-level groups (lists of task names), else by similarity.
        upper_init: initial coefficient of intermediate models at levels above the first.
        similarity_tensors: tensors sampled for the task-vector cosine similarity.
        impl: fused-kernel implementation: "auto" | "torch" | "triton".
        targets_cache: folder keeping `distill`'s expert targets between runs, keyed by the
            expert's and the data's content (default: inside the run state, removed at the end).
    """

    granularity: str = "tensor"
    blocks: list = field(default_factory=list)
    init: float = 0.3
    validation_size: int = 32
    storage_dtype: str = "float32"
    group_size: int = 0
    groups: list | None = None
    upper_init: float = 0.6
    similarity_tensors: int = 8
    impl: str = "auto"
    targets_cache: Path | None = None

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "validation_size",
            "checkpoint_every",
            "similarity_tensors",
            "top_k",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("early_stop_patience", "early_stop_min_delta"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be 0 or more, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be positive, got {self.lr}")
        if self.temperature <= 0:
            raise ValueError(f"temperature: must be positive, got {self.temperature}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity: must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "block" and not self.blocks:
            raise ValueError("blocks: granularity 'block' needs a list of regexes")
        _check_coefficient(self.init, "init")
        _check_coefficient(self.upper_init, "upper_init")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype: must be one of {list(STORAGE_DTYPES)}")
        if self.group_size == 1 or self.group_size < 0:
            raise ValueError(f"group_size: must be 0 (flat) or at least 2, got {self.group_size}")
        if self.impl not in ("auto", "torch", "triton"):
            raise ValueError(f"impl: must be auto, torch or triton, got {self.impl!r}")
        if not all(isinstance(b, str) for b in self.blocks):
            raise ValueError("blocks: must be a list of regexes")
        if self.groups is not None and not (
            isinstance(self.groups, list)
            and all(isinstance(g, list) and all(isinstance(n, str) for n in g) for g in self.groups)
        ):
            raise ValueError("groups: must be a list of lists of task names")
        if self.objective not in BUILTIN and ":" not in self.objective:
            raise ValueError(
                f"objective: must be {' or '.join(BUILTIN)} or 'package.module:function', "
                f"got {self.objective!r}"
            )

    def train_config(self) -> TrainConfig:
        return TrainConfig(**{f: getattr(self, f) for f in TrainConfig.__dataclass_fields__})


@dataclass(frozen=True)
class AdaMergingParams(SuperMergeParams):
    """AdaMerging-style layer-wise merging: entropy on unlabelled inputs, smaller lr."""

    objective: str = "entropy"
    lr: float = 0.001


class SuperMerge:
    """Learned tanh-weighted merging (flat or hierarchical), trained on labelled validation data."""

    name = "supermerge"
    Params = SuperMergeParams


class AdaMerging:
    """Layer-wise merging trained to minimise prediction entropy on unlabelled inputs."""

    name = "adamerging"
    Params = AdaMergingParams


LEARNED = {cls.name: cls for cls in (SuperMerge, AdaMerging)}
