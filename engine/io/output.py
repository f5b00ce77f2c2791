"""What every merge writes besides its own files: the tensors in the base's order, the experts'
heads, the base's config and tokenizer, the record of the run; and the summary line it prints."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import torch
from safetensors.torch import save as safetensors_bytes
from tqdm import tqdm

from supermerge.io.memory import human_bytes
from supermerge.io.writer import ShardedWriter
from supermerge.taskvectors.source import TaskVectorSource


@dataclass
class MergeSummary:
    """What a merge did, in bytes and seconds."""

    output: str
    method: str
    experts: int
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    peak_tensor_bytes: int
    peak_cuda_bytes: int | None
    validation_accuracy: dict[str, float] | None = None
    ranks: int = 1
    comm_bytes_per_step: dict[str, int] | None = None

    def line(self) -> str:
        cuda = f", peak CUDA {human_bytes(self.peak_cuda_bytes)}" if self.peak_cuda_bytes else ""
        if self.comm_bytes_per_step:
            cuda += f", {human_bytes(sum(self.comm_bytes_per_step.values()))} sent per step and rank"
        if self.validation_accuracy:
            mean = sum(self.validation_accuracy.values()) / len(self.validation_accuracy)
            cuda += f", mean validation accuracy {mean:.3f}"
        return (
            f"merged {self.tensors} tensors of {self.experts} experts with {self.method} in "
            f"{self.seconds:.1f} s: read {human_bytes(self.bytes_read)}, wrote "
            f"{human_bytes(self.bytes_written)}, peak RSS {human_bytes(self.peak_rss_bytes)}, "
            f"peak tensors held {human_bytes(self.peak_tensor_bytes)}{cuda} -> {self.output}"
        )


def output_bytes(source: TaskVectorSource, dtype: torch.dtype | None) -> int:
    """Bytes of the tensors `write_tensors` writes: every base tensor, the merged ones in `dtype`
    (None: the base's)."""
    mergeable = set(source.names)
    return sum(
        info.numel * (dtype if dtype is not None and name in mergeable else info.dtype).itemsize
        for name, info in source.base.infos.items()
    )


def write_tensors(
    writer: ShardedWriter,
    source: TaskVectorSource,
    merged_tensor: Callable[[str], torch.Tensor],
    dtype: torch.dtype | None,
    progress: bool = True,
) -> None:
    """Write every base tensor: merged ones from `merged_tensor(name)`, the rest as in the base.

    Heads and integer buffers keep the base's values; merged tensors are cast to `dtype`
    (None: the base's dtype of that tensor).
    """
    mergeable = set(source.names)
    for name in tqdm(source.base.names, desc="tensors", unit="tensor", disable=not progress):
        if name in mergeable:
            writer.add(name, merged_tensor(name).to(dtype or source.base.infos[name].dtype))
        else:
            writer.add(name, source.base.read(name))


def write_extras(writer: ShardedWriter, source: TaskVectorSource, record: dict) -> None:
    """Heads of every expert (heads/<task>.safetensors), the base's config and tokenizer
    files, and `record` as supermerge_merge.json."""
    for expert in source.experts:
        heads = source.heads(expert)
        if heads:
            data = safetensors_bytes({n: t.contiguous() for n, t in heads.items()})
            writer.write_file(f"heads/{expert.name}.safetensors", data)
    for path in source.base.carried:
        writer.copy_file(path)
    writer.write_file("supermerge_merge.json", json.dumps(record, indent=2).encode())
