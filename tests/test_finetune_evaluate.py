"""finetune -> merge -> evaluate on real MiniLM-L6 with a small text suite in the task format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from supermerge.checkpoint import Checkpoint
from supermerge.cli import main
from supermerge.finetune import FinetuneConfig, finetune_suite
from supermerge.tasks import read_suite
from tests.minilm import minilm_dir

POSITIVE = ["I love it", "great work", "wonderful day", "so happy", "excellent food", "nice people"]
NEGATIVE = ["I hate it", "awful work", "terrible day", "so sad", "disgusting food", "rude people"]
QUESTIONS = ["where is it?", "why now?", "who came?", "what time is it?", "how are you?", "can we go?"]
STATEMENTS = ["it is here.", "we left.", "she came.", "it is noon.", "I am fine.", "we can go."]


def write_suite(folder: Path) -> Path:
    folder.mkdir()
    for name, classes in {"sentiment": {"positive": POSITIVE, "negative": NEGATIVE},
                          "question": {"question": QUESTIONS, "statement": STATEMENTS}}.items():  # fmt: skip
        lines = []
        for label, texts in classes.items():
            for i, text in enumerate(texts * 3):
                split = "test" if i % 6 == 5 else "train"
                lines.append(json.dumps({"text": f"{text} {i}", "label": label, "split": split}))
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> tuple[Path, Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("ft")
    suite = write_suite(root / "suite")
    cfg = FinetuneConfig(epochs=1, batch_size=8, train_size=None, lr=1e-4)
    return (
        suite,
        root / "cache",
        finetune_suite(minilm_dir(), read_suite(suite, validation_size=4), root / "cache", cfg, False),
    )


@pytest.mark.slow
def test_finetune_writes_experts_with_their_head_and_classes(experts) -> None:
    _, _, paths = experts
    for task, folder in paths.items():
        ckpt = Checkpoint(folder)
        assert ckpt.infos["classifier.weight"].shape == (2, 384)
        assert ckpt.config["supermerge_task"] == task
        assert set(ckpt.config["label2id"]) == (
            {"negative", "positive"} if task == "sentiment" else {"question", "statement"}
        )
        assert (folder / "tokenizer.json").is_file()


@pytest.mark.slow
def test_finetune_reuses_cached_experts(experts) -> None:
    suite, cache, paths = experts
    stamps = {t: (p / "model.safetensors").stat().st_mtime_ns for t, p in paths.items()}
    cfg = FinetuneConfig(epochs=1, batch_size=8, train_size=None, lr=1e-4)
    again = finetune_suite(minilm_dir(), read_suite(suite, validation_size=4), cache, cfg, False)
    assert again == paths
    assert stamps == {t: (p / "model.safetensors").stat().st_mtime_ns for t, p in again.items()}


@pytest.mark.slow
def test_merge_then_evaluate_every_task_through_the_cli(experts, tmp_path: Path, capsys) -> None:
    suite, _, paths = experts
    assert (
        main(
            [
                "-q",
                "evaluate",
                str(paths["sentiment"]),
                "--suite",
                str(suite),
                "--json",
                str(tmp_path / "e.json"),
            ]
        )
        == 0
    )
    assert list(json.loads((tmp_path / "e.json").read_text())) == ["sentiment"]  # an expert has one head
    doc = {
        "base": str(minilm_dir()),
        "experts": [{"name": t, "path": str(p)} for t, p in paths.items()],
        "method": {"name": "supermerge", "steps": 2, "validation_size": 4},
        "data_dir": str(suite),
        "model": {"kind": "hf_encoder"},
        "heads": ["classifier.*"],
        "output": str(tmp_path / "merged"),
    }
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(doc))
    assert main(["-q", "merge", str(tmp_path / "merge.yaml")]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "-q",
                "evaluate",
                str(tmp_path / "merged"),
                "--suite",
                str(suite),
                "--json",
                str(tmp_path / "m.json"),
            ]
        )
        == 0
    )
    accuracy = json.loads((tmp_path / "m.json").read_text())
    assert set(accuracy) == {"sentiment", "question"} and all(0 <= a <= 1 for a in accuracy.values())
    assert "mean" in capsys.readouterr().out


def test_finetune_and_evaluate_refuse_unknown_tasks_and_missing_suites(tmp_path: Path, capsys) -> None:
    suite = write_suite(tmp_path / "suite")
    assert main(["-q", "finetune", "--suite", str(suite), "--tasks", "sentiment", "poetry"]) == 2
    assert "no task file for poetry" in capsys.readouterr().err
    assert main(["-q", "evaluate", str(tmp_path), "--suite", str(tmp_path / "nowhere")]) == 2
    assert "no <task>.jsonl files" in capsys.readouterr().err
