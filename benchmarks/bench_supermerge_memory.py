"""Peak memory and time per step of SuperMerge, flat vs hierarchical, as k grows.

Builds a synthetic deep MLP (a base, k experts = base + random task vectors, a head and random
validation data per task), then runs `supermerge merge` with method supermerge flat and
hierarchical (group size g) for each k, every run in a fresh process, and prints per run:
- tracked bytes: what the engine holds while training (task-vector store, merged body and its
  gradient); deterministic, the design's bound: flat (k + 3) N, hierarchical (g + 3) N values;
- peak RSS of the process (os.wait4's ru_maxrss of that child) and, on GPU,
  torch.cuda.max_memory_allocated;
- time per optimisation step (mean over all trained nodes' steps) and total wall time.
The driver imports no torch, so the children's peak RSS does not inherit a large parent's.

    python benchmarks/bench_supermerge_memory.py                      # CPU sizes
    python benchmarks/bench_supermerge_memory.py --device cuda --width 2048 --storage-dtype bfloat16
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLASSES = 4


def make_model(
    width: int = int(os.environ.get("BENCH_WIDTH", "1024")),
    layers: int = int(os.environ.get("BENCH_LAYERS", "8")),
):
    """The benchmark's model: `layers` Linear(width, width) + ReLU, then a per-task head."""
    import torch

    blocks = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*blocks, torch.nn.Linear(width, CLASSES))


def build(root: Path, k: int, width: int, layers: int, examples: int) -> None:
    """Write base, k experts (with heads) and validation data under `root` (runs in a child)."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = make_model(width, layers)
    head = f"{2 * layers}."
    base = {n: t.detach() for n, t in model.state_dict().items() if not n.startswith(head)}
    (root / "base").mkdir(parents=True)
    save_file(base, str(root / "base" / "model.safetensors"))
    for i in range(k):
        expert = {n: t + 0.1 * t.std() * torch.randn_like(t) for n, t in base.items()}
        expert[f"{head}weight"] = torch.randn(CLASSES, width) * width**-0.5
        expert[f"{head}bias"] = torch.zeros(CLASSES)
        (root / f"e{i}").mkdir()
        save_file(expert, str(root / f"e{i}" / "model.safetensors"))
        x = torch.randn(examples, width)
        torch.save({"x": x, "y": torch.randint(0, CLASSES, (examples,))}, root / f"e{i}.pt")


def run_merge(root: Path, k: int, args: argparse.Namespace, group_size: int) -> dict:
    """One `supermerge merge` in a fresh process; returns its figures."""
    import yaml

    name = f"k{k}-{'tree' if group_size else 'flat'}"
    doc = {
        "base": str(root / "base"),
        "experts": [
            {"name": f"e{i}", "path": str(root / f"e{i}"), "data": str(root / f"e{i}.pt")} for i in range(k)
        ],
        "method": {
            "name": "supermerge", "steps": args.steps, "lr": 0.01, "group_size": group_size,
            "storage_dtype": args.storage_dtype, "checkpoint_every": 1000,
        },
        "model": {"kind": "torch_module", "factory": "bench_supermerge_memory:make_model"},
        "heads": [f"{2 * args.layers}.*"],
        "device": args.device,
        "output": str(root / name),
    }  # fmt: skip
    (root / f"{name}.yaml").write_text(yaml.safe_dump(doc))
    env = os.environ | {
        "PYTHONPATH": f"{REPO / 'benchmarks'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "BENCH_WIDTH": str(args.width), "BENCH_LAYERS": str(args.layers),
    }  # fmt: skip
    cmd = [
        "/usr/bin/time",
        "-v",
        sys.executable,
        "-m",
        "supermerge.cli",
        "-q",
        "merge",
        str(root / f"{name}.yaml"),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout}\n{done.stderr}")
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    summary = json.loads((root / name / "supermerge_merge.json").read_text())["summary"]
    nodes = json.loads((root / name / "coefficients.json").read_text())["nodes"]
    steps = sum(len(n["losses"]) for n in nodes)
    result = {
        "run": name, "k": k, "g": group_size, "nodes": len(nodes),
        "tracked_bytes": summary["peak_tensor_bytes"], "peak_rss_bytes": rss_kib * 1024,
        "peak_cuda_bytes": summary["peak_cuda_bytes"], "seconds": summary["seconds"],
        "seconds_per_step": sum(n["train_seconds"] for n in nodes) / steps,
    }  # fmt: skip
    shutil.rmtree(root / name)
    return result


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.3f}"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        query = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
        return subprocess.run(query, capture_output=True, text=True, check=False).stdout.strip()
    model = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    return f"{model.group(1) if model else platform.processor()}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--examples", type=int, default=32, help="validation examples per task")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--storage-dtype", default="float32")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    parser.add_argument("--make", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        build(args.make, args.k, args.width, args.layers, args.examples)
        return

    params = args.layers * (args.width * args.width + args.width)
    root = Path(tempfile.mkdtemp(prefix="bench-supermerge-"))
    try:
        sizes = ["--width", str(args.width), "--layers", str(args.layers), "--examples", str(args.examples)]
        make = [sys.executable, __file__, "--make", str(root), "--k", str(max(args.ks)), *sizes]
        subprocess.run(make, check=True)
        rows = []
        for k in args.ks:
            for g in (0, args.group_size):
                rows.append(run_merge(root, k, args, g))
                r = rows[-1]
                memory = f"tracked {gib(r['tracked_bytes'])} GiB, RSS {gib(r['peak_rss_bytes'])} GiB"
                cuda = f"CUDA {gib(r['peak_cuda_bytes'])} GiB"
                print(f"{r['run']:>10s}: {memory}, {cuda}, {r['seconds_per_step']:.3f} s/step", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    lines = [
        f"Device: {device_name(args.device)}; {datetime.date.today()}; MLP {args.layers} x {args.width}^2 "
        f"= {params / 1e6:.1f} M merged parameters, task vectors in {args.storage_dtype}, "
        f"g = {args.group_size}, {args.steps} steps per node, {args.examples} validation examples per task.",
        "",
        "| k | flat tracked GiB | tree tracked GiB | ratio | flat peak RSS GiB | tree peak RSS GiB | ratio "
        "| flat CUDA GiB | tree CUDA GiB | ratio | flat s/step | tree s/step | tree nodes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for flat, tree in zip(rows[::2], rows[1::2], strict=True):
        cuda_ratio = (
            f"{flat['peak_cuda_bytes'] / tree['peak_cuda_bytes']:.2f}" if tree["peak_cuda_bytes"] else "-"
        )
        lines.append(
            f"| {flat['k']} | {gib(flat['tracked_bytes'])} | {gib(tree['tracked_bytes'])} "
            f"| {flat['tracked_bytes'] / tree['tracked_bytes']:.2f} | {gib(flat['peak_rss_bytes'])} "
            f"| {gib(tree['peak_rss_bytes'])} | {flat['peak_rss_bytes'] / tree['peak_rss_bytes']:.2f} "
            f"| {gib(flat['peak_cuda_bytes'])} | {gib(tree['peak_cuda_bytes'])} | {cuda_ratio} "
            f"| {flat['seconds_per_step']:.3f} | {tree['seconds_per_step']:.3f} | {tree['nodes']} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        args.out.write_text(f"## SuperMerge memory: flat vs hierarchical\n\n{table}\n")


if __name__ == "__main__":
    main()
