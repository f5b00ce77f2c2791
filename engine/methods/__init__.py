"""Registered merge methods; `build_method` turns a YAML `method:` block into one."""

from supermerge.methods import geometry, passthrough, task_arithmetic  # noqa: F401  (registers the methods)
from supermerge.methods.base import REGISTRY, ExpertParams, MergeMethod, build_method, resolve_experts

__all__ = ["REGISTRY", "ExpertParams", "MergeMethod", "build_method", "resolve_experts"]
