"""User code named in the YAML as "package.module:function" (model factories, objectives)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from supermerge.errors import ConfigError

# Modules that moved, by the name configs written for earlier versions use.
MOVED = {"supermerge.toy": "supermerge.demo.toy"}


def import_object(spec: str, field: str) -> Callable:
    """'package.module:name' -> the object; ConfigError naming `field` if it cannot be found."""
    module_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(MOVED.get(module_name, module_name)), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(field, f"cannot import {spec!r} ({e})") from None
