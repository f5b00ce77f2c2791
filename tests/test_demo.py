"""The README's demo end to end: every method on the toy suite, results and pictures written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from supermerge.cli import main


def test_demo_runs_every_method_and_supermerge_wins(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the README's command: the default workdir runs/demo
    assert main(["-q", "demo", "--toy"]) == 0
    workdir = tmp_path / "runs" / "demo"
    out = capsys.readouterr().out
    assert "supermerge (tree, g=2)" in out
    results = json.loads((workdir / "results.json").read_text())  # the summary over seeds: one here
    assert results["seeds"] == [0]
    mean = {m: r["mean"] for m, r in results["methods"].items()}
    assert set(mean) == {"average", "task_arithmetic", "ties", "dare_ties", "adamerging", "supermerge",
                         "supermerge (tree, g=2)"}  # fmt: skip
    best_baseline = max(v for m, v in mean.items() if not m.startswith("supermerge"))
    assert mean["supermerge"] > best_baseline + 0.2
    assert abs(mean["supermerge (tree, g=2)"] - mean["supermerge"]) < 0.05
    assert (workdir / "accuracy.png").stat().st_size > 0
    results = json.loads((workdir / "seed-0" / "results.json").read_text())  # the run itself
    assert Path(results["methods"]["supermerge"]["heatmap"]).is_file()
    stages = {k: v for k, v in results["seconds"].items() if k != "total"}  # each timed where it ran
    assert set(stages) == {"suite", *mean} and all(v >= 0 for v in stages.values())
    assert sum(stages.values()) <= results["seconds"]["total"]


@pytest.mark.parametrize("seeds", ["0", "-1"])
def test_demo_refuses_fewer_than_one_seed_before_any_work(tmp_path: Path, capsys, monkeypatch, seeds) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "demo", "--toy", "--seeds", seeds]) == 2
    assert f"--seeds: at least 1, got {seeds}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no workdir, no suite


def test_llm_demo_runs_every_method_on_tiny_causal_lms(tmp_path: Path, capsys, monkeypatch) -> None:
    """`demo --llm`'s whole path (suite posed as instructions, causal-LM experts fine-tuned,
    every method, choices and exact-match scoring, the tree with the default objective) on a tiny
    random Llama and a fake source suite; the real run uses SmolLM2 and the built-in suite."""
    from supermerge.demo import suite as builtin
    from supermerge.demo.llm_demo import LLMDemoSettings, _learned, llm_demo_suite
    from supermerge.demo.llm_suite import DEFAULT_TASKS
    from supermerge.demo.run import run_demo
    from tests.lm import tiny_lm
    from tests.test_llm_suite import no_builtin, write_source

    monkeypatch.setattr(builtin, "build_builtin_suite", no_builtin)
    grids = {"average": [{}], "task_arithmetic": [{"lambda": 0.3}, {"lambda": 1.0}]}
    settings = LLMDemoSettings(24, 8, 1, 1e-3, 4, 96, _learned(2, 0.1, quick=True), grids)
    base = tiny_lm(tmp_path / "base", 0)
    suite = llm_demo_suite(tmp_path / "cache", True, False, settings, base, write_source(tmp_path / "src"))
    results = run_demo(tmp_path / "demo", progress=False, suite=suite)
    rows = results["methods"]
    assert set(rows) == {"average", "task_arithmetic", "adamerging", "supermerge (cross_entropy)",
                         "supermerge (distill)", "supermerge (tree, g=2)"}  # fmt: skip
    assert set(results["experts"]) == {t.name for t in DEFAULT_TASKS}
    assert "objective" not in rows["supermerge (tree, g=2)"]["params"]  # cross entropy, as the flat default
    assert all("dev_accuracy" in row for row in rows.values())  # the pool rows no merge learned from
    kept = [p for p in (tmp_path / "demo" / "merged").iterdir() if p.name.startswith("task_arithmetic")]
    assert len(kept) == 1  # the grid's other merges are removed once beaten
    assert "supermerge (distill)" in capsys.readouterr().out
    assert (tmp_path / "demo" / "accuracy.png").is_file()


def test_llm_demo_merges_lora_experts_with_every_method(tmp_path: Path, capsys, monkeypatch) -> None:
    """`demo --llm --lora`: the experts are PEFT LoRA adapters, merged as adapters by the
    training-free methods and as factors by the learned ones (tiny random Llama, fake source)."""
    from supermerge.demo import suite as builtin
    from supermerge.demo.llm_demo import LLMDemoSettings, _learned, llm_demo_suite
    from supermerge.demo.run import run_demo
    from supermerge.io.adapters import is_adapter
    from tests.lm import tiny_lm
    from tests.test_llm_suite import no_builtin, write_source

    monkeypatch.setattr(builtin, "build_builtin_suite", no_builtin)
    grids = {"task_arithmetic": [{"lambda": 1.0}], "ties": [{"density": 0.5, "lambda": 1.0}]}
    settings = LLMDemoSettings(24, 8, 1, 1e-3, 4, 96, _learned(2, 0.1, quick=True), grids, 1e-2, 2)
    base = tiny_lm(tmp_path / "base", 0)
    suite = llm_demo_suite(
        tmp_path / "cache", True, False, settings, base, write_source(tmp_path / "src"), lora=True
    )
    assert all(is_adapter(Path(e["path"])) for e in suite.config["experts"])
    results = run_demo(tmp_path / "demo", progress=False, suite=suite)
    assert set(results["methods"]) == {"task_arithmetic", "ties", "adamerging", "supermerge (cross_entropy)",
                                       "supermerge (distill)", "supermerge (tree, g=2)"}  # fmt: skip
    assert "LoRA experts" in results["suite"] and "LoRA experts" in capsys.readouterr().out
    for row in results["methods"].values():
        assert all(0.0 <= a <= 1.0 for a in row["test_accuracy"].values())
