"""Distillation targets: each expert's top-k logits on its own task's validation inputs.

Computed once, before W trains, one expert resident at a time (its full weights, read tensor by
tensor), and kept on disk as `<cache>/<key>.safetensors` (ids [R, k] int64, logits [R, k] fp32,
offsets [n + 1]), where the key hashes the expert's weight files, the task's encoded inputs, the
task model's kind and k: a cached file is reused by any later run with the same expert and data,
and a changed expert or data set never reads a stale one. While W trains no expert is resident:
only these [R, k] tensors are.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from supermerge.io.atomic import atomic_file
from supermerge.io.checkpoint import Checkpoint, Tensors
from supermerge.learned.data import TaskData, Teacher, TopK
from supermerge.learned.task_models import TaskModel

log = logging.getLogger(__name__)
VERSION = "1"  # part of every key: bump it when the targets' computation changes


def targets_key(expert: Checkpoint, data: TaskData, kind: str, k: int) -> str:
    """Content key of an expert's targets on a task's inputs."""
    h = hashlib.sha256(f"{VERSION}\0{kind}\0{k}\0{expert.content_digest()}".encode())
    for name in sorted(data.inputs):
        tensor = data.inputs[name].contiguous()
        h.update(f"\0{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()[:24]


@torch.no_grad()  # not inference_mode: the targets take part in W's autograd graph later
def compute_targets(
    model: TaskModel, weights: Tensors, head: Tensors, data: TaskData, k: int, batch_size: int
) -> Teacher:
    """The top-k logits of `model` with `weights` and `head` at every logits row of `data`."""
    ids, values, rows = [], [], []
    for inputs, _, _ in data.batches(batch_size):
        logits = model.logits(weights, head, inputs).float()
        top = logits.topk(min(k, logits.shape[-1]), dim=-1)
        ids.append(top.indices)
        values.append(top.values)
        rows.append(model.rows_per_example(inputs))
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cat(rows).cumsum(0)])
    return Teacher(TopK(torch.cat(ids), torch.cat(values)), offsets)


def expert_teacher(
    model: TaskModel,
    expert: Checkpoint,
    head_names: list[str],
    fixed: Tensors,
    data: TaskData,
    k: int,
    batch_size: int,
    cache: Path,
    device: torch.device,
) -> Teacher:
    """The expert's targets on `data`, read from `cache` or computed (the expert's full weights
    resident only here) and written there atomically."""
    path = cache / f"{data.task}-{targets_key(expert, data, type(model).__name__, k)}.safetensors"
    if path.is_file():
        log.info("distillation targets of %s: cached at %s", data.task, path)
        stored = load_file(str(path))
        return Teacher(TopK(stored["ids"], stored["logits"]), stored["offsets"])
    log.info("distillation targets of %s: computing with %s", data.task, expert.path)
    weights = {n: expert.read(n).to(device) for n in expert.names}
    head = {n: weights.pop(n) for n in head_names}
    teacher = compute_targets(model, {**fixed, **weights}, head, data, k, batch_size)
    del weights, head
    cache.mkdir(parents=True, exist_ok=True)
    tensors = {"ids": teacher.targets.ids, "logits": teacher.targets.logits, "offsets": teacher.offsets}
    with atomic_file(path) as tmp:
        save_file({n: t.cpu().contiguous() for n, t in tensors.items()}, str(tmp))
    return Teacher(teacher.targets.to(torch.device("cpu")), teacher.offsets.cpu())
