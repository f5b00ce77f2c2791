"""The JSONL task format: splits, carving, class ids, and every kind of bad file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from supermerge.errors import InputError
from supermerge.io.taskfile import CARVED_VALIDATION, draw_validation, read_suite, read_task_file
from supermerge.learned.data import load_jsonl_data


def write_task(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def rows(split: str, labels: list, start: int = 0) -> list[dict]:
    return [{"text": f"{split} {start + i}", "label": y, "split": split} for i, y in enumerate(labels)]


def test_reads_splits_and_numbers_string_classes_in_sorted_order(tmp_path: Path) -> None:
    content = (
        rows("train", ["law", "art", "food"]) + rows("validation", ["art"]) + rows("test", ["food", "law"])
    )
    task = read_task_file(write_task(tmp_path / "topic.jsonl", content))
    assert task.name == "topic" and task.classes == ["art", "food", "law"]
    assert [len(task.splits[s]) for s in ("train", "validation", "test")] == [3, 1, 2]
    assert task.label_ids("test") == [1, 2]
    assert task.label_ids("test", {"law": 0, "food": 1, "art": 2}) == [1, 0]
    assert task.label_ids("test", {"LABEL_0": 0}) == [1, 2]  # a config that does not name them


def test_validation_is_carved_from_train_the_same_way_by_every_reader(tmp_path: Path) -> None:
    path = write_task(tmp_path / "t.jsonl", rows("train", [0, 1] * 100) + rows("test", [0, 1]))
    a, b = read_task_file(path), read_task_file(path, labelled=False)
    assert (
        len(a.splits["validation"]) == CARVED_VALIDATION and len(a.splits["train"]) == 200 - CARVED_VALIDATION
    )
    small = read_task_file(
        write_task(tmp_path / "s.jsonl", rows("train", [0, 1] * 10) + rows("test", [0, 1]))
    )
    assert len(small.splits["validation"]) == 5 and len(small.splits["train"]) == 15  # a quarter at most
    assert a.splits["validation"] == b.splits["validation"]
    assert not {e.line for e in a.splits["validation"]} & {e.line for e in a.splits["train"]}
    assert a.classes == ["0", "1"] and a.label_ids("validation") == [e.label for e in a.splits["validation"]]


class LineTokenizer:
    """Encodes "split i" as the single token i (no attention mask: load order is kept)."""

    def __call__(self, texts: list[str], **kwargs: object) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor([[int(t.split()[1])] for t in texts])}


@pytest.mark.parametrize("size", [8, 32, 64])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_a_merge_learns_only_from_rows_no_expert_trained_on_whatever_its_seed_and_size(
    tmp_path: Path, seed: int, size: int
) -> None:
    carved = write_task(tmp_path / "carved.jsonl", rows("train", [0, 1] * 60) + rows("test", [0, 1]))
    pooled = write_task(
        tmp_path / "pooled.jsonl",
        rows("train", [0, 1] * 60) + rows("validation", [0, 1] * 24, start=1000) + rows("test", [0, 1]),
    )
    for path in (carved, pooled):
        experts_saw = {e.text for e in read_task_file(path).splits["train"]}  # what finetune reads
        drawn = draw_validation({"t": read_task_file(path)}, size, seed)["t"].splits
        data = load_jsonl_data(path, "t", size, seed, True, LineTokenizer(), 16)
        learned = {
            f"validation {i}" if i >= 1000 else f"train {i}" for i in data.inputs["input_ids"][:, 0].tolist()
        }
        assert learned == {
            e.text for e in drawn["validation"]
        }  # the demo picks on what the merge learns from
        assert not learned & experts_saw and not learned & {e.text for e in drawn["dev"]}
        pool = len(read_task_file(path).splits["validation"])
        assert len(learned) == min(size, pool) and len(drawn["dev"]) == pool - len(learned)
    one, other = (
        {e.text for e in draw_validation({"t": read_task_file(pooled)}, 8, s)["t"].splits["validation"]}
        for s in (0, 1)
    )
    assert one != other  # a pool larger than the size: seeds draw different examples


def test_a_file_without_splits_is_all_validation(tmp_path: Path) -> None:
    path = write_task(tmp_path / "v.jsonl", [{"text": "x", "label": 1}, {"text": "y", "label": 0}])
    task = read_task_file(path)
    assert len(task.splits["validation"]) == 2 and not task.splits["train"]


def line(**row) -> bytes:
    return json.dumps(row).encode() + b"\n"


TRAIN, TEST = line(text="a", label=0, split="train"), line(text="c", label=0, split="test")


@pytest.mark.parametrize(
    "content, message",
    [
        (line(text="a", split="train"), "line 1: missing field 'label'"),
        (line(label=1, split="train"), "line 1: missing string field 'text'"),
        (line(text="a", label=0, split="dev"), "line 1: unknown split 'dev'"),
        (TRAIN + line(text="b", label=0), "line 2: missing field 'split'"),
        (TRAIN + b'{"text": "\xff\xfe", "label": 0, "split": "test"}\n', "line 2: not valid UTF-8"),
        (TRAIN + b"not json\n", "line 2: not valid JSON"),
        (TEST, "empty split 'train'"),
        (TRAIN + line(text="b", label=0, split="validation"), "empty split 'test'"),
        (line(text="a", label="x", split="train") + line(text="b", label="x", split="validation")
         + line(text="c", label="y", split="test"), "line 3: label 'y' appears only in test"),
        (line(text="a", label="x", split="train") + TRAIN + line(text="c", label="x", split="test"),
         "labels mix integers and strings"),
        (b"", "no examples"),
    ],
)  # fmt: skip
def test_bad_task_files_name_the_file_and_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError, match="bad.jsonl") as info:
        read_task_file(path)
    assert message in str(info.value)


def test_suite_is_every_jsonl_of_a_folder(tmp_path: Path) -> None:
    for name in ("noun", "verb"):
        write_task(tmp_path / f"{name}.jsonl", rows("train", ["a", "b", "a"]) + rows("test", ["b"]))
    (tmp_path / "notes.txt").write_text("ignored")
    suite = read_suite(tmp_path, validation_size=1)
    assert list(suite) == ["noun", "verb"] and all(len(t.splits["validation"]) == 1 for t in suite.values())
    with pytest.raises(InputError, match="no <task>.jsonl"):
        read_suite(tmp_path / "nowhere")
