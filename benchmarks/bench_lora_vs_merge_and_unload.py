"""LoRA experts into a learned merge: read as factors, against merge_and_unload'ing each first.

What a user without adapter support runs before a learned merge of k LoRA experts: for each,
load the base, PEFT's `merge_and_unload`, save the dense expert; then the dense store reads the
k dense experts back as task vectors. supermerge reads the adapters' factors instead
(`LowRankStore`). Both from the same files on disk, in one process, the adapters' path first:
- preparation seconds: merge_and_unload + save of every expert (user) vs none (ours);
- store seconds and bytes: TaskVectorStore.build over the dense experts vs LowRankStore.build
  over the adapters;
- one learned step's merge + coefficient gradient (MergedBody vs LowRankBody).
The model is a random transformers Llama (hidden, intermediate, key-value width, vocabulary from
--shape; layers to reach --params) saved in --dtype, with k random rank-r LoRA adapters on every
attention and MLP projection (PEFT, init_lora_weights=False). The dense experts are written to the
same disk just before they are read (so they may come from the page cache: the user's path is
if anything favoured).

    python benchmarks/bench_lora_vs_merge_and_unload.py                      # 0.25B, k = 4 8
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from bench_lowrank_store import PROJECTIONS, gib, llama_layers, step_seconds
from bench_merge_vs_mergekit import cpu_model
from transformers import LlamaConfig

from supermerge.learned.body import MergedBody
from supermerge.learned.coefficients import CoefficientLayout
from supermerge.learned.lowrank_body import LowRankBody
from supermerge.methods.learned import STORAGE_DTYPES
from supermerge.taskvectors.lowrank_store import LowRankStore
from supermerge.taskvectors.source import TaskVectorSource, open_source
from supermerge.taskvectors.store import TaskVectorStore

T = TypeVar("T")


def write_base(
    folder: Path, params: float, hidden: int, intermediate: int, kv: int, vocab: int, dtype: torch.dtype
) -> LlamaConfig:
    """A random Llama of at least `params` parameters saved at `folder`; returns its config."""
    from transformers import LlamaForCausalLM

    head_dim = 64
    layers = llama_layers(params, hidden, intermediate, kv, vocab)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=hidden // head_dim, num_key_value_heads=kv // head_dim, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(dtype).save_pretrained(folder)
    return config


def write_adapters(base: Path, folder: Path, k: int, rank: int, dtype: torch.dtype) -> list[Path]:
    """k random LoRA adapters of `base` (rank `rank`, alpha 2 rank, every projection)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    targets = list(PROJECTIONS)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), config)
    paths = []
    for i in range(k):
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
        model.save_pretrained(folder / f"lora{i}")
        paths.append(folder / f"lora{i}")
    return paths


def merge_and_unload_all(
    base: Path, adapters: list[Path], folder: Path, dtype: torch.dtype
) -> tuple[list[Path], float, int]:
    """(dense expert folders, seconds, bytes written): PEFT's merge_and_unload of each adapter, saved."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    start, paths = time.perf_counter(), []
    for adapter in adapters:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        merged.save_pretrained(folder / adapter.name)
        paths.append(folder / adapter.name)
        del model, merged
    seconds = time.perf_counter() - start
    written = sum(f.stat().st_size for p in paths for f in p.iterdir())
    return paths, seconds, written


def experts(base: Path, folders: list[Path]) -> TaskVectorSource:
    """A TaskVectorSource of `folders` (adapters or models) on `base`, every tensor merged."""
    return open_source(base, [(p.name, p) for p in folders], heads=[])


def timed(build: Callable[[], T]) -> tuple[T, float]:
    """(build(), its wall seconds)."""
    start = time.perf_counter()
    result = build()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=float, default=2.5e8)
    parser.add_argument("--shape", type=int, nargs=4, default=[1024, 2816, 256, 32000],
                        metavar=("HIDDEN", "INTERMEDIATE", "KV_DIM", "VOCAB"))  # fmt: skip
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", choices=list(STORAGE_DTYPES), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=Path, help="where the models go (default: a temporary folder)")
    args = parser.parse_args()
    dtype = STORAGE_DTYPES[args.dtype]
    work = Path(tempfile.mkdtemp(prefix="bench_lora_", dir=args.workdir))
    try:
        config = write_base(work / "base", args.params, *args.shape, dtype)
        numel = sum(p.stat().st_size for p in (work / "base").glob("*.safetensors")) // dtype.itemsize
        print(f"device: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads")  # fmt: skip
        print(f"model: random Llama, {config.num_hidden_layers} layers, {numel / 1e9:.2f}B params in "
              f"{args.dtype}; LoRA rank {args.rank} on {', '.join(PROJECTIONS)}\n")  # fmt: skip
        print("| k | merge_and_unload + save s | written | dense store s | dense task vectors | dense step s "
              "| factor store s | factors | factor step s | store ready: user / ours |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|")
        for k in args.experts:
            adapters = write_adapters(work / "base", work / f"adapters{k}", k, args.rank, dtype)
            ours, ours_s = timed(lambda: LowRankStore.build(experts(work / "base", adapters)))  # noqa: B023
            body = LowRankBody(ours, CoefficientLayout.build(ours.names))
            ours_step = sum(step_seconds(body, args.repeats))
            held = ours.task_vector_bytes
            del body, ours

            folder = work / f"dense{k}"
            dense_paths, unload_s, written = merge_and_unload_all(work / "base", adapters, folder, dtype)
            dense, dense_s = timed(lambda: TaskVectorStore.build(experts(work / "base", dense_paths)))  # noqa: B023
            merged = MergedBody(dense, CoefficientLayout.build(dense.names), impl="torch")
            dense_step = sum(step_seconds(merged, args.repeats))
            dense_bytes = dense.task_vector_bytes
            del merged, dense
            shutil.rmtree(work / f"dense{k}")
            ready = (unload_s + dense_s) / ours_s
            print(f"| {k} | {unload_s:.1f} | {gib(written)} | {dense_s:.1f} | {gib(dense_bytes)} | "
                  f"{dense_step:.2f} | {ours_s:.1f} | {gib(held)} | {ours_step:.2f} | {ready:.0f}x |",
                  flush=True)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
