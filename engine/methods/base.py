"""The merge-method interface and its registry.

A method is a small class registered under a name. It receives, for one parameter tensor,
the fp32 base tensor and the k task vectors, and returns the merged fp32 tensor. Parameters
come from the YAML's `method:` block (a dataclass per method, validated on construction) and
per-expert overrides (`weight`, `density`) from the `experts:` list.
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

REGISTRY: dict[str, type[MergeMethod]] = {}
# YAML names that are Python keywords, and the Params field each maps to.
YAML_ALIASES = {"lambda": "lam"}


@dataclass(frozen=True)
class ExpertParams:
    """Per-expert settings of a merge (resolved defaults and overrides).

    Attributes:
        name: task name of the expert.
        weight: its coefficient in the weighted sum (unitless).
        density: fraction of its task vector kept by sparsifying methods, in (0, 1].
    """

    name: str
    weight: float = 1.0
    density: float = 1.0


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
            merged tensor, fp32, shaped like `base`.
        """


def _coerce(value: Any, field: dataclasses.Field, where: str) -> Any:
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(where, f"expected a number, got {value!r}")
        return float(value)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(where, f"expected an integer, got {value!r}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(where, f"expected true or false, got {value!r}")
        return value
    return value


def parse_params(cls: Any, raw: Mapping[str, Any], where: str) -> Any:
    """Build `cls.Params` from a YAML mapping; unknown or invalid fields raise ConfigError.

    Args:
        cls: a method class: has `name` and a `Params` dataclass.
        raw: field -> value.
        where: dotted config path of `raw`, used in error messages (e.g. ``method``).
    """
    fields = {f.name: f for f in dataclasses.fields(cls.Params)}
    yaml_name = {v: k for k, v in YAML_ALIASES.items()}
    values = {}
    for key, value in raw.items():
        field = YAML_ALIASES.get(key, key)
        if field not in fields:
            known = ", ".join(sorted(yaml_name.get(f, f) for f in fields)) or "none"
            raise ConfigError(f"{where}.{key}", f"unknown parameter for '{cls.name}' (known: {known})")
        values[field] = _coerce(value, fields[field], f"{where}.{key}")
    try:
        return cls.Params(**values)
    except ValueError as e:
        field, _, message = str(e).partition(": ")
        raise ConfigError(f"{where}.{yaml_name.get(field, field)}", message or str(e)) from None


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
    params = parse_params(cls, raw_params, "method")
    resolved = []
    for i, e in enumerate(experts):
        overrides = {k: e[k] for k in ("weight", "density") if k in e}
        for key in overrides:
            if key not in cls.per_expert:
                raise ConfigError(f"experts[{i}].{key}", f"method '{name}' takes no per-expert {key}")
        own = parse_params(cls, dataclasses.asdict(params) | overrides, f"experts[{i}]")
        resolved.append(ExpertParams(e["name"], **{k: getattr(own, k) for k in cls.per_expert}))
    return cls(params, resolved, seed)
