"""Task-vector shards on NVMe, read back through DeepSpeed's async I/O op (DeepNVMe).

`distributed.offload: nvme` with `distributed.nvme_path`: each rank writes its share (the task
vectors of its task group over its layer shard, as `ShardStore.tau_local` holds them) to one file
in nvme_path, laid out by layer group: group g (whole tensor parts, about `prefetch_elements`
elements, as the ZeRO store streams them) is one block [k_q, n_g], padded to 4 KiB because
DeepSpeed reads and writes with O_DIRECT (the folder's file system must support it).

Per training step `chunks()` reads the shard back group by group into two page-locked CPU
buffers: while group g is merged, group g + 1 is being read by the aio handle's threads
(`async_pread`), so the read overlaps the kernel; on CUDA the group is then copied to the device.
Forward and backward each read the shard once: 2 k_q n bytes per step from the drive. Memory
held: the two buffers (2 k_q n_g elements), not the shard.

The file is private to the store: made with a unique name, deleted when the store is dropped.
A killed job leaves its `supermerge-rank*.tau` files behind; the rebuilt store writes new ones.
Every use of the aio op is in this file; deepspeed is pinned in constraints-cpu.txt.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from supermerge.distributed.comm import prefer_this_environments_tools
from supermerge.distributed.plan import ShardPlan, layer_groups
from supermerge.distributed.stores.resident import Chunk, ShardLayout, dense_parts, read_shard
from supermerge.errors import ConfigError, SupermergeError
from supermerge.io.memory import nbytes
from supermerge.taskvectors.source import TaskVectorSource

ALIGNMENT = 4096  # bytes: O_DIRECT needs file offsets and sizes in whole blocks


@functools.cache
def _aio_op() -> Any:
    """DeepSpeed's async_io op module, checked and loaded once per process (the op is built on
    first use, then cached in TORCH_EXTENSIONS_DIR)."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    prefer_this_environments_tools()
    builder = AsyncIOBuilder()
    if not builder.is_compatible(verbose=False):
        raise ConfigError(
            "distributed.offload",
            "nvme needs DeepSpeed's async_io op, which needs libaio and its headers "
            "(Debian: apt-get install libaio-dev)",
        )
    return builder.load(verbose=False)


def aio_handle() -> Any:
    """A new DeepSpeed aio handle. Raises ConfigError when the op cannot be built here (no libaio)."""
    return _aio_op().aio_handle(
        block_size=1 << 20, queue_depth=32, single_submit=False, overlap_events=True, intra_op_parallelism=2
    )


@dataclass
class _Block:
    """Where layer group `segments` of the shard sits in the file."""

    segments: slice
    lo: int  # element range [lo, hi) within the layer shard
    hi: int
    offset: int  # bytes from the start of the file
    numel: int  # elements read or written: k_q (hi - lo), padded to ALIGNMENT


@dataclass
class NvmeShardStore(ShardLayout):
    """A rank's task vectors in a file on NVMe, streamed back in layer groups (see module docstring).

    Attributes (beyond ShardLayout's):
        path: the file (deleted when the store is dropped).
        blocks: the layer groups, in order.
        buffers: two page-locked CPU buffers, each as large as the largest block.
        handle: the DeepSpeed aio handle.
        device: where the kernel runs.
        storage_dtype: dtype of the task vectors.
    """

    path: Path
    blocks: list[_Block]
    buffers: list[torch.Tensor]
    handle: Any
    device: torch.device
    storage_dtype: torch.dtype

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
        nvme_path: Path,
        progress: bool = False,
    ) -> NvmeShardStore:
        """Write this rank's share of the task vectors to a new file in `nvme_path`."""
        handle = aio_handle()
        rows = plan.task_rows(plan.coords(rank)[1])
        layout = cls.fields(source, plan, rank, rows, torch.zeros(0))
        bounds = layout["offsets"].tolist()
        itemsize = storage_dtype.itemsize
        blocks, offset = [], 0
        for segments in layer_groups(layout["offsets"], chunk_elements):
            lo, hi = bounds[segments.start], bounds[segments.stop]
            nbytes = math.ceil(len(rows) * (hi - lo) * itemsize / ALIGNMENT) * ALIGNMENT
            blocks.append(_Block(segments, lo, hi, offset, nbytes // itemsize))
            offset += nbytes
        largest = max((b.numel for b in blocks), default=ALIGNMENT // itemsize)
        buffers = [
            handle.new_cpu_locked_tensor(largest, torch.empty(0, dtype=storage_dtype)) for _ in range(2)
        ]
        fd, name = tempfile.mkstemp(prefix=f"supermerge-rank{rank}-", suffix=".tau", dir=nvme_path)
        os.close(fd)
        path = Path(name)
        pending = iter(blocks)
        block = next(pending, None)

        def put(a: int, b: int, tau: torch.Tensor) -> None:
            """Fill the current block's buffer part by part; write the block once it is whole."""
            nonlocal block
            width = block.hi - block.lo
            buffers[0][: len(rows) * width].view(len(rows), width)[:, a - block.lo : b - block.lo] = tau
            if b == block.hi:
                buffers[0][len(rows) * width : block.numel].zero_()
                _io(handle, "sync_pwrite", buffers[0][: block.numel], path, block.offset)
                block = next(pending, None)

        try:
            take = dense_parts(source, rows, put)
            layout["base_piece"] = read_shard(source, plan, rank, take, device, progress)
        except BaseException:
            _release(handle, buffers, path)
            raise
        store = cls(**layout, path=path, blocks=blocks, buffers=buffers, handle=handle, device=device,
                    storage_dtype=storage_dtype)  # fmt: skip
        weakref.finalize(store, _release, handle, buffers, path)
        return store

    @property
    def nbytes(self) -> int:
        """Bytes held between steps: the base piece and the two read buffers (locked CPU memory)."""
        return nbytes(self.base_piece, *self.buffers)

    @property
    def task_vector_bytes(self) -> int:
        """Task-vector bytes held on the compute device between steps: none (they are on NVMe)."""
        return 0

    @property
    def offloaded_bytes(self) -> int:
        return self.path.stat().st_size

    def _start_read(self, g: int) -> None:
        """Start reading block g into buffer g % 2 (completed by the next `handle.wait()`)."""
        block = self.blocks[g]
        _io(self.handle, "async_pread", self.buffers[g % 2][: block.numel], self.path, block.offset)

    def chunks(self) -> Iterator[Chunk]:
        """The shard's layer groups on the device, the next one read while the current is used."""
        if not self.blocks:
            return
        self._start_read(0)
        pending = True
        try:
            for g, block in enumerate(self.blocks):
                done, pending = self.handle.wait(), False
                if done != 1:
                    raise SupermergeError(f"distributed.nvme_path: reading {self.path} failed")
                if g + 1 < len(self.blocks):
                    self._start_read(g + 1)
                    pending = True
                width = block.hi - block.lo
                tau = self.buffers[g % 2][: len(self.rows) * width].view(len(self.rows), width)
                offsets = self.offsets[block.segments.start : block.segments.stop + 1] - block.lo
                yield Chunk(block.lo, block.hi, tau.to(self.device), offsets, block.segments)
        finally:  # a stream left early: finish the read in flight before the buffers are reused
            if pending:
                self.handle.wait()


def _io(handle: Any, op: str, buffer: torch.Tensor, path: Path, offset: int) -> None:
    """handle.<op>(buffer, path, offset), with a clear error if it fails."""
    result = getattr(handle, op)(buffer, str(path), offset)
    if result < 0 or (op.startswith("sync") and result == 0):
        raise SupermergeError(
            f"distributed.nvme_path: {op} of {nbytes(buffer)} bytes at {offset} "
            f"in {path} failed ({result}); the folder must be on a file system that supports O_DIRECT"
        )


def _release(handle: Any, buffers: list[torch.Tensor], path: Path) -> None:
    for buffer in buffers:
        handle.free_cpu_locked_tensor(buffer)
    path.unlink(missing_ok=True)
