"""Training-free merge of a base and k experts, streamed tensor by tensor to sharded safetensors.

Data flow per tensor j: read base(j) -> read each expert(j), subtract -> method.merge ->
cast to the output dtype -> shard writer. At most one tensor group (base, k task vectors,
merged tensor) plus the current output shard is in memory at any time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import torch

from supermerge.config import MergeConfig
from supermerge.io.memory import TensorBytes, cuda_peak_bytes, nbytes, peak_rss_bytes
from supermerge.io.output import MergeSummary, output_bytes, write_extras, write_tensors
from supermerge.io.paths import check_apart
from supermerge.io.writer import ShardedWriter, prepare_output
from supermerge.methods import REGISTRY
from supermerge.taskvectors.source import open_source

log = logging.getLogger(__name__)


def run_merge(cfg: MergeConfig, overwrite: bool = False, progress: bool = True) -> MergeSummary:
    """Merge per `cfg` with a training-free method; nothing appears at cfg.output on failure."""
    start = time.perf_counter()
    check_apart(cfg.output, cfg.inputs())
    prepare_output(cfg.output, overwrite)
    method = REGISTRY[cfg.method.name](cfg.method.params, cfg.method.experts, cfg.seed)
    source = open_source(cfg.base, [(e.name, e.path) for e in cfg.experts], cfg.heads)
    device = torch.device(cfg.device)
    held = TensorBytes()

    def merged_tensor(name: str) -> torch.Tensor:
        base = source.read_base(name).to(device)
        taus = [t.to(device) for t in source.task_vectors(name, base)]
        merged = method.merge(name, base, taus)
        held.observe(nbytes(base, merged, *taus) + writer.pending_bytes)
        return merged

    log.info("merging %d experts into %s with %s", source.k, cfg.output, cfg.method.name)
    expected = output_bytes(source, cfg.dtype)
    with ShardedWriter(cfg.output, cfg.shard_size, overwrite, expected) as writer:
        write_tensors(writer, source, merged_tensor, cfg.dtype, progress)
        source.warn_identical_experts()
        summary = MergeSummary(
            output=str(cfg.output),
            method=cfg.method.name,
            experts=source.k,
            tensors=len(source.base.names),
            bytes_read=source.bytes_read,
            bytes_written=writer.bytes_written,
            seconds=time.perf_counter() - start,
            peak_rss_bytes=peak_rss_bytes(),
            peak_tensor_bytes=held.peak,
            peak_cuda_bytes=cuda_peak_bytes(cfg.device),
        )
        write_extras(writer, source, {"config": cfg.record(), "summary": asdict(summary)})
        writer.commit()
    return summary
