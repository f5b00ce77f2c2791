"""Training-free merge of a base and k experts, streamed tensor by tensor to sharded safetensors.

Data flow per tensor j: read base(j) -> read each expert(j), subtract -> the method with tensor
j's parameter values (supermerge.methods.settings: filters and gradients resolve per tensor) ->
merge -> cast to the output dtype -> shard writer. At most one tensor group (base, k task
vectors, merged tensor) plus the current output shard is in memory at any time.

The output's tensors come in groups that share their inputs (mergekit's plan.py):
- without `slices:`, one group: every tensor of the base, merged from the base and the experts;
  a tensor of layer i of n has depth t = i / (n - 1), the others t = 0;
- with `slices:`, one group per slice: the output's next layers, each from the layer at the same
  offset in every source's range, renamed to its place in the output; the first slice also
  makes the tensors before the layers (embeddings), the last the ones after them (final norm,
  head), from its own sources; t is the layer's position in its slice, 0 outside the layers.
  The output's config.json counts the layers the slices make.

Arithmetic: fp32 whatever the storage dtype (the default), or with `compute_dtype` (bfloat16,
float16) as mergekit computes in its `dtype`: every input is rounded to it as it is read; a
method whose `computes_in_dtype` is true (mergekit's task-vector methods compute in their inputs'
dtype) then receives base and task vectors in that dtype, the others fp32 tensors holding the
rounded inputs, their result rounded as it is written (mergekit's slerp and linear compute so).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from supermerge.config import MergeConfig, SourceSpec
from supermerge.errors import InputError
from supermerge.io.adapters import AdapterCheckpoint, open_expert
from supermerge.io.checkpoint import Checkpoint, TensorInfo, TensorSet
from supermerge.io.memory import Scratch, TensorBytes, cuda_peak_bytes, nbytes, peak_rss_bytes
from supermerge.io.output import MergeSummary, output_bytes, output_layout, write_extras, write_tensors
from supermerge.io.paths import check_apart
from supermerge.io.writer import ShardedWriter, prepare_output
from supermerge.methods import REGISTRY
from supermerge.methods.settings import ExpertInput, Setting, TensorMethods, depth, layer_of, with_layer
from supermerge.taskvectors.source import Expert, TaskVectorSource, open_source

log = logging.getLogger(__name__)

# config.json keys holding the number of layers, the first present is updated for slices
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
# dotted name components of the tensors before the layers: every other tensor outside the
# layers (final norm, lm_head, pooler, classifier) comes after them
BEFORE_LAYERS = re.compile(r"(?:^|\.)(?:\w*embed\w*|wte|wpe)(?:\.|$)")
# files that define a vocabulary: merged models must agree on them when a tokenizer is named
VOCABULARY_FILES = (
    "tokenizer.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)


class CheckpointView(TensorSet):
    """A checkpoint's tensors under the names they take in the output; reads as a Checkpoint.

    Args:
        checkpoint: the model.
        names: output name -> the tensor's own name in `checkpoint`, in output order.
    """

    def __init__(self, checkpoint: Checkpoint, names: Mapping[str, str]) -> None:
        self.checkpoint = checkpoint
        self.own = dict(names)
        self.path, self.config, self.carried = checkpoint.path, checkpoint.config, checkpoint.carried
        self.infos: dict[str, TensorInfo] = {out: checkpoint.infos[own] for out, own in self.own.items()}

    def read(self, name: str) -> torch.Tensor:
        return self.checkpoint.read(self.own[name])

    def read_into(self, name: str, out: torch.Tensor, staging: torch.Tensor) -> torch.Tensor:
        return self.checkpoint.read_into(self.own[name], out, staging)

    def read_range(self, name: str, lo: int, hi: int) -> torch.Tensor:
        return self.checkpoint.read_range(self.own[name], lo, hi)


@dataclass
class Group:
    """Output tensors merged from the same inputs.

    Attributes:
        source: base (or carrier) and experts, under the output's tensor names.
        depth: output tensor name -> t in [0, 1].
        scopes: per expert of `source`, its own settings, highest precedence first.
        scope: the slice's settings (empty without slices).
    """

    source: TaskVectorSource
    depth: dict[str, float]
    scopes: list[tuple[Mapping[str, Setting], ...]]
    scope: Mapping[str, Setting]

    def inputs(self, name: str) -> list[ExpertInput]:
        """Each expert's part in the merge of output tensor `name` (its own tensor's name: the
        output's, or its layer's in the expert when a slice renamed it)."""
        return [
            ExpertInput(
                e.name, e.checkpoint.own[name] if isinstance(e.checkpoint, CheckpointView) else name, scopes
            )
            for e, scopes in zip(self.source.experts, self.scopes, strict=True)
        ]


def _depths(names: list[str]) -> dict[str, float]:
    """t of every tensor of a whole model: layer i of its stack of n, i / (n - 1); 0 outside."""
    where = {n: layer_of(n) for n in names}
    counts: dict[str, int] = {}
    for spot in where.values():
        if spot is not None:
            counts[spot[0]] = max(counts.get(spot[0], 0), spot[1] + 1)
    return {n: depth(spot[1], counts[spot[0]]) if spot else 0.0 for n, spot in where.items()}


def _layers(checkpoint: Checkpoint) -> dict[int, list[str]]:
    """Layer index -> the names of its tensors, in a model with one stack of layers."""
    layers: dict[int, list[str]] = {}
    stacks = set()
    for name in checkpoint.names:
        spot = layer_of(name)
        if spot is not None:
            stacks.add(spot[0])
            layers.setdefault(spot[1], []).append(name)
    if len(stacks) > 1:
        raise InputError(
            checkpoint.path,
            f"several stacks of layers ({', '.join(sorted(stacks))}): slices take models with one",
        )
    return layers


def _view(
    checkpoint: Checkpoint, source: SourceSpec, offset: int, first: bool, last: bool, where: str
) -> CheckpointView:
    """The tensors one slice source gives the output: its layers renamed to start at `offset`,
    those before the layers when the slice is the first, after them when it is the last."""
    outside = [n for n in checkpoint.names if layer_of(n) is None]
    names = {n: n for n in outside if first and BEFORE_LAYERS.search(n)}
    layers = _layers(checkpoint)
    for p in range(len(source)):
        index = source.layers[0] + p
        if index not in layers:
            raise InputError(
                checkpoint.path,
                f"no layer {index} ({where}.layer_range is {list(source.layers)}; it has {len(layers)})",
            )
        names |= {with_layer(n, offset + p): n for n in layers[index]}
    names |= {n: n for n in outside if last and not BEFORE_LAYERS.search(n)}
    return CheckpointView(checkpoint, names)


def plan_groups(
    cfg: MergeConfig, input_dtype: torch.dtype | None = None, scratch: Scratch | None = None
) -> list[Group]:
    """The output's tensor groups (see the module docstring), their checkpoints opened, their
    inputs read rounded to `input_dtype` (None: as stored), into `scratch` when given (every group
    reads into the same buffers, one tensor at a time)."""
    experts = {e.name: e for e in cfg.experts}
    if not cfg.slices:
        source = open_source(
            cfg.base, [(e.name, e.path) for e in cfg.experts], cfg.heads, input_dtype, scratch
        )
        scopes = [(e.params,) for e in cfg.experts]
        return [Group(source, _depths(source.base.names), scopes, {})]
    opened: dict[str, Checkpoint | AdapterCheckpoint] = {}

    def checkpoint(model: str) -> Checkpoint:
        if model not in opened:
            base = opened.setdefault("base", Checkpoint(cfg.base))
            opened[model] = base if model == "base" else open_expert(experts[model].path, base)
        return opened[model]

    groups, offset = [], 0
    for s, piece in enumerate(cfg.slices):
        first, last = s == 0, s == len(cfg.slices) - 1
        base = next((x for x in piece.sources if x.model == "base"), piece.sources[0])
        sources = [x for x in piece.sources if x.model != "base"]
        views = {
            id(x): _view(
                checkpoint(x.model), x, offset, first, last, f"slices[{s}].sources[{piece.sources.index(x)}]"
            )
            for x in piece.sources
        }
        source = TaskVectorSource(
            views[id(base)],
            [Expert(x.model, views[id(x)]) for x in sources],
            input_dtype=input_dtype,
            scratch=scratch,
        )
        depths = {}
        for out in views[id(base)].names:
            spot = layer_of(out)
            depths[out] = 0.0 if spot is None else depth(spot[1] - offset, len(piece))
        scopes = [(x.params, experts[x.model].params) for x in sources]
        groups.append(Group(source, depths, scopes, piece.params))
        offset += len(piece)
    return groups


def _vocabulary(path: Path) -> dict[str, object]:
    """What defines a model folder's vocabulary: its vocabulary files (tokenizer.json by its
    model and added tokens, the others byte for byte)."""
    found: dict[str, object] = {}
    for name in VOCABULARY_FILES:
        file = path / name
        if not file.is_file():
            continue
        if name == "tokenizer.json":
            try:
                doc = json.loads(file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise InputError(file, f"not valid JSON ({e})") from None
            added = [(t.get("id"), t.get("content")) for t in doc.get("added_tokens") or []]
            found[name] = (doc.get("model"), added)
        else:
            found[name] = file.read_bytes()
    return found


def check_vocabularies(tokenizer: Path, models: list[Path]) -> None:
    """Refuse models whose vocabulary differs from the tokenizer model's: the output carries that
    tokenizer, and supermerge does not re-align embedding rows between vocabularies (mergekit's
    tokenizer_source does)."""
    wanted = _vocabulary(tokenizer)
    for path in models:
        theirs = _vocabulary(path)
        differ = sorted(n for n in wanted.keys() & theirs.keys() if wanted[n] != theirs[n])
        if differ:
            raise InputError(
                path,
                f"its vocabulary ({differ[0]}) differs from that of the tokenizer's model {tokenizer}: "
                "supermerge does not re-align embeddings between vocabularies; merge models that share one",
            )


def output_model_config(cfg: MergeConfig, base: Checkpoint) -> dict | None:
    """The output's config.json: the base's, with the slices' layer count and the output dtype
    (None: the base's as it is)."""
    if base.config is None:
        return None
    config = dict(base.config)
    if cfg.slices:
        key = next((k for k in LAYER_COUNT_KEYS if k in config), "num_hidden_layers")
        config[key] = sum(len(piece) for piece in cfg.slices)
    if cfg.dtype is not None:
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = str(cfg.dtype).removeprefix("torch.")
    return config if config != base.config else None


def run_merge(cfg: MergeConfig, overwrite: bool = False, progress: bool = True) -> MergeSummary:
    """Merge per `cfg` with a training-free method; nothing appears at cfg.output on failure."""
    start = time.perf_counter()
    check_apart(cfg.output, cfg.inputs())
    prepare_output(cfg.output, overwrite)
    methods = TensorMethods(REGISTRY[cfg.method.name], cfg.method.settings, cfg.seed)
    low = cfg.compute_dtype if cfg.compute_dtype in (torch.bfloat16, torch.float16) else None
    compute = low if low is not None and methods.cls.computes_in_dtype else torch.float32
    scratch = Scratch()
    groups = plan_groups(cfg, low, scratch)
    base = groups[0].source.base if not cfg.slices else Checkpoint(cfg.base)
    donor = base if cfg.tokenizer in (None, "base") else Checkpoint(cfg.expert(cfg.tokenizer).path)
    if cfg.tokenizer is not None:
        check_vocabularies(donor.path, [p for _, p in cfg.inputs() if Path(p).is_dir()])
    device = torch.device(cfg.device)
    held = TensorBytes()

    def merger(group: Group) -> Callable[[str], torch.Tensor]:
        def merged_tensor(name: str) -> torch.Tensor:
            base = group.source.read_base(name).to(device, compute)
            taus = [t.to(device, compute) for t in group.source.task_vectors(name, base)]
            method = methods(name, group.depth[name], group.inputs(name), group.scope)
            merged = method.merge(name, base, taus)
            own = 0 if any(merged.data_ptr() == t.data_ptr() for t in (base, *taus)) else nbytes(merged)
            held.observe(nbytes(base, *taus) + own + writer.pending_bytes)
            if scratch.holds(merged):  # made in an input's memory, which the next tensor reuses
                merged = merged.to(cfg.dtype or group.source.base.infos[name].dtype, copy=True)
            return merged

        return merged_tensor

    experts = len(cfg.experts)
    log.info("merging %d experts into %s with %s", experts, cfg.output, cfg.method.name)
    expected = sum(output_bytes(g.source, cfg.dtype) for g in groups)
    layout = [planned for g in groups for planned in output_layout(g.source, cfg.dtype)]
    with ShardedWriter(cfg.output, cfg.shard_size, overwrite, expected, layout) as writer:
        for group in groups:
            write_tensors(writer, group.source, merger(group), cfg.dtype, progress)
            if not any(e.path == cfg.base for e in cfg.experts):  # else the base only carries the tensors
                group.source.warn_identical_experts()
        summary = MergeSummary(
            output=str(cfg.output),
            method=cfg.method.name,
            experts=experts,
            tensors=sum(len(g.source.base.names) for g in groups),
            bytes_read=sum(g.source.bytes_read for g in groups),
            bytes_written=writer.bytes_written,
            seconds=time.perf_counter() - start,
            peak_rss_bytes=peak_rss_bytes(),
            peak_tensor_bytes=held.peak,
            peak_cuda_bytes=cuda_peak_bytes(cfg.device),
        )
        record = {"config": cfg.record(), "summary": asdict(summary)}
        write_extras(writer, groups[0].source, record, donor, output_model_config(cfg, base))
        writer.commit()
    return summary
