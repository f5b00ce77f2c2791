"""The `supermerge` command: merge, methods, demo.

Every user error (bad file, tensor or config field) is printed as one line,
`supermerge: error: ...`, with exit code 2 and nothing written at the output path.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence

from supermerge.errors import SupermergeError

log = logging.getLogger("supermerge")


def cmd_merge(args: argparse.Namespace) -> int:
    from supermerge.config import load_config
    from supermerge.learned_merge import run_learned_merge
    from supermerge.merge import run_merge

    cfg = load_config(args.config)
    if cfg.learned:
        summary = run_learned_merge(cfg, args.overwrite, args.resume, progress=not args.quiet)
    elif args.resume:
        raise SupermergeError(f"--resume applies to learned methods only, not '{cfg.method}'")
    else:
        summary = run_merge(cfg, overwrite=args.overwrite, progress=not args.quiet)
    print(summary.line())
    return 0


def _default(f: dataclasses.Field) -> object:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def cmd_methods(args: argparse.Namespace) -> int:
    from supermerge.methods import REGISTRY
    from supermerge.methods.base import YAML_ALIASES
    from supermerge.methods.learned import LEARNED

    yaml_name = {v: k for k, v in YAML_ALIASES.items()}
    for name, cls in sorted({**REGISTRY, **LEARNED}.items()):
        params = ", ".join(
            f"{yaml_name.get(f.name, f.name)}={_default(f)!r}" for f in dataclasses.fields(cls.Params)
        )
        print(f"{name:16s} {cls.__doc__.splitlines()[0]}\n{'':16s} parameters: {params}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from supermerge.demo import run_demo

    run_demo(args.workdir, progress=not args.quiet)
    return 0


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
        "(sharded safetensors + index + config) to its output folder. "
        "See README.md for the YAML format.",
    )
    merge.add_argument("config", help="merge YAML file")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    merge.add_argument(
        "--resume",
        action="store_true",
        help="continue an unfinished learned merge from <output>.run/ (finished tree nodes and "
        "the last checkpoint of W are reused)",
    )
    merge.set_defaults(func=cmd_merge)

    methods = sub.add_parser(
        "methods",
        help="list merge methods and their parameters",
        description="List the registered merge methods with their parameters and defaults.",
    )
    methods.set_defaults(func=cmd_methods)

    demo = sub.add_parser(
        "demo",
        help="run the built-in demo",
        description="Merge four toy experts (a task family with a known best merge) with every "
        "method, training-free and learned, and print test accuracy, time and memory per method; "
        "writes results.json, accuracy.png and coefficient heatmaps under --workdir.",
    )
    demo.add_argument("--workdir", default="runs/demo", help="folder for the demo's files")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
