"""The built-in demo: every merging method on real tasks (default) or on a toy family.

Real (`supermerge demo`): MiniLM-L6 experts fine-tuned on the built-in real text suite
(`supermerge.demo.suite`, `supermerge.demo.finetune`); `--quick` on 3 of its tasks with smaller experts.
Toy (`--toy`): four tasks on a small MLP (`supermerge.demo.toy`), each expert carrying one useful
layer and one harmful one, so the best merge is known. Either way the demo merges the experts
with every training-free method (lambda / density picked on the validation sets, as a user
would) and with SuperMerge (flat and hierarchical) and AdaMerging-style entropy merging, all
through the same code path as `supermerge merge`, then prints test accuracy per task, the
mean, the mean normalised by the experts' own accuracy, time and memory held, and writes
results.json, accuracy.png and each learned merge's coefficient heatmap."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from supermerge.config import config_from_dict
from supermerge.demo.finetune import FinetuneConfig
from supermerge.demo.toy import FACTORY, build_toy_suite, toy_accuracy
from supermerge.io.checkpoint import Checkpoint
from supermerge.io.taskfile import draw_validation
from supermerge.learned.report import plot_accuracy_bars
from supermerge.learned_merge import run_learned_merge
from supermerge.merge import MergeSummary, run_merge

log = logging.getLogger(__name__)

# Training-free candidates: the one with the best mean validation accuracy is reported.
GRIDS = {
    "average": [{}],
    "task_arithmetic": [{"lambda": lam} for lam in (0.3, 0.5, 0.7, 1.0)],
    "ties": [{"density": d, "lambda": lam} for d in (0.2, 0.5) for lam in (0.5, 1.0)],
    "dare_ties": [{"density": 0.5, "lambda": lam, "normalize": True} for lam in (0.5, 1.0)],
}
TOY_LEARNED = {
    "adamerging": {"name": "adamerging", "steps": 100, "lr": 0.05},
    "supermerge": {"name": "supermerge", "steps": 100, "lr": 0.05},
    "supermerge (tree, g=2)": {"name": "supermerge", "steps": 100, "lr": 0.05, "group_size": 2},
}


@dataclass
class DemoSuite:
    """What the demo needs of a suite.

    Attributes:
        title: names the suite in the table and the chart.
        config: the merge YAML fields shared by every method (base, experts with data, model, heads).
        accuracy: (model folder, split, seed) -> accuracy per task, with the tasks' heads; split
            "validation" is the rows a merge with that seed learns from, "dev" the rest of the
            tasks' validation pools (an empty result when there is none), "test" the test split.
        experts: each expert's test accuracy on its own task.
        learned: label -> `method:` block of each learned merge to run.
        grids: training-free method -> its candidate parameters.
        timings: wall time of the stages run while building the suite (s).
    """

    title: str
    config: dict
    accuracy: Callable[[Path, str, int], dict[str, float]]
    experts: dict[str, float]
    learned: dict[str, dict]
    grids: dict[str, list[dict]] = field(default_factory=lambda: GRIDS)
    timings: dict[str, float] = field(default_factory=dict)


def toy_demo_suite(workdir: Path) -> DemoSuite:
    """The four-task toy family (seconds on a CPU)."""
    start = time.perf_counter()
    shutil.rmtree(workdir / "suite", ignore_errors=True)  # only what an earlier toy demo wrote there
    suite = build_toy_suite(workdir / "suite", n_tasks=4, seed=0, n_val=32, n_test=2000)

    def accuracy(model_dir: Path, split: str, seed: int) -> dict[str, float]:
        if split == "dev":  # (each toy validation file is exactly what a merge learns from)
            return {}
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

    experts = {}
    for task, folder in suite.experts.items():
        ckpt = Checkpoint(folder)
        state = {n: ckpt.read(n) for n in ckpt.names}
        head = {n: state.pop(n) for n in list(state) if n.startswith("head.")}
        experts[task] = toy_accuracy(state, head, *suite.test[task])
    config = {
        "base": str(suite.base),
        "experts": [
            {"name": t, "path": str(p), "data": str(suite.validation[t])} for t, p in suite.experts.items()
        ],
        "model": {"kind": "torch_module", "factory": FACTORY},
        "heads": ["head.*"],
    }
    title = "toy suite, 4 tasks, 2000 test examples each"
    toy = DemoSuite(title, config, accuracy, experts, TOY_LEARNED)
    toy.timings = {"suite": time.perf_counter() - start}  # (training and scoring the toy experts too)
    return toy


@dataclass(frozen=True)
class RealDemoSettings:
    """The real demo's defaults (docs/demo_tuning.md says how each was chosen).

    Attributes:
        tasks: the suite's tasks to use (None: all of them).
        finetune: expert fine-tuning settings.
        max_length: tokenizer truncation for merging and evaluation.
        learned: label -> `method:` block of each learned merge.
        validation_size: validation examples per task that the merges learn from and the
            training-free methods' parameters are picked on (drawn from each task's pool with
            the merge's seed).
    """

    tasks: tuple[str, ...] | None
    finetune: FinetuneConfig
    max_length: int
    learned: dict[str, dict]
    validation_size: int = 32


def _learned(steps: int, tree_steps: int, lr: float, distill: bool = True) -> dict[str, dict]:
    common = {"batch_size": 8}  # micro-batches of similar lengths carry little padding
    learned = {
        "adamerging": {"name": "adamerging", "steps": steps, **common},
        "supermerge": {"name": "supermerge", "steps": steps, "lr": lr, **common},
        "supermerge (distill)": {
            "name": "supermerge", "steps": steps, "lr": lr, "objective": "distill", **common
        },
        "supermerge (tree, g=2)": {
            "name": "supermerge", "steps": tree_steps, "lr": lr, "group_size": 2, **common
        },
    }  # fmt: skip
    if not distill:
        del learned["supermerge (distill)"]
    return learned


# Chosen on validation / dev accuracy only, never test: the evidence is in docs/demo_tuning.md.
EXPERTS = FinetuneConfig(epochs=1, lr=2e-4, train_size=1000)
REAL = RealDemoSettings(None, EXPERTS, 64, _learned(20, 20, 0.1))
# quick: the 3 tasks with the shortest texts (fastest to train and merge), 300 train examples, and
# the default objective only (each learned row takes about a minute of its 5)
QUICK = RealDemoSettings(
    ("verb", "noun", "langid"),
    FinetuneConfig(epochs=1, lr=2e-4, train_size=300),
    64,
    _learned(20, 20, 0.1, distill=False),
)


def real_demo_suite(
    cache: Path,
    quick: bool,
    progress: bool,
    settings: RealDemoSettings | None = None,
    tasks: dict | None = None,
) -> DemoSuite:
    """MiniLM-L6 experts fine-tuned on the built-in real text suite (supermerge.demo.suite).

    `tasks` replaces the built-in suite (e.g. a tuning suite whose test split is held-out train).
    """
    from supermerge.demo.finetune import default_base
    from supermerge.demo.suite import build_builtin_suite
    from supermerge.io.taskfile import read_suite

    settings = settings or (QUICK if quick else REAL)
    start = time.perf_counter()
    if tasks is None:
        tasks = read_suite(build_builtin_suite(cache, progress))
    timings = {"suite": time.perf_counter() - start}
    if settings.tasks is not None:
        tasks = {t: tasks[t] for t in settings.tasks}
    elif quick:
        tasks = dict(list(tasks.items())[:3])
    title = f"MiniLM-L6 experts on {len(tasks)} real text tasks{' (quick)' if quick else ''}"
    suite = encoder_experts_suite(default_base(), tasks, cache, settings, progress, title)
    suite.timings = timings | suite.timings
    return suite


def encoder_experts_suite(
    base: Path, tasks: dict, cache: Path, settings: RealDemoSettings, progress: bool, title: str
) -> DemoSuite:
    """Encoder experts of `base` fine-tuned on the classification `tasks` (cached), each scored on
    its own test split, and the DemoSuite that merges them with `settings`' methods."""
    from supermerge.demo.evaluate import evaluate_model
    from supermerge.demo.finetune import finetune_suite

    start = time.perf_counter()
    paths = finetune_suite(base, tasks, cache, settings.finetune, progress)
    timings = {"finetune": time.perf_counter() - start}
    start = time.perf_counter()
    experts = {}
    for task, path in paths.items():
        experts |= evaluate_model(path, {task: tasks[task]}, max_length=settings.max_length, progress=False)
    timings["experts_test"] = time.perf_counter() - start
    config = {
        "base": str(base.resolve()),  # (the merges run from their own folders)
        "experts": expert_entries(paths, tasks),
        "model": {"kind": "hf_encoder", "max_length": settings.max_length},
        "heads": ["classifier.*"],
    }

    def accuracy(model_dir: Path, split: str, seed: int) -> dict[str, float]:
        chosen = drawn_split(tasks, split, settings.validation_size, seed)
        return evaluate_model(model_dir, chosen, split, max_length=settings.max_length, progress=False)

    suite = DemoSuite(
        title, config, accuracy, experts, with_validation_size(settings.learned, settings.validation_size)
    )
    suite.timings = timings
    return suite


def with_validation_size(learned: dict[str, dict], size: int) -> dict[str, dict]:
    """The learned `method:` blocks, each learning from `size` validation examples per task (the
    rows `drawn_split` scores as "validation")."""
    return {label: method | {"validation_size": size} for label, method in learned.items()}


def drawn_split(tasks: dict, split: str, size: int, seed: int) -> dict:
    """The tasks that have rows in `split` as a merge with validation_size `size` and `seed` sees
    them (`draw_validation`: its drawn validation rows, the rest of the pool as "dev")."""
    return {n: t for n, t in draw_validation(tasks, size, seed).items() if t.splits[split]}


def expert_entries(paths: dict[str, Path], tasks: dict) -> list[dict]:
    """The merge config's `experts:` list for expert folders by task and their task files, with
    absolute paths (the merges run from their own folders)."""
    return [
        {"name": t, "path": str(p.resolve()), "data": str(Path(tasks[t].path).resolve())}
        for t, p in paths.items()
    ]


def run_demo(workdir: str | Path, suite: DemoSuite, progress: bool = True) -> dict:
    """Run every method of `suite` with its config's seed, print the table.

    Returns the results (also written to results.json), with the wall time of each stage.
    """
    start = time.perf_counter()
    workdir = Path(workdir).resolve()
    shutil.rmtree(workdir / "merged", ignore_errors=True)  # only what an earlier run wrote there
    timings = dict(suite.timings)  # each stage timed where it ran: building the suite, fine-tuning, ...
    seed = suite.config.get("seed", 0)
    (workdir / "merged").mkdir(parents=True)
    rows: dict[str, dict] = {}
    for method, grid in suite.grids.items():
        stage = time.perf_counter()
        best = None
        for i, params in enumerate(grid):
            out = workdir / "merged" / f"{method}-{i}"
            cfg = config_from_dict(
                suite.config | {"method": {"name": method, **params}, "output": str(out)}, workdir
            )
            summary = run_merge(cfg, progress=False)
            score = _mean(suite.accuracy(out, "validation", seed))
            if best is None or score > best[0]:
                if best is not None:
                    shutil.rmtree(best[2])  # only the picked merge is kept (LLM merges are large)
                best = (score, params, out, summary)
            else:
                shutil.rmtree(out)
        _, params, out, summary = best
        rows[method] = _row(params, suite.accuracy(out, "test", seed), summary)
        rows[method]["validation_accuracy"] = best[0]
        rows[method] |= _dev(suite.accuracy(out, "dev", seed))
        timings[method] = time.perf_counter() - stage
        log.info("%s: picked %s on validation", method, params)
    for label, method in suite.learned.items():
        stage = time.perf_counter()
        out = workdir / "merged" / label.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
        cfg = config_from_dict(suite.config | {"method": method, "output": str(out)}, workdir)
        summary = run_learned_merge(cfg, progress=progress)
        rows[label] = _row(
            {k: v for k, v in method.items() if k != "name"}, suite.accuracy(out, "test", seed), summary
        )
        rows[label]["heatmap"] = str(out / "coefficients.png")
        rows[label]["validation_accuracy"] = _mean(suite.accuracy(out, "validation", seed))
        rows[label] |= _dev(suite.accuracy(out, "dev", seed))
        timings[label] = time.perf_counter() - stage
    # the suite's stages ran before this call (the demo builds it first)
    timings["total"] = sum(suite.timings.values()) + time.perf_counter() - start
    results = {"suite": suite.title, "experts": suite.experts, "methods": rows, "seconds": timings}
    _print_table(suite.title, suite.experts, rows)
    print("\nwall time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    accuracy = {"experts": suite.experts} | {m: r["test_accuracy"] for m, r in rows.items()}
    plot_accuracy_bars(
        workdir / "accuracy.png", accuracy, f"test accuracy per method and task ({suite.title})"
    )
    print(
        f"\nwrote {workdir / 'results.json'}, {workdir / 'accuracy.png'}, heatmaps under {workdir / 'merged'}"
    )
    return results


def normalised(mean: float, expert_mean: float) -> float:
    """A merge's mean accuracy over the experts' own (NaN when the experts score 0)."""
    return mean / expert_mean if expert_mean > 0 else float("nan")


def _mean(accuracy: dict[str, float]) -> float:
    return sum(accuracy.values()) / len(accuracy)


def _dev(accuracy: dict[str, float]) -> dict:
    """A row's dev accuracy fields (none when the suite has no dev rows)."""
    return {"dev_accuracy": _mean(accuracy), "dev_accuracy_per_task": accuracy} if accuracy else {}


def _row(params: dict, accuracy: dict[str, float], summary: MergeSummary) -> dict:
    return {
        "params": params,
        "test_accuracy": accuracy,
        "seconds": round(summary.seconds, 2),
        "peak_tensor_bytes": summary.peak_tensor_bytes,
    }


def _print_table(title: str, experts: dict[str, float], rows: dict[str, dict]) -> None:
    tasks = list(experts)
    expert_mean = sum(experts.values()) / len(experts)
    print(f"\ntest accuracy per task ({title})")
    header = (
        f"{'method':28s}"
        + "".join(f"{t:>7s}" for t in tasks)
        + f"{'mean':>7s}{'norm.':>7s}{'dev':>7s}{'s':>8s}{'KiB':>10s}"
    )
    print(header + "  chosen")
    if any("dev_accuracy" in row for row in rows.values()):
        print("(dev: mean accuracy on the validation rows that no merge learned from)")
    print(
        f"{'experts (each its own)':28s}"
        + "".join(f"{experts[t]:7.3f}" for t in tasks)
        + f"{expert_mean:7.3f}"
    )
    for method, row in rows.items():
        acc = row["test_accuracy"]
        mean = sum(acc.values()) / len(acc)
        print(
            f"{method:28s}" + "".join(f"{acc[t]:7.3f}" for t in tasks)
            + f"{mean:7.3f}{normalised(mean, expert_mean):7.3f}"
            + (f"{row['dev_accuracy']:7.3f}" if "dev_accuracy" in row else f"{'':7s}")
            + f"{row['seconds']:8.1f}"
            + f"{row['peak_tensor_bytes'] / 1024:10.0f}  {json.dumps(row['params'])}"
        )  # fmt: skip
