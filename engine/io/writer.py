"""Write a merged model as sharded safetensors with an index, atomically.

Tensors are added one at a time and flushed to a shard file whenever the shard reaches
`max_shard_bytes`, so at most one shard of output is held in memory. When the caller knows the
output's tensors in advance (`layout`: names, shapes, dtypes, in the order they will come), the
shards are planned up front, each file's header is written first, and every tensor is written
to its place as it comes, by a background thread while the next tensor is computed: then at most
one tensor of output is held in memory, and writing overlaps the merge. Everything is written to
a temporary folder beside the output and renamed into place by `commit()`; on failure the
temporary folder is removed and nothing appears at the output path. The writer holds the output's
lock (io/lock.py) from construction to commit, refuses non-finite tensors, and reports a full
disk as one line.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import torch
from safetensors.torch import save_file

from supermerge.errors import SupermergeError
from supermerge.io.atomic import TempFolder, disk_full_error, raise_if_disk_full
from supermerge.io.checkpoint import SAFETENSORS_DTYPES, Tensors
from supermerge.io.finite import non_finite
from supermerge.io.memory import nbytes

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
# one output tensor as the writer expects it: (name, shape, dtype)
Planned = tuple[str, tuple[int, ...], torch.dtype]


def prepare_output(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing output path unless `overwrite`; check its parent exists."""
    if out_dir.exists() and not overwrite:
        raise SupermergeError(f"{out_dir}: output folder exists (pass --overwrite to replace it)")
    if not out_dir.parent.is_dir():
        raise SupermergeError(f"{out_dir.parent}: parent folder of the output does not exist")


class ShardedWriter:
    """Streams tensors into `model-0000i-of-0000N.safetensors` shards under a temporary folder.

    Use as a context manager: leaving the block without `commit()` (an exception) removes
    the temporary folder; a full disk met anywhere in the block (shards, extra files, anything
    written into `tmp_dir`) is raised as one `SupermergeError` line.

    Args:
        out_dir: final output folder; created by `commit()`.
        max_shard_bytes: flush a shard once it holds at least this many bytes.
        overwrite: replace an existing `out_dir` at commit time.
        expected_bytes: size of the output if the caller knows it (bytes of the tensors to be
            written); refused at once when the output's file system has less free space.
        layout: every tensor to be added, in order, if the caller knows them: streamed shards
            (see the module docstring); `add` then refuses a tensor out of order or of another
            shape or dtype, and `commit` one that never came.

    Raises:
        SupermergeError: at construction: the output exists (without `overwrite`), another run
            holds its lock or left a live temporary folder, not enough free space.
    """

    def __init__(
        self,
        out_dir: Path,
        max_shard_bytes: int,
        overwrite: bool = False,
        expected_bytes: int | None = None,
        layout: Sequence[Planned] | None = None,
    ) -> None:
        prepare_output(out_dir, overwrite)
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self.overwrite = overwrite
        self.expected_bytes = expected_bytes
        self._folder = TempFolder(out_dir)  # after it removed dead runs' leftovers: count their space as free
        if expected_bytes is not None and expected_bytes > shutil.disk_usage(out_dir.parent).free:
            self._folder.discard()
            raise disk_full_error(out_dir, expected_bytes)
        self.tmp_dir = self._folder.path
        self._pending: Tensors = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.tensor_bytes = 0
        self.extra_bytes = 0
        self._committed = False
        self._stream = (
            _Stream(self.tmp_dir, _plan_shards(layout, max_shard_bytes)) if layout is not None else None
        )

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._committed:
            return
        if self._stream is not None:
            error = self._stream.close()  # always: the thread stops, the open shard closes
            exc = exc or error
        if exc is not None:
            known = self.expected_bytes is not None
            needed = self.expected_bytes if known else self.bytes_written
            raise_if_disk_full(exc, self.out_dir, self._folder.discard, needed, at_least=not known)
        self._folder.discard()

    @property
    def bytes_written(self) -> int:
        """Bytes of tensors and extra files written, counting tensors queued for the open shard."""
        return self.tensor_bytes + self._pending_bytes + self.extra_bytes

    @property
    def pending_bytes(self) -> int:
        """Bytes of output held in memory, waiting for the current shard to fill (streamed: the
        tensor being written)."""
        return self._stream.in_flight if self._stream is not None else self._pending_bytes

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor (copied to contiguous CPU memory) for the current shard.

        Raises:
            SupermergeError: the tensor holds NaN or Inf (naming the output and the tensor).
        """
        tensor = tensor.detach()
        bad = non_finite(tensor)
        if bad is not None:
            where = f"{self.out_dir}: tensor '{name}'"
            hint = _non_finite_hint(tensor.dtype)
            raise SupermergeError(f"{where}: merged values are not finite ({bad}); {hint}")
        tensor = tensor.to("cpu").contiguous()
        if self._stream is not None:
            self._stream.add(name, tensor)
            self.tensor_bytes += nbytes(tensor)
            return
        self._pending[name] = tensor
        self._pending_bytes += nbytes(tensor)
        if self._pending_bytes >= self.max_shard_bytes:
            self._flush()

    def write_file(self, relative: str, data: bytes) -> None:
        """Write an extra file (config, coefficients, ...) into the output folder."""
        target = self.tmp_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        self.extra_bytes += len(data)

    def copy_file(self, source: Path, relative: str | None = None) -> None:
        """Copy a file (e.g. the base's config.json or tokenizer) into the output folder."""
        target = self.tmp_dir / (relative or source.name)
        shutil.copyfile(source, target)
        self.extra_bytes += target.stat().st_size

    def _flush(self) -> None:
        if not self._pending:
            return
        index = len(self._shards)
        save_file(self._pending, str(self.tmp_dir / f"shard-{index:05d}.tmp"), {"format": "pt"})
        self._shards.append(list(self._pending))
        self.tensor_bytes += self._pending_bytes
        self._pending = {}
        self._pending_bytes = 0

    def commit(self) -> Path:
        """Flush, name the shards, write the index and move the folder into place."""
        if self._stream is not None:
            error = self._stream.close()
            if error is not None:
                raise error
            self._shards = self._stream.finished()
        self._flush()
        total = len(self._shards)
        if total == 1:
            os.replace(self.tmp_dir / "shard-00000.tmp", self.tmp_dir / SINGLE_NAME)
        else:
            weight_map: dict[str, str] = {}
            for index, names in enumerate(self._shards):
                final = f"model-{index + 1:05d}-of-{total:05d}.safetensors"
                os.replace(self.tmp_dir / f"shard-{index:05d}.tmp", self.tmp_dir / final)
                weight_map.update(dict.fromkeys(names, final))
            index_doc = {"metadata": {"total_size": self.tensor_bytes}, "weight_map": weight_map}
            self.write_file(INDEX_NAME, json.dumps(index_doc, indent=2).encode())
        self._folder.commit()
        self._committed = True
        return self.out_dir


def _non_finite_hint(dtype: torch.dtype) -> str:
    """What to try when merged values of `dtype` are not finite: a narrow dtype overflows easily."""
    if dtype.itemsize >= 4:
        return "check the method's coefficients"
    name = str(dtype).removeprefix("torch.")
    return f"{name} holds at most {torch.finfo(dtype).max:g}: choose dtype float32 or smaller coefficients"


def _plan_shards(layout: Sequence[Planned], max_shard_bytes: int) -> list[list[Planned]]:
    """The tensors of each shard: filled in order until one holds at least `max_shard_bytes`
    (the rule `add` follows without a layout)."""
    shards: list[list[Planned]] = [[]]
    size = 0
    for planned in layout:
        shards[-1].append(planned)
        size += math.prod(planned[1]) * planned[2].itemsize
        if size >= max_shard_bytes:
            shards.append([])
            size = 0
    return [shard for shard in shards if shard]


def safetensors_header(shard: Sequence[Planned]) -> bytes:
    """The 8-byte length and the JSON header of a safetensors file holding `shard`'s tensors
    back to back in order, padded with spaces to a multiple of 8 bytes (as safetensors pads)."""
    doc: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in shard:
        end = offset + math.prod(shape) * dtype.itemsize
        doc[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(doc, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


class _Stream:
    """Planned shards written tensor by tensor by one background thread (see ShardedWriter)."""

    def __init__(self, folder: Path, shards: list[list[Planned]]) -> None:
        self.folder, self.shards = folder, shards
        self.order = [(s, planned) for s, shard in enumerate(shards) for planned in shard]
        self.next = 0
        self.in_flight = 0
        self._file: BinaryIO | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._write: Future[None] | None = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.next >= len(self.order):
            raise ValueError(f"tensor '{name}' is not in the output's layout (all {self.next} came)")
        shard, (want, shape, dtype) = self.order[self.next]
        if (name, tuple(tensor.shape), tensor.dtype) != (want, tuple(shape), dtype):
            raise ValueError(
                f"tensor '{name}' {list(tensor.shape)} {tensor.dtype} came where the layout has "
                f"'{want}' {list(shape)} {dtype}"
            )
        self._wait()  # one tensor in flight: the memory bound
        first = self.next == 0 or self.order[self.next - 1][0] != shard
        last = self.next + 1 == len(self.order) or self.order[self.next + 1][0] != shard
        self.next += 1
        self.in_flight = nbytes(tensor)
        self._write = self._pool.submit(self._write_tensor, shard, tensor, first, last)

    def _write_tensor(self, shard: int, tensor: torch.Tensor, first: bool, last: bool) -> None:
        if first:
            self._file = open(self.folder / f"shard-{shard:05d}.tmp", "wb")  # noqa: SIM115 (closed at `last`)
            self._file.write(safetensors_header(self.shards[shard]))
        assert self._file is not None
        self._file.write(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
        if last:
            self._file.close()
            self._file = None

    def _wait(self) -> None:
        if self._write is not None:
            self._write.result()
            self._write = None
        self.in_flight = 0

    def close(self) -> BaseException | None:
        """Wait for the last write and stop the thread; the write's error, if it failed."""
        try:
            self._wait()
            return None
        except BaseException as e:  # reported by the caller, with the disk-full check
            return e
        finally:
            if self._file is not None:
                self._file.close()
            self._pool.shutdown()

    def finished(self) -> list[list[str]]:
        """The names of each shard, once every planned tensor came."""
        if self.next != len(self.order):
            name = self.order[self.next][1][0]
            raise ValueError(f"the output's tensor '{name}' never came ({self.next} of {len(self.order)})")
        return [[planned[0] for planned in shard] for shard in self.shards]
