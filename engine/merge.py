"""Training-free merge of a base and k experts, streamed tensor by tensor to sharded safetensors.

Data flow per tensor j: read base(j) -> read each expert(j), subtract -> method.merge ->
cast to the output dtype -> shard writer. At most one tensor group (base, k task vectors,
merged tensor) plus the current output shard is in memory at any time.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import save as safetensors_bytes
from tqdm import tqdm

from supermerge.checkpoint import Checkpoint
from supermerge.config import MergeConfig
from supermerge.memory import TensorBytes, cuda_peak_bytes, human_bytes, nbytes, peak_rss_bytes
from supermerge.methods import build_method
from supermerge.taskvectors import Expert, TaskVectorSource
from supermerge.writer import ShardedWriter, prepare_output

log = logging.getLogger(__name__)


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


def open_sources(cfg: MergeConfig) -> TaskVectorSource:
    """Open base and experts lazily and check they are compatible (no tensor data is read)."""
    base = Checkpoint(cfg.base)
    experts = [Expert(e.name, Checkpoint(e.path)) for e in cfg.experts]
    return TaskVectorSource(base, experts, cfg.heads)


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


def run_merge(cfg: MergeConfig, overwrite: bool = False, progress: bool = True) -> MergeSummary:
    """Merge per `cfg` with a training-free method; nothing appears at cfg.output on failure."""
    start = time.perf_counter()
    prepare_output(cfg.output, overwrite)
    method = build_method(cfg.method, cfg.method_params, cfg.expert_entries(), cfg.seed)
    source = open_sources(cfg)
    device = torch.device(cfg.device)
    held = TensorBytes()

    def merged_tensor(name: str) -> torch.Tensor:
        base = source.read_base(name).to(device)
        taus = [t.to(device) for t in source.task_vectors(name, base)]
        merged = method.merge(name, base, taus)
        held.observe(nbytes(base, merged, *taus) + writer.pending_bytes)
        return merged

    log.info("merging %d experts into %s with %s", source.k, cfg.output, cfg.method)
    with ShardedWriter(cfg.output, cfg.shard_size, overwrite) as writer:
        write_tensors(writer, source, merged_tensor, cfg.dtype, progress)
        summary = MergeSummary(
            output=str(cfg.output),
            method=cfg.method,
            experts=source.k,
            tensors=len(source.base.names),
            bytes_read=source.bytes_read,
            bytes_written=writer.bytes_written,
            seconds=time.perf_counter() - start,
            peak_rss_bytes=peak_rss_bytes(),
            peak_tensor_bytes=held.peak,
            peak_cuda_bytes=cuda_peak_bytes(cfg.device),
        )
        write_extras(writer, source, {"config": config_record(cfg), "summary": asdict(summary)})
        writer.commit()
    return summary


def config_record(cfg: MergeConfig) -> dict:
    """The config as JSON-friendly data, kept beside the merged model for provenance."""
    return {
        "base": str(cfg.base),
        "experts": [{"name": e.name, "path": str(e.path), **e.overrides} for e in cfg.experts],
        "method": {"name": cfg.method, **cfg.method_params},
        "heads": cfg.heads,
        "dtype": str(cfg.dtype).removeprefix("torch.") if cfg.dtype else None,
        "seed": cfg.seed,
    }
