"""Grouping experts by the cosine similarity of their task vectors (hierarchical merges, level by level)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from supermerge.io.checkpoint import Checkpoint
from supermerge.taskvectors.source import Expert, TaskVectorSource

log = logging.getLogger(__name__)
SIMILARITY_ELEMENTS = 65536  # entries per sampled tensor used for task-vector similarity


def similarity_groups(
    base: Checkpoint, children: list[Expert], g: int, sample: int, heads: Sequence[str]
) -> list[list[str]]:
    """Greedy groups (of names) of at most g children with the most similar task vectors.

    Similarity: cosine of the task vectors over `sample` tensors spread evenly over the model,
    each tensor subsampled to at most SIMILARITY_ELEMENTS evenly strided entries, so the memory
    it takes is k x sample x SIMILARITY_ELEMENTS values plus one tensor, whatever the model size.
    The first ungrouped child takes the g - 1 ungrouped children most similar to it.
    """
    source = TaskVectorSource(base, children, list(heads))
    names = source.names
    picked = [names[round(i)] for i in torch.linspace(0, len(names) - 1, min(sample, len(names))).tolist()]
    parts: list[list[torch.Tensor]] = [[] for _ in children]
    for name in picked:
        b = source.read_base(name)
        stride = max(1, math.ceil(b.numel() / SIMILARITY_ELEMENTS))
        for i in range(len(children)):
            parts[i].append(source.task_vector(name, b, i).reshape(-1)[::stride].clone())
    vectors = torch.nn.functional.normalize(torch.stack([torch.cat(p) for p in parts]), dim=1)
    similarity = vectors @ vectors.T
    log.info("task-vector cosine similarity:\n%s", similarity)
    remaining = list(range(len(children)))
    groups = []
    while remaining:
        seed = remaining.pop(0)
        ranked = sorted(remaining, key=lambda j: -float(similarity[seed, j]))[: g - 1]
        remaining = [j for j in remaining if j not in ranked]
        groups.append([children[i].name for i in [seed, *ranked]])
    return groups
