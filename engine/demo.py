"""The built-in demo: every merging method on a task family with a known best merge.

Four tasks on a small MLP (`supermerge.toy`): each expert carries one useful layer and one
harmful one, and the best merge keeps the first and drops the second. The demo merges the
experts with every training-free method (lambda / density picked on the validation sets, as
a user would) and with SuperMerge (flat and hierarchical) and AdaMerging-style entropy
merging, all through the same code path as `supermerge merge`, then prints test accuracy per
task, the mean, the mean normalised by the experts' own accuracy, time and memory held, and
writes results.json, accuracy.png and each learned merge's coefficient heatmap.
The real-model evaluation suite replaces this toy suite in a later version.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from supermerge.checkpoint import Checkpoint
from supermerge.config import config_from_dict
from supermerge.learned_merge import run_learned_merge
from supermerge.merge import MergeSummary, run_merge
from supermerge.report import plot_accuracy_bars
from supermerge.toy import FACTORY, ToySuite, build_toy_suite, toy_accuracy

log = logging.getLogger(__name__)

# Training-free candidates: the one with the best mean validation accuracy is reported.
GRIDS = {
    "average": [{}],
    "task_arithmetic": [{"lambda": lam} for lam in (0.3, 0.5, 0.7, 1.0)],
    "ties": [{"density": d, "lambda": lam} for d in (0.2, 0.5) for lam in (0.5, 1.0)],
    "dare_ties": [{"density": 0.5, "lambda": lam, "normalize": True} for lam in (0.5, 1.0)],
}
LEARNED = {
    "adamerging": {"name": "adamerging", "steps": 100, "lr": 0.05},
    "supermerge": {"name": "supermerge", "steps": 100, "lr": 0.05},
    "supermerge (tree, g=2)": {"name": "supermerge", "steps": 100, "lr": 0.05, "group_size": 2},
}


def _accuracy(model_dir: Path, suite: ToySuite, split: str) -> dict[str, float]:
    """Accuracy of a merged model (body + each task's saved head) on validation or test."""
    ckpt = Checkpoint(model_dir)
    body = {n: ckpt.read(n) for n in ckpt.names}
    result = {}
    for task in suite.experts:
        head = Checkpoint(model_dir / "heads" / f"{task}.safetensors")
        if split == "test":
            x, y = suite.test[task]
        else:
            data = torch.load(suite.validation[task], weights_only=True)
            x, y = data["x"], data["y"]
        result[task] = toy_accuracy(body, {n: head.read(n) for n in head.names}, x, y)
    return result


def _expert_accuracy(suite: ToySuite) -> dict[str, float]:
    result = {}
    for task, folder in suite.experts.items():
        ckpt = Checkpoint(folder)
        state = {n: ckpt.read(n) for n in ckpt.names}
        head = {n: state.pop(n) for n in list(state) if n.startswith("head.")}
        result[task] = toy_accuracy(state, head, *suite.test[task])
    return result


def run_demo(workdir: str | Path, progress: bool = True) -> dict:
    """Build the toy suite, run every method, print the table; returns the results."""
    workdir = Path(workdir).resolve()
    for own in ("suite", "merged"):  # only what an earlier demo wrote there
        shutil.rmtree(workdir / own, ignore_errors=True)
    suite = build_toy_suite(workdir / "suite", n_tasks=4, seed=0, n_val=32, n_test=2000)
    common = {
        "base": str(suite.base),
        "experts": [
            {"name": t, "path": str(p), "data": str(suite.validation[t])} for t, p in suite.experts.items()
        ],
        "model": {"kind": "torch_module", "factory": FACTORY},
        "heads": ["head.*"],
    }
    experts = _expert_accuracy(suite)
    (workdir / "merged").mkdir()
    rows: dict[str, dict] = {}
    for method, grid in GRIDS.items():
        best = None
        for i, params in enumerate(grid):
            out = workdir / "merged" / f"{method}-{i}"
            cfg = config_from_dict(
                common | {"method": {"name": method, **params}, "output": str(out)}, workdir
            )
            summary = run_merge(cfg, progress=False)
            val = _accuracy(out, suite, "validation")
            score = sum(val.values()) / len(val)
            if best is None or score > best[0]:
                best = (score, params, out, summary)
        _, params, out, summary = best
        rows[method] = _row(params, _accuracy(out, suite, "test"), summary)
        log.info("%s: picked %s on validation", method, params)
    for label, method in LEARNED.items():
        out = workdir / "merged" / label.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
        cfg = config_from_dict(common | {"method": method, "output": str(out)}, workdir)
        summary = run_learned_merge(cfg, progress=progress)
        rows[label] = _row(
            {k: v for k, v in method.items() if k != "name"}, _accuracy(out, suite, "test"), summary
        )
        rows[label]["heatmap"] = str(out / "coefficients.png")
    results = {"suite": "toy (supermerge.toy), 4 tasks", "experts": experts, "methods": rows}
    _print_table(experts, rows)
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    accuracy = {"experts": experts} | {m: r["test_accuracy"] for m, r in rows.items()}
    plot_accuracy_bars(workdir / "accuracy.png", accuracy, "test accuracy per method and task (toy suite)")
    print(
        f"\nwrote {workdir / 'results.json'}, {workdir / 'accuracy.png'}, heatmaps under {workdir / 'merged'}"
    )
    return results


def _row(params: dict, accuracy: dict[str, float], summary: MergeSummary) -> dict:
    return {
        "params": params,
        "test_accuracy": accuracy,
        "seconds": round(summary.seconds, 2),
        "peak_tensor_bytes": summary.peak_tensor_bytes,
    }


def _print_table(experts: dict[str, float], rows: dict[str, dict]) -> None:
    tasks = list(experts)
    expert_mean = sum(experts.values()) / len(experts)
    print("\ntest accuracy per task (toy suite: 4 tasks, 2000 test examples each)")
    header = (
        f"{'method':24s}"
        + "".join(f"{t:>7s}" for t in tasks)
        + f"{'mean':>7s}{'norm.':>7s}{'s':>7s}{'KiB':>7s}"
    )
    print(header + "  chosen")
    print(
        f"{'experts (each its own)':24s}"
        + "".join(f"{experts[t]:7.3f}" for t in tasks)
        + f"{expert_mean:7.3f}"
    )
    for method, row in rows.items():
        acc = row["test_accuracy"]
        mean = sum(acc.values()) / len(acc)
        print(
            f"{method:24s}" + "".join(f"{acc[t]:7.3f}" for t in tasks)
            + f"{mean:7.3f}{mean / expert_mean:7.3f}{row['seconds']:7.1f}"
            + f"{row['peak_tensor_bytes'] / 1024:7.0f}  {json.dumps(row['params'])}"
        )  # fmt: skip
