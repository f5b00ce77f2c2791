"""The merge configuration: one YAML file, validated once into a frozen `MergeConfig`.

    base: path/to/base            # HF model folder, .safetensors file or torch state_dict file
    experts:                      # one entry per task expert, in task order
      - name: noun                # task name (default: the path's stem), unique
        path: path/to/expert      # same formats as base
        weight: 1.0               # optional per-expert override of a method parameter: any
        density: 0.5              #   the method takes per expert (`supermerge methods`)
        data: path/to/noun.jsonl  # validation data (learned methods; see supermerge.learned.data)
    method:
      name: ties                  # `supermerge methods` lists them; training-free parameters and
      density: 0.5                #   the per-expert ones above take settings that vary per tensor:
      lambda: 1.0                 #   [0, 0.5, 1] over depth, [{filter: mlp, value: 0.3}, {value: 1}]
    model:                        # learned methods: how logits are computed (ModelSpec)
      kind: hf_encoder            # hf_encoder | torch_module
      factory: null               # torch_module: "package.module:function" -> nn.Module
      head: classifier            # hf_encoder: head tensors <head>.weight / <head>.bias
    data_dir: null                # learned methods: folder of <task>.jsonl / .pt / .safetensors
    heads: ["classifier.*"]       # globs of task-specific tensors, never merged
    output: path/to/merged        # output folder (must not exist unless --overwrite)
    dtype: null                   # output dtype: float32 | bfloat16 | float16 (null: base's)
    compute_dtype: null           # training-free: null (fp32 whatever the storage) | bfloat16 |
                                  # float16: compute as mergekit does, in that dtype
    tokenizer: base               # training-free: whose tokenizer files the output carries: base
                                  # or an expert's name (vocabularies must be the same)
    slices:                       # training-free: the output's layers from ranges of layers
      - sources:                  # one slice: aligned layer ranges, merged by the method
          - model: base           # base or an expert's name
            layer_range: [0, 16]  # layers [first, end) of that model
            weight: 0.5           # per-expert parameters of this source (optional)
        t: 0.3                    # parameters of this slice's merges (optional)
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
against the YAML file's folder. A mergekit config (one with `merge_method`) is read as it is:
`supermerge.mergekit_config` turns it into this schema first.
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

from supermerge.errors import ConfigError, InputError, SupermergeError
from supermerge.mergekit_config import is_mergekit, to_native
from supermerge.methods import REGISTRY, ExpertParams
from supermerge.methods.learned import LEARNED
from supermerge.methods.settings import Setting, as_yaml, check_settings, parse_setting
from supermerge.schema import YAML_NAMES, parse_block

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DATA_SUFFIXES = (".jsonl", ".pt", ".safetensors")
OUTPUT_FORMATS = ("model", "lora")  # a merged model; one LoRA adapter (linear merges of LoRA adapters)
LINEAR_METHODS = ("average", "task_arithmetic")
MODEL_KINDS = ("hf_encoder", "hf_causal_lm", "torch_module")
OFFLOAD_TARGETS = ("none", "cpu", "nvme")
GATHER_MODES = ("body", "layer")
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class ExpertSpec:
    """One `experts:` entry.

    Attributes:
        path: the expert's checkpoint (HF folder, .safetensors or torch state_dict file).
        name: task name (default: the path's stem).
        data: the task's validation data (learned methods).
        params: its own values of the method's per-expert parameters (weight, density, ...), as
            settings (supermerge.methods.settings); the method's own values where absent.
    """

    path: Path
    name: str | None = None
    data: Path | None = None
    params: Mapping[str, Setting] = field(default_factory=dict)

    @property
    def overrides(self) -> dict[str, Any]:
        """The per-expert method parameters this entry sets, as YAML data."""
        return {k: as_yaml(v) for k, v in self.params.items()}


@dataclass(frozen=True)
class _ExpertFields:
    """The fields of an expert entry besides its method parameters."""

    path: Path | None = None
    name: str | None = None
    data: Path | None = None


@dataclass(frozen=True)
class SourceSpec:
    """One source of a slice: a layer range of one model.

    Attributes:
        model: "base" or an expert's name.
        layers: the range [first, end) of that model's layers (0-based).
        params: per-expert settings of this source (above the expert entry's own).
    """

    model: str
    layers: tuple[int, int]
    params: Mapping[str, Setting] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.layers[1] - self.layers[0]


@dataclass(frozen=True)
class SliceSpec:
    """One `slices:` entry: output layers merged from aligned layer ranges of its sources.

    Attributes:
        sources: the sources, all of one length; the one whose model is "base" is the base of
            the slice's merges, else the first source carries the tensors (and is an expert too).
        params: the method's settings for this slice (above the method block's).
    """

    sources: tuple[SourceSpec, ...]
    params: Mapping[str, Setting] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sources[0])

    @property
    def experts(self) -> list[str]:
        """The names of the experts this slice merges (every source but the base)."""
        return [s.model for s in self.sources if s.model != "base"]


@dataclass(frozen=True)
class ModelSpec:
    """The `model:` block: how a learned merge computes a task's logits.

    Attributes:
        kind: "hf_encoder", "hf_causal_lm" or "torch_module".
        factory: "package.module:function" returning the nn.Module (torch_module only).
        head: name prefix of the per-task linear head (hf_encoder).
        pooling: "mean" or "cls" (hf_encoder).
        max_length: tokenizer truncation length in tokens (hf_encoder, hf_causal_lm).
        chat_template: wrap each prompt in the tokenizer's chat template (hf_causal_lm).
        prompt_template: poses a text/label task file's rows as prompts, `{text}` filled in
            (hf_causal_lm; a task file's own template line wins).
        completion_template: the completion of a text/label row, `{label}` filled in.
    """

    kind: str = "hf_encoder"
    factory: str | None = None
    head: str = "classifier"
    pooling: str = "mean"
    max_length: int = 128
    chat_template: bool = False
    prompt_template: str | None = None
    completion_template: str = " {label}"

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
        params: the method's `Params` dataclass, validated (settings that vary per tensor at
            their first value).
        experts: training-free methods: each expert's resolved per-expert parameters, settings
            at their first value (empty for learned methods).
        given: the block as written (without `name`), kept for the output's record.
        settings: training-free methods: the block's parameters as settings.
    """

    name: str
    params: Any
    experts: tuple[ExpertParams, ...] = ()
    given: Mapping[str, Any] = field(default_factory=dict)
    settings: Mapping[str, Setting] = field(default_factory=dict)

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
    compute_dtype: torch.dtype | None = None
    tokenizer: str | None = None
    slices: tuple[SliceSpec, ...] = ()
    device: str = "cpu"
    shard_size: int = 2 * 2**30
    seed: int = 0
    source: Path | None = None
    model: ModelSpec = field(default_factory=ModelSpec)
    distributed: DistributedSpec = field(default_factory=DistributedSpec)
    output_format: str = "model"
    lora_rank: int | None = None

    @property
    def learned(self) -> bool:
        return self.method.learned

    def expert(self, name: str) -> ExpertSpec:
        """The expert named `name`."""
        return next(e for e in self.experts if e.name == name)

    def inputs(self) -> list[tuple[str, Path]]:
        """Every path the merge reads, labelled: the base, the experts, the tasks' data."""
        paths = [("the base", self.base), *((f"expert '{e.name}'", e.path) for e in self.experts)]
        return paths + [(f"the data of task '{e.name}'", e.data) for e in self.experts if e.data is not None]

    def record(self) -> dict:
        """The complete config in the YAML schema, paths absolute: what `config_from_dict` reads
        back into this config (kept beside the merged model as supermerge_config.yaml and in
        supermerge_merge.json, so the output can be made again)."""
        if self.learned:
            fields = dataclasses.asdict(self.method.params)
            params = {YAML_NAMES.get(k, k): v for k, v in fields.items()}
        else:
            params = dict(self.method.given)
        doc: dict[str, Any] = {
            "base": str(self.base.absolute()),
            "experts": [
                {
                    "name": e.name,
                    "path": str(e.path.absolute()),
                    **e.overrides,
                    **({"data": str(e.data.absolute())} if e.data is not None else {}),
                }
                for e in self.experts
            ],
        }
        if self.slices:
            doc["slices"] = [
                {
                    "sources": [
                        {
                            "model": s.model,
                            "layer_range": list(s.layers),
                            **{k: as_yaml(v) for k, v in s.params.items()},
                        }
                        for s in piece.sources
                    ],
                    **{k: as_yaml(v) for k, v in piece.params.items()},
                }
                for piece in self.slices
            ]
        doc["method"] = {"name": self.method.name, **params}
        doc |= {
            "heads": list(self.heads),
            "output": str(self.output.absolute()),
            "dtype": _dtype_name(self.dtype),
        }
        if not self.learned:
            doc["compute_dtype"] = _dtype_name(self.compute_dtype)
            if self.tokenizer is not None:
                doc["tokenizer"] = self.tokenizer
        doc |= {"seed": self.seed, "device": self.device, "shard_size": self.shard_size}
        if self.output_format != "model":
            doc |= {"output_format": self.output_format, "lora_rank": self.lora_rank}
        if self.learned:
            doc["model"] = _changed(self.model)
            doc["distributed"] = _changed(self.distributed)
        return _plain(doc)


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return str(dtype).removeprefix("torch.") if dtype is not None else None


def _changed(block: Any) -> dict:
    """The fields of a block that differ from its defaults (what the YAML must say to rebuild it)."""
    default = type(block)()
    return {
        f.name: v
        for f in dataclasses.fields(block)
        if (v := getattr(block, f.name)) != getattr(default, f.name)
    }


def _plain(value: Any) -> Any:
    """`value` as YAML / JSON data: paths as strings, tuples as lists."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


@dataclass(frozen=True)
class _TopLevel:
    """The top-level keys and their plain types (blocks are parsed on their own below)."""

    base: Path | None = None
    experts: list | None = None
    method: Any = None
    output: Path | None = None
    heads: list = field(default_factory=list)
    dtype: str | None = None
    compute_dtype: str | None = None
    tokenizer: str | None = None
    slices: list | None = None
    device: str = "cpu"
    shard_size: int = field(default=2 * 2**30, metadata={"size": True})
    seed: int = 0
    model: Any = None
    data_dir: Path | None = None
    distributed: Any = None
    output_format: str = "model"
    lora_rank: int | None = None

    def __post_init__(self) -> None:
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(
                f"output_format: expected one of {', '.join(OUTPUT_FORMATS)}, got {self.output_format!r}"
            )
        if self.lora_rank is not None and (self.output_format != "lora" or self.lora_rank < 1):
            raise ValueError("lora_rank: a rank >= 1, with output_format lora")
        if not all(isinstance(h, str) for h in self.heads):
            raise ValueError("heads: expected a list of name patterns")
        for name in ("dtype", "compute_dtype"):
            value = getattr(self, name)
            if value is not None and value not in DTYPES:
                raise ValueError(f"{name}: unknown dtype {value!r} (known: {', '.join(DTYPES)})")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device: expected cpu, cuda or cuda:N, got {self.device!r}")


def _required(value: Any, where: str) -> Any:
    if value is None:
        raise ConfigError(where, "missing required field")
    return value


def _settings(raw: Mapping[str, Any], where: str) -> dict[str, Setting]:
    """Each value of `raw` as a setting (scalar, gradient or filters), keys as written."""
    return {key: parse_setting(value, f"{where}.{key}") for key, value in raw.items()}


def _experts(raw: list, root: Path) -> tuple[ExpertSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("experts", "needs at least one expert")
    experts: list[ExpertSpec] = []
    for i, entry in enumerate(raw):
        where = f"experts[{i}]"
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            raise ConfigError(where, "expected a mapping with 'path' (and 'name')")
        own = {k: v for k, v in entry.items() if k in {f.name for f in dataclasses.fields(_ExpertFields)}}
        fields = parse_block(_ExpertFields, own, where, root)
        path = _required(fields.path, f"{where}.path")
        params = _settings({k: v for k, v in entry.items() if k not in own}, where)
        spec = ExpertSpec(path, str(fields.name or path.stem), fields.data, params)
        if spec.name in {e.name for e in experts}:
            raise ConfigError(f"{where}.name", f"duplicate expert name '{spec.name}'")
        experts.append(spec)
    return tuple(experts)


def _method(raw: Any, experts: tuple[ExpertSpec, ...], slices: tuple[SliceSpec, ...]) -> MethodSpec:
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
    if name in LEARNED:
        for i, e in enumerate(experts):
            if e.params:
                raise ConfigError(
                    f"experts[{i}].{next(iter(e.params))}", f"'{name}' takes no per-expert parameters"
                )
        return MethodSpec(name, parse_block(cls.Params, given, "method", owner=name), given=given)
    settings = _settings(given, "method")
    entries = [(e.name, f"experts[{i}]", e.params) for i, e in enumerate(experts)]
    params, resolved = check_settings(cls, settings, entries)
    for s, piece in enumerate(slices):
        try:
            check_settings(cls, {**settings, **piece.params}, [])
        except ConfigError as e:
            key = e.field.removeprefix("method.")
            raise ConfigError(f"slices[{s}].{key}" if key in piece.params else e.field, e.message) from None
        for j, source in enumerate(piece.sources):
            if source.params:
                check_settings(cls, settings, [(source.model, f"slices[{s}].sources[{j}]", source.params)])
    by_name = dict(zip((e.name for e in experts), resolved, strict=True))
    for names in [piece.experts for piece in slices] or [list(by_name)]:
        cls(params, [by_name[n] for n in names])  # the method's own checks (how many experts, ...)
    return MethodSpec(name, params, tuple(resolved), given, settings)


def _base_not_an_expert(experts: tuple[ExpertSpec, ...]) -> None:
    for i, e in enumerate(experts):
        if e.name == "base":
            raise ConfigError(
                f"experts[{i}].name", "'base' names the base model here: give this expert another name"
            )


def _slices(raw: list, experts: tuple[ExpertSpec, ...]) -> tuple[SliceSpec, ...]:
    """The `slices:` list: sources naming the base or an expert, ranges of one length per slice."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError("slices", "expected a list of slices, each with its sources")
    models = {"base", *(e.name for e in experts)}
    _base_not_an_expert(experts)
    slices = []
    for s, entry in enumerate(raw):
        where = f"slices[{s}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("sources"), list) or not entry["sources"]:
            raise ConfigError(f"{where}.sources", "expected a list of sources ({model, layer_range})")
        sources = []
        for j, item in enumerate(entry["sources"]):
            at = f"{where}.sources[{j}]"
            if not isinstance(item, dict):
                raise ConfigError(at, "expected a mapping with model and layer_range")
            model = _required(item.get("model"), f"{at}.model")
            if model not in models:
                raise ConfigError(f"{at}.model", f"'{model}' is neither base nor an expert's name")
            if model in {x.model for x in sources}:
                raise ConfigError(f"{at}.model", f"'{model}' is already a source of this slice")
            span = _required(item.get("layer_range"), f"{at}.layer_range")
            if not (
                isinstance(span, list)
                and len(span) == 2
                and all(type(x) is int for x in span)
                and 0 <= span[0] < span[1]
            ):
                raise ConfigError(
                    f"{at}.layer_range", f"expected [first, end) with 0 <= first < end, got {span!r}"
                )
            params = _settings({k: v for k, v in item.items() if k not in ("model", "layer_range")}, at)
            if model == "base" and params:
                raise ConfigError(f"{at}.{next(iter(params))}", "the base takes no per-expert parameters")
            sources.append(SourceSpec(model, (span[0], span[1]), params))
        if len({len(x) for x in sources}) > 1:
            raise ConfigError(f"{where}.sources", "every source of a slice needs as many layers")
        params = _settings({k: v for k, v in entry.items() if k != "sources"}, where)
        slices.append(SliceSpec(tuple(sources), params))
    return tuple(slices)


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


def config_from_dict(
    raw: Any, root: Path, source: Path | None = None, output: Path | None = None
) -> MergeConfig:
    """Validate a parsed YAML mapping into a MergeConfig; paths resolve against `root`.

    Args:
        raw: the YAML mapping (this schema; see `load_config` for mergekit's).
        root: folder relative paths resolve against.
        source: the file it came from, named in errors.
        output: the output folder, overriding the mapping's `output`.
    Errors name the file (`source`) and the dotted field at fault.
    """
    try:
        if not isinstance(raw, dict):
            raise ConfigError("<top>", "the config must be a mapping")
        top = parse_block(_TopLevel, raw, "<top>", root)
        base = _required(top.base, "base")
        experts = _experts(_required(top.experts, "experts"), root)
        slices = _slices(top.slices, experts) if top.slices is not None else ()
        method = _method(_required(top.method, "method"), experts, slices)
        if method.learned:
            for key in ("compute_dtype", "tokenizer", "slices"):
                if getattr(top, key) is not None:
                    raise ConfigError(key, f"applies to training-free methods, not '{method.name}'")
            experts = _with_data(experts, top.data_dir)
        if top.tokenizer is not None:
            _base_not_an_expert(experts)
            if top.tokenizer not in {"base", *(e.name for e in experts)}:
                raise ConfigError("tokenizer", f"'{top.tokenizer}' is neither base nor an expert's name")
        if slices and top.heads:
            raise ConfigError("heads", "task heads are not kept with slices (a layer plan)")
        if top.output_format == "lora" and (method.name not in LINEAR_METHODS or slices or top.compute_dtype):
            raise ConfigError(
                "output_format",
                f"a LoRA output is a linear merge of LoRA adapters: method {' or '.join(LINEAR_METHODS)}, "
                "without slices or compute_dtype",
            )
        model = parse_block(ModelSpec, top.model, "model")
        output = _required(output or top.output, "output")
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
        compute_dtype=DTYPES[top.compute_dtype] if top.compute_dtype else None,
        tokenizer=top.tokenizer,
        slices=slices,
        device=top.device,
        shard_size=top.shard_size,
        seed=top.seed,
        source=source,
        model=model,
        distributed=distributed,
        output_format=top.output_format,
        lora_rank=top.lora_rank,
    )


def read_yaml(path: str | Path) -> Any:
    """The parsed YAML of a config file (InputError if it is missing or not YAML)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "config file not found")
    try:
        return yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(path, f"not valid YAML ({str(e).splitlines()[0]})") from None


def mergekit_native(raw: Mapping[str, Any], source: Path, output: Path | None = None) -> dict:
    """A mergekit config as this schema's mapping (see supermerge.mergekit_config), validated;
    errors name the mergekit config's file and fields.

    Args:
        raw: the mergekit YAML mapping.
        source: its file.
        output: the output folder, recorded in the mapping (None: left out, given when it runs).
    """
    try:
        native, fields = to_native(raw)
    except ConfigError as e:
        raise ConfigError(e.field, e.message, source) from None
    if output is not None:
        native["output"] = str(output.absolute())
    try:
        config_from_dict(native, Path.cwd(), output=None if output is not None else Path("OUT_PATH"))
    except ConfigError as e:
        raise ConfigError(fields(e.field), e.message, source) from None
    return native


def load_config(path: str | Path, output: str | Path | None = None) -> MergeConfig:
    """Read and validate a merge YAML file: this schema, or mergekit's (recognised by its
    `merge_method`; see supermerge.mergekit_config), which needs `output`.

    Args:
        path: the YAML file.
        output: the output folder (overrides the file's `output`; required for mergekit's).
    """
    path = Path(path)
    raw = read_yaml(path)
    out = Path(output).absolute() if output is not None else None
    if not is_mergekit(raw):
        return config_from_dict(raw, path.parent.resolve(), source=path, output=out)
    if out is None:
        raise SupermergeError(
            f"{path}: a mergekit config needs the output folder: supermerge merge {path} OUT_PATH"
        )
    return config_from_dict(mergekit_native(raw, path, out), Path.cwd(), source=path)
