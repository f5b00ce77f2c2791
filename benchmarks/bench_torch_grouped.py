"""The torch grouped weighted sum's forward (kernels/torch_grouped.py, the CPU path of every learned
merge step) against the same products written to a temporary and copied into the output.

Tensors of a SmolLM2-135M-shaped body (30 layers of 576 x 576, 192 x 576, 1536 x 576 projections,
a 49152 x 576 embedding; float32) and k task vectors, random; per k the best of --repeats of
each variant, in the same process, and the ratio. The device and the thread count are printed.

    python benchmarks/bench_torch_grouped.py                 # k = 4 8
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch
from bench_merge_vs_mergekit import cpu_model

from supermerge.kernels.torch_grouped import grouped_weighted_sum_torch


def smollm2_sizes() -> list[int]:
    """Element counts of a SmolLM2-135M body's tensors, in order."""
    hidden, kv, inter = 576, 192, 1536
    layer = [hidden * hidden, kv * hidden, kv * hidden, hidden * hidden, inter * hidden, inter * hidden,
             hidden * inter, hidden, hidden]  # fmt: skip
    return [49152 * hidden, *(layer * 30), hidden]


def through_a_temporary(
    base: torch.Tensor, tau: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor
) -> None:
    """The baseline: each tensor's addmv into a fresh temporary, then copied into the output."""
    coef = torch.tanh(w)
    out = torch.empty_like(base)
    bounds = offsets.tolist()
    for t, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        out[lo:hi] = torch.addmv(base[lo:hi], tau[:, lo:hi].T, coef[:, t])


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def measure(k: int, sizes: list[int], repeats: int) -> tuple[float, float]:
    """(seconds into the output, seconds through a temporary) for k random task vectors."""
    offsets = torch.tensor([0, *sizes], dtype=torch.int64).cumsum(0)
    gen = torch.Generator().manual_seed(k)
    base = torch.randn(int(offsets[-1]), generator=gen)
    tau = torch.randn(k, base.numel(), generator=gen) * 0.01
    w = torch.randn(k, len(sizes), generator=gen)
    ours = best_seconds(lambda: grouped_weighted_sum_torch(base, tau, w, offsets), repeats)
    return ours, best_seconds(lambda: through_a_temporary(base, tau, w, offsets), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sizes = smollm2_sizes()
    threads = torch.get_num_threads()
    print(f"device: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} threads; "
          f"N = {sum(sizes) / 1e6:.1f}M in {len(sizes)} tensors\n")  # fmt: skip
    print("| k | into the output s | through a temporary s | ratio |")
    print("|---|---|---|---|")
    for k in args.experts:
        ours, baseline = measure(k, sizes, args.repeats)
        print(f"| {k} | {ours:.3f} | {baseline:.3f} | {baseline / ours:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
