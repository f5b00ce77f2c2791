"""Validation data per task, for learning the merge coefficients.

Formats (the `data:` field of an expert in the YAML):
- `.pt` / `.safetensors`: tensors `x` [n, ...] (inputs) and, for supervised objectives,
  `y` [n] int64 (labels); for `model.kind: torch_module`.
- `.jsonl`: one JSON object per line with `text`, `label` (an int, or a name found in the
  expert's config.json `label2id`) and optionally `split`; rows with split "validation" are
  used when any row has a split, else every row; tokenised with the base's tokenizer
  (`model.kind: hf_encoder`).
At most `size` examples are kept per task (a seeded random subset; the paper uses 32).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from supermerge.errors import InputError

Tensors = dict[str, torch.Tensor]


@dataclass
class TaskData:
    """One task's validation set.

    Attributes:
        task: task name.
        source: file it came from.
        inputs: batched model inputs, each [n, ...].
        labels: [n] int64, or None when unlabelled.
    """

    task: str
    source: Path
    inputs: Tensors
    labels: torch.Tensor | None

    def __len__(self) -> int:
        return next(iter(self.inputs.values())).shape[0]

    def batches(
        self, batch_size: int, device: torch.device | str = "cpu"
    ) -> Iterator[tuple[Tensors, torch.Tensor | None]]:
        """Consecutive micro-batches of at most `batch_size` examples, in a fixed order."""
        for lo in range(0, len(self), batch_size):
            inputs = {k: v[lo : lo + batch_size].to(device) for k, v in self.inputs.items()}
            labels = None if self.labels is None else self.labels[lo : lo + batch_size].to(device)
            yield inputs, labels

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


def _subset(n: int, size: int, seed: int) -> torch.Tensor:
    """Indices of a seeded random subset of min(n, size) of range(n), in ascending order."""
    if n <= size:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values


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
    keep = _subset(x.shape[0], size, seed)
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
    """Read and tokenise a JSONL text file (see module docstring)."""
    if not path.is_file():
        raise InputError(path, "validation data file not found")
    rows: list[tuple[int, dict]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise InputError(path, f"not valid UTF-8 ({e})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(path, f"line {number}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise InputError(path, f"line {number}: missing string field 'text'")
        if labelled and "label" not in row:
            raise InputError(path, f"line {number}: missing field 'label'")
        rows.append((number, row))
    if any("split" in r for _, r in rows):
        rows = [(n, r) for n, r in rows if r.get("split") == "validation"]
    if not rows:
        raise InputError(path, f"no validation examples for task '{task}'")
    rows = [rows[i] for i in _subset(len(rows), size, seed).tolist()]
    labels = None
    if labelled:
        values = []
        for number, row in rows:
            label = row["label"]
            if isinstance(label, str) and label2id is not None and label in label2id:
                label = label2id[label]
            if not isinstance(label, int) or isinstance(label, bool):
                raise InputError(path, f"line {number}: label {row['label']!r} is not a class index")
            values.append(label)
        labels = torch.tensor(values, dtype=torch.int64)
    encoded = tokenizer(
        [r["text"] for _, r in rows],
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return TaskData(task, path, dict(encoded), labels)
