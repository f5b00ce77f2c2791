"""supermerge vs mergekit 0.1.5: wall time and peak RSS of the same merges on the same files.

Builds a synthetic Llama-shaped model (embedding, N layers of q/k/v/o/gate/up/down + 2 norms,
final norm, untied lm_head) of about --params parameters in --dtype, saved as sharded
safetensors with an HF config.json, plus --experts experts (base + N(0, (0.1 * 0.02)^2)
deltas). Then merges it with every method both tools offer, each tool given the SAME mergekit
config (supermerge reads it as it is), each run in a FRESH subprocess (with --repeats the tools
alternate and each one's fastest run is kept): peak RSS is the child's
ru_maxrss (via /usr/bin/time), wall time is the parent's clock around the child (imports
included); the child also reports its merge-only seconds. Both do the math in fp32 (`dtype:
float32`) and write the base's dtype with the same shard size. Random methods (DARE, DELLA) draw
other masks in each tool, so their outputs are not compared.

Our theoretical bound: one tensor group and one output tensor in flight (the streamed writer) =
(1 base + k task vectors + 1 merged) * largest numel * 4 bytes + largest numel * output itemsize
(the merged tensor is made in an input's buffer, so one of the 2 + k is spare); it is compared
with our peak RSS minus a baseline process that only imports `supermerge.merge` (python+torch).

    python benchmarks/bench_merge_vs_mergekit.py                 # 500M params, 4 experts, bf16
    python benchmarks/bench_merge_vs_mergekit.py --methods linear ties --results out.md
    python benchmarks/bench_merge_vs_mergekit.py --params 100e6 --methods all
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from supermerge.io.checkpoint import Checkpoint

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BASE_STD = 0.02  # std of the synthetic base weights
DELTA_STD = 0.002  # std of an expert's task vector (10% of the base's)
HIDDEN, INTERMEDIATE, HEADS, VOCAB = 1536, 4096, 12, 32000


def llama_shapes(params: float) -> tuple[int, dict[str, tuple[int, ...]]]:
    """Layer count and name -> shape of a Llama model of hidden 1536 with >= `params` parameters."""
    per_layer = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN
    layers = max(1, math.ceil((params - 2 * VOCAB * HIDDEN - HIDDEN) / per_layer))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{proj}.weight"] = (HIDDEN, HIDDEN)
        shapes[f"{p}mlp.gate_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[f"{p}mlp.up_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[f"{p}mlp.down_proj.weight"] = (HIDDEN, INTERMEDIATE)
        shapes[f"{p}input_layernorm.weight"] = (HIDDEN,)
        shapes[f"{p}post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return layers, shapes


def hf_config(layers: int, dtype: str) -> dict:
    """config.json of the synthetic model (mergekit needs the architecture)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
    }


def write_model(
    folder: Path,
    shapes: dict[str, tuple[int, ...]],
    config: dict,
    dtype: torch.dtype,
    shard_bytes: int,
    seed: int,
    base: Path | None,
) -> None:
    """Write one model as HF sharded safetensors: random base, or `base` + random deltas.

    Tensors are generated one at a time and flushed per shard (at most one shard in memory).
    """
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    base_files = {}
    if base is not None:
        base_files = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in shapes.items():
        if base is None:
            tensor = torch.randn(shape, generator=generator) * BASE_STD + (1.0 if "norm" in name else 0.0)
        else:
            with safe_open(base / base_files[name], framework="pt") as f:
                tensor = f.get_tensor(name).float() + torch.randn(shape, generator=generator) * DELTA_STD
        shards[-1][name] = tensor.to(dtype)
        size += shards[-1][name].nbytes
        if size >= shard_bytes:
            shards.append({})
            size = 0
    shards = [s for s in shards if s]
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), {"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        shards[i] = {}
    total = sum(math.prod(s) for s in shapes.values()) * torch.empty((), dtype=dtype).element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(config, indent=2))


OURS_CHILD = """
import dataclasses, json, sys, tempfile, time
from supermerge.config import load_config
from supermerge.merge import run_merge
raw, out, shard = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
    f.write(json.dumps(raw))
    f.flush()
    cfg = dataclasses.replace(load_config(f.name, out), shard_size=shard)  # mergekit's out_shard_size
start = time.perf_counter()
summary = run_merge(cfg, progress=False)
print(json.dumps({"merge_s": time.perf_counter() - start, "peak_tensor_bytes": summary.peak_tensor_bytes}))
"""

MERGEKIT_CHILD = """
import json, sys, time
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
raw, out, shard = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
options = MergeOptions(device="cpu", lazy_unpickle=True, low_cpu_memory=True, out_shard_size=shard,
                       copy_tokenizer=False, write_model_card=False, quiet=True)
start = time.perf_counter()
run_merge(MergeConfiguration.model_validate(raw), out, options=options)
print(json.dumps({"merge_s": time.perf_counter() - start}))
"""

BASELINE_CHILD = "import supermerge.merge"


@dataclass
class Run:
    """One merge in a fresh process: wall seconds (process), merge seconds (in-process), peak RSS bytes."""

    wall_s: float
    merge_s: float | None
    peak_rss: int


def run_child(code: str, *args: str) -> Run:
    """Run `python -c code args` in a fresh process under /usr/bin/time, which reports its peak RSS.

    Not os.wait4 / RUSAGE_CHILDREN from this process: on Linux a child's ru_maxrss starts at
    the high-water RSS of the process that forked it (exec keeps it), and this parent holds
    model shards while it writes them; /usr/bin/time is a small process to fork from.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with tempfile.NamedTemporaryFile("r", suffix=".maxrss") as rss_file:
        cmd = ["/usr/bin/time", "-f", "%M", "-o", rss_file.name, sys.executable, "-c", code, *args]
        start = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, env=env, text=True, check=False)
        wall = time.perf_counter() - start
        peak_kib = int(rss_file.read().strip().splitlines()[-1])
    if proc.returncode != 0:
        raise SystemExit(f"child failed with exit code {proc.returncode}:\n{proc.stdout}")
    lines = proc.stdout.strip().splitlines()
    merge_s = json.loads(lines[-1])["merge_s"] if lines else None
    return Run(wall, merge_s, peak_kib * 1024)


# mergekit name -> (experts it takes (None: all), per-model parameters, global parameters)
METHODS: dict[str, tuple[int | None, dict, dict]] = {
    "linear": (None, {"weight": 1.0}, {}),
    "task_arithmetic": (None, {"weight": 1.0}, {}),
    "ties": (None, {"weight": 1.0, "density": 0.5}, {}),
    "dare_linear": (None, {"weight": 1.0, "density": 0.5}, {}),
    "dare_ties": (None, {"weight": 1.0, "density": 0.5}, {}),
    "breadcrumbs": (None, {"weight": 1.0, "density": 0.5}, {"gamma": 0.01}),
    "breadcrumbs_ties": (None, {"weight": 1.0, "density": 0.5}, {"gamma": 0.01}),
    "della": (None, {"weight": 1.0, "density": 0.5}, {"epsilon": 0.1}),
    "della_linear": (None, {"weight": 1.0, "density": 0.5}, {"epsilon": 0.1}),
    "sce": (None, {"weight": 1.0}, {"select_topk": 0.5}),
    "slerp": (1, {}, {"t": 0.5}),
    "nuslerp": (2, {"weight": 1.0}, {}),
    "multislerp": (None, {"weight": 1.0}, {}),
    "karcher": (None, {}, {}),
    "model_stock": (None, {}, {}),
}
RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}  # masks drawn differently per tool


def merge_config(method: str, base: Path, experts: list[Path], out_dtype: str) -> dict:
    """The mergekit config of one merge (both tools run it): fp32 math, `out_dtype` output."""
    count, per_model, shared = METHODS[method]
    return {
        "merge_method": method,
        **({} if method == "linear" else {"base_model": str(base)}),  # linear uses no base
        "models": [{"model": str(p), "parameters": per_model} for p in experts[:count]],
        "parameters": shared,
        "dtype": "float32",
        "out_dtype": out_dtype,
    }


def max_relative_diff(a_dir: Path, b_dir: Path, names: list[str]) -> float:
    """max over `names` of max|a - b| / max|b| between two merged models (unitless)."""
    a_ckpt, b_ckpt = Checkpoint(a_dir), Checkpoint(b_dir)
    worst = 0.0
    for name in names:
        a, b = a_ckpt.read(name).float(), b_ckpt.read(name).float()
        worst = max(worst, ((a - b).abs().max() / b.abs().max()).item())
    return worst


def models_match(models: Path, config: dict, experts: int, shard_size: int) -> bool:
    """True if `models` holds a complete set written by this script for the same shape."""
    made = models / "made.json"
    if not made.is_file() or json.loads(made.read_text()) != {"experts": experts, "shard": shard_size}:
        return False
    return all(
        (folder / "config.json").is_file() and json.loads((folder / "config.json").read_text()) == config
        for folder in [models / "base", *(models / f"expert{i}" for i in range(experts))]
    )


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=float, default=500e6, help="model size (parameters)")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--shard-size", type=int, default=2**30, help="bytes per shard, in and out")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="stored dtype")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["linear", "task_arithmetic", "ties"],
        help=f"'all' or of {list(METHODS)}",
    )
    parser.add_argument("--workdir", type=Path, default=REPO / ".cache" / "bench" / "merge_vs_mergekit")
    parser.add_argument("--keep", action="store_true", help="keep the generated models")
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per tool, alternating; the fastest is kept"
    )
    parser.add_argument(
        "--reuse", action="store_true", help="reuse models kept by an earlier --keep run of the same shape"
    )
    parser.add_argument("--results", type=Path, help="write the results as markdown here")
    args = parser.parse_args()

    dtype = DTYPES[args.dtype]
    layers, shapes = llama_shapes(args.params)
    numel = sum(math.prod(s) for s in shapes.values())
    largest = max(math.prod(s) for s in shapes.values())
    bound = (2 + args.experts) * largest * 4 + largest * dtype.itemsize
    device = (
        f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"device: {device}", flush=True)
    print(
        f"model: Llama-shaped, {layers} layers, {numel / 1e6:.0f}M params, {args.dtype} "
        f"({gib(numel * torch.empty((), dtype=dtype).element_size())} per model), "
        f"{args.experts} experts, shard {gib(args.shard_size)}",
        flush=True,
    )
    models = args.workdir / "models"
    config = hf_config(layers, args.dtype)
    experts = [models / f"expert{i}" for i in range(args.experts)]
    if args.reuse and models_match(models, config, args.experts, args.shard_size):
        print(f"reusing the models in {models}", flush=True)
    else:
        if args.workdir.exists():
            shutil.rmtree(args.workdir)
        start = time.perf_counter()
        write_model(models / "base", shapes, config, dtype, args.shard_size, 0, None)
        for i, folder in enumerate(experts):
            write_model(folder, shapes, config, dtype, args.shard_size, i + 1, models / "base")
            print(f"  wrote expert {i + 1}/{args.experts} ({time.perf_counter() - start:.0f} s)", flush=True)
        (models / "made.json").write_text(json.dumps({"experts": args.experts, "shard": args.shard_size}))
    for method in args.methods if args.methods != ["all"] else []:
        if method not in METHODS:
            raise SystemExit(f"unknown method {method!r} (known: {list(METHODS)})")

    baseline = run_child(BASELINE_CHILD).peak_rss
    print(f"baseline process (python + import supermerge.merge): peak RSS {gib(baseline)}", flush=True)
    check = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"]
    check += [f"model.layers.{layers - 1}.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight"]
    rows = []
    methods = list(METHODS) if args.methods == ["all"] else args.methods
    for method in methods:
        out = args.workdir / method
        out.mkdir(parents=True)
        config = json.dumps(merge_config(method, models / "base", experts, args.dtype))
        ours = theirs = None
        for attempt in range(args.repeats):  # alternating, each tool's fastest run kept
            for tool, code in (("supermerge", OURS_CHILD), ("mergekit", MERGEKIT_CHILD)):
                print(f"{method}: {tool} ({attempt + 1}/{args.repeats}) ...", flush=True)
                if attempt:
                    shutil.rmtree(out / tool)
                run = run_child(code, config, str(out / tool), str(args.shard_size))
                print(f"  {run}", flush=True)
                best = ours if tool == "supermerge" else theirs
                if best is None or run.wall_s < best.wall_s:
                    best = run
                ours, theirs = (best, theirs) if tool == "supermerge" else (ours, best)
        diff = None if method in RANDOM else max_relative_diff(out / "supermerge", out / "mergekit", check)
        rows.append((method, ours, theirs, diff))
        shutil.rmtree(out)

    lines = [
        f"Date: {datetime.date.today().isoformat()}. Device: {device}. Python {platform.python_version()}.",
        "",
        f"Model: synthetic Llama-shaped, {layers} layers (hidden {HIDDEN}, intermediate {INTERMEDIATE}, "
        f"vocab {VOCAB}, untied lm_head), {numel / 1e6:.0f}M params, stored {args.dtype}, sharded "
        f"{gib(args.shard_size)}; {args.experts} experts = base + N(0, {DELTA_STD}^2); math in fp32, "
        f"output {args.dtype}, output shard {gib(args.shard_size)}; parameters as in METHODS.",
        f"Each run is a fresh process; process s includes imports, merge s is run_merge only; "
        f"fastest of {args.repeats} alternating run(s) per tool (its peak RSS with it).",
        "",
        "| method | tool | process s | merge s | peak RSS | time ratio ours/mk | RSS ratio ours/mk "
        "| max rel diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, ours, theirs, diff in rows:
        for tool, run in (("supermerge", ours), ("mergekit 0.1.5", theirs)):
            ratios = (
                f"{ours.wall_s / theirs.wall_s:.2f} | {ours.peak_rss / theirs.peak_rss:.2f} | "
                + ("random masks" if diff is None else f"{diff:.2e}")
                if run is ours
                else " | | "
            )
            times = f"{run.wall_s:.1f} | {run.merge_s:.1f}"
            lines.append(f"| {method} | {tool} | {times} | {gib(run.peak_rss)} | {ratios} |")
    lines += [
        "",
        f"Baseline process (python + `import supermerge.merge`): peak RSS {gib(baseline)}.",
        f"Bound (one tensor group and one output tensor in flight): (2 + {args.experts}) x "
        f"{largest / 1e6:.1f}M x 4 B + {largest / 1e6:.1f}M x {dtype.itemsize} B = {gib(bound)}.",
    ]
    for method, ours, _, _ in rows:
        over = ours.peak_rss - baseline
        verdict = "within" if over <= bound else "ABOVE"
        lines.append(
            f"- {method}: supermerge peak RSS - baseline = {gib(over)} ({verdict} the bound {gib(bound)})"
        )
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    if args.results:
        args.results.write_text(f"# supermerge vs mergekit: merge time and peak RSS\n\n{text}\n")
    if not args.keep:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
