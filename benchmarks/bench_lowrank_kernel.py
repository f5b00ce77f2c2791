"""The low-rank merge and coefficient gradient (kernels/lowrank.py): Triton vs torch on a GPU.

One tensor [m, n] (Llama-8B projection shapes by default) and k LoRA experts of rank r side by
side (R = k r), factors in --dtype, base and merged weights in float32. Per shape and k, the
median time of the forward (out = base + (B c) A into another buffer than base, as the learned
body merges) and of the backward (per-expert <G, B_i A_i>) for impl="torch" (addmm / cuBLAS) and
impl="triton" (kernels/lowrank_triton.py), measured in the same process with CUDA events after
warm-up, and their ratio; both outputs (merged weights, coefficient gradients) are compared
first. `auto` keeps torch until this shows where Triton pays.

    python benchmarks/bench_lowrank_kernel.py                    # k = 8 32 64, r = 16
    python benchmarks/bench_lowrank_kernel.py --experts 64 --shapes 4096x4096 14336x4096
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import torch

from supermerge.kernels.lowrank import lowrank_coefficient_grad, lowrank_merge_into
from supermerge.methods.learned import STORAGE_DTYPES


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median CUDA-event time of fn() in ms, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_one(m: int, n: int, k: int, rank: int, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    """Forward and backward ms of each impl on fresh random factors, and their outputs' max diff."""
    gen = torch.Generator("cuda").manual_seed(m * n + k)
    r_total = k * rank
    b = (torch.randn(m, r_total, generator=gen, device="cuda") * 0.01).to(dtype)
    a = (torch.randn(r_total, n, generator=gen, device="cuda") * 0.01).to(dtype)
    c = torch.randn(k, generator=gen, device="cuda")
    offsets = torch.arange(k + 1, device="cuda", dtype=torch.int64) * rank
    base = torch.randn(m, n, generator=gen, device="cuda")
    grad = torch.randn(m, n, generator=gen, device="cuda")
    outs = [
        lowrank_merge_into(torch.empty_like(base), base, b, a, c, offsets, i) for i in ("torch", "triton")
    ]
    grads = [lowrank_coefficient_grad(grad, b, a, offsets, impl) for impl in ("torch", "triton")]
    row = {
        "diff": float((outs[0] - outs[1]).abs().max()),
        "grad diff": float((grads[0] - grads[1]).abs().max()),
    }
    out = torch.empty_like(base)  # into another buffer than base, as the learned body merges
    for impl in ("torch", "triton"):
        row[f"{impl} fwd"] = median_ms(
            lambda i=impl: lowrank_merge_into(out, base, b, a, c, offsets, i), repeats
        )
        row[f"{impl} bwd"] = median_ms(
            lambda i=impl: lowrank_coefficient_grad(grad, b, a, offsets, i), repeats
        )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "1024x4096", "14336x4096", "4096x14336"])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", choices=list(STORAGE_DTYPES), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_lowrank_kernel: needs a CUDA device (Triton runs on CPU only in its interpreter)")
        return 2
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"factors {args.dtype}, r {args.rank}\n")  # fmt: skip
    print("| m x n | k | torch fwd ms | triton fwd ms | fwd torch/triton | torch bwd ms | triton bwd ms "
          "| bwd torch/triton | max diff fwd / bwd |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        m, n = (int(x) for x in shape.split("x"))
        for k in args.experts:
            t = time_one(m, n, k, args.rank, STORAGE_DTYPES[args.dtype], args.repeats)
            fwd, bwd = t["torch fwd"] / t["triton fwd"], t["torch bwd"] / t["triton bwd"]
            times = f"{t['torch fwd']:.3f} | {t['triton fwd']:.3f} | {fwd:.2f} | "
            times += f"{t['torch bwd']:.3f} | {t['triton bwd']:.3f} | {bwd:.2f}"
            print(f"| {m}x{n} | {k} | {times} | {t['diff']:.1e} / {t['grad diff']:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
