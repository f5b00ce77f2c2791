"""The merge-method interface and its registry.

A method is a small class registered under a name. It receives, for one parameter tensor,
the fp32 base tensor and the k task vectors, and returns the merged fp32 tensor. Parameters
come from the YAML's `method:` block (a dataclass per method, validated on construction) and
per-expert overrides (`weight`, `density`, and where a method takes them `gamma`, `epsilon`) from
the `experts:` list.
"""

from __future__ import annotations

import dataclasses
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from supermerge.errors import ConfigError
from supermerge.schema import parse_block

REGISTRY: dict[str, type[MergeMethod]] = {}


@dataclass(frozen=True)
class ExpertParams:
    """Per-expert settings of a merge (resolved defaults and overrides).

    Attributes:
        name: task name of the expert.
        weight: its coefficient in the weighted sum (unitless).
        density: fraction of its task vector kept by sparsifying methods, in (0, 1].
        gamma: fraction of its largest |tau| dropped as outliers (Model Breadcrumbs).
        epsilon: half the spread of its keep probabilities (DELLA).
    Only the fields in the method's `per_expert` are resolved; the others keep these defaults.
    """

    name: str
    weight: float = 1.0
    density: float = 1.0
    gamma: float = 0.0
    epsilon: float = 0.0


# every per-expert parameter a method may take (ExpertParams' fields)
PER_EXPERT_FIELDS = ("weight", "density", "gamma", "epsilon")


def tensor_seed(seed: int, expert: str, tensor: str) -> int:
    """A stable 63-bit seed per (run seed, expert, tensor), independent of processing order."""
    digest = hashlib.sha256(f"{seed}\0{expert}\0{tensor}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class MergeMethod(ABC):
    """A training-free merge of k task vectors into one tensor.

    Subclasses set `name`, `Params` (a dataclass of parameters with defaults) and implement
    `merge`. `per_expert` lists the Params fields that an expert entry may override.
    """

    name: ClassVar[str]
    Params: ClassVar[type]
    per_expert: ClassVar[tuple[str, ...]] = ("weight",)
    # with a compute_dtype: True, merge() gets base and task vectors in that dtype and computes as
    # mergekit does; False, it gets fp32 tensors holding the rounded inputs
    computes_in_dtype: ClassVar[bool] = False

    def __init__(self, params: Any, experts: Sequence[ExpertParams], seed: int = 0) -> None:
        self.params = params
        self.experts = list(experts)
        self.seed = seed

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            REGISTRY[cls.name] = cls

    @abstractmethod
    def merge(self, name: str, base: torch.Tensor, taus: Sequence[torch.Tensor]) -> torch.Tensor:
        """Merge one tensor.

        Args:
            name: tensor name (seeds random methods per tensor).
            base: base tensor, fp32.
            taus: k task vectors shaped like `base`, fp32, in expert order.
        Returns:
            merged tensor, fp32, shaped like `base`. A method may make it in the memory of
            `base` or of a task vector, and may overwrite them: the caller reads them fresh for
            every tensor.
        """


def resolve_experts(
    cls: type[MergeMethod], params: Any, experts: Sequence[Mapping[str, Any]]
) -> list[ExpertParams]:
    """Each expert's settings: the method's `params` with the expert's overrides applied.

    Args:
        cls: the method class (its `per_expert` fields may be overridden).
        params: the method's parsed Params.
        experts: per-expert mappings with `name` and optional overrides (`weight`, `density`).
    """
    resolved = []
    for i, e in enumerate(experts):
        overrides = {k: e[k] for k in PER_EXPERT_FIELDS if k in e}
        for key in overrides:
            if key not in cls.per_expert:
                raise ConfigError(f"experts[{i}].{key}", f"method '{cls.name}' takes no per-expert {key}")
        own = parse_block(cls.Params, dataclasses.asdict(params) | overrides, f"experts[{i}]", owner=cls.name)
        resolved.append(ExpertParams(e["name"], **{k: getattr(own, k) for k in cls.per_expert}))
    return resolved


def build_method(
    name: str,
    raw_params: Mapping[str, Any],
    experts: Sequence[Mapping[str, Any]],
    seed: int = 0,
) -> MergeMethod:
    """Instantiate a registered method from YAML-shaped input.

    Args:
        name: registered method name.
        raw_params: the `method:` block without its `name`.
        experts: per-expert mappings with `name` and optional overrides (`weight`, `density`).
        seed: run seed for random methods.
    """
    cls = REGISTRY.get(name)
    if cls is None:
        known = ", ".join(sorted(REGISTRY))
        raise ConfigError("method.name", f"unknown method '{name}' (known: {known})")
    params = parse_block(cls.Params, raw_params, "method", owner=name)
    return cls(params, resolve_experts(cls, params, experts), seed)
