"""The task format: one JSONL file per task, a folder of them a suite.

Each line is a JSON object {"text": str, "label": str | int, "split": "train" | "validation" |
"test"}. Class ids: integer labels are their own ids; string labels are numbered in sorted
order of the names seen in train and validation. When a file has no validation rows,
`CARVED_VALIDATION` rows (at most a quarter of train) are carved from train with a fixed seed:
the carve is a property of the file alone (never of a merge's seed or validation size), so the
experts fine-tuned on its train split and a merge that learns on its validation split never
share an example. Write validation rows to give a merge a larger pool to draw from. A file with
no "split" field at all is a validation-only file (every row is validation). Bad files are
refused with the file and line: invalid UTF-8 or JSON, a missing field, an unknown split, an
empty split, a label seen only in test, labels mixing ints and strings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import torch

from supermerge.errors import InputError

SPLITS = ("train", "validation", "test")
CARVED_VALIDATION = 32  # rows carved from train when a file has no validation rows (the paper's 32)
_CARVE_SEED = 0
T = TypeVar("T")


@dataclass(frozen=True)
class Example:
    """One labelled text and the file line it came from (1-based)."""

    text: str
    label: str | int
    line: int


@dataclass
class TaskFile:
    """A task's examples by split.

    Attributes:
        name: task name (the file's stem).
        path: the JSONL file.
        classes: class names; a class's id is its index.
        splits: split name -> examples (validation carved from train when absent).
    """

    name: str
    path: Path
    classes: list[str]
    splits: dict[str, list[Example]]

    def label_ids(self, split: str, label2id: dict[str, int] | None = None) -> list[int]:
        """Class ids of a split's examples.

        Integer labels are their own ids. String labels map through `label2id` (e.g. an expert's
        config.json) when it names every class of the file, else through `classes` order.
        """
        mapping = {c: i for i, c in enumerate(self.classes)}
        if label2id is not None and all(c in label2id for c in self.classes):
            mapping = dict(label2id)
        return [e.label if isinstance(e.label, int) else mapping[e.label] for e in self.splits[split]]


def parse_lines(path: Path) -> list[tuple[int, dict]]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(path, "task file not found") from None
    rows = []
    for number, line in enumerate(raw.splitlines(), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(path, f"line {number}: not valid UTF-8 ({e.reason})") from None
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(path, f"line {number}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise InputError(path, f"line {number}: expected a JSON object")
        rows.append((number, row))
    return rows


def assign_splits(path: Path, rows: list[tuple[dict, T]], validation_size: int) -> dict[str, list[T]]:
    """Examples by split, from (JSON row, example) pairs in file order (each example has a `line`): rows
    name their split, or none does (then all are validation); validation is carved from train
    (`validation_size` examples but at most a quarter of train, with a fixed seed) when a file
    with splits has none."""
    has_splits = any("split" in row for row, _ in rows)
    splits: dict[str, list[T]] = {s: [] for s in SPLITS}
    for row, example in rows:
        split = row.get("split", "validation") if not has_splits else row.get("split")
        if split is None:
            raise InputError(path, f"line {example.line}: missing field 'split'")
        if split not in SPLITS:
            raise InputError(
                path, f"line {example.line}: unknown split {split!r} (known: {', '.join(SPLITS)})"
            )
        splits[split].append(example)
    if has_splits:
        if not splits["train"]:
            raise InputError(path, "empty split 'train'")
        if not splits["test"]:
            raise InputError(path, "empty split 'test'")
        if not splits["validation"]:
            if len(splits["train"]) < 2:
                raise InputError(path, "too few train examples to carve a validation set from")
            size = min(validation_size, max(1, len(splits["train"]) // 4))
            order = torch.randperm(
                len(splits["train"]), generator=torch.Generator().manual_seed(_CARVE_SEED)
            ).tolist()
            carved = set(order[:size])
            splits["validation"] = [e for i, e in enumerate(splits["train"]) if i in carved]
            splits["train"] = [e for i, e in enumerate(splits["train"]) if i not in carved]
    elif not splits["validation"]:
        raise InputError(path, "no examples")
    return splits


def validation_subset(n: int, size: int, seed: int) -> list[int]:
    """The indices a merge with `seed` keeps of a validation split of n rows: a seeded random
    subset of min(n, size), ascending (every row when n <= size)."""
    if n <= size:
        return list(range(n))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values.tolist()


def draw_validation(tasks: dict[str, T], size: int, seed: int) -> dict[str, T]:
    """The tasks (TaskFile or io.completions' CompletionTaskFile) as a merge with
    `validation_size` `size` and `seed` sees them: `validation` the rows it learns from
    (`validation_subset`), `dev` the rest of the validation pool (empty when the pool has no more
    than `size` rows): labelled data that neither the experts nor the merge trained on, for
    choosing between merges."""
    drawn = {}
    for name, task in tasks.items():
        pool = task.splits["validation"]
        keep = set(validation_subset(len(pool), size, seed))
        splits = task.splits | {
            "validation": [e for i, e in enumerate(pool) if i in keep],
            "dev": [e for i, e in enumerate(pool) if i not in keep],
        }
        drawn[name] = replace(task, splits=splits)
    return drawn


def read_task_file(
    path: str | Path, validation_size: int = CARVED_VALIDATION, labelled: bool = True
) -> TaskFile:
    """Read and check one task file (see the module docstring).

    Args:
        path: the JSONL file.
        validation_size: examples carved from train when the file has no validation rows (every
            reader of one file must carve alike: keep the default outside tests).
        labelled: whether every row must have a label.
    """
    path = Path(path)
    rows = parse_lines(path)
    examples = []
    for number, row in rows:
        if not isinstance(row.get("text"), str):
            raise InputError(path, f"line {number}: missing string field 'text'")
        if labelled and "label" not in row:
            raise InputError(path, f"line {number}: missing field 'label'")
        label = row.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, int | str)):
            raise InputError(path, f"line {number}: label must be a string or an integer, got {label!r}")
        if isinstance(label, int) and label < 0:
            raise InputError(path, f"line {number}: negative label {label}")
        examples.append((row, Example(row["text"], label, number)))
    splits = assign_splits(path, examples, validation_size)
    return TaskFile(path.stem, path, _classes(path, splits, labelled), splits)


def _classes(path: Path, splits: dict[str, list[Example]], labelled: bool) -> list[str]:
    if not labelled:
        return []
    known = [e for s in ("train", "validation") for e in splits[s]]
    kinds = {type(e.label) for e in known + splits["test"]}
    if len(kinds) > 1:
        first = next(e for e in known + splits["test"] if type(e.label) is not type(known[0].label))
        raise InputError(path, f"line {first.line}: labels mix integers and strings")
    seen = {str(e.label) for e in known}
    for example in splits["test"]:
        if str(example.label) not in seen:
            raise InputError(path, f"line {example.line}: label {example.label!r} appears only in test")
    if kinds == {int}:
        top = max(int(label) for label in seen)
        return [str(i) for i in range(top + 1)]
    return sorted(seen)


def read_suite(folder: str | Path, validation_size: int = CARVED_VALIDATION) -> dict[str, TaskFile]:
    """Every `<task>.jsonl` of a folder, by task name."""
    folder = Path(folder)
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise InputError(folder, "no <task>.jsonl files in the suite folder")
    return {f.stem: read_task_file(f, validation_size) for f in files}
