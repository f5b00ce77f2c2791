"""How many labelled examples does a learned merge need? Test accuracy against validation size.

On the real demo's experts (the built-in suite, MiniLM-L6, cached under runs/cache), for each
validation size in --sizes and each seed in --seeds: task arithmetic with its lambda picked on
the drawn examples, and SuperMerge (the demo's settings) learning from the same examples; both
through `run_demo`, so exactly what `supermerge demo` runs. A size at or above every task's
validation pool takes the whole pool, the same for every seed, so it runs once. Prints the mean
test accuracy over tasks per size (mean and spread over seeds) with the machine, and writes
runs/validation-size/results.json and validation_size.png.

    python benchmarks/validation_size.py --sizes 8 16 32 64 128 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from supermerge.demo.run import GRIDS, REAL, real_demo_suite, run_demo  # noqa: E402
from supermerge.demo.suite import build_builtin_suite  # noqa: E402
from supermerge.io.taskfile import read_suite  # noqa: E402

METHODS = {"task arithmetic": "task_arithmetic", "SuperMerge": "supermerge"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--cache", type=Path, default=Path("runs/cache"))
    parser.add_argument("--out", type=Path, default=Path("runs/validation-size"))
    args = parser.parse_args()
    out = args.out.resolve()
    results: dict[int, dict[str, list[float]]] = {}
    tasks = read_suite(build_builtin_suite(args.cache.resolve(), progress=False))
    pool = max(len(t.splits["validation"]) for t in tasks.values())
    for size in args.sizes:
        settings = replace(REAL, validation_size=size)
        suite = real_demo_suite(args.cache.resolve(), False, False, settings, tasks)
        seeds = args.seeds if size < pool else args.seeds[:1]
        suite = replace(
            suite,
            grids={"task_arithmetic": GRIDS["task_arithmetic"]},
            learned={"supermerge": suite.learned["supermerge"]},
        )
        results[size] = {label: [] for label in METHODS}
        for seed in seeds:
            seeded = replace(suite, config=suite.config | {"seed": seed})
            run = run_demo(out / f"size-{size}-seed-{seed}", seeded, progress=False)
            for label, method in METHODS.items():
                accuracy = run["methods"][method]["test_accuracy"]
                results[size][label].append(statistics.fmean(accuracy.values()))
    experts = statistics.fmean(suite.experts.values())
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}"
    print(f"\nmean test accuracy over {len(suite.experts)} tasks vs validation examples per task ({machine})")
    print(f"experts: {experts:.3f}")
    for size, by_method in results.items():
        cells = [f"{label} {_summary(v)}" for label, v in by_method.items()]
        print(f"{size:4d}: " + "; ".join(cells))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps(
            {"machine": machine, "experts": experts, "seeds": args.seeds, "results": results}, indent=2
        )
    )
    _plot(out / "validation_size.png", results, experts)
    print(f"wrote {out / 'results.json'}, {out / 'validation_size.png'}")


def _summary(values: list[float]) -> str:
    spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.3f}{spread} (n={len(values)})"


def _plot(path: Path, results: dict[int, dict[str, list[float]]], experts: float) -> None:
    sizes = list(results)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in METHODS:
        means = [statistics.fmean(results[s][label]) for s in sizes]
        spreads = [statistics.stdev(results[s][label]) if len(results[s][label]) > 1 else 0.0 for s in sizes]
        ax.errorbar(sizes, means, yerr=spreads, marker="o", capsize=3, label=label)
    ax.axhline(experts, color="grey", linestyle="--", label="experts (each its own task)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("labelled validation examples per task")
    ax.set_ylabel("mean test accuracy")
    ax.set_title("learned merge vs labelled data (built-in suite, 5 tasks)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
