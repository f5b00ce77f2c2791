"""finetune -> merge -> evaluate on real MiniLM-L6 with a small text suite in the task format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from supermerge.cli import main
from supermerge.demo.finetune import FinetuneConfig, finetune_suite
from supermerge.io.checkpoint import Checkpoint
from supermerge.io.taskfile import read_suite
from tests.files import tree_hashes
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


def argmax_accuracy(model_dir: Path, task_file: Path, head_file: Path) -> float:
    """Test accuracy computed by hand: each test row alone (no batching, no padding) through the
    encoder, mean-pooled, through the head's `classifier.*`; class ids in the file's sorted order."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    rows = [json.loads(line) for line in task_file.read_text().splitlines()]
    classes = sorted({r["label"] for r in rows})
    test = [r for r in rows if r["split"] == "test"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoder = AutoModel.from_pretrained(model_dir).eval()
    head = load_file(str(head_file))
    correct = 0
    with torch.no_grad():
        for row in test:
            inputs = tokenizer(row["text"], truncation=True, max_length=64, return_tensors="pt")
            features = encoder(**inputs).last_hidden_state.mean(1)  # one row: no padding to mask
            logits = features @ head["classifier.weight"].T + head["classifier.bias"]
            correct += int(logits.argmax(-1)) == classes.index(row["label"])
    return correct / len(test)


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
    expert = json.loads((tmp_path / "e.json").read_text())  # an expert has one head: its own
    expert_dir = paths["sentiment"]
    own_head = expert_dir / "model.safetensors"  # the expert's weights hold its head's `classifier.*`
    assert expert == {"sentiment": argmax_accuracy(expert_dir, suite / "sentiment.jsonl", own_head)}
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
    merged = tmp_path / "merged"
    heads = merged / "heads"
    assert accuracy == {
        t: argmax_accuracy(merged, suite / f"{t}.jsonl", heads / f"{t}.safetensors")
        for t in ("sentiment", "question")
    }
    assert "mean" in capsys.readouterr().out


def test_finetune_and_evaluate_refuse_unknown_tasks_and_missing_suites(tmp_path: Path, capsys) -> None:
    suite = write_suite(tmp_path / "suite")
    assert main(["-q", "finetune", "--suite", str(suite), "--tasks", "sentiment", "poetry"]) == 2
    assert "no task file for poetry" in capsys.readouterr().err
    assert main(["-q", "evaluate", str(tmp_path), "--suite", str(tmp_path / "nowhere")]) == 2
    assert "no <task>.jsonl files" in capsys.readouterr().err


@pytest.mark.slow
def test_length_sorted_trimmed_micro_batches_give_the_same_logits(experts) -> None:
    """data.py orders text by length and cuts each micro-batch's padding: no logit changes."""
    import torch
    from transformers import AutoTokenizer

    from supermerge.learned.data import load_jsonl_data
    from supermerge.learned.task_models import HFEncoderModel, ModelSpec

    suite, _, paths = experts
    ckpt = Checkpoint(paths["sentiment"])
    tok = AutoTokenizer.from_pretrained(paths["sentiment"])
    data = load_jsonl_data(suite / "sentiment.jsonl", "sentiment", 8, 0, True, tok, 64)
    assert data.inputs["attention_mask"].sum(1).diff().ge(0).all()  # sorted by length
    model = HFEncoderModel(ModelSpec(max_length=64), ckpt)
    body = {n: ckpt.read(n) for n in ckpt.names if not n.startswith("classifier.")}
    head = {n: ckpt.read(n) for n in ckpt.names if n.startswith("classifier.")}
    whole = model.logits(body, head, data.inputs)
    batches = list(data.batches(3))
    widths = [b.inputs["input_ids"].shape[1] for b in batches]
    assert widths == sorted(widths) and widths[0] < data.inputs["input_ids"].shape[1]
    pieces = torch.cat([model.logits(body, head, b.inputs) for b in batches])
    torch.testing.assert_close(pieces, whole, atol=1e-5, rtol=1e-4)
    assert torch.equal(torch.cat([b.labels for b in batches]), data.labels)


def test_length_bucketed_batches_cover_every_example_once_with_less_padding() -> None:
    import random

    import torch

    from supermerge.demo.finetune import length_bucketed_batches

    lengths = [random.Random(i).randint(3, 64) for i in range(1000)]
    batches = length_bucketed_batches(lengths, 32, torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert all(1 <= len(b) <= 32 for b in batches) and len(batches) <= 1000 // 32 + 8
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(0)).tolist()
    plain = sum(32 * max(lengths[i] for i in order[lo : lo + 32]) for lo in range(0, 1000, 32))
    assert padded < 0.8 * plain
    again = length_bucketed_batches(lengths, 32, torch.Generator().manual_seed(0))
    assert again == batches  # seeded


@pytest.mark.slow
def test_no_command_changes_its_inputs(experts, tmp_path: Path, capsys) -> None:
    suite, cache, paths = experts
    inputs = [suite, minilm_dir(), *paths.values()]
    before = tree_hashes(*inputs)
    methods = {
        "ta": {"name": "task_arithmetic", "lambda": 0.5},
        "sm": {"name": "supermerge", "steps": 2, "validation_size": 4},
    }
    for name, method in methods.items():
        doc = {
            "base": str(minilm_dir()),
            "experts": [{"name": t, "path": str(p)} for t, p in paths.items()],
            "method": method,
            "data_dir": str(suite),
            "heads": ["classifier.*"],
            "output": str(tmp_path / name),
        }
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(doc))
    commands = [
        ["finetune", "--suite", str(suite), "--cache", str(cache)],
        ["merge", str(tmp_path / "ta.yaml")],
        ["merge", str(tmp_path / "sm.yaml")],
        ["plan", str(tmp_path / "sm.yaml"), "--ranks", "2"],
        ["methods"],
        ["evaluate", str(tmp_path / "sm"), "--suite", str(suite), "--json", str(tmp_path / "acc.json")],
        ["evaluate", str(paths["sentiment"]), "--suite", str(suite), "--tasks", "sentiment"],
    ]
    for argv in commands:
        assert main(["-q", *argv]) == 0, argv
    capsys.readouterr()
    assert tree_hashes(*inputs) == before
