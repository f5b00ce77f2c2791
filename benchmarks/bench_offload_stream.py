"""Offloaded task-vector stores: time per SuperMerge step against the floor of streaming them.

An offloaded store (`distributed.offload: cpu`, DeepSpeed ZeRO-3 partitions in pinned CPU memory;
or `nvme`, a file read by DeepSpeed's async I/O op) streams the k task vectors to the compute
device twice per step (forward and backward), in layer groups of `--prefetch` elements, the next
group staged while the current one is merged. The floor of a step is therefore
2 k N b / bandwidth, with the bandwidth of that path measured in the same process (and, to
separate streaming from merging, the time of the store's two streams with no merge):
- cpu offload, CUDA device: pinned host -> device copies of one layer group (the PCIe floor);
- cpu offload, CPU device: host memory copies of one layer group;
- nvme: DeepSpeed's aio reads (O_DIRECT) of the store's size.
The task vectors are synthetic (seeded random values made tensor part by tensor part, no
checkpoint files), one process, no launcher; the step is ShardedBody's forward + backward
(`supermerge.distributed.body`), which is what training runs around the task model.
Prints time per step, the floor, their ratio, and on CUDA the peak device memory against the
bytes of task vectors that never had to fit there.

    python benchmarks/bench_offload_stream.py                                   # CPU, small
    python benchmarks/bench_offload_stream.py --device cuda --elements 268435456 --k 8 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_distributed import nvme_read_bandwidth  # noqa: E402
from supermerge.distributed.body import ShardedBody  # noqa: E402
from supermerge.distributed.comm import Comm  # noqa: E402
from supermerge.distributed.plan import ShardPlan  # noqa: E402
from supermerge.distributed.stores.nvme import NvmeShardStore  # noqa: E402
from supermerge.distributed.stores.zero import ZeroShardStore  # noqa: E402
from supermerge.learned.coefficients import CoefficientLayout  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class SyntheticSource:
    """k task vectors over `tensors` tensors of `numel` elements each, the TaskVectorSource calls
    the stores make (names, headers, base and task-vector parts), values seeded per part."""

    def __init__(self, k: int, tensors: int, numel: int, storage_dtype: torch.dtype) -> None:
        self.k, self.storage_dtype, self.merged_dtype = k, storage_dtype, torch.float32
        self.names = [f"layers.{t}.weight" for t in range(tensors)]
        info = SimpleNamespace(shape=(numel,), numel=numel)
        self.base = SimpleNamespace(infos=dict.fromkeys(self.names, info))

    def read_base(self, name: str, span: tuple[int, int]) -> torch.Tensor:
        return torch.full((span[1] - span[0],), 0.5)

    def task_vector(self, name: str, base: torch.Tensor, index: int, span: tuple[int, int]) -> torch.Tensor:
        gen = torch.Generator().manual_seed(index * 7919 + self.names.index(name) * 104729 + span[0])
        return (0.01 * torch.randn(span[1] - span[0], generator=gen)).to(self.storage_dtype)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Bytes per second of copying `nbytes` from (pinned, on CUDA) host memory to `device`."""
    src = torch.empty(nbytes, dtype=torch.uint8).random_(0, 255)
    if device.type == "cuda":
        src = src.pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src, non_blocking=True)
    sync(device)
    return repeats * nbytes / (time.perf_counter() - start)


def train_step(body: ShardedBody, grad: torch.Tensor) -> None:
    """What a training step does to the store: merge (forward), then dW from a gradient (backward)."""
    body.forward()
    body.backward(grad)


def stream_twice(store: ZeroShardStore | NvmeShardStore) -> None:
    """The store's streaming alone: its layer groups staged twice, as a step does, merged never."""
    for _ in range(2):
        for _chunk in store.chunks():
            pass


def timed(work: Callable[[], None], device: torch.device) -> float:
    """Seconds `work()` takes, the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    work()
    sync(device)
    return time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--offload", default="cpu,nvme", help="comma-separated: cpu (ZeRO-3), nvme")
    parser.add_argument("--elements", type=int, default=2**25, help="N, merged elements")
    parser.add_argument("--tensors", type=int, default=16, help="tensors N is split into")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--prefetch", type=int, default=2**22, help="elements per streamed layer group")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--nvme-path", type=Path, default=None, help="folder on the drive (default: /tmp)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {device} ({name}, {os.cpu_count()} CPU cores, torch {torch.__version__})")
    numel = args.elements // args.tensors
    source = SyntheticSource(args.k, args.tensors, numel, dtype)
    tasks = [f"t{i}" for i in range(args.k)]
    streamed = 2 * args.k * numel * args.tensors * dtype.itemsize  # bytes per step
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-offload-", dir=args.nvme_path) as tmp:
        for offload in args.offload.split(","):
            numels = [numel] * args.tensors
            plan = ShardPlan(
                names=source.names,
                numels=numels,
                tasks=tasks,
                ranks=1,
                task_groups=1,
                storage_itemsize=dtype.itemsize,
                base_itemsize=4,
                columns=args.tensors,
                offload=offload,
                prefetch_elements=args.prefetch,
            )
            if offload == "cpu":
                store = ZeroShardStore.build(source, plan, 0, dtype, device, args.prefetch)
                group_bytes = args.k * max(args.prefetch, numel) * dtype.itemsize
                bandwidth = copy_bandwidth(device, group_bytes)
                path = "pinned host -> device copy" if device.type == "cuda" else "host memory copy"
            else:
                store = NvmeShardStore.build(source, plan, 0, dtype, device, args.prefetch, Path(tmp))
                bandwidth = nvme_read_bandwidth(Path(tmp), streamed // 2)
                path = "aio read (O_DIRECT)"
            comm = Comm(None, [0], 0)
            body = ShardedBody(store, CoefficientLayout.build(source.names), comm, comm)
            grad = torch.randn(plan.n, device=device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = [timed(partial(train_step, body, grad), device) for _ in range(args.steps + 1)]
            step = min(times[1:])  # the first step warms up
            floor = streamed / bandwidth
            stream_only = min(timed(partial(stream_twice, store), device) for _ in range(args.steps))
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            rows.append({
                "offload": offload, "seconds_per_step": step, "floor_seconds": floor, "bandwidth": bandwidth,
                "stream_only_seconds": stream_only,
                "path": path, "streamed_bytes_per_step": streamed, "task_vector_bytes": streamed // 2,
                "peak_device_bytes": peak,
            })  # fmt: skip
            memory = "" if peak is None else f"; peak device memory {peak / 2**30:.2f} GiB"
            print(
                f"offload {offload}: {step:.3f} s/step, floor {floor:.3f} s ({streamed / 2**30:.2f} GiB "
                f"streamed at {bandwidth / 2**30:.2f} GiB/s, {path}): {step / floor:.2f}x the floor; the "
                f"store's two streams alone (no merge) {stream_only:.3f} s; "
                f"task vectors {streamed / 2 / 2**30:.2f} GiB{memory}"
            )
            del body, store
    out = ROOT / "benchmarks" / "results" / f"offload_stream_{device.type}.json"
    record = {"device": f"{device} ({name})", "args": {**vars(args), "nvme_path": str(args.nvme_path)}}
    out.write_text(json.dumps(record | {"rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
