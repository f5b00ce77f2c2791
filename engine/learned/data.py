"""Validation data per task, for learning the merge coefficients.

Formats (the `data:` field of an expert in the YAML):
- `.pt` / `.safetensors`: tensors `x` [n, ...] (inputs) and, for supervised objectives,
  `y` [n] int64 (labels); for `model.kind: torch_module`.
- `.jsonl`: the task format of `supermerge.io.taskfile` (text, label, split; validation carved from
  train when absent; a file without splits is all validation); string labels map to class ids
  through the expert's config.json `label2id` when it names them all, else in sorted order;
  tokenised with the base's tokenizer (`model.kind: hf_encoder`).
- `.jsonl` for `model.kind: hf_causal_lm`: the generative format of `supermerge.io.completions`
  (prompt, completion, choices), encoded by `supermerge.learned.lm_inputs`; the completion tokens
  are the targets, so there are no separate labels.
At most `size` examples of a file's validation split are kept per task (a subset drawn with the
merge's seed; the paper uses 32); a file without validation rows has `CARVED_VALIDATION` carved
from train, the same rows its expert was not fine-tuned on, whatever the seed. Text
examples are ordered by token length, so that micro-batches cut to their longest example
(`TaskData.batches`) carry little padding; a step sums over every example, so order is free.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file

from supermerge.errors import InputError
from supermerge.io.checkpoint import Tensors
from supermerge.io.completions import Template, read_completion_file
from supermerge.io.taskfile import read_task_file, validation_subset
from supermerge.learned.lm_inputs import collate, encode, pad_id


class TopK(NamedTuple):
    """An expert's k largest logits per row of a task model's logits (distillation targets).

    Attributes:
        ids: [R, k] int64 class (token) ids.
        logits: [R, k] fp32 logits at those ids.
    """

    ids: torch.Tensor
    logits: torch.Tensor

    def to(self, device: torch.device) -> TopK:
        return TopK(self.ids.to(device), self.logits.to(device))


@dataclass
class Teacher:
    """A task's distillation targets: its expert's top-k logits at every logits row, in data order.

    Attributes:
        targets: [R, k] for all R rows of the task's examples.
        offsets: [n + 1] int64; example e's rows are offsets[e]:offsets[e + 1].
    """

    targets: TopK
    offsets: torch.Tensor

    def rows(self, lo: int, hi: int) -> TopK:
        """The targets of examples lo..hi-1."""
        a, b = int(self.offsets[lo]), int(self.offsets[min(hi, len(self.offsets) - 1)])
        return TopK(self.targets.ids[a:b], self.targets.logits[a:b])


class Batch(NamedTuple):
    """One micro-batch: model inputs [B, ...], labels [B] (or None), distillation targets (or None)."""

    inputs: Tensors
    labels: torch.Tensor | None
    teacher: TopK | None


@dataclass
class TaskData:
    """One task's validation set.

    Attributes:
        task: task name.
        source: file it came from.
        inputs: batched model inputs, each [n, ...].
        labels: [n] int64, or None when unlabelled (or when the inputs hold the targets).
        teacher: distillation targets, when the objective needs them.
    """

    task: str
    source: Path
    inputs: Tensors
    labels: torch.Tensor | None
    teacher: Teacher | None = None

    def __len__(self) -> int:
        return next(iter(self.inputs.values())).shape[0]

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Consecutive micro-batches of at most `batch_size` examples, in a fixed order.

        Tokenised text (an `attention_mask` among the inputs, right padding) is cut to the
        micro-batch's longest example: the padding columns dropped change no logit.
        """
        mask = self.inputs.get("attention_mask")
        for lo in range(0, len(self), batch_size):
            rows = slice(lo, lo + batch_size)
            width = None
            if mask is not None and mask.dim() == 2:
                width = max(1, int(mask[rows].sum(1).max()))
            inputs = {
                k: v[rows, :width] if width is not None and v.dim() == 2 else v[rows]
                for k, v in self.inputs.items()
            }
            labels = None if self.labels is None else self.labels[rows]
            teacher = None if self.teacher is None else self.teacher.rows(lo, lo + batch_size)
            yield Batch(inputs, labels, teacher)

    def check_labels(self, classes: int | None) -> None:
        """Raise InputError naming the file and example if a label is outside [0, classes)."""
        if self.labels is None or classes is None:
            return
        bad = ((self.labels < 0) | (self.labels >= classes)).nonzero()
        if len(bad):
            i = int(bad[0])
            raise InputError(
                self.source,
                f"example {i}: label {int(self.labels[i])} out of range for task "
                f"'{self.task}' whose head has {classes} classes",
            )


def load_tensor_data(path: Path, task: str, size: int, seed: int, labelled: bool) -> TaskData:
    """Read `x` (and `y`) from a .pt or .safetensors file."""
    try:
        raw = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise InputError(path, "validation data file not found") from None
    except Exception as e:
        raise InputError(path, f"cannot read validation data ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("x"), torch.Tensor):
        raise InputError(path, "expected a mapping with tensor 'x' (inputs) and 'y' (labels)")
    x, y = raw["x"], raw.get("y")
    if labelled and y is None:
        raise InputError(path, "no labels: tensor 'y' is missing (the objective needs labels)")
    if y is not None and (y.shape != (x.shape[0],) or y.is_floating_point()):
        raise InputError(path, f"'y' must be integer labels of shape [{x.shape[0]}], got {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise InputError(path, f"no validation examples for task '{task}'")
    keep = validation_subset(x.shape[0], size, seed)
    return TaskData(task, path, {"x": x[keep]}, None if y is None else y[keep].long())


def load_jsonl_data(
    path: Path,
    task: str,
    size: int,
    seed: int,
    labelled: bool,
    tokenizer,
    max_length: int,
    label2id: dict[str, int] | None = None,
) -> TaskData:
    """The validation split of a task file (supermerge.io.taskfile): `size` rows drawn with `seed`,
    tokenised."""
    task_file = read_task_file(path, labelled=labelled)
    examples = task_file.splits["validation"]
    keep = validation_subset(len(examples), size, seed)
    labels = None
    if labelled:
        ids = task_file.label_ids("validation", label2id)
        labels = torch.tensor([ids[i] for i in keep], dtype=torch.int64)
    encoded = dict(tokenizer(
        [examples[i].text for i in keep], padding=True, truncation=True, max_length=max_length,
        return_tensors="pt",
    ))  # fmt: skip
    if "attention_mask" in encoded:
        order = encoded["attention_mask"].sum(1).argsort(stable=True)
        encoded = {k: v[order] for k, v in encoded.items()}
        labels = None if labels is None else labels[order]
    return TaskData(task, path, encoded, labels)


def load_completion_data(
    path: Path,
    task: str,
    size: int,
    seed: int,
    tokenizer,
    max_length: int,
    chat: bool,
    template: Template | None,
) -> TaskData:
    """The validation split of a generative task file (supermerge.io.completions), subset to
    `size`, encoded as prompt + completion (supermerge.learned.lm_inputs), ordered by length."""
    examples = read_completion_file(path, template=template).splits["validation"]
    keep = validation_subset(len(examples), size, seed)
    encoded = [encode(tokenizer, examples[i].prompt, examples[i].completion, max_length, chat) for i in keep]
    encoded.sort(key=lambda e: len(e[0]))
    return TaskData(task, path, collate(encoded, pad_id(tokenizer)), None)
