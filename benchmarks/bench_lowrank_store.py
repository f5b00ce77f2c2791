"""LoRA experts held as their factors vs as dense task vectors: bytes, and one learned step.

A synthetic Llama-shaped model (hidden, intermediate, heads from --shape; layers to reach
--params) and k LoRA experts of rank r on every attention and MLP projection (random factors;
embeddings, norms and head untouched, as LoRA leaves them), built in memory:
- low-rank: a LowRankStore (taskvectors/lowrank_store.py) and a LowRankBody: bytes of the
  factors held, against the formula k r (m + n) per targeted tensor, and the time of one step's
  merge (forward) and coefficient gradient (backward of a random dLoss/dmerged);
- dense: the same experts' task vectors B A in a TaskVectorStore and a MergedBody, only where
  k x N x 4 bytes fit in --dense-budget: the same two timings, in the same process.
Times are the best of --repeats; the device and the thread count are printed.

    python benchmarks/bench_lowrank_store.py                               # 1.1B, k = 8 32 64
    python benchmarks/bench_lowrank_store.py --params 2.5e8 --experts 4 8  # where dense fits too
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
from bench_merge_vs_mergekit import cpu_model

from supermerge.learned.body import MergedBody
from supermerge.learned.coefficients import CoefficientLayout
from supermerge.learned.lowrank_body import LowRankBody
from supermerge.taskvectors.lowrank_store import LowRankStore, LowRankTensor
from supermerge.taskvectors.store import TaskVectorStore

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_layers(params: float, hidden: int, intermediate: int, kv: int, vocab: int) -> int:
    """Decoder layers of a Llama model (untied embeddings) with at least `params` parameters."""
    per_layer = 2 * hidden * hidden + 2 * kv * hidden + 3 * hidden * intermediate + 2 * hidden
    return max(1, math.ceil((params - 2 * vocab * hidden) / per_layer))


def llama_shapes(
    params: float, hidden: int, intermediate: int, kv: int, vocab: int
) -> dict[str, tuple[int, ...]]:
    """name -> shape of a Llama model with at least `params` parameters."""
    layers = llama_layers(params, hidden, intermediate, kv, vocab)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            f"{p}self_attn.q_proj.weight": (hidden, hidden),
            f"{p}self_attn.k_proj.weight": (kv, hidden),
            f"{p}self_attn.v_proj.weight": (kv, hidden),
            f"{p}self_attn.o_proj.weight": (hidden, hidden),
            f"{p}mlp.gate_proj.weight": (intermediate, hidden),
            f"{p}mlp.up_proj.weight": (intermediate, hidden),
            f"{p}mlp.down_proj.weight": (hidden, intermediate),
            f"{p}input_layernorm.weight": (hidden,),
            f"{p}post_attention_layernorm.weight": (hidden,),
        }
    return shapes | {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}


def lowrank_store(shapes: dict[str, tuple[int, ...]], k: int, rank: int, seed: int) -> LowRankStore:
    """Base and k LoRA experts' factors (every projection), random."""
    gen = torch.Generator().manual_seed(seed)
    names = list(shapes)
    base_flat = torch.randn(sum(math.prod(s) for s in shapes.values()), generator=gen) * 0.02
    tensors = []
    for name, shape in shapes.items():
        targeted = any(p in name for p in PROJECTIONS)
        m, n = (shape[0], math.prod(shape) // shape[0])
        r = rank if targeted else 0
        tensors.append(
            LowRankTensor(
                lowrank=list(range(k)) if targeted else [],
                b=torch.randn(m, k * r, generator=gen) * 0.01,
                a=torch.randn(k * r, n, generator=gen) * 0.01,
                scales=torch.full((k if targeted else 0,), 2.0),
                rank_offsets=torch.arange(0, (k if targeted else 0) + 1, dtype=torch.int64) * r,
                rows=[],
                row_vectors=torch.empty(0, m),
                cols=[],
                col_vectors=torch.empty(0, n),
                dense=[],
                taus=torch.empty(0, *shape),
            )
        )
    return LowRankStore(names, list(shapes.values()), base_flat, tensors, k)


def dense_store(store: LowRankStore) -> TaskVectorStore:
    """The same experts' task vectors s_i B_i A_i, dense, in flat buffers."""
    offsets = torch.tensor([0, *(math.prod(s) for s in store.shapes)], dtype=torch.int64).cumsum(0)
    tau_flat = torch.zeros(store.k, int(offsets[-1]))
    for t, part in enumerate(store.tensors):
        lo, hi = int(offsets[t]), int(offsets[t + 1])
        for j, i in enumerate(part.lowrank):
            r0, r1 = int(part.rank_offsets[j]), int(part.rank_offsets[j + 1])
            tau = (part.b[:, r0:r1] @ part.a[r0:r1]) * part.scales[j]
            tau_flat[i, lo:hi] = tau.reshape(-1)
    return TaskVectorStore(store.names, store.shapes, store.base_flat, tau_flat, offsets)


def step_seconds(body, repeats: int) -> tuple[float, float]:
    """Best forward (merge) and backward (coefficient gradient) seconds of one step."""
    grad = torch.randn(body.store.base_flat.numel(), generator=torch.Generator().manual_seed(1))
    forward = backward = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        body.forward()
        forward = min(forward, time.perf_counter() - start)
        start = time.perf_counter()
        body.backward(grad)
        backward = min(backward, time.perf_counter() - start)
        body.w.grad = None
    return forward, backward


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=float, default=1.1e9)
    parser.add_argument("--shape", type=int, nargs=4, default=[2048, 5632, 256, 32000],
                        metavar=("HIDDEN", "INTERMEDIATE", "KV_DIM", "VOCAB"))  # fmt: skip
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dense-budget", type=float, default=12e9, help="bytes the dense store may take")
    args = parser.parse_args()
    shapes = llama_shapes(args.params, *args.shape)
    numel = sum(math.prod(s) for s in shapes.values())
    print(
        f"device: {cpu_model()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"model: Llama-shaped, {numel / 1e9:.2f}B params, LoRA rank {args.rank} on {', '.join(PROJECTIONS)}\n"
    )
    print("| k | store (factors) | k r (m + n) | ratio | dense task vectors | dense / factors | "
          "merge s | gradient s | dense merge s | dense gradient s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k in args.experts:
        store = lowrank_store(shapes, k, args.rank, seed=k)
        formula = sum(
            k * args.rank * (s[0] + math.prod(s) // s[0]) * 4
            for n, s in shapes.items()
            if any(p in n for p in PROJECTIONS)
        )
        dense_bytes = k * numel * 4
        body = LowRankBody(store, CoefficientLayout.build(store.names))
        forward, backward = step_seconds(body, args.repeats)
        dense = "does not fit | |"
        if dense_bytes <= args.dense_budget:
            merged = MergedBody(dense_store(store), CoefficientLayout.build(store.names), impl="torch")
            d_forward, d_backward = step_seconds(merged, args.repeats)
            dense = f"{d_forward:.2f} | {d_backward:.2f} |"
            del merged
        held = store.task_vector_bytes
        sizes = f"{gib(held)} | {gib(formula)} | {held / formula:.3f} | {gib(dense_bytes)}"
        sizes += f" | {dense_bytes / held:.0f}x"
        print(f"| {k} | {sizes} | {forward:.2f} | {backward:.2f} | {dense}", flush=True)
        del store, body


if __name__ == "__main__":
    main()
