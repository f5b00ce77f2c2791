"""Benchmark the fused weighted-sum kernels against torch eager on one CUDA device.

Measures, in one run:
  * the device's copy bandwidth (device-to-device copy of 2 GiB, bytes read + written);
  * forward and backward (dL/dw) time of the Triton kernel, of torch eager
    ``base + (tanh(w)[:, None] * tau).sum(0)`` and of ``base + tanh(w) @ tau``, for each k and n,
    with achieved bandwidth over the minimal bytes (forward reads base and k tau rows and writes
    out; backward reads g and k tau rows);
  * a transformer-like group of ~300 tensors in one grouped launch vs a per-tensor loop;
  * optionally (--sweep) block size and warps per program of the Triton kernels.

Times are medians of triton.testing.do_bench, which flushes L2 (a 256 MB write) before every
timed call, so small inputs are read from device memory, not from the 50 MB L2.

Usage: python benchmarks/bench_weighted_sum.py [--out section.md] [--sweep]  (paste into RESULTS.md)
"""

import argparse
import datetime
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton
from torch import Tensor

from supermerge.kernels import grouped_weighted_sum, weighted_sum
from supermerge.kernels import weighted_sum_triton as kernels

GIB = 2**30


def bench_ms(fn: Callable[[], object]) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_bandwidth_gbs() -> float:
    src = torch.randn(GIB // 4, device="cuda")  # 1 GiB read + 1 GiB written per copy
    dst = torch.empty_like(src)
    return 2 * src.nbytes / bench_ms(lambda: dst.copy_(src)) / 1e6


def eager_sum(base: Tensor, tau: Tensor, w: Tensor) -> Tensor:
    return base + (torch.tanh(w)[:, None] * tau).sum(0)


def eager_matmul(base: Tensor, tau: Tensor, w: Tensor) -> Tensor:
    return base + torch.tanh(w).to(tau.dtype) @ tau


def fused(base: Tensor, tau: Tensor, w: Tensor) -> Tensor:
    return weighted_sum(base, tau, w, impl="triton")


def time_forward_backward(fn, base: Tensor, tau: Tensor, w: Tensor) -> tuple[float, float]:
    """Median ms of ``fn(base, tau, w)`` (a tensor or a list) and of its backward to ``w``."""
    forward_ms = bench_ms(lambda: fn(base, tau, w))
    outs = fn(base, tau, w)
    outs = [outs] if isinstance(outs, Tensor) else outs
    grads = [torch.randn_like(o) for o in outs]
    backward_ms = bench_ms(lambda: torch.autograd.grad(outs, w, grads, retain_graph=True))
    return forward_ms, backward_ms


def fmt_row(cells: list[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(header: list[str], rows: list[list[object]]) -> list[str]:
    return [fmt_row(header), fmt_row(["---"] * len(header)), *(fmt_row(r) for r in rows)]


def single_tensor_rows(ks: list[int], log2ns: list[int], dtype, copy_gbs: float) -> list[list]:
    rows = []
    es = torch.finfo(dtype).bits // 8
    for n_log2 in log2ns:
        for k in ks:
            n = 2**n_log2
            free, _ = torch.cuda.mem_get_info()
            # tau + eager's two fp32 [k, n] temporaries, with slack.
            if (k * n * (es + 8) + 8 * n * 4) > 0.9 * free:
                rows.append([k, f"2^{n_log2}", "skipped: does not fit", *[""] * 8])
                continue
            base = torch.randn(n, device="cuda").to(dtype)
            tau = (0.1 * torch.randn(k, n, device="cuda")).to(dtype)
            w = torch.randn(k, device="cuda", requires_grad=True)
            times = {}
            for name, fn in [("fused", fused), ("eager", eager_sum), ("matmul", eager_matmul)]:
                try:
                    times[name] = time_forward_backward(fn, base, tau, w)
                except torch.cuda.OutOfMemoryError:
                    times[name] = (math.nan, math.nan)
                torch.cuda.empty_cache()
            fwd_bytes, bwd_bytes = (k + 2) * n * es, (k + 1) * n * es
            f_ms, b_ms = times["fused"]
            f_gbs, b_gbs = fwd_bytes / f_ms / 1e6, bwd_bytes / b_ms / 1e6
            rows.append(
                [
                    k,
                    f"2^{n_log2}",
                    f"{f_ms:.3f}",
                    f"{f_gbs:.0f} ({100 * f_gbs / copy_gbs:.0f}%)",
                    f"{times['eager'][0] / f_ms:.1f}x",
                    f"{times['matmul'][0] / f_ms:.1f}x",
                    f"{b_ms:.3f}",
                    f"{b_gbs:.0f} ({100 * b_gbs / copy_gbs:.0f}%)",
                    f"{times['eager'][1] / b_ms:.1f}x",
                    f"{times['matmul'][1] / b_ms:.1f}x",
                ]
            )
            print(fmt_row(rows[-1]), flush=True)
            del base, tau, w
            torch.cuda.empty_cache()
    return rows


def transformer_sizes(layers: int = 24, hidden: int = 768, vocab: int = 50257) -> list[int]:
    """Parameter sizes of a GPT-2-medium-like stack: 12 tensors per layer + embeddings."""
    per_layer = [
        hidden * 3 * hidden,
        3 * hidden,  # qkv
        hidden * hidden,
        hidden,  # attention out
        hidden,
        hidden,
        hidden,
        hidden,  # two layer norms
        hidden * 4 * hidden,
        4 * hidden,  # mlp up
        4 * hidden * hidden,
        hidden,  # mlp down
    ]
    return [vocab * hidden, 1024 * hidden, *per_layer * layers, hidden, hidden]


def grouped_rows(k: int, dtype, copy_gbs: float) -> tuple[list[list], str]:
    sizes = transformer_sizes()
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int64)
    n = int(offsets[-1])
    base = torch.randn(n, device="cuda").to(dtype)
    tau = (0.1 * torch.randn(k, n, device="cuda")).to(dtype)
    w = torch.randn(k, len(sizes), device="cuda", requires_grad=True)
    bounds = offsets.tolist()
    # The per-tensor loops see separate contiguous tensors, as a model's parameters are.
    bases = [base[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    taus = [tau[:, a:b].contiguous() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def loop(fn):
        def run(_base, _tau, w_all):
            return [fn(b, t, w_all[:, i]) for i, (b, t) in enumerate(zip(bases, taus, strict=True))]

        return run

    def grouped(b, t, w_all):
        return grouped_weighted_sum(b, t, w_all, offsets, impl="triton")

    es = torch.finfo(dtype).bits // 8
    fwd_bytes, bwd_bytes = (k + 2) * n * es, (k + 1) * n * es
    rows = []
    for name, fn in [
        ("grouped fused (1 launch)", grouped),
        ("per-tensor fused loop", loop(fused)),
        ("per-tensor eager loop", loop(eager_sum)),
    ]:
        f_ms, b_ms = time_forward_backward(fn, base, tau, w)
        f_gbs, b_gbs = fwd_bytes / f_ms / 1e6, bwd_bytes / b_ms / 1e6
        rows.append(
            [
                name,
                f"{f_ms:.3f}",
                f"{f_gbs:.0f} ({100 * f_gbs / copy_gbs:.0f}%)",
                f"{b_ms:.3f}",
                f"{b_gbs:.0f} ({100 * b_gbs / copy_gbs:.0f}%)",
            ]
        )
        print(fmt_row(rows[-1]), flush=True)
    desc = f"{len(sizes)} tensors, {n / 1e6:.1f} M elements, smallest {min(sizes)}, k={k}"
    return rows, desc


def sweep_rows(k: int, n: int, dtype) -> list[list]:
    """Raw kernel time (no autograd) per block size, warps per program and tau rows per step."""
    base = torch.randn(n, device="cuda").to(dtype)
    tau = (0.1 * torch.randn(k, n, device="cuda")).to(dtype)
    w = torch.randn(k, 1, device="cuda")
    out, dw = torch.empty_like(base), torch.empty_like(w)
    offsets = torch.tensor([0, n], dtype=torch.int64)
    es = torch.finfo(dtype).bits // 8
    rows = []
    for block in (2048, 4096, 8192, 16384):
        plan = kernels.build_chunk_plan(offsets, block, base.device)
        partial = torch.empty(k, plan.n_chunks, device="cuda")
        for num_warps in (4, 8):
            for tasks in (1, 4, 8):
                cfg = {"plan": plan, "num_warps": num_warps, "tasks_per_step": tasks}
                f_ms = bench_ms(lambda c=cfg: kernels.grouped_forward(base, tau, w, out=out, **c))
                b_ms = bench_ms(
                    lambda c=cfg, p=partial: kernels.grouped_backward(base, tau, w, dw=dw, partial=p, **c)
                )
                rows.append(
                    [
                        k,
                        block,
                        num_warps,
                        tasks,
                        f"{f_ms:.3f}",
                        f"{(k + 2) * n * es / f_ms / 1e6:.0f}",
                        f"{b_ms:.3f}",
                        f"{(k + 1) * n * es / b_ms / 1e6:.0f}",
                    ]
                )
                print(fmt_row(rows[-1]), flush=True)
    return rows


def host_overhead_rows(k: int = 8, n: int = 2**16, calls: int = 300) -> list[list]:
    """Host (CPU) microseconds per call on a tiny input, where the GPU work is negligible."""
    base = torch.randn(n, device="cuda").to(torch.bfloat16)
    tau = torch.randn(k, n, device="cuda").to(torch.bfloat16)
    w = torch.randn(k, device="cuda", requires_grad=True)
    w2d = w.detach()[:, None].contiguous()
    out, dw = torch.empty_like(base), torch.empty_like(w2d)
    plan = kernels.build_chunk_plan(torch.tensor([0, n]), kernels.DEFAULT_BLOCK, base.device)
    partial = torch.empty(k, plan.n_chunks, device="cuda")
    fused_out = fused(base, tau, w)
    grad_out = torch.randn_like(fused_out)
    eager_out = eager_sum(base, tau, w)
    cases = {
        "raw forward launch": lambda: kernels.grouped_forward(base, tau, w2d, plan, out),
        "raw backward launches (2)": lambda: kernels.grouped_backward(base, tau, w2d, plan, dw, partial),
        "weighted_sum forward (autograd)": lambda: fused(base, tau, w),
        "weighted_sum backward (autograd.grad)": lambda: torch.autograd.grad(
            fused_out, w, grad_out, retain_graph=True
        ),
        "eager forward": lambda: eager_sum(base, tau, w),
        "eager backward (autograd.grad)": lambda: torch.autograd.grad(
            eager_out, w, grad_out, retain_graph=True
        ),
    }
    rows = []
    for name, fn in cases.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        rows.append([name, f"{(time.perf_counter() - start) / calls * 1e6:.0f}"])
        print(fmt_row(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the markdown section to this file")
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--log2n", type=int, nargs="+", default=[20, 24, 27])
    parser.add_argument("--grouped-k", type=int, default=8)
    parser.add_argument("--sweep", action="store_true", help="also sweep block / num_warps")
    args = parser.parse_args()
    dtype = torch.bfloat16

    device = torch.cuda.get_device_name()
    copy_gbs = copy_bandwidth_gbs()
    lines = [
        "## Fused weighted-sum kernels",
        "",
        f"Device: {device}; {datetime.date.today()}; torch {torch.__version__}, "
        f"triton {triton.__version__}; bf16 inputs, fp32 w.",
        f"Copy bandwidth (D2D copy of 1 GiB, read + write): {copy_gbs:.0f} GB/s.",
        "Medians of triton.testing.do_bench (L2 flushed before each call). GB/s counts minimal "
        "bytes: forward base + k*n tau + out, backward g + k*n tau; % is of the copy bandwidth. "
        "Speedups are vs eager `base + (tanh(w)[:,None]*tau).sum(0)` and "
        "vs `base + tanh(w) @ tau`, same pass (forward or backward to w).",
        "",
    ]
    print("\n".join(lines), flush=True)
    header = [
        "k",
        "n",
        "fwd ms",
        "fwd GB/s (% copy)",
        "fwd vs eager",
        "fwd vs matmul",
        "bwd ms",
        "bwd GB/s (% copy)",
        "bwd vs eager",
        "bwd vs matmul",
    ]
    print(fmt_row(header), flush=True)
    lines += table(header, single_tensor_rows(args.ks, args.log2n, dtype, copy_gbs))

    rows, desc = grouped_rows(args.grouped_k, dtype, copy_gbs)
    lines += ["", f"Grouped: transformer-like group, {desc}.", ""]
    lines += table(["variant", "fwd ms", "fwd GB/s (% copy)", "bwd ms", "bwd GB/s (% copy)"], rows)

    if args.sweep:
        lines += ["", "Sweep (raw launches, n=2^24):", ""]
        sweep = [row for k in (2, 8) for row in sweep_rows(k, 2**24, dtype)]
        header = ["k", "block", "warps", "rows/step", "fwd ms", "fwd GB/s", "bwd ms", "bwd GB/s"]
        lines += table(header, sweep)

    lines += ["", "Host time per call (k=8, n=2^16, GPU work negligible):", ""]
    lines += table(["call", "us"], host_overhead_rows())

    text = "\n".join(lines) + "\n"
    print("\n" + text, flush=True)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
