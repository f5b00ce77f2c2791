"""mergekit's merge YAML, read as it is: `to_native` turns it into supermerge's schema.

    models:                       # or slices: (below), not both
      - model: path/to/model      # a local model folder
        parameters: {weight: 0.5, density: [0.2, 0.8]}
    base_model: path/to/base
    merge_method: ties            # linear is our average; the others keep their names
    parameters: {lambda: 1.0, t: [{filter: self_attn, value: [0, 1]}, {value: 0.5}]}
    dtype: bfloat16               # compute_dtype: computed in it, as mergekit does
    out_dtype: float16            # dtype of the output (default: dtype)
    tokenizer_source: base        # base or one of the models: whose tokenizer files the output
                                  # carries (union refused)
    slices:
      - sources:
          - {model: path/to/a, layer_range: [0, 16], parameters: {weight: 0.5}}
        parameters: {t: 0.3}

How it maps (mergekit 0.1.5's config.py, plan.py and merge_methods/ define the meaning):
- the inputs of a merge are the models (each slice's sources), and base_model when it is not
  among them (mergekit adds it). Methods that take a base (every one but linear, karcher and
  passthrough) merge the other inputs, the experts, into base_model; for linear, karcher and
  passthrough every input is an expert and the base only carries the tensors (base_model, or
  the first model), as it does for nuslerp and multislerp without a base_model (`use_base:
  false`);
- experts are named after their folders (made unique); slice sources name them, or `base`;
- `parameters` of the config, a slice, a model or a source keep their form (scalars,
  gradients, filters) and precedence; mergekit's per-input parameters (weight, density, ...)
  become per-expert ones; `int8_mask` (a mask's dtype, the same values) is dropped, and so are a
  model's parameters that mergekit does not read per model (each with a warning); numbers
  written as strings ("1e-3", which YAML reads as text) are numbers;
- paths are local folders, relative ones resolved against the current folder (as mergekit
  does); `base_model+adapter` in `models` is the adapter as an expert (a PEFT folder on the
  base); hub ids that are no folder, other `model+lora` and `model@revision` references are refused,
  and every field this reader does not know, naming it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from supermerge.errors import ConfigError
from supermerge.methods import REGISTRY

log = logging.getLogger(__name__)

FIELDS = (
    "models",
    "slices",
    "base_model",
    "merge_method",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
)
UNSUPPORTED = {
    "modules": "per-module merges are not supported: use models or slices",
    "tokenizer": "the tokenizer block (vocabulary surgery) is not supported: use tokenizer_source",
    "chat_template": "chat templates are not supported: edit tokenizer_config.json of the output",
}
METHOD_NAMES = {"linear": "average"}
# mergekit methods that treat every input as a model to merge (their input contract ignores a base)
ALL_INPUTS = {"linear", "karcher", "passthrough"}
# mergekit methods that refuse to run without a base model
NEED_BASE = {
    "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
    "della_linear", "slerp", "model_stock", "sce",
}  # fmt: skip
# mergekit parameters bound per input (PerInput / PerNonBase), and those that change no value
PER_INPUT = {"weight", "density", "gamma", "epsilon", "scale"}
NO_EFFECT = {"int8_mask"}
NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name, as mergekit reads a reference that is no folder


def is_mergekit(raw: Any) -> bool:
    """True for a mergekit config (a mapping with `merge_method`)."""
    return isinstance(raw, Mapping) and "merge_method" in raw


def _numbers(value: Any) -> Any:
    """Numbers written as text ("1e-3") as numbers, inside gradients and filters too."""
    if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, Mapping):
        return {k: v if k == "filter" else _numbers(v) for k, v in value.items()}
    return value


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(where, f"expected a mapping, got {value!r}")
    return dict(value)


def _only(entry: Any, known: tuple[str, ...], where: str) -> dict:
    entry = _mapping(entry, where)
    for key in entry:
        if key not in known:
            raise ConfigError(f"{where}.{key}", f"unknown or unsupported field (known: {', '.join(known)})")
    return entry


def _reference(value: Any, where: str, lora: bool = False) -> str:
    """A model reference that names a local folder (checked when the merge opens it); with `lora`,
    `model+adapter` is taken as it is (see `_adapter_of`)."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(where, f"expected the path of a model folder, got {value!r}")
    if "+" in value and not lora:
        raise ConfigError(
            where,
            f"'{value}': LoRA references (model+lora) are taken in `models` only, on the base_model",
        )
    if "@" in value:
        raise ConfigError(
            where, f"'{value}': revisions (model@revision) are not supported: name a local folder"
        )
    if HUB_ID.fullmatch(value) and not Path(value).exists():
        raise ConfigError(
            where,
            f"'{value}' is no local folder, and supermerge does not download models: fetch it first "
            f"(huggingface-cli download {value} --local-dir {value})",
        )
    return value


def _path(reference: str) -> str:
    """The absolute path of a reference, relative ones against the current folder (as mergekit)."""
    return str(Path(reference).expanduser().absolute())


class _Reader:
    """One mergekit config on its way to the native schema (see `to_native`)."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self.raw = raw
        self.renames: dict[str, str] = {"method.name": "merge_method", "method": "parameters"}
        name = raw["merge_method"]
        if not isinstance(name, str):
            raise ConfigError("merge_method", f"expected a method name, got {name!r}")
        self.theirs = name
        self.ours = METHOD_NAMES.get(name, name)
        if self.ours not in REGISTRY:
            known = sorted({*(k for k in REGISTRY if k not in METHOD_NAMES.values()), *METHOD_NAMES})
            raise ConfigError("merge_method", f"'{name}' is not supported (supported: {', '.join(known)})")
        self.cls = REGISTRY[self.ours]
        self.params = {f.name for f in fields(self.cls.Params)}
        base = raw.get("base_model")
        self.base = _reference(base, "base_model") if base is not None else None
        if self.base is None and name in NEED_BASE:
            raise ConfigError("base_model", f"mergekit's {name} needs a base_model")
        self.uses_base = self.base is not None and name not in ALL_INPUTS
        self.names: dict[str, str] = {}  # reference -> expert name

    def expert(self, reference: str, where: str) -> str:
        """The expert name of a reference (a new expert at its first sight): its folder's name,
        made unique, never 'base'."""
        if reference not in self.names:
            stem = Path(reference.rstrip("/")).name or "model"
            name, n = stem, 1
            while name == "base" or name in self.names.values():
                n += 1
                name = f"{stem}_{n}"
            self.names[reference] = name
            self.renames[f"experts[{len(self.names) - 1}].path"] = where
        return self.names[reference]

    def per_input(self, params: Any, where: str, single: bool) -> tuple[dict, dict]:
        """A model's or a source's `parameters`: (per-expert settings, settings for its slice).

        mergekit binds some parameters per input where ours are shared: with one input (a slice
        of one source) they are the slice's. Parameters mergekit does not read per input are
        dropped with a warning, unknown ones refused.
        """
        own, for_slice = {}, {}
        for key, value in _mapping(params, where).items():
            value = _numbers(value)
            if key in NO_EFFECT:
                continue
            if key in self.cls.per_expert:
                own[key] = value
            elif key in PER_INPUT and key in self.params:
                if not single:
                    raise ConfigError(
                        f"{where}.{key}",
                        f"supermerge's {self.ours} takes {key} for every model at once, not per model",
                    )
                for_slice[key] = value
            elif key in self.params or key in PER_INPUT:
                log.warning("%s.%s: mergekit does not read this parameter per model; ignored", where, key)
            else:
                raise ConfigError(f"{where}.{key}", f"unknown parameter for mergekit's {self.theirs}")
        return own, for_slice

    def method(self) -> dict:
        block = {"name": self.ours}
        for key, value in _mapping(self.raw.get("parameters"), "parameters").items():
            if key not in NO_EFFECT:
                block[key] = _numbers(value)
        if not self.uses_base and "use_base" in self.params:
            block["use_base"] = False
        return block

    def models(self) -> tuple[str, list[dict]]:
        """`models:` -> (base path, experts)."""
        entries = self.raw["models"]
        if not isinstance(entries, list) or not entries:
            raise ConfigError("models", "expected a list of models")
        refs = []
        experts = []
        for i, entry in enumerate(entries):
            where = f"models[{i}]"
            if isinstance(entry, str):
                entry = {"model": entry}
            entry = _only(entry, ("model", "parameters"), where)
            ref = _reference(entry.get("model"), f"{where}.model", lora=True)
            if ref in refs:
                raise ConfigError(f"{where}.model", f"'{ref}' is listed twice")
            refs.append(ref)
            if self.uses_base and ref == self.base:
                if entry.get("parameters"):
                    log.warning(
                        "%s.parameters: mergekit reads no parameters of the base model; ignored", where
                    )
                continue
            own, _ = self.per_input(entry.get("parameters"), f"{where}.parameters", single=False)
            name = self.expert(ref, f"{where}.model")
            self.renames[f"experts[{len(experts)}]"] = f"{where}.parameters"
            experts.append({"name": name, "path": _path(self._adapter_of(ref, f"{where}.model")), **own})
        if self.base is not None and self.base not in refs and not self.uses_base:
            # mergekit adds the base to the inputs: one more model to merge
            experts.append({"name": self.expert(self.base, "base_model"), "path": _path(self.base)})
        base = self.base if self.base is not None else refs[0]
        return _path(base), experts

    def _adapter_of(self, ref: str, where: str) -> str:
        """`model+adapter` -> the adapter folder, an expert on the base (supermerge applies an
        adapter to the base it merges into); any other reference as it is."""
        if "+" not in ref:
            return ref
        model, adapter = ref.rsplit("+", 1)
        if self.base is None or _path(model) != _path(self.base):
            raise ConfigError(
                where,
                f"'{ref}': a LoRA on a model other than the base_model ({self.base}) is not supported: "
                "merge it into its model first (peft's merge_and_unload) and name that folder",
            )
        return adapter

    def slices(self) -> tuple[str, list[dict], list[dict]]:
        """`slices:` -> (base path, experts, native slices)."""
        entries = self.raw["slices"]
        if not isinstance(entries, list) or not entries:
            raise ConfigError("slices", "expected a list of slices")
        slices, first = [], None
        for s, entry in enumerate(entries):
            where = f"slices[{s}]"
            entry = _only(entry, ("sources", "parameters"), where)
            sources = entry.get("sources")
            if not isinstance(sources, list) or not sources:
                raise ConfigError(f"{where}.sources", "expected a list of sources ({model, layer_range})")
            if self.ours == "passthrough" and len(sources) != 1:
                raise ConfigError(
                    f"{where}.sources", f"passthrough takes one source per slice, got {len(sources)}"
                )
            native_slice = {
                k: _numbers(v) for k, v in _mapping(entry.get("parameters"), f"{where}.parameters").items()
            }
            native_slice = {k: v for k, v in native_slice.items() if k not in NO_EFFECT}
            self.renames[where] = f"{where}.parameters"
            self.renames[f"{where}.sources"] = f"{where}.sources"
            native_sources, refs = [], []
            for j, source in enumerate(sources):
                at = f"{where}.sources[{j}]"
                source = _only(source, ("model", "layer_range", "parameters"), at)
                ref = _reference(source.get("model"), f"{at}.model")
                refs.append(ref)
                first = first or ref
                for key in ("model", "layer_range"):
                    self.renames[f"{at}.{key}"] = f"{at}.{key}"
                self.renames[at] = f"{at}.parameters"
                own, for_slice = self.per_input(
                    source.get("parameters"), f"{at}.parameters", len(sources) == 1
                )
                for key, value in for_slice.items():  # the source's setting first, then the slice's
                    native_slice[key] = _before(value, native_slice.get(key))
                if self.uses_base and ref == self.base:
                    if own:
                        log.warning(
                            "%s.parameters: mergekit reads no parameters of the base model; ignored", at
                        )
                    model, own = "base", {}
                else:
                    model = self.expert(ref, f"{at}.model")
                native_sources.append({"model": model, "layer_range": source.get("layer_range"), **own})
            if self.uses_base and self.base not in refs:
                raise ConfigError(
                    f"{where}.sources", f"mergekit's {self.theirs} needs the base_model among the sources"
                )
            slices.append({"sources": native_sources, **native_slice})
        experts = [{"name": name, "path": _path(ref)} for ref, name in self.names.items()]
        return _path(self.base if self.base is not None else first), experts, slices

    def tokenizer(self) -> str | None:
        value = self.raw.get("tokenizer_source")
        if value is None or value == "base":
            return value
        if value == "union":
            raise ConfigError(
                "tokenizer_source",
                "union (a vocabulary built from every model's) is not supported: use base or a model",
            )
        ref = _reference(value, "tokenizer_source")
        if ref == self.base:
            return "base"
        if ref not in self.names:
            raise ConfigError(
                "tokenizer_source", f"'{ref}' is neither base, the base_model nor one of the models"
            )
        return self.names[ref]


def _before(first: Any, then: Any) -> Any:
    """One setting giving `first`'s value where it gives one, else `then`'s (mergekit's precedence)."""
    if then is None:
        return first

    def conditions(setting: Any) -> list:
        if isinstance(setting, Mapping):
            return [setting]
        if isinstance(setting, list) and setting and isinstance(setting[0], Mapping):
            return list(setting)
        return [{"value": setting}]

    return conditions(first) + conditions(then)


def _dtype(value: Any) -> Any:
    """mergekit's dtype names may carry a "torch." prefix."""
    return value.removeprefix("torch.") if isinstance(value, str) else value


def to_native(raw: Mapping[str, Any]) -> tuple[dict, Callable[[str], str]]:
    """A mergekit config as a supermerge config (see the module docstring), without `output`.

    Returns:
        the native YAML mapping (absolute paths), and a function naming a field of it as the
        mergekit config's field (for errors the native schema finds).
    Raises:
        ConfigError: a field this reader does not support or know, naming it.
    """
    for key in raw:
        if key in UNSUPPORTED:
            raise ConfigError(key, UNSUPPORTED[key])
        if key not in FIELDS:
            raise ConfigError(key, f"unknown field (mergekit fields supported: {', '.join(FIELDS)})")
    if ("models" in raw) == ("slices" in raw):
        raise ConfigError("models", "give either models or slices")
    reader = _Reader(raw)
    doc: dict[str, Any] = {}
    if "models" in raw:
        doc["base"], doc["experts"] = reader.models()
    else:
        doc["base"], doc["experts"], doc["slices"] = reader.slices()
    if not doc["experts"]:
        raise ConfigError("models", "no model to merge besides the base_model")
    doc["method"] = reader.method()
    tokenizer = reader.tokenizer()
    if tokenizer is not None:
        doc["tokenizer"] = tokenizer
    compute, out = _dtype(raw.get("dtype")), _dtype(raw.get("out_dtype"))
    if compute is not None:
        doc["compute_dtype"] = compute
    if out or compute:
        doc["dtype"] = out or compute
    reader.renames |= {
        "base": "base_model",
        "compute_dtype": "dtype",
        "dtype": "out_dtype" if out else "dtype",
        "tokenizer": "tokenizer_source",
        "experts": "models" if "models" in raw else "slices",
    }
    return doc, _translator(reader.renames)


def _translator(renames: Mapping[str, str]) -> Callable[[str], str]:
    ordered = sorted(renames, key=len, reverse=True)

    def translate(field: str) -> str:
        for native in ordered:
            if field == native or field.startswith((native + ".", native + "[")):
                return renames[native] + field[len(native) :]
        return field

    return translate
