"""The LLM demo (`supermerge demo --llm`): causal-LM experts of a real small LLM on real tasks.

SmolLM2-135M-Instruct (`supermerge.demo.llm_base`, converted once from the PyPI GGUF) is
fine-tuned into one expert per task of the built-in generative suite
(`supermerge.demo.llm_suite`: the built-in text tasks posed as instructions, scored by rank
classification over choices or by exact match of a generated answer), with the completion-only
loss (`supermerge.demo.lm_finetune`, cached by content): every weight, or with `lora` a PEFT LoRA
adapter per task (merged as adapters: factors in the learned merges, one tensor's task vector at
a time in the training-free ones). `supermerge.demo.run.run_demo` then merges
them with every method through `supermerge merge`'s code path and scores each merge with
`supermerge.demo.lm_evaluate` on the validation split (to pick parameters and objectives) and on
test (the table).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from supermerge.demo.run import DemoSuite, drawn_split, expert_entries, with_validation_size
from supermerge.io.completions import CompletionTaskFile, Template


@dataclass(frozen=True)
class LLMDemoSettings:
    """The LLM demo's settings (docs/demo_tuning.md says how they were chosen).

    Attributes:
        train_size: train examples per task in the suite (its experts' training set).
        test_size: test examples per task.
        epochs, lr: expert fine-tuning (every weight).
        lora_lr, lora_rank: the learning rate and rank of LoRA experts (the `lora` demo).
        validation_size: validation examples per task (learned merges and picking on validation).
        max_length: tokens per prompt + completion.
        learned: label -> `method:` block of each learned merge (its validation_size is the one above).
        grids: training-free method -> candidate parameters.
    """

    train_size: int
    test_size: int
    epochs: int
    lr: float
    validation_size: int
    max_length: int
    learned: dict[str, dict]
    grids: dict[str, list[dict]] = field(default_factory=dict)
    lora_lr: float = 1e-3
    lora_rank: int = 16


def _learned(steps: int, lr: float, quick: bool) -> dict[str, dict]:
    common = {"batch_size": 8, "lr": lr, "steps": steps}
    supermerge = {"name": "supermerge", **common}
    learned = {"adamerging": {"name": "adamerging", **common, "lr": lr / 10}}
    objectives = ("cross_entropy", "distill") if quick else ("cross_entropy", "distill", "entropy")
    learned |= {f"supermerge ({o})": supermerge | {"objective": o} for o in objectives}
    learned["supermerge (tree, g=2)"] = supermerge | {"group_size": 2}
    return learned


GRIDS = {
    "average": [{}],
    "task_arithmetic": [{"lambda": lam} for lam in (0.3, 0.5, 1.0)],
    "ties": [{"density": d, "lambda": 1.0} for d in (0.2, 0.5)],
    "dare_ties": [{"density": 0.5, "lambda": 1.0, "normalize": True}],
}
QUICK_GRIDS = {
    "average": [{}],
    "task_arithmetic": [{"lambda": lam} for lam in (0.3, 1.0)],
    "ties": [{"density": 0.2, "lambda": 1.0}],
    "dare_ties": [{"density": 0.5, "lambda": 1.0, "normalize": True}],
}
LLM_REAL = LLMDemoSettings(240, 60, 1, 1e-4, 16, 96, _learned(8, 0.1, quick=False), GRIDS)
LLM_QUICK = LLMDemoSettings(96, 32, 1, 1e-4, 8, 96, _learned(5, 0.1, quick=True), QUICK_GRIDS)


def llm_demo_suite(
    cache: Path,
    quick: bool,
    progress: bool,
    settings: LLMDemoSettings | None = None,
    base: Path | None = None,
    source: Path | None = None,
    lora: bool = False,
) -> DemoSuite:
    """SmolLM2-135M-Instruct experts fine-tuned on the built-in generative suite (LoRA adapters
    with `lora`); `base` and `source` (a classification suite folder to pose) replace the
    built-in ones (tests)."""
    from supermerge.demo.llm_base import smollm2_base
    from supermerge.demo.llm_suite import LLMSuiteSettings, build_llm_suite
    from supermerge.io.completions import read_completion_suite

    settings = settings or (LLM_QUICK if quick else LLM_REAL)
    timings = {}
    start = time.perf_counter()
    base = base or smollm2_base(cache, progress)
    timings["base"] = time.perf_counter() - start
    start = time.perf_counter()
    suite_settings = replace(LLMSuiteSettings(), train_size=settings.train_size, test_size=settings.test_size)
    folder = build_llm_suite(cache, progress, suite_settings, source)
    tasks = read_completion_suite(folder)
    timings["llm_suite"] = time.perf_counter() - start
    kind = "LoRA experts" if lora else "experts"
    title = f"{base.name} {kind} on {len(tasks)} generative tasks{' (quick)' if quick else ''}"
    suite = lm_experts_suite(base, tasks, cache, settings, suite_settings.chat, lora, progress, title)
    suite.timings = timings | suite.timings
    return suite


def lm_experts_suite(
    base: Path,
    tasks: dict[str, CompletionTaskFile],
    cache: Path,
    settings: LLMDemoSettings,
    chat: bool,
    lora: bool,
    progress: bool,
    title: str,
    template: Template | None = None,
) -> DemoSuite:
    """Causal-LM experts of `base` fine-tuned on `tasks` (cached; LoRA adapters with `lora`), each
    scored on its own test split, and the DemoSuite that merges them with `settings`' methods
    (`template`: how text/label task files were posed, passed on to the merges)."""
    from supermerge.demo.lm_evaluate import evaluate_lm
    from supermerge.demo.lm_finetune import LMFinetuneConfig, LMLoraFinetuneConfig, finetune_lm_suite

    timings = {}
    start = time.perf_counter()
    common = {"epochs": settings.epochs, "max_length": settings.max_length, "train_size": None, "chat": chat}
    if lora:
        finetune = LMLoraFinetuneConfig(**common, lr=settings.lora_lr, rank=settings.lora_rank)
    else:
        finetune = LMFinetuneConfig(**common, lr=settings.lr)
    paths = finetune_lm_suite(base, tasks, cache, finetune, progress)
    timings["finetune"] = time.perf_counter() - start

    def evaluate(model_dir: Path, chosen: dict, split: str) -> dict[str, float]:
        return evaluate_lm(
            model_dir, chosen, split, max_length=settings.max_length, chat=chat, progress=False
        )

    def accuracy(model_dir: Path, split: str, seed: int) -> dict[str, float]:
        return evaluate(model_dir, drawn_split(tasks, split, settings.validation_size, seed), split)

    start = time.perf_counter()
    experts = {}
    for task, path in paths.items():
        experts |= evaluate(path, {task: tasks[task]}, "test")
    timings["experts_test"] = time.perf_counter() - start
    config = {
        "base": str(base.resolve()),  # (the merges run from their own folders)
        "experts": expert_entries(paths, tasks),
        "model": {"kind": "hf_causal_lm", "max_length": settings.max_length, "chat_template": chat},
    }
    if template is not None:
        config["model"] |= {"prompt_template": template.prompt, "completion_template": template.completion}
    learned = {
        label: method | {"targets_cache": str(cache / "distill_targets")}
        if method.get("objective") == "distill"
        else method
        for label, method in with_validation_size(settings.learned, settings.validation_size).items()
    }
    suite = DemoSuite(title, config, accuracy, experts, learned, settings.grids)
    suite.timings = timings
    return suite
