"""The generative task format and the causal-LM encoding: rows, templates, choices, splits, and
every kind of bad file named with its line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from supermerge.errors import InputError
from supermerge.io.completions import Template, read_completion_file
from supermerge.learned.lm_inputs import collate, completion_targets, encode, predicting_positions
from tests.lm import byte_tokenizer


def write(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def test_prompt_rows_keep_their_choices_and_splits(tmp_path: Path) -> None:
    rows = [
        {"prompt": f"q{i}", "completion": " a", "choices": [" a", " b"], "split": s}
        for i, s in enumerate(["train"] * 8 + ["test"] * 2)
    ]
    task = read_completion_file(write(tmp_path / "qa.jsonl", rows), validation_size=2)
    assert task.name == "qa" and task.scored_by_choices
    assert [len(task.splits[s]) for s in ("train", "validation", "test")] == [6, 2, 2]
    assert task.splits["test"][0].choices == (" a", " b") and task.splits["test"][0].line == 9


def test_text_label_rows_are_posed_through_the_files_template_with_every_class_as_a_choice(
    tmp_path: Path,
) -> None:
    header = {"template": {"prompt": "Topic of: {text}\nAnswer:", "completion": " {label}"}}
    rows = [header] + [
        {"text": t, "label": y, "split": s}
        for t, y, s in [("x", "law", "train"), ("y", "art", "train"), ("z", "art", "test")]
    ]
    task = read_completion_file(write(tmp_path / "t.jsonl", rows), template=Template("ignored {text}"))
    example = task.splits["test"][0]
    assert example.prompt == "Topic of: z\nAnswer:" and example.completion == " art"
    assert example.choices == (" art", " law") and example.line == 4


def test_the_yaml_template_applies_to_a_file_without_one(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", [{"text": "abc", "label": 3}])
    task = read_completion_file(path, template=Template("Q: {text}", " -> {label}"))
    assert task.splits["validation"][0].prompt == "Q: abc"
    assert task.splits["validation"][0].completion == " -> 3"


def test_rows_without_choices_are_scored_by_exact_match(tmp_path: Path) -> None:
    task = read_completion_file(write(tmp_path / "g.jsonl", [{"prompt": "p", "completion": " c"}]))
    assert not task.scored_by_choices and task.splits["validation"][0].choices is None


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prompt": "p"}], "line 1: missing non-empty string field 'completion'"),
        ([{"prompt": 3, "completion": "c"}], "line 1: 'prompt' must be a string"),
        ([{"prompt": "p", "completion": "c", "choices": ["a", "b"]}], "line 1: the completion is not one of"),
        ([{"prompt": "p", "completion": "a", "choices": ["a", "a"]}], "line 1: 'choices' must be a list"),
        ([{"prompt": "p", "completion": "a", "choices": ["a"]}, {"prompt": "q", "completion": "b"}],
         "line 2: some rows have 'choices'"),
        ([{"text": "t", "label": "x"}], "line 1: a text/label row needs a template"),
        ([{"template": {"prompt": "{nope}"}}, {"text": "t", "label": "x"}], "cannot be filled with {text}"),
        ([{"template": {"prompt": 1}}], "line 1: template fields must be strings"),
        ([{"answer": 1}], "line 1: expected a 'prompt'"),
        ([{"prompt": "p", "completion": "c", "split": "dev"}], "line 1: unknown split 'dev'"),
        (["not json"], "line 1: not valid JSON"),
        ([{"template": {"prompt": "{text}", "completion": "{label}"}},
          {"text": "a", "label": "x", "split": "train"}, {"text": "b", "label": "y", "split": "test"}],
         "line 3: label 'y' appears only in test"),
    ],
)  # fmt: skip
def test_bad_generative_files_name_the_file_and_line(tmp_path: Path, rows: list, message: str) -> None:
    with pytest.raises(InputError, match="bad.jsonl") as info:
        read_completion_file(write(tmp_path / "bad.jsonl", rows))
    assert message in str(info.value)


def test_encoding_marks_the_completion_and_its_eos_as_targets() -> None:
    tok = byte_tokenizer()
    ids, n_prompt = encode(tok, "ab", " c", max_length=32)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and n_prompt == 3
    batch = collate([(ids, n_prompt), encode(tok, "abcdef", " xy", 32)], pad_id=0)
    assert batch["input_ids"].shape == (2, 11) and batch["attention_mask"][0].sum() == 6
    targets = completion_targets(batch["input_ids"], batch["completion_mask"])
    assert tok.decode(targets[:2]) == " c" and targets[2] == tok.eos_token_id
    assert int(predicting_positions(batch["completion_mask"]).sum()) == len(targets) == 3 + 4


def test_a_long_prompt_loses_its_left_side_but_keeps_bos_and_the_completion() -> None:
    tok = byte_tokenizer()
    ids, n_prompt = encode(tok, "0123456789", " end", max_length=8)
    assert len(ids) == 8 and ids[0] == tok.bos_token_id
    assert tok.decode(ids[1:n_prompt]) == "89" and tok.decode(ids[n_prompt:-1]) == " end"


def test_the_chat_template_wraps_the_prompt() -> None:
    tok = byte_tokenizer()
    ids, n_prompt = encode(tok, "hi", " yo", max_length=64, chat=True)
    assert tok.decode(ids[:n_prompt]) == "<user>hi\n<assistant>"
