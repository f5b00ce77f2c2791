"""Keeping what a command writes apart from what it reads.

A command refuses, before any work, to write at a path that is, contains or lies inside one
of its inputs: it would overwrite or mix into the models and data it is reading. Paths are
compared after resolving symbolic links and `..`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from supermerge.errors import SupermergeError


def overlap(a: Path, b: Path) -> str | None:
    """How `a` overlaps `b` ("is", "contains", "lies inside"), or None; both resolved."""
    a, b = a.resolve(), b.resolve()
    if a == b:
        return "is"
    if a in b.parents:
        return "contains"
    if b in a.parents:
        return "lies inside"
    return None


def check_apart(output: Path, inputs: Iterable[tuple[str, Path]], what: str = "output") -> None:
    """Refuse `output` if it is, contains or lies inside any of `inputs` ((label, path) pairs);
    the error names both paths."""
    for label, path in inputs:
        relation = overlap(output, path)
        if relation is not None:
            raise SupermergeError(
                f"{output}: the {what} {relation} {label} {path}, which this command reads; "
                f"choose another {what} path"
            )
