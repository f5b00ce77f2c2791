"""The merge configuration: one YAML file, validated once into a frozen `MergeConfig`.

    base: path/to/base            # HF model folder, .safetensors file or torch state_dict file
    experts:                      # one entry per task expert, in task order
      - name: noun                # task name (default: the path's stem), unique
        path: path/to/expert      # same formats as base
        weight: 1.0               # optional per-expert override of method.weight
        density: 0.5              # optional per-expert override of method.density
        data: path/to/noun.jsonl  # validation data (learned methods; see supermerge.learned.data)
    method:
      name: ties                  # average | task_arithmetic | ties | dare_linear | dare_ties
      density: 0.5                # | supermerge | adamerging; parameters: `supermerge methods`
      lambda: 1.0
    model:                        # learned methods: how logits are computed (ModelSpec)
      kind: hf_encoder            # hf_encoder | torch_module
      factory: null               # torch_module: "package.module:function" -> nn.Module
      head: classifier            # hf_encoder: head tensors <head>.weight / <head>.bias
    data_dir: null                # learned methods: folder of <task>.jsonl / .pt / .safetensors
    heads: ["classifier.*"]       # globs of task-specific tensors, never merged
    output: path/to/merged        # output folder (must not exist unless --overwrite)
    dtype: null                   # output dtype: float32 | bfloat16 | float16 (null: base's)
    device: cpu                   # where the math runs: cpu | cuda | cuda:N
    shard_size: 2GB               # max bytes per output shard (B, KB, MB, GB)
    seed: 0                       # seeds random methods (DARE), per expert and tensor
    distributed:                  # learned methods under torchrun / deepspeed / accelerate
      task_groups: 1              # Q: ranks = layer shards x task groups (supermerge plan)
      offload: none               # where task-vector shards live: none | cpu (DeepSpeed ZeRO-3
                                  # offload_param) | nvme (files read by DeepSpeed's async I/O op)
      nvme_path: null             # offload nvme: a folder on the drive (O_DIRECT-capable)
      gather: body                # body: all-gather the merged body once per step | layer: each
                                  # layer's merged tensors just before it runs, freed after
      gather_ahead: 1             # gather layer: layers whose gathers start before they run
                                  # (prefetch, while the current one computes; 0: none)
      memory_per_rank: null       # optional budget the plan checks (e.g. 16GB)
      timeout_s: 300              # a collective waits this long for a silent rank
      prefetch_elements: 4194304  # offload: elements per streamed layer group (two are staged)

Every block is a frozen dataclass below (the method block: the method's own `Params`, in
`supermerge.methods`), parsed by `supermerge.schema.parse_block`. Relative paths are resolved
against the YAML file's folder.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from supermerge.errors import ConfigError, InputError
from supermerge.methods import REGISTRY, ExpertParams, resolve_experts
from supermerge.methods.learned import LEARNED
from supermerge.schema import parse_block

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DATA_SUFFIXES = (".jsonl", ".pt", ".safetensors")
MODEL_KINDS = ("hf_encoder", "torch_module")
OFFLOAD_TARGETS = ("none", "cpu", "nvme")
GATHER_MODES = ("body", "layer")
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class ExpertSpec:
    """One `experts:` entry.

    Attributes:
        path: the expert's checkpoint (HF folder, .safetensors or torch state_dict file).
        name: task name (default: the path's stem).
        weight, density: per-expert overrides of the method's parameters (None: the method's).
        data: the task's validation data (learned methods).
    """

    path: Path
    name: str | None = None
    weight: float | None = None
    density: float | None = None
    data: Path | None = None

    @property
    def overrides(self) -> dict[str, float]:
        """The per-expert method parameters this entry sets."""
        return {k: v for k, v in (("weight", self.weight), ("density", self.density)) if v is not None}


@dataclass(frozen=True)
class ModelSpec:
    """The `model:` block: how a learned merge computes a task's logits.

    Attributes:
        kind: "hf_encoder" or "torch_module".
        factory: "package.module:function" returning the nn.Module (torch_module only).
        head: name prefix of the per-task linear head (hf_encoder).
        pooling: "mean" or "cls" (hf_encoder).
        max_length: tokenizer truncation length in tokens (hf_encoder).
    """

    kind: str = "hf_encoder"
    factory: str | None = None
    head: str = "classifier"
    pooling: str = "mean"
    max_length: int = 128

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"kind: must be one of {MODEL_KINDS}, got {self.kind!r}")
        if self.kind == "torch_module" and not self.factory:
            raise ValueError("factory: torch_module needs a factory 'package.module:function'")
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"pooling: must be 'mean' or 'cls', got {self.pooling!r}")


@dataclass(frozen=True)
class DistributedSpec:
    """The `distributed:` block (see the module docstring); gather_ahead None means 1 in layer
    mode and 0 in body mode (where it does not apply)."""

    task_groups: int = 1
    offload: str = "none"
    nvme_path: Path | None = None
    gather: str = "body"
    gather_ahead: int | None = None
    memory_per_rank: int = field(default=0, metadata={"size": True})
    timeout_s: float = DEFAULT_TIMEOUT_S
    prefetch_elements: int = 2**22

    def __post_init__(self) -> None:
        if self.task_groups < 1:
            raise ValueError(f"task_groups: expected a positive integer, got {self.task_groups}")
        if self.offload not in OFFLOAD_TARGETS:
            raise ValueError(f"offload: expected one of {', '.join(OFFLOAD_TARGETS)}, got {self.offload!r}")
        if self.offload == "nvme" and self.nvme_path is None:
            raise ValueError("nvme_path: offload nvme needs a folder on the NVMe drive")
        if self.offload == "nvme" and not self.nvme_path.is_dir():
            raise ValueError(f"nvme_path: {self.nvme_path} is not an existing folder")
        if self.offload != "nvme" and self.nvme_path is not None:
            raise ValueError(f"nvme_path: only used with offload nvme (offload is {self.offload})")
        if self.gather not in GATHER_MODES:
            raise ValueError(f"gather: expected body or layer, got {self.gather!r}")
        if self.gather_ahead is not None and self.gather != "layer":
            raise ValueError(f"gather_ahead: only used with gather layer (gather is {self.gather})")
        if self.gather_ahead is not None and self.gather_ahead < 0:
            raise ValueError(f"gather_ahead: expected an integer >= 0, got {self.gather_ahead}")
        if self.gather_ahead is None:
            object.__setattr__(self, "gather_ahead", 1 if self.gather == "layer" else 0)
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s: expected a positive number, got {self.timeout_s}")
        if self.prefetch_elements < 1:
            raise ValueError(f"prefetch_elements: expected a positive integer, got {self.prefetch_elements}")


@dataclass(frozen=True)
class MethodSpec:
    """The `method:` block, parsed.

    Attributes:
        name: registered method name.
        params: the method's `Params` dataclass, validated.
        experts: training-free methods: each expert's resolved weight / density (empty for
            learned methods).
        given: the block as written (without `name`), kept for the output's record.
    """

    name: str
    params: Any
    experts: tuple[ExpertParams, ...] = ()
    given: Mapping[str, Any] = field(default_factory=dict)

    @property
    def learned(self) -> bool:
        """True for methods that train coefficients (supermerge, adamerging)."""
        return self.name in LEARNED


@dataclass(frozen=True)
class MergeConfig:
    """A validated merge configuration (see the module docstring for the YAML)."""

    base: Path
    experts: tuple[ExpertSpec, ...]
    method: MethodSpec
    output: Path
    heads: tuple[str, ...] = ()
    dtype: torch.dtype | None = None
    device: str = "cpu"
    shard_size: int = 2 * 2**30
    seed: int = 0
    source: Path | None = None
    model: ModelSpec = field(default_factory=ModelSpec)
    distributed: DistributedSpec = field(default_factory=DistributedSpec)

    @property
    def learned(self) -> bool:
        return self.method.learned

    def inputs(self) -> list[tuple[str, Path]]:
        """Every path the merge reads, labelled: the base, the experts, the tasks' data."""
        paths = [("the base", self.base), *((f"expert '{e.name}'", e.path) for e in self.experts)]
        return paths + [(f"the data of task '{e.name}'", e.data) for e in self.experts if e.data is not None]

    def record(self) -> dict:
        """The config as JSON-friendly data, kept beside the merged model for provenance."""
        params = dataclasses.asdict(self.method.params) if self.learned else dict(self.method.given)
        return {
            "base": str(self.base),
            "experts": [{"name": e.name, "path": str(e.path), **e.overrides} for e in self.experts],
            "method": {"name": self.method.name, **params},
            "heads": list(self.heads),
            "dtype": str(self.dtype).removeprefix("torch.") if self.dtype else None,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class _TopLevel:
    """The top-level keys and their plain types (blocks are parsed on their own below)."""

    base: Path | None = None
    experts: list | None = None
    method: Any = None
    output: Path | None = None
    heads: list = field(default_factory=list)
    dtype: str | None = None
    device: str = "cpu"
    shard_size: int = field(default=2 * 2**30, metadata={"size": True})
    seed: int = 0
    model: Any = None
    data_dir: Path | None = None
    distributed: Any = None

    def __post_init__(self) -> None:
        if not all(isinstance(h, str) for h in self.heads):
            raise ValueError("heads: expected a list of name patterns")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype: unknown dtype {self.dtype!r} (known: {', '.join(DTYPES)})")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device: expected cpu, cuda or cuda:N, got {self.device!r}")


def _required(value: Any, where: str) -> Any:
    if value is None:
        raise ConfigError(where, "missing required field")
    return value


def _experts(raw: list, root: Path) -> tuple[ExpertSpec, ...]:
    if not raw:
        raise ConfigError("experts", "needs at least one expert")
    experts: list[ExpertSpec] = []
    for i, entry in enumerate(raw):
        where = f"experts[{i}]"
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            raise ConfigError(where, "expected a mapping with 'path' (and 'name')")
        _required(entry.get("path"), f"{where}.path")
        spec = parse_block(ExpertSpec, entry, where, root)
        spec = dataclasses.replace(spec, name=str(spec.name or spec.path.stem))
        if spec.name in {e.name for e in experts}:
            raise ConfigError(f"{where}.name", f"duplicate expert name '{spec.name}'")
        experts.append(spec)
    return tuple(experts)


def _method(raw: Any, experts: tuple[ExpertSpec, ...]) -> MethodSpec:
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise ConfigError("method", f"expected a mapping, got {raw!r}")
    name = _required(raw.get("name"), "method.name")
    given = {k: v for k, v in raw.items() if k != "name"}
    cls = REGISTRY.get(name) or LEARNED.get(name)
    if cls is None:
        known = ", ".join(sorted([*REGISTRY, *LEARNED]))
        raise ConfigError("method.name", f"unknown method '{name}' (known: {known})")
    params = parse_block(cls.Params, given, "method", owner=name)
    if name in LEARNED:
        return MethodSpec(name, params, given=given)
    entries = [{"name": e.name, **e.overrides} for e in experts]
    return MethodSpec(name, params, tuple(resolve_experts(cls, params, entries)), given)


def _with_data(experts: tuple[ExpertSpec, ...], data_dir: Path | None) -> tuple[ExpertSpec, ...]:
    """Every expert with its validation file: its own `data`, or `<data_dir>/<task>.<suffix>`.

    Every task needs data, and every file in data_dir must belong to a task.
    """
    files: dict[str, Path] = {}
    if data_dir is not None:
        if not data_dir.is_dir():
            raise ConfigError("data_dir", f"{data_dir}: no such folder")
        files = {p.stem: p for p in sorted(data_dir.iterdir()) if p.suffix in DATA_SUFFIXES}
        strays = sorted(set(files) - {e.name for e in experts})
        if strays:
            raise ConfigError("data_dir", f"{files[strays[0]]}: task '{strays[0]}' has data but no expert")
    result = []
    for i, e in enumerate(experts):
        data = e.data or files.get(e.name)
        if data is None:
            raise ConfigError(
                f"experts[{i}].data", f"task '{e.name}' has no validation data (set data or data_dir)"
            )
        result.append(dataclasses.replace(e, data=data))
    return tuple(result)


def config_from_dict(raw: Any, root: Path, source: Path | None = None) -> MergeConfig:
    """Validate a parsed YAML mapping into a MergeConfig; paths resolve against `root`.

    Errors name the file (`source`) and the dotted field at fault.
    """
    try:
        if not isinstance(raw, dict):
            raise ConfigError("<top>", "the config must be a mapping")
        top = parse_block(_TopLevel, raw, "<top>", root)
        base = _required(top.base, "base")
        experts = _experts(_required(top.experts, "experts"), root)
        method = _method(_required(top.method, "method"), experts)
        if method.learned:
            experts = _with_data(experts, top.data_dir)
        model = parse_block(ModelSpec, top.model, "model")
        output = _required(top.output, "output")
        distributed = parse_block(DistributedSpec, top.distributed, "distributed", root)
    except ConfigError as e:
        raise ConfigError(e.field.removeprefix("<top>."), e.message, source) from None
    return MergeConfig(
        base=base,
        experts=experts,
        method=method,
        output=output,
        heads=tuple(top.heads),
        dtype=DTYPES[top.dtype] if top.dtype else None,
        device=top.device,
        shard_size=top.shard_size,
        seed=top.seed,
        source=source,
        model=model,
        distributed=distributed,
    )


def load_config(path: str | Path) -> MergeConfig:
    """Read and validate a merge YAML file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(path, f"not valid YAML ({str(e).splitlines()[0]})") from None
    return config_from_dict(raw, path.parent.resolve(), source=path)
