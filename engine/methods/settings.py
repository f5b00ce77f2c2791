"""Parameter values that vary per tensor: mergekit's scalars, gradients and filters.

A method parameter (in `method:`, an expert entry, a slice or one of its sources) takes a
*setting*, one of:
- a scalar (number, bool, string): that value for every tensor;
- a list of scalars, a gradient: numbers interpolated linearly over the tensor's depth t in
  [0, 1] (for `t: [0, 0.5, 1]`, t = 0.25 gives 0.25), other scalars (bools, strings) picked at
  index int(t * (n - 1));
- a list of conditions `{filter: text, value: scalar or gradient}` (or one such mapping): the
  first condition whose filter is a substring of the tensor's name (a missing filter or "*"
  matches every name) gives the value; when none matches, the setting gives nothing and the
  next scope is asked (then the method's default).

t is the position of the tensor's layer in its slice, layer / (layers - 1) (1 for a slice of one
layer), and 0 for the tensors outside the layers (embeddings, final norm, head). These are the
definitions of mergekit 0.1.5 (mergekit/config.py `evaluate_setting`, parameter_resolver.py,
plan.py `plan_slice`), so a mergekit config resolves to the same value for every tensor.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from supermerge.errors import ConfigError
from supermerge.methods.base import ExpertParams, MergeMethod, resolve_experts
from supermerge.schema import parse_block

Scalar = bool | int | float | str
# Dotted components naming a repeated block followed by its index: model.layers.3., transformer.h.3.,
# encoder.layer.3., layers.3., decoder.block.3.
LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?=\.)")


@dataclass(frozen=True)
class Condition:
    """One `{filter, value}` entry: `value` applies to tensors whose name contains `filter`
    (None: every tensor)."""

    value: Scalar | tuple[Scalar, ...]
    filter: str | None = None


Setting = Scalar | tuple[Scalar, ...] | tuple[Condition, ...]


def _is_scalar(value: Any) -> bool:
    return isinstance(value, bool | int | float | str)


def _gradient_or_scalar(raw: Any, where: str) -> Scalar | tuple[Scalar, ...]:
    if _is_scalar(raw):
        return raw
    if isinstance(raw, list) and raw and all(_is_scalar(v) for v in raw):
        return tuple(raw)
    raise ConfigError(where, f"expected a value or a list of values (a gradient), got {raw!r}")


def parse_setting(raw: Any, where: str) -> Setting:
    """A YAML value as a Setting (see the module docstring); ConfigError naming `where` if it is
    none of the forms."""
    if _is_scalar(raw):
        return raw
    if isinstance(raw, Mapping):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise ConfigError(where, f"expected a value, a gradient list or a list of filters, got {raw!r}")
    if all(_is_scalar(v) for v in raw):
        return tuple(raw)
    conditions = []
    for i, entry in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(at, f"expected {{filter: ..., value: ...}} (all entries alike), got {entry!r}")
        unknown = sorted(set(entry) - {"filter", "value"})
        if unknown:
            raise ConfigError(f"{at}.{unknown[0]}", "unknown field (known: filter, value)")
        if "value" not in entry:
            raise ConfigError(f"{at}.value", "missing required field")
        name = entry.get("filter")
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"{at}.filter", f"expected a string, got {name!r}")
        conditions.append(Condition(_gradient_or_scalar(entry["value"], f"{at}.value"), name))
    return tuple(conditions)


def is_scalar(setting: Setting) -> bool:
    """True when the setting is one value for every tensor."""
    return _is_scalar(setting)


def leaves(setting: Setting) -> list[Scalar]:
    """Every value the setting names (the ends and stops of its gradients included)."""
    if _is_scalar(setting):
        return [setting]
    values: list[Scalar] = []
    for item in setting:
        inner = item.value if isinstance(item, Condition) else item
        values += list(inner) if isinstance(inner, tuple) else [inner]
    return values


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _along(values: tuple[Scalar, ...], t: float) -> Scalar:
    """A gradient's value at depth t in [0, 1] (mergekit's interpolation, operation for operation)."""
    if not all(_is_number(v) for v in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    result = (1 - frac) * values[i0] + frac * values[i1]
    if all(isinstance(v, int) for v in values) and float(result).is_integer():
        return int(result)
    return result


def evaluate(setting: Setting, tensor: str, t: float) -> Scalar | None:
    """The setting's value for tensor `tensor` at depth t; None when no filter matches.

    Args:
        setting: a parsed setting.
        tensor: the tensor's name, matched against the filters.
        t: the tensor's depth in [0, 1] (see the module docstring).
    """
    if _is_scalar(setting):
        return setting
    if not isinstance(setting[0], Condition):
        return _along(setting, t)
    for condition in setting:
        if condition.filter in (None, "*") or (tensor and condition.filter in tensor):
            value = condition.value
            return _along(value, t) if isinstance(value, tuple) else value
    return None


def first_value(scopes: Iterable[Setting | None], tensor: str, t: float) -> Scalar | None:
    """The value of the first scope (highest precedence first) whose setting gives one."""
    for setting in scopes:
        if setting is not None:
            value = evaluate(setting, tensor, t)
            if value is not None:
                return value
    return None


def as_yaml(setting: Setting) -> Any:
    """The setting as YAML data again (what `parse_setting` reads back to the same setting)."""
    if _is_scalar(setting):
        return setting
    if not isinstance(setting[0], Condition):
        return list(setting)
    return [
        {**({"filter": c.filter} if c.filter is not None else {}), "value": as_yaml(c.value)} for c in setting
    ]


def as_conditions(setting: Setting) -> tuple[Condition, ...]:
    """The setting as a list of conditions that gives the same values (a scalar or a gradient
    becomes one condition matching every tensor)."""
    if not _is_scalar(setting) and isinstance(setting[0], Condition):
        return setting
    return (Condition(setting),)


def layer_of(name: str) -> tuple[str, int] | None:
    """Where a tensor of a layer sits: its stack (the name up to the index) and the layer index
    (`model.layers.3.mlp.up_proj.weight` -> ("model.layers.", 3)); None outside the layers."""
    match = LAYER_PATTERN.search(name)
    return (name[: match.start(1)], int(match.group(1))) if match else None


def with_layer(name: str, index: int) -> str:
    """`name` with its layer index replaced by `index` (a tensor of a layer)."""
    match = LAYER_PATTERN.search(name)
    if match is None:
        raise ValueError(f"{name}: not a tensor of a layer")
    return name[: match.start(1)] + str(index) + name[match.end(1) :]


def depth(position: int, layers: int) -> float:
    """t of the layer at `position` (0-based) in a run of `layers` layers: position / (layers - 1),
    1 for a run of one layer (mergekit plan_slice)."""
    return position / (layers - 1) if layers > 1 else 1.0


@contextmanager
def _located(where: str) -> Iterator[None]:
    """Errors about `experts[0]` (a one-expert check) re-raised about `where`."""
    try:
        yield
    except ConfigError as e:
        field = e.field.replace("experts[0]", where, 1) if e.field.startswith("experts[0]") else e.field
        raise ConfigError(field, e.message) from None


def check_settings(
    cls: type[MergeMethod],
    shared: Mapping[str, Setting],
    experts: Sequence[tuple[str, str, Mapping[str, Setting]]],
) -> tuple[Any, list[ExpertParams]]:
    """Validate a training-free method's settings: every value each setting names, for the
    method block and for each expert.

    Args:
        cls: the method.
        shared: the method block's settings (parameter -> setting).
        experts: (name, where, settings) per expert: `where` names its entry in errors
            (`experts[2]`, `slices[0].sources[1]`).
    Returns:
        the method's Params and each expert's ExpertParams with every setting at its first value
        (the values everywhere when all settings are scalars).
    Raises:
        ConfigError: an unknown parameter, a parameter an expert may not set, a bad value.
    """
    first = {k: leaves(v)[0] for k, v in shared.items()}
    params = parse_block(cls.Params, first, "method", owner=cls.name)
    for key, setting in shared.items():
        for value in leaves(setting)[1:]:
            parse_block(cls.Params, first | {key: value}, "method", owner=cls.name)
    resolved = []
    for name, where, own in experts:
        for key in own:
            if key not in cls.per_expert:
                takes = ", ".join(cls.per_expert) or "none"
                raise ConfigError(
                    f"{where}.{key}", f"method '{cls.name}' takes no per-expert {key} (it takes: {takes})"
                )
        own_first = {k: leaves(v)[0] for k, v in own.items()}
        with _located(where):
            for key, setting in own.items():
                for value in leaves(setting)[1:]:
                    resolve_experts(cls, params, [{"name": name, **own_first, key: value}])
            resolved += resolve_experts(cls, params, [{"name": name, **own_first}])
    return params, resolved


@dataclass(frozen=True)
class ExpertInput:
    """One expert's part in the merge of one tensor.

    Attributes:
        name: the expert's name.
        tensor: the name of its tensor being merged (its per-expert filters match this name;
            another layer's than the output's when a slice takes a shifted layer range).
        scopes: its own settings, highest precedence first (a slice's source, its entry).
    """

    name: str
    tensor: str
    scopes: tuple[Mapping[str, Setting], ...] = ()


class TensorMethods:
    """Per tensor, the method with that tensor's parameter values, built once per distinct set of
    values (a config of scalars builds one).

    Args:
        cls: the method.
        shared: the method block's settings.
        seed: the run's seed.
    """

    def __init__(self, cls: type[MergeMethod], shared: Mapping[str, Setting], seed: int) -> None:
        self.cls, self.shared, self.seed = cls, shared, seed
        self._built: dict[tuple, MergeMethod] = {}

    def __call__(
        self,
        tensor: str,
        t: float,
        experts: Sequence[ExpertInput],
        scope: Mapping[str, Setting] | None = None,
    ) -> MergeMethod:
        """The method for output tensor `tensor` at depth `t`.

        Precedence, highest first (mergekit's): per expert, its own scopes, then `scope` (a
        slice's settings), then the method block; for the method's shared parameters, `scope`
        then the method block. A setting that gives no value (no filter matches) passes on.
        """
        scopes = (scope or {}, self.shared)
        shared = {}
        for key in dict.fromkeys(k for s in scopes for k in s):
            value = first_value((s.get(key) for s in scopes), tensor, t)
            if value is not None:
                shared[key] = value
        entries = []
        for e in experts:
            own = {}
            for key in self.cls.per_expert:
                value = first_value((s.get(key) for s in (*e.scopes, *scopes)), e.tensor, t)
                if value is not None:
                    own[key] = value
            entries.append({"name": e.name, **own})
        key = (tuple(shared.items()), tuple(tuple(e.items()) for e in entries))
        method = self._built.get(key)
        if method is None:
            try:
                params = parse_block(self.cls.Params, shared, "method", owner=self.cls.name)
                method = self.cls(params, resolve_experts(self.cls, params, entries), self.seed)
            except ConfigError as e:
                raise ConfigError(e.field, f"{e.message} (tensor '{tensor}', t = {t:g})") from None
            self._built[key] = method
        return method
