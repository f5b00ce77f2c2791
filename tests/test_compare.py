"""`supermerge compare`: a user's suite, every method once per seed, the mean and spread over seeds
and the noise verdict; the summary arithmetic on hand-made runs, the command end to end on a tiny
random causal LM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from supermerge.cli import main
from supermerge.demo.compare import only_methods, summarise
from supermerge.demo.run import DemoSuite
from supermerge.errors import SupermergeError


def run(ties: tuple[float, float], supermerge: tuple[float, float], average: tuple[float, float]) -> dict:
    """One seed's results: each method's test accuracy on tasks a and b."""
    rows = {"ties": ties, "supermerge": supermerge, "average": average}
    return {
        "methods": {
            m: {"test_accuracy": dict(zip("ab", acc, strict=True)), "params": {}} for m, acc in rows.items()
        }
    }


def test_the_summary_is_the_mean_and_spread_over_seeds_and_calls_gaps_inside_the_spread_noise() -> None:
    runs = [run((0.6, 0.8), (0.8, 0.8), (0.5, 0.5)), run((0.7, 0.9), (0.8, 0.9), (0.5, 0.6)),
            run((0.8, 0.8), (0.9, 0.8), (0.6, 0.5))]  # fmt: skip
    summary = summarise(runs, {"a": 1.0, "b": 0.8})
    rows = summary["methods"]
    assert summary["best"] == "supermerge"
    assert rows["supermerge"]["per_seed"] == pytest.approx([0.8, 0.85, 0.85])
    assert rows["supermerge"]["mean"] == pytest.approx(2.5 / 3)
    assert rows["ties"]["mean"] == pytest.approx(0.7666667, abs=1e-6)
    assert rows["ties"]["std"] == pytest.approx(0.0577350, abs=1e-6)  # sample std of 0.7, 0.8, 0.8
    assert rows["ties"]["test_accuracy"] == pytest.approx({"a": 0.7, "b": 0.8333333})
    assert rows["supermerge"]["normalised"] == pytest.approx((2.5 / 3) / 0.9)
    # ties is 0.067 below the best, beyond both spreads (0.058, 0.029); average far below
    assert not rows["ties"]["within_noise_of_best"] and not rows["average"]["within_noise_of_best"]
    close = [*runs, run((0.9, 1.0), (0.7, 0.8), (0.5, 0.5))]
    rows = summarise(close, {"a": 1.0, "b": 0.8})["methods"]
    assert rows["ties"]["within_noise_of_best"] or rows["supermerge"]["within_noise_of_best"]
    one = summarise(runs[:1], {"a": 1.0, "b": 0.8})["methods"]
    assert all(r["std"] == 0.0 and not r["within_noise_of_best"] for r in one.values())


def test_only_the_named_methods_run_and_an_unknown_name_is_refused() -> None:
    learned = {"supermerge (tree)": {"name": "supermerge"}, "adamerging": {"name": "adamerging"}}
    grids = {"ties": [{}], "average": [{}]}
    suite = DemoSuite("s", {}, lambda d, s: {}, {}, learned, grids)
    kept = only_methods(suite, ("ties", "supermerge"))
    assert list(kept.grids) == ["ties"] and list(kept.learned) == ["supermerge (tree)"]
    with pytest.raises(SupermergeError, match="--methods: unknown slerp"):
        only_methods(suite, ("slerp",))


def test_compare_runs_every_seed_and_writes_the_summary(tmp_path: Path, capsys, monkeypatch) -> None:
    from tests.lm import tiny_lm
    from tests.test_lm_finetune_evaluate import write_suite

    tiny_lm(tmp_path / "base", 0, "llama", tied=True)
    write_suite(tmp_path / "suite")
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them
    workdir = tmp_path / "cmp"
    argv = ["-q", "compare", "--suite", "suite", "--base", "base", "--seeds", "2",
            "--methods", "task_arithmetic", "supermerge", "--workdir", "cmp",
            "--cache", "cache", "--prompt-template", "{text} is"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    results = json.loads((workdir / "results.json").read_text())
    assert results["seeds"] == [0, 1] and sorted(results["experts"]) == ["copy", "sentiment", "yesno"]
    methods = results["methods"]
    assert "task_arithmetic" in methods and "adamerging" not in methods
    assert {m for m in methods if m.startswith("supermerge")} == {
        "supermerge (cross_entropy)", "supermerge (distill)", "supermerge (entropy)", "supermerge (tree, g=2)"
    }  # fmt: skip
    for method, row in methods.items():
        per_seed = [
            json.loads((workdir / f"seed-{s}" / "results.json").read_text())["methods"][method][
                "test_accuracy"
            ]
            for s in (0, 1)
        ]
        means = [sum(a.values()) / len(a) for a in per_seed]
        assert row["per_seed"] == pytest.approx(means) and row["mean"] == pytest.approx(sum(means) / 2)
    assert results["best"] in methods and "mean over seeds [0, 1]" in out and "best" in out
    assert (workdir / "accuracy.png").stat().st_size > 0
    records = [
        workdir / f"seed-{s}" / "merged" / "supermerge_cross_entropy" / "supermerge_merge.json"
        for s in (0, 1)
    ]
    assert [json.loads(r.read_text())["config"]["seed"] for r in records] == [0, 1]


def test_compare_refuses_bad_arguments_with_one_line(tmp_path: Path, capsys) -> None:
    from tests.lm import tiny_lm
    from tests.test_lm_finetune_evaluate import write_suite

    base = tiny_lm(tmp_path / "base", 0)
    suite = write_suite(tmp_path / "suite")
    common = ["-q", "compare", "--suite", str(suite), "--base", str(base), "--workdir", str(tmp_path / "w"),
              "--cache", str(tmp_path / "cache"), "--prompt-template", "{text} is"]  # fmt: skip
    cases = {
        ("--seeds", "0"): "--seeds: at least 1",
        ("--methods", "slerp"): "--methods: unknown slerp",
        ("--tasks", "nope"): "no task file for nope",
        ("--workdir", str(suite / "out")): "the compare workdir lies inside the suite",
    }
    for extra, message in cases.items():
        capsys.readouterr()
        assert main([*common, *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "w").exists() and not (suite / "out").exists()
    assert not (tmp_path / "cache").exists()  # each refused before any expert was fine-tuned
