"""Task-vector shards kept by DeepSpeed ZeRO-3 with `offload_param`, streamed to the compute device.

Each task vector is one flat frozen parameter [N] built under `deepspeed.zero.Init` (stage 3,
`param_persistence_threshold: 0`, offload_param cpu): ZeRO partitions it into R contiguous pieces
of ceil(N / R) elements, which are exactly the plan's pieces when Q = 1, so rank r's partition
`ds_tensor` holds its layer shard of every task vector, in pinned CPU memory. Only the store lives
there: W is trained by plain Adam in the trainer, never in a DeepSpeed engine (a stage-3 engine
would all-gather the store on access).

Per training step `chunks()` streams the shard in layer groups of about `chunk_elements`:
the next group's k slices are copied to the device (on a side CUDA stream, so the copy overlaps
the current group's kernel) while the current one is merged; the forward and the backward each
stream the shard once, so the PCIe floor is 2 k n bytes per step and device memory holds two
groups, not the shard.

Every use of DeepSpeed internals (ds_tensor, partition_numel) is in this file; deepspeed is
pinned in constraints-cpu.txt.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from supermerge.distributed.comm import prefer_this_environments_tools, quiet_renamed_collectives
from supermerge.distributed.plan import ShardPlan, layer_groups
from supermerge.distributed.stores.resident import Chunk, ShardLayout, dense_parts, read_shard
from supermerge.errors import SupermergeError
from supermerge.io.memory import nbytes
from supermerge.taskvectors.source import TaskVectorSource


def zero_config() -> dict:
    """The DeepSpeed config of the store: ZeRO-3 partitioning with every parameter offloaded to CPU."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {
            "stage": 3,
            "param_persistence_threshold": 0,
            # else zero.Init replaces torch.nn.functional.linear for the rest of the process (this
            # key overrides Init's own mem_efficient_linear argument) with a version that saves
            # every weight for backward
            "memory_efficient_linear": False,
            "offload_param": {"device": "cpu", "pin_memory": True},
        },
    }


class _Holder(torch.nn.Module):
    def __init__(self, n: int, k: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.tau = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.empty(n, dtype=dtype), requires_grad=False) for _ in range(k)]
        )


@dataclass
class ZeroShardStore(ShardLayout):
    """A rank's task vectors as ZeRO-3 partitions (see module docstring): ShardLayout's fields
    (rows: every task, Q = 1), with ShardStore's `tau_local` replaced by `chunks()`.

    Attributes (beyond ShardLayout's):
        params: the k ZeRO parameters; `params[i].ds_tensor` is [S] in CPU memory.
        device: where the kernel runs.
        chunk_elements: elements per streamed layer group (at least one whole segment).
    """

    params: list[torch.nn.Parameter]
    device: torch.device
    chunk_elements: int
    holder: torch.nn.Module  # owns the ZeRO parameters

    resident = False

    @classmethod
    def build(
        cls,
        source: TaskVectorSource,
        plan: ShardPlan,
        rank: int,
        storage_dtype: torch.dtype,
        device: torch.device,
        chunk_elements: int,
        progress: bool = False,
    ) -> ZeroShardStore:
        """Partition k flat task vectors with ZeRO-3 offload and fill this rank's partitions."""
        import deepspeed

        prefer_this_environments_tools()  # DeepSpeed builds its CPU comm op on first use
        quiet_renamed_collectives()
        if plan.task_groups != 1:
            raise SupermergeError("distributed.offload: needs task_groups 1 (ZeRO partitions over all ranks)")
        if not torch.distributed.is_initialized():  # one process, no launcher: a group of one
            for var, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                               ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):  # fmt: skip
                os.environ.setdefault(var, value)
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        linear = torch.nn.functional.linear
        with deepspeed.zero.Init(
            config_dict_or_path=zero_config(), remote_device="cpu", pin_memory=True,
            mem_efficient_linear=False,
        ):  # fmt: skip
            holder = _Holder(plan.n, source.k, storage_dtype)
        if torch.nn.functional.linear is not linear:
            raise SupermergeError("DeepSpeed's zero.Init replaced torch.nn.functional.linear; it must not")
        params = list(holder.tau)
        if any(p.partition_numel() != plan.piece for p in params):
            raise SupermergeError(
                f"DeepSpeed partitioned {plan.n} elements into {params[0].partition_numel()} per rank, "
                f"the plan expects {plan.piece}"
            )
        for p in params:
            p.ds_tensor.zero_()  # the tail of the last partition is uninitialised memory

        def put(a: int, b: int, tau: torch.Tensor) -> None:
            for i, p in enumerate(params):
                p.ds_tensor[a:b] = tau[i]

        rows = list(range(source.k))
        base_piece = read_shard(source, plan, rank, dense_parts(source, rows, put), device, progress)
        layout = cls.fields(source, plan, rank, rows, base_piece)
        return cls(**layout, params=params, device=device, chunk_elements=chunk_elements, holder=holder)

    @property
    def nbytes(self) -> int:
        """Bytes resident on the compute device: the base piece (the task vectors are offloaded)."""
        return nbytes(self.base_piece)

    @property
    def task_vector_bytes(self) -> int:
        """Task-vector bytes held on the compute device between steps: none (they are offloaded)."""
        return 0

    @property
    def offloaded_bytes(self) -> int:
        return nbytes(*(p.ds_tensor for p in self.params))

    def _stage(self, segs: slice, stream: torch.cuda.Stream | None) -> Chunk:
        lo, hi = int(self.offsets[segs.start]), int(self.offsets[segs.stop])
        tau = torch.empty(len(self.params), hi - lo, dtype=self.params[0].ds_tensor.dtype, device=self.device)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for i, p in enumerate(self.params):
                tau[i].copy_(p.ds_tensor[lo:hi], non_blocking=stream is not None)
        return Chunk(lo, hi, tau, self.offsets[segs.start : segs.stop + 1] - lo, segs)

    def chunks(self) -> Iterator[Chunk]:
        """The shard's layer groups on the device, the next one copied while the current is used."""
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        groups = layer_groups(self.offsets, self.chunk_elements)
        ahead = self._stage(groups[0], stream) if groups else None
        for g in range(len(groups)):
            if stream is not None:
                torch.cuda.current_stream(self.device).wait_stream(stream)
            current = ahead
            ahead = self._stage(groups[g + 1], stream) if g + 1 < len(groups) else None
            yield current


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
