"""The TIES magnitude trim: supermerge's exact replay against mergekit 0.1.5's argsort.

For each kind of task vector and each density, times mergekit's
`sparsify(tau, density, SparsificationMethod.magnitude)` (argsort of |tau|, then a mask) and
supermerge's `magnitude_trim` (same kept entries without sorting, in place) in this process, the
latter twice: with its compiled replay (kernels/sorted_range.cpp) and with its replay in torch
operations (what runs without a C++ compiler); checks that all keep the same entries bit for
bit, and prints the speed ratios. With --memory,
each trim also runs in a fresh subprocess that reports its peak RSS above what it held before
the trim (Linux: VmHWM after resetting it through /proc/self/clear_refs), in units of tau's size
(mergekit's figure includes its output tensor; supermerge trims in place).

Kinds of task vector (all ~N(0, 0.002^2), like a fine-tune's deltas):
  float32              continuous fp32 values (ties at the cut are unlikely);
  float32_of_bfloat16  expert - base of bf16 checkpoints, in fp32 (what supermerge's default fp32
                       merge of bf16 models trims: many equal magnitudes);
  bfloat16             the same in bf16 (mergekit's arithmetic in a bf16 merge).

    python benchmarks/bench_magnitude_trim.py                       # 4096 x 4096, 5 densities
    python benchmarks/bench_magnitude_trim.py --threads 1 --memory
    python benchmarks/bench_magnitude_trim.py --shape 1024 1024 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from bench_merge_vs_mergekit import cpu_model
from mergekit.sparsify import SparsificationMethod, sparsify

from supermerge.kernels import sorted_range_cpu
from supermerge.methods.sparsify import magnitude_trim

KINDS = ("float32", "float32_of_bfloat16", "bfloat16")
TOOLS = ("mergekit", "compiled", "torch_ops")  # the last two: supermerge's two replays
DELTA_STD = 0.002


def task_vector(kind: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A task vector of one kind (see the module docstring), made a block of rows at a time so
    that making it costs little more memory than it holds."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(shape, dtype=torch.bfloat16 if kind == "bfloat16" else torch.float32)
    for rows in out.view(shape[0], -1).split(256):
        base = torch.randn(rows.shape, generator=gen) * 0.02
        tau = torch.randn(rows.shape, generator=gen) * DELTA_STD
        if kind == "float32":
            rows.copy_(tau)
        else:
            expert16, base16 = (base + tau).bfloat16(), base.bfloat16()
            rows.copy_(expert16 - base16 if kind == "bfloat16" else expert16.float() - base16.float())
    return out


@contextmanager
def torch_ops_replay() -> Iterator[None]:
    """supermerge's trims replay std::sort in torch operations, as without a C++ compiler."""
    supports = sorted_range_cpu.supports
    sorted_range_cpu.supports = lambda flat: False
    try:
        yield
    finally:
        sorted_range_cpu.supports = supports


def trim(tool: str, tau: torch.Tensor, density: float) -> torch.Tensor:
    """One trim: mergekit's returns a new tensor; supermerge's zeroes `tau` in place."""
    if tool == "mergekit":
        return sparsify(tau, density, SparsificationMethod.magnitude)
    if tool == "torch_ops":
        with torch_ops_replay():
            return magnitude_trim(tau, density)
    return magnitude_trim(tau, density)


def best_seconds(tool: str, tau: torch.Tensor, density: float, repeats: int) -> tuple[float, torch.Tensor]:
    """Fastest of `repeats` runs (supermerge's each on a fresh copy, not timed) and the result."""
    best, out = float("inf"), tau
    for _ in range(repeats):
        work = tau if tool == "mergekit" else tau.clone()
        start = time.perf_counter()
        out = trim(tool, work, density)
        best = min(best, time.perf_counter() - start)
    return best, out


def peak_child(tool: str, kind: str, shape: tuple[int, ...], density: float, threads: int | None) -> float:
    """Peak RSS of one trim in a fresh process, above what it held before, in units of tau's bytes."""
    args = [tool, kind, json.dumps(list(shape)), str(density), str(threads or 0)]
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True
    ).stdout
    return float(out.strip().splitlines()[-1])


def rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(tool: str, kind: str, shape: list[int], density: float, threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)
    tau = task_vector(kind, tuple(shape), seed=0)
    trim(tool, task_vector(kind, (64, 64), seed=1), density)  # warm up the code paths
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = rss_bytes("VmRSS")
    trim(tool, tau, density)
    print((rss_bytes("VmHWM") - before) / (tau.numel() * tau.element_size()))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", type=int, nargs="+", default=[4096, 4096])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--memory", action="store_true", help="also peak RSS of each trim, in subprocesses")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        tool, kind, shape, density, threads = args.child
        child(tool, kind, json.loads(shape), float(density), int(threads))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    print(
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}; "
        f"python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}); load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    print(f"Tensor {' x '.join(map(str, shape))}, best of {args.repeats}; times in seconds.\n")
    if sorted_range_cpu.library() is None:
        raise SystemExit("the compiled trim could not be built here (see the warning above)")
    header = "| kind | density | mergekit | compiled | torch ops | speedup compiled | speedup torch ops "
    header += "| same entries |"
    if args.memory:
        header += " peak mergekit (x tau) | peak compiled (x tau) | peak torch ops (x tau) |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    ratios: dict[str, list[float]] = {"compiled": [], "torch_ops": []}
    for kind in args.kinds:
        tau = task_vector(kind, shape, seed=0)
        for density in args.densities:
            runs = {tool: best_seconds(tool, tau, density, args.repeats) for tool in TOOLS}
            theirs_s, theirs = runs["mergekit"]
            same = all(
                torch.equal(out != 0, theirs != 0) and torch.equal(out, theirs) for _, out in runs.values()
            )
            for tool in ratios:
                ratios[tool].append(theirs_s / runs[tool][0])
            times = " | ".join(f"{runs[tool][0]:.3f}" for tool in TOOLS)
            speedups = " | ".join(f"{theirs_s / runs[tool][0]:.1f}x" for tool in ratios)
            row = f"| {kind} | {density} | {times} | {speedups} | {same} |"
            if args.memory:
                peaks = [peak_child(tool, kind, shape, density, args.threads) for tool in TOOLS]
                row += "".join(f" {peak:.2f} |" for peak in peaks)
            print(row, flush=True)
    for tool, values in ratios.items():
        print(f"\nSpeedup of {tool} over mergekit: min {min(values):.1f}x, max {max(values):.1f}x.")


if __name__ == "__main__":
    main()
