"""The merge configuration: one YAML file, validated into a `MergeConfig`.

    base: path/to/base            # HF model folder, .safetensors file or torch state_dict file
    experts:                      # one entry per task expert, in task order
      - name: noun                # task name (default: the path's stem), unique
        path: path/to/expert      # same formats as base
        weight: 1.0               # optional per-expert override of method.weight
        density: 0.5              # optional per-expert override of method.density
        data: path/to/noun.jsonl  # validation data (learned methods; see supermerge.data)
    method:
      name: ties                  # average | task_arithmetic | ties | dare_linear | dare_ties
      density: 0.5                # | supermerge | adamerging; parameters: `supermerge methods`
      lambda: 1.0
    model:                        # learned methods: how logits are computed (task_models)
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

Relative paths are resolved against the YAML file's folder.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from supermerge.errors import ConfigError, InputError
from supermerge.methods import build_method
from supermerge.methods.base import parse_params
from supermerge.methods.learned import LEARNED
from supermerge.task_models import ModelSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOP_LEVEL = {
    "base", "experts", "method", "heads", "output", "dtype", "device", "shard_size", "seed",
    "model", "data_dir", "distributed",
}  # fmt: skip
EXPERT_FIELDS = {"name", "path", "weight", "density", "data"}
DATA_SUFFIXES = (".jsonl", ".pt", ".safetensors")
GATHER_MODES = ("body", "layer")
SIZE_UNITS = {"": 1, "B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}


@dataclass
class ExpertSpec:
    """One expert entry: task name, checkpoint path and per-expert method overrides."""

    name: str
    path: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    data: Path | None = None


@dataclass(frozen=True)
class DistributedSpec:
    """The YAML's `distributed:` block (see the module docstring)."""

    task_groups: int = 1
    offload: str = "none"
    nvme_path: Path | None = None
    gather: str = "body"
    memory_per_rank: int = 0
    timeout_s: float = 300.0
    prefetch_elements: int = 2**22
    gather_ahead: int = 1


@dataclass
class MergeConfig:
    """A validated merge configuration (see the module docstring for the YAML)."""

    base: Path
    experts: list[ExpertSpec]
    method: str
    method_params: dict[str, Any]
    output: Path
    heads: list[str] = field(default_factory=list)
    dtype: torch.dtype | None = None
    device: str = "cpu"
    shard_size: int = 2 * 2**30
    seed: int = 0
    source: Path | None = None
    model: ModelSpec = field(default_factory=ModelSpec)
    distributed: DistributedSpec = field(default_factory=DistributedSpec)

    @property
    def learned(self) -> bool:
        """True for methods that train coefficients (supermerge, adamerging)."""
        return self.method in LEARNED

    def expert_entries(self) -> list[dict[str, Any]]:
        """Experts as mappings (name + overrides), the shape `build_method` takes."""
        return [{"name": e.name, **e.overrides} for e in self.experts]


def parse_size(value: Any, where: str, source: Path | None = None) -> int:
    """'2GB' / '512MB' / 1048576 -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", str(value).upper())
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(where, f"expected a size like 2GB or 512MB, got {value!r}", source)
    unit = match.group(2) if match.group(2).endswith("B") or not match.group(2) else match.group(2) + "B"
    return int(float(match.group(1)) * SIZE_UNITS[unit])


def _require(raw: dict, key: str, kind: type | tuple[type, ...], where: str, source: Path | None):
    if key not in raw or raw[key] is None:
        raise ConfigError(where, "missing required field", source)
    if not isinstance(raw[key], kind):
        raise ConfigError(where, f"expected {getattr(kind, '__name__', kind)}, got {raw[key]!r}", source)
    return raw[key]


def config_from_dict(raw: Any, root: Path, source: Path | None = None) -> MergeConfig:
    """Validate a parsed YAML mapping into a MergeConfig; paths resolve against `root`."""
    if not isinstance(raw, dict):
        raise ConfigError("<top>", "the config must be a mapping", source)
    for key in raw:
        if key not in TOP_LEVEL:
            raise ConfigError(key, f"unknown field (known: {', '.join(sorted(TOP_LEVEL))})", source)

    def path(value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else root / p

    base = path(_require(raw, "base", str, "base", source))
    experts_raw = _require(raw, "experts", list, "experts", source)
    if not experts_raw:
        raise ConfigError("experts", "needs at least one expert", source)
    experts: list[ExpertSpec] = []
    for i, entry in enumerate(experts_raw):
        where = f"experts[{i}]"
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            raise ConfigError(where, "expected a mapping with 'path' (and 'name')", source)
        for key in entry:
            if key not in EXPERT_FIELDS:
                raise ConfigError(
                    f"{where}.{key}",
                    f"unknown field (known: {', '.join(sorted(EXPERT_FIELDS))})",
                    source,
                )
        p = path(_require(entry, "path", str, f"{where}.path", source))
        name = str(entry.get("name") or p.stem)
        if name in {e.name for e in experts}:
            raise ConfigError(f"{where}.name", f"duplicate expert name '{name}'", source)
        overrides = {k: v for k, v in entry.items() if k in ("weight", "density")}
        data = entry.get("data")
        if data is not None and not isinstance(data, str):
            raise ConfigError(f"{where}.data", f"expected a path, got {data!r}", source)
        experts.append(ExpertSpec(name, p, overrides, path(data) if data else None))

    method_raw = _require(raw, "method", (dict, str), "method", source)
    if isinstance(method_raw, str):
        method_raw = {"name": method_raw}
    method = _require(method_raw, "name", str, "method.name", source)
    method_params = {k: v for k, v in method_raw.items() if k != "name"}
    try:  # validate the method and its parameters now, not after the first tensor
        if method in LEARNED:
            parse_params(LEARNED[method], method_params, "method")
            _attach_data(experts, raw.get("data_dir"), path)
        else:
            build_method(method, method_params, [{"name": e.name, **e.overrides} for e in experts])
        model = _model_spec(raw.get("model") or {})
    except ConfigError as e:
        raise ConfigError(e.field, e.message, source) from None

    heads = raw.get("heads") or []
    if not isinstance(heads, list) or not all(isinstance(h, str) for h in heads):
        raise ConfigError("heads", "expected a list of name patterns", source)
    dtype_name = raw.get("dtype")
    if dtype_name is not None and dtype_name not in DTYPES:
        raise ConfigError("dtype", f"unknown dtype {dtype_name!r} (known: {', '.join(DTYPES)})", source)
    device = str(raw.get("device", "cpu"))
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ConfigError("device", f"expected cpu, cuda or cuda:N, got {device!r}", source)
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError("seed", f"expected an integer, got {seed!r}", source)
    return MergeConfig(
        base=base,
        experts=experts,
        method=method,
        method_params=method_params,
        output=path(_require(raw, "output", str, "output", source)),
        heads=heads,
        dtype=DTYPES[dtype_name] if dtype_name else None,
        device=device,
        shard_size=parse_size(raw.get("shard_size", "2GB"), "shard_size", source),
        seed=seed,
        source=source,
        model=model,
        distributed=_distributed_spec(raw.get("distributed") or {}, path, source),
    )


def _distributed_spec(raw: Any, path: Callable[[str], Path], source: Path | None) -> DistributedSpec:
    if not isinstance(raw, dict):
        raise ConfigError("distributed", f"expected a mapping, got {raw!r}", source)
    fields = {f.name for f in dataclasses.fields(DistributedSpec)}
    for key in raw:
        if key not in fields:
            raise ConfigError(
                f"distributed.{key}", f"unknown field (known: {', '.join(sorted(fields))})", source
            )
    groups = raw.get("task_groups", 1)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ConfigError("distributed.task_groups", f"expected a positive integer, got {groups!r}", source)
    offload = raw.get("offload", "none")
    if offload not in ("none", "cpu", "nvme"):
        raise ConfigError("distributed.offload", f"expected none, cpu or nvme, got {offload!r}", source)
    nvme = raw.get("nvme_path")
    if nvme is not None and not isinstance(nvme, str):
        raise ConfigError("distributed.nvme_path", f"expected a folder path, got {nvme!r}", source)
    problem = None  # checked before any work, not after the stores are half built
    if offload == "nvme" and nvme is None:
        problem = "offload nvme needs a folder on the NVMe drive"
    elif offload == "nvme" and not path(nvme).is_dir():
        problem = f"{path(nvme)} is not an existing folder"
    elif offload != "nvme" and nvme is not None:
        problem = f"only used with offload nvme (offload is {offload})"
    if problem:
        raise ConfigError("distributed.nvme_path", problem, source)
    gather = raw.get("gather", "body")
    if gather not in GATHER_MODES:
        raise ConfigError("distributed.gather", f"expected body or layer, got {gather!r}", source)
    ahead = raw.get("gather_ahead", 1)
    if not isinstance(ahead, int) or isinstance(ahead, bool) or ahead < 0:
        raise ConfigError("distributed.gather_ahead", f"expected an integer >= 0, got {ahead!r}", source)
    if "gather_ahead" in raw and gather != "layer":
        raise ConfigError(
            "distributed.gather_ahead", f"only used with gather layer (gather is {gather})", source
        )
    budget = raw.get("memory_per_rank")
    timeout = raw.get("timeout_s", 300.0)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise ConfigError("distributed.timeout_s", f"expected a positive number, got {timeout!r}", source)
    prefetch = raw.get("prefetch_elements", 2**22)
    if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 1:
        raise ConfigError(
            "distributed.prefetch_elements", f"expected a positive integer, got {prefetch!r}", source
        )
    return DistributedSpec(
        groups, offload, path(nvme) if nvme else None, gather,
        parse_size(budget, "distributed.memory_per_rank", source) if budget is not None else 0,
        float(timeout), prefetch, ahead,
    )  # fmt: skip


def _model_spec(raw: Any) -> ModelSpec:
    if not isinstance(raw, dict):
        raise ConfigError("model", f"expected a mapping, got {raw!r}")
    fields = {f.name for f in dataclasses.fields(ModelSpec)}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"model.{key}", f"unknown field (known: {', '.join(sorted(fields))})")
    try:
        return ModelSpec(**raw)
    except (TypeError, ValueError) as e:
        key, _, message = str(e).partition(": ")
        raise ConfigError(f"model.{key}" if key in fields else "model", message or str(e)) from None


def _attach_data(experts: list[ExpertSpec], data_dir: Any, path: Callable[[str], Path]) -> None:
    """Give every expert its validation file: its own `data`, or `<data_dir>/<task>.<suffix>`.

    Every task needs data, and every file in data_dir must belong to a task.
    """
    if data_dir is not None:
        if not isinstance(data_dir, str):
            raise ConfigError("data_dir", f"expected a path, got {data_dir!r}")
        folder = path(data_dir)
        if not folder.is_dir():
            raise ConfigError("data_dir", f"{folder}: no such folder")
        files = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix in DATA_SUFFIXES}
        names = {e.name for e in experts}
        strays = sorted(set(files) - names)
        if strays:
            raise ConfigError("data_dir", f"{files[strays[0]]}: task '{strays[0]}' has data but no expert")
        for e in experts:
            if e.data is None and e.name in files:
                e.data = files[e.name]
    for i, e in enumerate(experts):
        if e.data is None:
            raise ConfigError(
                f"experts[{i}].data", f"task '{e.name}' has no validation data (set data or data_dir)"
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
