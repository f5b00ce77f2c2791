"""The one way a YAML block becomes a frozen dataclass: `parse_block`.

Every block of the merge YAML (the top level's parts in `supermerge.config`, each method's
`Params` in `supermerge.methods`) is a frozen dataclass whose fields are the block's keys. A
block is checked in one style:
  1. unknown keys are refused, naming the dotted field and the known ones;
  2. each value is checked against its field's annotation (float, int, bool, str, Path, list,
     unions of them, each optionally `| None`); floats must be finite (NaN and Inf would merge
     into a model of NaN or Inf); a field with `metadata={"size": True}` takes sizes like 2GB;
     Path fields resolve against the YAML file's folder;
  3. the dataclass's own `__post_init__` checks ranges and relations, raising
     ValueError("<field>: <what is wrong>"), which becomes a ConfigError naming `<where>.<field>`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from supermerge.errors import ConfigError

SIZE_UNITS = {"": 1, "B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}
# YAML names that are Python keywords, and the dataclass field each maps to.
YAML_ALIASES = {"lambda": "lam"}
YAML_NAMES = {field: name for name, field in YAML_ALIASES.items()}


def parse_size(value: Any, where: str) -> int:
    """'2GB' / '512MB' / 1048576 -> bytes (a positive number of bytes)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", str(value).upper())
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(where, f"expected a size like 2GB or 512MB, got {value!r}")
    unit = match.group(2) if match.group(2).endswith("B") or not match.group(2) else match.group(2) + "B"
    return int(float(match.group(1)) * SIZE_UNITS[unit])


def _as_kind(value: Any, kind: str, root: Path | None) -> Any:
    """`value` as the annotation `kind` (float, int, bool, str, Path, list..., tuple...), or
    _NO if it is not one."""
    if kind == "float":
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else _NO
    if kind == "int":
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if kind == "bool":
        return value if isinstance(value, bool) else _NO
    if kind == "str":
        return value if isinstance(value, str) else _NO
    if kind == "Path":
        if not isinstance(value, str):
            return _NO
        path = Path(value).expanduser()
        return path if path.is_absolute() or root is None else root / path
    if kind.startswith(("list", "tuple")):
        if not isinstance(value, list):
            return _NO
        return tuple(value) if kind.startswith("tuple") else value
    return value


_NO = object()
EXPECTED = {
    "float": "a number", "int": "an integer", "bool": "true or false", "str": "a string", "Path": "a path",
}  # fmt: skip


def _check_value(value: Any, field: dataclasses.Field, where: str, root: Path | None) -> Any:
    """`value` as the type `field` is annotated with (the first kind of a union that it is);
    ConfigError naming `where` otherwise."""
    annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None and "None" in kinds:
        return None
    if field.metadata.get("size"):
        return parse_size(value, where)
    for kind in (k for k in kinds if k != "None"):
        result = _as_kind(value, kind, root)
        if isinstance(result, float) and not math.isfinite(result):
            raise ConfigError(where, f"must be a finite number, got {value!r}")
        if result is not _NO:
            return result
    expected = " or ".join(EXPECTED.get(k, "a list" if k.startswith(("list", "tuple")) else k) for k in kinds)
    raise ConfigError(where, f"expected {expected}, got {value!r}")


def parse_block(cls: type, raw: Any, where: str, root: Path | None = None, owner: str | None = None) -> Any:
    """Build the frozen dataclass `cls` from a YAML mapping (see module docstring).

    Args:
        cls: the block's dataclass.
        raw: the YAML value (a mapping, or None for all defaults).
        where: dotted config path of the block, e.g. ``method`` or ``distributed``.
        root: folder that relative Path fields resolve against.
        owner: what the fields belong to, for "unknown parameter for '<owner>'" messages.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(where, f"expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values = {}
    for key, value in raw.items():
        name = YAML_ALIASES.get(key, key)
        if name not in fields:
            known = ", ".join(sorted(YAML_NAMES.get(f, f) for f in fields)) or "none"
            what = f"unknown parameter for '{owner}'" if owner else "unknown field"
            raise ConfigError(f"{where}.{key}", f"{what} (known: {known})")
        values[name] = _check_value(value, fields[name], f"{where}.{key}", root)
    try:
        return cls(**values)
    except ValueError as e:
        name, _, message = str(e).partition(": ")
        field = YAML_NAMES.get(name, name)
        raise ConfigError(f"{where}.{field}" if name in fields else where, message or str(e)) from None
