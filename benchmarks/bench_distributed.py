"""Distributed SuperMerge on CPU (gloo): per-rank memory, time per step and traffic vs ranks and k,
with the merged body all-gathered once per step (`distributed.gather: body`) and layer by layer
(`gather: layer`).

A synthetic model (an MLP of `--layers` square layers of width `--width`, fp32) and k experts
(base + random task vectors) are written to a work folder; `supermerge merge` then runs as one
process and under torchrun with R = 2 and 4 ranks at k = 8, and at R = 2 for k = 2, 4, 8, in each
gather mode of `--gather`. From each run's coefficients.json / supermerge_merge.json it prints:
- task-vector bytes each rank held (goal: total / R within 5%), and each rank's peak RSS;
- the tensor bytes the engine held at its peak (store, merged weights, gradients: tracked);
- time per training step (on this machine's cores: with more ranks than cores the ranks share
  them, so this is not a scaling figure);
- bytes a rank sent per step, split into tensor traffic (goal: flat in k) and dW (k x G floats);
- layer mode with and without prefetch (`gather_ahead` 1 and 0) at k = 8, R = 2 and 4: time per
  step of each (runs alternated, `--repeats` each, median) and their ratio.
Usage: .venv/bin/python benchmarks/bench_distributed.py [--width 1024 --layers 4 --steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from torch import nn

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
CLASSES = 4
RUNS = [(8, 1), (8, 2), (8, 4), (2, 2), (4, 2)]  # (k, ranks), in each gather mode
OFFLOAD_RUNS = [(8, 1, "body"), (8, 2, "layer")]  # (k, ranks, gather), for each offload target
PREFETCH_RUNS = [(8, 2), (8, 4)]  # (k, ranks), layer mode with gather_ahead 0 and 1


class WideMLP(nn.Module):
    """`layers` square ReLU layers of `width` and a head (the head is task-specific)."""

    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.ReLU())])
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def make_model() -> nn.Module:
    """The factory the merge config names; sizes come from the environment the benchmark sets."""
    return WideMLP(int(os.environ["BENCH_WIDTH"]), int(os.environ["BENCH_LAYERS"]))


def write_suite(work: Path, k: int, width: int, layers: int) -> Path:
    """Base, k experts and validation data under work/k<k>; returns the merge YAML."""
    folder = work / f"k{k}"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    base = WideMLP(width, layers).state_dict()
    save_file(base, str(folder / "base.safetensors"))
    experts = []
    for i in range(k):
        gen = torch.Generator().manual_seed(100 + i)
        state = {n: t + 0.02 * t.std() * torch.randn(t.shape, generator=gen) for n, t in base.items()}
        save_file(state, str(folder / f"expert{i}.safetensors"))
        data = {
            "x": torch.randn(64, width, generator=gen),
            "y": torch.randint(0, CLASSES, (64,), generator=gen),
        }
        torch.save(data, folder / f"expert{i}.pt")
        experts.append({"name": f"t{i}", "path": f"expert{i}.safetensors", "data": f"expert{i}.pt"})
    config = folder / "merge.yaml"
    config.write_text(yaml.safe_dump({
        "base": "base.safetensors", "experts": experts, "heads": ["head.*"],
        "method": {"name": "supermerge", "steps": 0, "validation_size": 64, "batch_size": 64},
        "model": {"kind": "torch_module", "factory": "benchmarks.bench_distributed:make_model"},
        "output": "out",
    }))  # fmt: skip
    return config


def run(config: Path, ranks: int, steps: int, gather: str, offload: str, env: dict, ahead: int = 1) -> dict:
    """One merge; returns the root node record, the summary and the wall time."""
    doc = yaml.safe_load(config.read_text())
    doc["method"]["steps"] = steps
    doc["output"] = f"out-r{ranks}-{gather}-{offload}"
    doc["distributed"] = {"gather": gather, "offload": offload}
    if gather == "layer":
        doc["distributed"]["gather_ahead"] = ahead
    if offload == "nvme":
        (config.parent / "nvme").mkdir(exist_ok=True)
        doc["distributed"]["nvme_path"] = "nvme"
    run_config = config.with_name(f"merge-r{ranks}-{gather}-{offload}.yaml")
    run_config.write_text(yaml.safe_dump(doc))
    launcher = [str(BIN / "supermerge")] if ranks == 1 else [
        str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={ranks}", "-m", "supermerge",
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(
        [*launcher, "-q", "merge", str(run_config), "--overwrite"], cwd=config.parent, env=env, check=True,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    wall = time.perf_counter() - start
    out = config.parent / doc["output"]
    root = json.loads((out / "coefficients.json").read_text())["nodes"][-1]
    summary = json.loads((out / "supermerge_merge.json").read_text())["summary"]
    return {"root": root, "summary": summary, "wall": wall}


def nvme_read_bandwidth(folder: Path, nbytes: int, block: int = 64 << 20) -> float:
    """Bytes per second DeepSpeed's aio handle reads from a file of `nbytes` in `folder` (O_DIRECT,
    so not the page cache), in blocks of `block` bytes: the floor the NVMe store is held to."""
    from supermerge.distributed.stores.nvme import aio_handle

    handle = aio_handle()
    buffer = handle.new_cpu_locked_tensor(block, torch.empty(0, dtype=torch.uint8))
    buffer.random_(0, 255)
    path = folder / "bandwidth.bin"
    blocks = max(1, nbytes // block)
    for b in range(blocks):
        handle.sync_pwrite(buffer, str(path), b * block)
    start = time.perf_counter()
    for b in range(blocks):
        handle.sync_pread(buffer, str(path), b * block)
    seconds = time.perf_counter() - start
    handle.free_cpu_locked_tensor(buffer)
    path.unlink()
    return blocks * block / seconds


def compare_prefetch(configs: dict[int, Path], steps: int, repeats: int, env: dict) -> list[dict]:
    """Layer mode, time per step with gather_ahead 0 and 1, runs alternated (the machine's drift
    hits both alike); the median of `repeats` runs of each and their ratio."""
    rows = []
    for k, ranks in PREFETCH_RUNS if repeats else []:
        seconds: dict[int, list[float]] = {0: [], 1: []}
        for _ in range(repeats):
            for ahead in (0, 1):
                root = run(configs[k], ranks, steps, "layer", "none", env, ahead)["root"]
                seconds[ahead].append(root["train_seconds"] / steps)
        median = {a: statistics.median(t) for a, t in seconds.items()}
        rows.append({"k": k, "ranks": ranks, "seconds_per_step": seconds, "ratio": median[1] / median[0]})
        print(
            f"layer k={k} R={ranks}: {median[0]:.3f} s/step without prefetch, {median[1]:.3f} with "
            f"gather_ahead 1 (ratio {median[1] / median[0]:.3f}; medians of {repeats})"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--gather", default="body,layer", help="comma-separated gather modes to run")
    parser.add_argument(
        "--offload", default="cpu,nvme", help="offload targets to run at k = 8 (nvme needs libaio-dev)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each prefetch setting (0: skip)")
    args = parser.parse_args()
    # DeepSpeed's ops (CPU comm, async_io) built once, where the tests and launch/ keep them
    default_extensions = Path.home() / ".cache" / "supermerge" / "torch_extensions"
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(default_extensions))
    env = os.environ | {
        "BENCH_WIDTH": str(args.width), "BENCH_LAYERS": str(args.layers), "OMP_NUM_THREADS": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }  # fmt: skip
    device = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    print(f"device: CPU ({device}); model: {args.layers} x {args.width}^2 fp32 MLP; {args.steps} steps")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        work = Path(tmp)
        configs = {k: write_suite(work, k, args.width, args.layers) for k in (2, 4, 8)}
        runs = [(k, ranks, gather, "none") for gather in args.gather.split(",") for k, ranks in RUNS]
        offloads = [o for o in args.offload.split(",") if o]
        runs += [(k, ranks, gather, o) for o in offloads for k, ranks, gather in OFFLOAD_RUNS]
        for k, ranks, gather, offload in runs:
            result = run(configs[k], ranks, args.steps, gather, offload, env)
            root = result["root"]
            n = sum(
                p.numel() for n_, p in WideMLP(args.width, args.layers).named_parameters() if "head" not in n_
            )
            total = k * n * 4
            shares = root["rank_task_vector_bytes"]
            # an offloaded store holds no task vectors on the compute device: nothing to balance there
            worst = (
                max(abs(b - total / ranks) / (total / ranks) for b in shares) if offload == "none" else 0.0
            )
            traffic = root["comm_bytes_per_step"]
            tensor = sum(b for t, b in traffic.items() if t not in ("dW", "loss", "accuracy", "objects"))
            rows.append({
                "gather": gather, "offload": offload, "k": k, "ranks": ranks,
                "task_vector_bytes_total": total,
                "rank_task_vector_bytes": shares, "tracked_bytes": root["tracked_bytes"],
                "worst_share_error": worst, "rank_peak_rss": root["rank_peak_rss"],
                "seconds_per_step": root["train_seconds"] / args.steps, "tensor_bytes_per_step": tensor,
                "dW_bytes_per_step": traffic.get("dW", 0), "wall_seconds": result["wall"],
            })  # fmt: skip
            print(
                f"gather={gather} offload={offload} k={k} R={ranks}: task vectors per rank "
                f"{[f'{b / 2**20:.1f}' for b in shares]} MiB "
                f"(total/R {total / ranks / 2**20:.1f} MiB, worst {100 * worst:.2f}% off), peak RSS per rank "
                f"{[f'{r / 2**20:.0f}' for r in root['rank_peak_rss']]} MiB, tracked tensors "
                f"{root['tracked_bytes'] / 2**20:.1f} MiB, "
                f"{rows[-1]['seconds_per_step']:.3f} s/step, sent per step: tensors "
                f"{tensor / 2**20:.2f} MiB, dW {traffic.get('dW', 0)} B"
            )
        bandwidth = None
        if "nvme" in offloads:
            largest = max(r["task_vector_bytes_total"] // r["ranks"] for r in rows if r["offload"] == "nvme")
            bandwidth = nvme_read_bandwidth(work, largest)
            print(f"aio read bandwidth of the drive under {work}: {bandwidth / 2**30:.2f} GiB/s")
            for row in rows:
                if row["offload"] == "nvme":  # forward and backward each read the rank's shard once
                    row["read_floor_seconds_per_step"] = (
                        2 * row["task_vector_bytes_total"] / row["ranks"] / bandwidth
                    )
                    print(
                        f"nvme k={row['k']} R={row['ranks']} {row['gather']}: "
                        f"{row['seconds_per_step']:.3f} s/step, read floor "
                        f"{row['read_floor_seconds_per_step']:.3f} s/step"
                    )
        prefetch = compare_prefetch(configs, args.steps, args.repeats, env)
    out = ROOT / "benchmarks" / "results" / "distributed_cpu.json"
    out.parent.mkdir(exist_ok=True)
    record = {
        "device": device, "args": vars(args), "rows": rows, "nvme_read_bytes_per_s": bandwidth,
        "prefetch": prefetch,
    }  # fmt: skip
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
