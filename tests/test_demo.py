"""The README's demo end to end: every method on the toy suite, results and pictures written."""

from __future__ import annotations

import json
from pathlib import Path

from supermerge.cli import main


def test_demo_runs_every_method_and_supermerge_wins(tmp_path: Path, capsys) -> None:
    assert main(["-q", "demo", "--toy", "--workdir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "supermerge (tree, g=2)" in out
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    mean = {m: sum(r["test_accuracy"].values()) / 4 for m, r in results["methods"].items()}
    assert set(mean) == {"average", "task_arithmetic", "ties", "dare_ties", "adamerging", "supermerge",
                         "supermerge (tree, g=2)"}  # fmt: skip
    best_baseline = max(v for m, v in mean.items() if not m.startswith("supermerge"))
    assert mean["supermerge"] > best_baseline + 0.2
    assert abs(mean["supermerge (tree, g=2)"] - mean["supermerge"]) < 0.05
    assert (tmp_path / "demo" / "accuracy.png").stat().st_size > 0
    assert Path(results["methods"]["supermerge"]["heatmap"]).is_file()
