"""Choosing the real demo's defaults without looking at test accuracy.

A tuning suite is written from the built-in one: each task's train split loses a seeded 20%
(the "dev" set), which becomes the tuning suite's test split; validation (the 32 examples per
task that pick the training-free hyperparameters and train SuperMerge) is unchanged. The real
test split is never read. Every number printed here is validation or dev accuracy / loss.

    python benchmarks/tune_real_demo.py experts --epochs 1 2 --lr 1e-4 2e-4
    python benchmarks/tune_real_demo.py sweep --epochs 2 --lr 1e-4 --merge-lr 0.01 0.03 0.1 --steps 60
    python benchmarks/tune_real_demo.py demo --epochs 2 --lr 1e-4     # the whole demo on dev

`pool` instead uses the demo's own experts and validation draws, scored on the pool rows each seed
did not draw (the demo's dev column; the test split is not read there either):

    python benchmarks/tune_real_demo.py pool --merge-lr 0.1 --steps 20 --schedule constant cosine --tail 5
    python benchmarks/tune_real_demo.py pool --merge-lr 0.1 --steps 20 --balance expert
    python benchmarks/tune_real_demo.py pool --merge-lr 0.1 --steps 20 --bags 3

(--merge-lr and --steps default to the sweep's 0.01 and 60; the demo's are 0.1 and 20.)

Outputs go under runs/tune/ (experts cached under runs/tune/cache/experts).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from supermerge.config import config_from_dict
from supermerge.demo.evaluate import evaluate_model
from supermerge.demo.finetune import HEAD, FinetuneConfig, default_base, finetune_suite
from supermerge.demo.suite import build_builtin_suite
from supermerge.io.taskfile import TaskFile, read_suite

ROOT = Path("runs/tune").resolve()


def dev_suite(cache: Path, fraction: float = 0.2, seed: int = 1) -> dict[str, TaskFile]:
    """The tuning suite: test := a held-out part of train (see module docstring)."""
    folder = ROOT / "suite-dev"
    folder.mkdir(parents=True, exist_ok=True)
    for name, task in read_suite(build_builtin_suite(cache, progress=False)).items():
        train = list(task.splits["train"])
        random.Random(seed).shuffle(train)
        n_dev = max(32, int(len(train) * fraction))
        rows = [(e, "test") for e in train[:n_dev]] + [(e, "train") for e in train[n_dev:]]
        rows += [(e, "validation") for e in task.splits["validation"]]
        lines = [json.dumps({"text": e.text, "label": e.label, "split": split}) for e, split in rows]
        path = folder / f"{name}.jsonl"
        text = "\n".join(lines) + "\n"
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    return read_suite(folder)


def experts_for(tasks: dict[str, TaskFile], epochs: int, lr: float, names=None) -> dict[str, Path]:
    tasks = {t: tasks[t] for t in (names or tasks)}
    cfg = FinetuneConfig(epochs=epochs, lr=lr, train_size=1000)
    start = time.perf_counter()
    paths = finetune_suite(default_base(), tasks, ROOT / "cache", cfg, progress=False)
    print(f"  fine-tune epochs={epochs} lr={lr}: {time.perf_counter() - start:.0f} s (0 if cached)")
    return paths


def cmd_experts(args, tasks) -> None:
    for epochs in args.epochs:
        for lr in args.lr:
            paths = experts_for(tasks, epochs, lr, args.tasks)
            dev = {}
            for t, p in paths.items():
                dev |= evaluate_model(p, {t: tasks[t]}, "test", progress=False)
            print(f"epochs={epochs} lr={lr} expert dev acc {_fmt(dev)}", flush=True)


def _fmt(acc: dict[str, float]) -> str:
    return " ".join(f"{t}={v:.3f}" for t, v in acc.items()) + f"  mean={sum(acc.values()) / len(acc):.3f}"


class DevEval:
    """Dev accuracy of in-memory merged weights (no folder written)."""

    def __init__(self, lm, tasks: dict[str, TaskFile], max_length: int, split: str = "test") -> None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(lm.source.base.path)
        self.lm, self.batches = lm, {}
        for name in lm.tasks:
            examples = tasks[name].splits[split]
            if not examples:
                continue
            labels = torch.tensor(tasks[name].label_ids(split))
            enc = tok([e.text for e in examples], truncation=True, max_length=max_length)
            order = sorted(range(len(examples)), key=lambda i: len(enc["input_ids"][i]))
            fields = ("input_ids", "token_type_ids")
            self.batches[name] = [
                (dict(tok.pad({k: [enc[k][i] for i in order[lo : lo + 64]] for k in fields},
                              return_tensors="pt")), labels[order[lo : lo + 64]])
                for lo in range(0, len(order), 64)
            ]  # fmt: skip

    @torch.inference_mode()
    def __call__(self, merged: dict[str, torch.Tensor]) -> dict[str, float]:
        params = {**self.lm.fixed, **merged}
        acc = {}
        for name, batches in self.batches.items():
            head = self.lm.tasks[name].head
            correct = sum(
                int((self.lm.model.logits(params, head, x).argmax(-1) == y).sum()) for x, y in batches
            )
            acc[name] = correct / sum(len(y) for _, y in batches)
        return acc


def cmd_sweep(args, tasks) -> None:
    from supermerge.learned.body import MergedBody
    from supermerge.learned.coefficients import CoefficientLayout
    from supermerge.learned.trainer import CoefficientTrainer
    from supermerge.learned_merge import load_inputs
    from supermerge.methods.learned import TrainConfig
    from supermerge.taskvectors.source import TaskVectorSource
    from supermerge.taskvectors.store import TaskVectorStore

    paths = experts_for(tasks, args.epochs[0], args.lr[0], args.tasks)
    config = {
        "base": str(default_base()),
        "experts": [{"name": t, "path": str(p), "data": str(tasks[t].path)} for t, p in paths.items()],
        "model": {"kind": "hf_encoder", "max_length": args.max_length},
        "heads": [f"{HEAD}.*"],
        "method": {"name": args.method},
        "output": "sweep-out",
    }
    lm = load_inputs(config_from_dict(config, ROOT), torch.device("cpu"))
    dev = DevEval(lm, tasks, args.max_length)
    source = TaskVectorSource(lm.source.base, list(lm.source.experts), lm.cfg.heads)
    store = TaskVectorStore.build(source, torch.float32, lm.device, False)
    blocks = [r"encoder\.layer\.\d+\."]
    for granularity in args.granularity:
        layout = CoefficientLayout.build(store.names, granularity, blocks)
        for init in args.init:
            for lr in args.merge_lr:
                body = MergedBody(store, layout, init)
                objective = "entropy" if args.method == "adamerging" else "cross_entropy"
                cfg = TrainConfig(steps=args.steps, lr=lr, batch_size=8, objective=objective)
                trainer = CoefficientTrainer(body, lm.model, list(lm.tasks.values()), lm.fixed, cfg)
                label = f"{args.method} {granularity} init={init} lr={lr}"
                acc = dev(body.merged_tensors())
                print(f"{label} step 0: val acc {_mean(trainer.accuracy()):.3f} dev {_fmt(acc)}", flush=True)
                start = time.perf_counter()
                for step in range(1, args.steps + 1):
                    trainer.optimizer.zero_grad()
                    losses = trainer.losses_and_grad()
                    trainer.optimizer.step()
                    if step % args.every == 0 or step == args.steps:
                        secs = time.perf_counter() - start
                        acc = dev(body.merged_tensors())
                        val = _mean(trainer.accuracy())
                        print(f"{label} step {step}: val loss {_mean(losses):.4f} val acc {val:.3f} "
                              f"dev {_fmt(acc)} ({secs:.0f} s)", flush=True)  # fmt: skip
                        start = time.perf_counter()


def cmd_pool(args, _tasks) -> None:
    """The demo's own experts and validation draws; dev = the pool rows the seed did not draw.

    Per seed and learning rate: SuperMerge (cross entropy) with a constant or cosine-decayed lr,
    each task's loss as it is or (`--balance expert`) divided by its expert's loss on the same
    rows (which no expert trained on), floored at `--floor`; dev accuracy every `--every` steps,
    and of the coefficients tanh(W) averaged over the last `--tail` steps (tail averaging). With
    `--bags B`: W averaged over B bootstrap resamples of the drawn rows instead (`bagged`)."""
    from supermerge.demo.run import REAL, drawn_split, expert_entries
    from supermerge.learned.body import MergedBody
    from supermerge.learned.coefficients import CoefficientLayout
    from supermerge.learned.trainer import CoefficientTrainer
    from supermerge.learned_merge import load_inputs
    from supermerge.methods.learned import TrainConfig
    from supermerge.taskvectors.source import TaskVectorSource
    from supermerge.taskvectors.store import TaskVectorStore

    cache = Path("runs/cache").resolve()
    tasks = read_suite(build_builtin_suite(cache, progress=False))
    paths = finetune_suite(default_base(), tasks, cache, REAL.finetune, progress=False)
    for seed in args.seeds:
        config = {
            "base": str(default_base()),
            "experts": expert_entries(paths, tasks),
            "model": {"kind": "hf_encoder", "max_length": REAL.max_length},
            "heads": [f"{HEAD}.*"],
            "method": {"name": "supermerge", "validation_size": args.validation_size},
            "output": "sweep-out",
            "seed": seed,
        }
        lm = load_inputs(config_from_dict(config, ROOT), torch.device("cpu"))
        dev = DevEval(lm, drawn_split(tasks, "dev", args.validation_size, seed), REAL.max_length, "dev")
        source = TaskVectorSource(lm.source.base, list(lm.source.experts), lm.cfg.heads)
        store = TaskVectorStore.build(source, torch.float32, lm.device, False)
        layout = CoefficientLayout.build(store.names, "tensor", [])
        cfg = TrainConfig(steps=args.steps, lr=args.merge_lr[0], batch_size=8, objective="cross_entropy")
        weights = None
        if args.balance == "expert":
            reference = expert_losses(CoefficientTrainer(MergedBody(store, layout, 0.3), lm.model,
                                                         list(lm.tasks.values()), lm.fixed, cfg))  # fmt: skip
            weights = [1 / max(loss, args.floor) for loss in reference.values()]
            weights = [w * len(weights) / sum(weights) for w in weights]
            print(f"seed={seed} expert losses {_fmt(reference)}; task weights {weights}", flush=True)
        if args.bags:
            bagged(args, seed, store, layout, lm, cfg, dev)
            continue
        for lr in args.merge_lr:
            for schedule in args.schedule:
                body = MergedBody(store, layout, 0.3)
                cfg = TrainConfig(steps=args.steps, lr=lr, batch_size=8, objective="cross_entropy")
                trainer = CoefficientTrainer(body, lm.model, list(lm.tasks.values()), lm.fixed, cfg)
                if weights is not None:
                    weigh_tasks(trainer, weights)
                label = f"seed={seed} lr={lr} {schedule} balance={args.balance}"
                tail = []
                for step in range(1, args.steps + 1):
                    if schedule == "cosine":
                        trainer.optimizer.lr = lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / args.steps))
                    trainer.optimizer.zero_grad()
                    trainer.losses_and_grad()
                    trainer.optimizer.step()
                    if step > args.steps - args.tail:
                        tail.append(body.coefficients())
                    if step % args.every == 0:
                        print(f"{label} step {step}: dev {_fmt(dev(body.merged_tensors()))}", flush=True)
                set_mean_coefficients(body, tail)
                print(f"{label} tail {args.tail}: dev {_fmt(dev(body.merged_tensors()))}", flush=True)


def bagged(args, seed: int, store, layout, lm, cfg, dev) -> None:
    """W trained on `args.bags` bootstrap resamples of each task's drawn rows (seeded), then
    the coefficients tanh(W) averaged over the bags: dev of each bag and of the average."""
    from dataclasses import replace

    from supermerge.learned.body import MergedBody
    from supermerge.learned.trainer import CoefficientTrainer

    coefficients = []
    for bag in range(args.bags):
        gen = torch.Generator().manual_seed(1000 * seed + bag)
        tasks = []
        for task in lm.tasks.values():
            rows = torch.randint(len(task.data), (len(task.data),), generator=gen).sort().values
            data = replace(task.data, inputs={k: v[rows] for k, v in task.data.inputs.items()},
                           labels=task.data.labels[rows])  # fmt: skip
            tasks.append(replace(task, data=data))
        body = MergedBody(store, layout, 0.3)
        CoefficientTrainer(body, lm.model, tasks, lm.fixed, cfg).train(progress=False)
        coefficients.append(body.coefficients())
        print(f"seed={seed} bag {bag}: dev {_fmt(dev(body.merged_tensors()))}", flush=True)
    set_mean_coefficients(body, coefficients)
    print(f"seed={seed} average of {args.bags} bags: dev {_fmt(dev(body.merged_tensors()))}", flush=True)


def set_mean_coefficients(body, coefficients: list[torch.Tensor]) -> None:
    """Set W so that tanh(W) is the mean of `coefficients` (each [k, G], as `body.coefficients()`)."""
    with torch.no_grad():
        body.w.copy_(torch.atanh(torch.stack(coefficients).mean(0).clamp(-0.999999, 0.999999)))


def expert_losses(trainer) -> dict[str, float]:
    """Each task's loss under its own expert (W: coefficient ~1 on its task vector, 0 elsewhere)."""
    losses = {}
    for i, task in enumerate(trainer.tasks):
        with torch.no_grad():
            trainer.body.w.zero_()
            trainer.body.w[i] = math.atanh(1 - 1e-6)
        losses[task.name] = trainer.losses_and_grad()[task.name]
    return losses


def weigh_tasks(trainer, weights: list[float]) -> None:
    """Scale task t's loss by weights[t] in `trainer`'s objective (the engine weighs tasks alike)."""
    batches, objective, current = trainer._my_batches, trainer.objective, [0]

    def my_batches(tasks):
        for t, *rest in batches(tasks):
            current[0] = t
            yield (t, *rest)

    trainer._my_batches = my_batches
    trainer.objective = lambda logits, targets: weights[current[0]] * objective(logits, targets)


def _mean(d: dict[str, float]) -> float:
    return sum(d.values()) / len(d)


def cmd_demo(args, tasks) -> None:
    from supermerge.demo.run import QUICK, REAL, RealDemoSettings, real_demo_suite, run_demo

    defaults = QUICK if args.quick else REAL
    settings = RealDemoSettings(
        tuple(args.tasks) if args.tasks else defaults.tasks,
        FinetuneConfig(epochs=args.epochs[0], lr=args.lr[0], train_size=defaults.finetune.train_size),
        args.max_length,
        defaults.learned,
    )
    suite = real_demo_suite(ROOT / "cache", args.quick, False, settings, tasks)
    results = run_demo(ROOT / ("demo-quick" if args.quick else "demo"), progress=False, suite=suite)
    print("(the table's 'test' columns are DEV accuracy: held-out train examples)")
    for method, row in results["methods"].items():
        print(f"{method}: val {row['validation_accuracy']} dev {_fmt(row['test_accuracy'])}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["experts", "sweep", "demo", "pool"])
    parser.add_argument("--epochs", type=int, nargs="+", default=[1])
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-4])
    parser.add_argument("--tasks", nargs="*")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--method", default="supermerge", choices=["supermerge", "adamerging"])
    parser.add_argument("--merge-lr", type=float, nargs="+", default=[0.01])
    parser.add_argument("--init", type=float, nargs="+", default=[0.3])
    parser.add_argument("--granularity", nargs="+", default=["tensor"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--validation-size", type=int, default=32)
    parser.add_argument("--schedule", nargs="+", default=["constant"], choices=["constant", "cosine"])
    parser.add_argument("--tail", type=int, default=5)
    parser.add_argument("--balance", default="none", choices=["none", "expert"])
    parser.add_argument("--floor", type=float, default=0.1)
    parser.add_argument("--bags", type=int, default=0, help="pool: bootstrap resamples to average W over")
    args = parser.parse_args()
    torch.manual_seed(0)
    tasks = None if args.mode == "pool" else dev_suite(Path("runs/cache").resolve())
    {"experts": cmd_experts, "sweep": cmd_sweep, "demo": cmd_demo, "pool": cmd_pool}[args.mode](args, tasks)


if __name__ == "__main__":
    main()
