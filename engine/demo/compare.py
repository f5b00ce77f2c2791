"""`supermerge compare`: the demo's whole comparison on a user's own suite, over several seeds.

For a folder of task files and a base model: one expert per task is fine-tuned (or reused from
the cache; `supermerge finetune`'s experts, LoRA adapters with `lora`), then, once per seed, every
method merges them through `supermerge merge`'s code path (training-free parameters picked on
validation, learned merges; `supermerge.demo.run.run_demo`, under `<workdir>/seed-<s>/`) and is
scored on test. The seed is the merge config's `seed`: it draws the learned merges' validation
subsets (where a task has more validation rows than `validation_size`), their batch order and
DARE's random drops. The report gives, per method, the mean test accuracy over the
seeds and its spread (the sample standard deviation), and calls a method whose mean lies within
the larger of its and the best method's spread of the best one "noise": the suite cannot tell
them apart. Encoder bases (classification task files) get the real demo's settings, causal LMs
(generative task files) the LLM demo's.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from supermerge.demo.run import GRIDS, REAL, DemoSuite, encoder_experts_suite, normalised, run_demo
from supermerge.errors import SupermergeError
from supermerge.io.completions import Template
from supermerge.learned.report import plot_accuracy_bars


@dataclass(frozen=True)
class CompareSettings:
    """What `supermerge compare` runs.

    Attributes:
        seeds: the merge seeds, one full comparison each.
        methods: method names to run (training-free names, `adamerging`, `supermerge`); None: all.
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] | None = None


def user_suite(
    base: Path,
    tasks: dict,
    causal: bool,
    cache: Path,
    progress: bool,
    name: str,
    lora: bool = False,
    chat: bool = False,
    template: Template | None = None,
) -> DemoSuite:
    """The experts of `base` on a user's `tasks` (generative task files for a causal LM, with the
    LLM demo's settings, `lora`, `chat` and the `template` of text/label files; classification
    ones for an encoder, with the real demo's), ready for `run_compare`; `name` names base and
    suite in the title."""
    if causal:
        from supermerge.demo.llm_demo import LLM_REAL, lm_experts_suite

        title = f"{'LoRA experts' if lora else 'experts'}: {name}, {len(tasks)} tasks"
        return lm_experts_suite(base, tasks, cache, LLM_REAL, chat, lora, progress, title, template)
    title = f"experts: {name}, {len(tasks)} tasks"
    return encoder_experts_suite(base, tasks, cache, REAL, progress, title)


def known_methods(causal: bool) -> set[str]:
    """The method names `user_suite` runs for a causal-LM (or an encoder) base."""
    if causal:
        from supermerge.demo.llm_demo import LLM_REAL

        return methods_of(LLM_REAL.grids, LLM_REAL.learned)
    return methods_of(GRIDS, REAL.learned)


def methods_of(grids: dict[str, list[dict]], learned: dict[str, dict]) -> set[str]:
    """Training-free method names and learned ones (`method.name`) of a suite's rows."""
    return set(grids) | {m["name"] for m in learned.values()}


def check_methods(methods: tuple[str, ...] | None, known: set[str]) -> None:
    """Raise SupermergeError naming the given methods that are not `known` (None: all run)."""
    unknown = sorted(set(methods or ()) - known)
    if unknown:
        raise SupermergeError(f"--methods: unknown {', '.join(unknown)} (known: {', '.join(sorted(known))})")


def only_methods(suite: DemoSuite, methods: tuple[str, ...] | None) -> DemoSuite:
    """The suite with only the named methods (a learned row by its `method.name`).

    Raises:
        SupermergeError: a name that is no method of the suite.
    """
    if methods is None:
        return suite
    check_methods(methods, methods_of(suite.grids, suite.learned))
    grids = {m: g for m, g in suite.grids.items() if m in methods}
    learned = {label: m for label, m in suite.learned.items() if m["name"] in methods}
    return replace(suite, grids=grids, learned=learned)


def summarise(runs: list[dict], experts: dict[str, float]) -> dict:
    """Per method (rows present in every run): per-task mean test accuracy over the runs, the mean
    over tasks per run, their mean and sample standard deviation (0 for one run), the mean dev
    accuracy (where every run has one: the validation rows no merge learned from) and whether it
    is within noise of the best method."""
    methods = [m for m in runs[0]["methods"] if all(m in r["methods"] for r in runs)]
    expert_mean = statistics.fmean(experts.values())
    rows = {}
    for method in methods:
        per_run = [r["methods"][method]["test_accuracy"] for r in runs]
        means = [statistics.fmean(acc.values()) for acc in per_run]
        rows[method] = {
            "test_accuracy": {t: statistics.fmean(acc[t] for acc in per_run) for t in per_run[0]},
            "mean": statistics.fmean(means),
            "std": statistics.stdev(means) if len(means) > 1 else 0.0,
            "per_seed": means,
            "normalised": normalised(statistics.fmean(means), expert_mean),
            "chosen": [r["methods"][method]["params"] for r in runs],
        }
        dev = [r["methods"][method].get("dev_accuracy") for r in runs]
        if None not in dev:
            rows[method]["dev"] = statistics.fmean(dev)
    best = max(rows, key=lambda m: rows[m]["mean"])
    for method, row in rows.items():
        spread = max(row["std"], rows[best]["std"])
        row["within_noise_of_best"] = method != best and rows[best]["mean"] - row["mean"] <= spread
    return {"best": best, "methods": rows}


def print_summary(title: str, seeds: tuple[int, ...], experts: dict[str, float], summary: dict) -> None:
    """The table: per task means, mean +- spread over the seeds, normalised, the verdict."""
    tasks = list(experts)
    print(f"\ntest accuracy, mean over seeds {list(seeds)} ({title})")
    header = "".join(f"{t:>8s}" for t in tasks) + f"{'mean':>8s}{'+-':>7s}{'norm.':>7s}{'dev':>7s}"
    print(f"{'method':28s}{header}  verdict")
    print(f"{'experts (each its own)':28s}" + "".join(f"{experts[t]:8.3f}" for t in tasks)
          + f"{statistics.fmean(experts.values()):8.3f}")  # fmt: skip
    for method, row in sorted(summary["methods"].items(), key=lambda kv: -kv[1]["mean"]):
        verdict = "best" if method == summary["best"] else "noise" if row["within_noise_of_best"] else ""
        print(f"{method:28s}" + "".join(f"{row['test_accuracy'][t]:8.3f}" for t in tasks)
              + f"{row['mean']:8.3f}{row['std']:7.3f}{row['normalised']:7.3f}"
              + (f"{row['dev']:7.3f}" if "dev" in row else f"{'':7s}") + f"  {verdict}")  # fmt: skip
    if any("dev" in row for row in summary["methods"].values()):
        print("dev: mean accuracy on the validation rows that no merge learned from (for choosing a merge)")
    if len(seeds) == 1:
        print("one seed: no spread measured, so no difference is called noise")


def run_compare(suite: DemoSuite, workdir: Path, settings: CompareSettings, progress: bool = True) -> dict:
    """Every method of `suite` once per seed (`run_demo` under <workdir>/seed-<s>), then the summary
    over seeds; writes <workdir>/results.json and accuracy.png (per-task means) and returns the
    results."""
    suite = only_methods(suite, settings.methods)
    workdir = Path(workdir).resolve()
    runs = []
    for n, seed in enumerate(settings.seeds):  # (the experts' stages are timed with the first seed)
        seeded = replace(suite, config=suite.config | {"seed": seed}, timings=suite.timings if n == 0 else {})
        runs.append(run_demo(workdir / f"seed-{seed}", progress=progress, suite=seeded))
    summary = summarise(runs, suite.experts)
    results = {"suite": suite.title, "seeds": list(settings.seeds), "experts": suite.experts} | summary
    print_summary(suite.title, settings.seeds, suite.experts, summary)
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    accuracy = {"experts": suite.experts} | {m: r["test_accuracy"] for m, r in summary["methods"].items()}
    title = f"mean test accuracy over {len(settings.seeds)} seed(s) ({suite.title})"
    plot_accuracy_bars(workdir / "accuracy.png", accuracy, title)
    return results
