"""PEFT adapters (LoRA, IA3) as experts: the model an adapter makes with its base, one tensor at a time.

An adapter folder holds adapter_config.json and adapter_model.safetensors (or .bin). What it adds
to base tensor j (PEFT's merge, `merge_and_unload`):
- LoRA on a linear layer: tau(j) = s B A, B [out, r], A [r, in], s = alpha / r (rsLoRA:
  alpha / sqrt(r)); alpha is `lora_alpha` or the `alpha_pattern` entry matching the module, r is
  A's row count (so `rank_pattern` needs no reading); transposed with `fan_in_fan_out` (GPT-2's
  Conv1D). On an embedding: tau = s (B A)^T from lora_embedding_A [r, vocab] and _B [dim, r].
  With `lora_bias`, the bias gains s b_B.
- IA3: the layer's weight is scaled by l: tau(j) = W0(j) * (l - 1), l [out, 1] (rows), or [1, in]
  for `feedforward_modules` (columns); the bias of a non-feedforward layer scales with it.
- Whole tensors an adapter saves (biases with `bias: all | lora_only`, `modules_to_save`): they
  replace the base's, tau = saved - base.

`AdapterCheckpoint` reads like a Checkpoint of that dense expert (`read` = base + tau, in the
base's dtype, as merge_and_unload leaves it), and gives the task vector itself (`task_vector`,
fp32, never rounded through the dense model) to a TaskVectorSource. Nothing dense is held beyond
the tensor asked for.

Refused, with the file and the field or tensor named: adapter types other than LoRA and IA3,
DoRA and the other LoRA variants that change the merge, a target module with no weight in the
base, a factor whose shape does not fit its base tensor, an adapter made for another
architecture (`auto_mapping.base_model_class` against the base's config.json).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from supermerge.errors import InputError
from supermerge.io.checkpoint import STATE_DICT_SUFFIXES, Checkpoint, TensorInfo, TensorSet
from supermerge.io.digest import files_digest

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", *(f"adapter_model{s}" for s in STATE_DICT_SUFFIXES))
PREFIX = "base_model.model."  # PEFT's names: base_model.model.<the base model's module path>
# LoRA fields that change what merging means; refused when set
UNSUPPORTED_LORA = (
    "use_dora",
    "use_qalora",
    "use_bdlora",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
)
LORA_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "B bias",
    ".lora_embedding_A": "embedding A",
    ".lora_embedding_B": "embedding B",
}


def is_adapter(path: Path) -> bool:
    """True for a PEFT adapter folder (it holds adapter_config.json)."""
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def adapter_config(folder: Path) -> dict[str, Any]:
    """The adapter folder's adapter_config.json as a dict.

    Raises:
        InputError: naming the file, when it is not a JSON object.
    """
    file = folder / CONFIG_FILE
    try:
        settings = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(file, f"not valid JSON ({e})") from None
    if not isinstance(settings, dict):
        raise InputError(file, "not a JSON object")
    return settings


def adapter_base(folder: Path) -> Path:
    """The base model folder an adapter names (`base_model_name_or_path`), as PEFT loads it.

    Raises:
        InputError: the field is missing or does not name a model folder on this machine.
    """
    named = adapter_config(folder).get("base_model_name_or_path")
    base = Path(named) if isinstance(named, str) and named else None
    if base is None or not (base / "config.json").is_file():
        raise InputError(
            folder / CONFIG_FILE,
            f"base_model_name_or_path {named!r} is not a model folder here: give the adapter's base",
        )
    return base


def matches(key: str, module: str) -> bool:
    """Whether PEFT's `key` (an alpha_pattern key, a feedforward_modules entry) names the module
    at path `module`: a regex matching its last components."""
    return re.match(rf"(.*\.)?({key})$", module) is not None


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """The value of the first key of `patterns` (PEFT's rank_pattern / alpha_pattern) that matches
    the module; `default` when none does."""
    return next((value for key, value in patterns.items() if matches(key, module)), default)


@dataclass(frozen=True)
class Delta:
    """What an adapter adds to one base tensor.

    Attributes:
        kind: "lora", "lora_embedding", "lora_bias", "ia3", "ia3_bias" or "whole".
        tensors: the adapter tensors it is made from (B then A for LoRA, l for IA3, the saved
            tensor for "whole").
        scale: s of LoRA (1 otherwise).
        transpose: LoRA with fan_in_fan_out.
        feedforward: IA3 scaling the input dimension (columns) rather than the output (rows).
    """

    kind: str
    tensors: tuple[str, ...]
    scale: float = 1.0
    transpose: bool = False
    feedforward: bool = False


class AdapterCheckpoint(TensorSet):
    """A PEFT adapter on `base`, read as the dense expert it makes (see the module docstring).

    Args:
        path: the adapter folder.
        base: the base checkpoint the adapter was trained on.
    Attributes:
        deltas: base tensor name -> its Deltas (one, or a LoRA update on a layer also saved
            whole), for every tensor the adapter changes.
        kind: "lora" or "ia3".
    Raises:
        InputError: naming the file and field or tensor, for any adapter it cannot merge.
    """

    def __init__(self, path: str | Path, base: Checkpoint) -> None:
        self.path = Path(path)
        self.base = base
        self.config = base.config
        self.carried: list[Path] = []
        self.settings = adapter_config(self.path)
        weights = next((self.path / n for n in WEIGHT_FILES if (self.path / n).is_file()), None)
        if weights is None:
            raise InputError(self.path, f"adapter folder without weights (expected {WEIGHT_FILES[0]})")
        self.weights = Checkpoint(weights)
        peft_type = str(self.settings.get("peft_type", "")).upper()
        self.kind = {"LORA": "lora", "IA3": "ia3"}.get(peft_type, "")
        if not self.kind:
            raise InputError(
                self.path / CONFIG_FILE, f"peft_type {peft_type or None!r} is not supported (LORA, IA3)"
            )
        self._check_architecture()
        self.deltas = self._lora_deltas() if self.kind == "lora" else self._ia3_deltas()
        self._lora: dict[str, Delta | None] = {}
        # the dense expert's tensors: the base's names, shapes and dtypes (no file offset, so
        # nothing takes them for the base's own bytes)
        self.infos = {n: TensorInfo(n, i.shape, i.dtype, self.weights.path) for n, i in base.infos.items()}

    # reading the adapter
    def _check_architecture(self) -> None:
        wanted = (self.settings.get("auto_mapping") or {}).get("base_model_class")
        have = (self.base.config or {}).get("architectures") or []
        if wanted and have and wanted not in have:
            raise InputError(
                self.path / CONFIG_FILE,
                f"auto_mapping.base_model_class is {wanted!r}, the base ({self.base.path}) is {have[0]!r}: "
                "the adapter was made for another architecture",
            )

    def _parts(self) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
        """(module path -> {part: adapter tensor name} for the adapter's own parts (LORA_SUFFIXES,
        or IA3's "l"), base tensor name -> adapter tensor name for the whole tensors it saves)."""
        modules: dict[str, dict[str, str]] = {}
        whole: dict[str, str] = {}
        own = LORA_SUFFIXES if self.kind == "lora" else {".ia3_l": "l"}
        for name in self.weights.names:
            if not name.startswith(PREFIX):
                raise InputError(self.weights.path, f"not a PEFT adapter tensor (no '{PREFIX}' prefix)", name)
            rest = name[len(PREFIX) :]
            suffix = next((s for s in own if rest.endswith(s)), None)
            if suffix is not None:
                modules.setdefault(rest[: -len(suffix)], {})[own[suffix]] = name
            else:  # a bias, a modules_to_save copy, a targeted embedding saved whole
                for wrapper in (".modules_to_save.default", ".original_module", ".base_layer"):
                    rest = rest.replace(wrapper, "")
                whole[rest] = name
        return modules, whole

    def _base_info(self, target: str, adapter_tensor: str) -> TensorInfo:
        info = self.base.infos.get(target)
        if info is None:
            raise InputError(
                self.weights.path,
                f"targets '{target}', which the base ({self.base.path}) does not have",
                adapter_tensor,
            )
        return info

    def _check_shape(self, target: str, shape: tuple[int, ...], adapter_tensor: str) -> None:
        want = self._base_info(target, adapter_tensor).shape
        if tuple(shape) != tuple(want):
            raise InputError(
                self.weights.path,
                f"makes a {list(shape)} update for '{target}', which is {list(want)} in the base",
                adapter_tensor,
            )

    def _lora_deltas(self) -> dict[str, tuple[Delta, ...]]:
        for field in UNSUPPORTED_LORA:
            if self.settings.get(field):
                raise InputError(
                    self.path / CONFIG_FILE, f"{field} is set: this LoRA variant is not supported"
                )
        alpha = float(self.settings.get("lora_alpha", 8))
        patterns = self.settings.get("alpha_pattern") or {}
        rslora = bool(self.settings.get("use_rslora"))
        fan_in_fan_out = bool(self.settings.get("fan_in_fan_out"))
        modules, whole = self._parts()
        deltas = self._whole(whole)
        for module, parts in modules.items():
            embedding = "embedding A" in parts or "embedding B" in parts
            a_key, b_key = ("embedding A", "embedding B") if embedding else ("A", "B")
            if a_key not in parts or b_key not in parts:
                missing, present = (a_key, parts[b_key]) if a_key not in parts else (b_key, parts[a_key])
                raise InputError(self.weights.path, f"LoRA factor without its {missing} factor", present)
            a, b = self.weights.infos[parts[a_key]], self.weights.infos[parts[b_key]]
            if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
                raise InputError(
                    self.weights.path,
                    f"LoRA factors of shapes {list(b.shape)} x {list(a.shape)} do not chain",
                    a.name,
                )
            rank = a.shape[0]
            module_alpha = float(pattern_value(patterns, module, alpha))
            scale = module_alpha / (math.sqrt(rank) if rslora else rank)
            target = f"{module}.weight"
            shape = (b.shape[0], a.shape[1])
            transpose = embedding or fan_in_fan_out
            self._check_shape(target, shape[::-1] if transpose else shape, a.name)
            kind = "lora_embedding" if embedding else "lora"
            deltas.setdefault(target, []).append(Delta(kind, (b.name, a.name), scale, transpose))
            if "B bias" in parts:
                bias = self.weights.infos[parts["B bias"]]
                self._check_shape(f"{module}.bias", bias.shape, bias.name)
                deltas.setdefault(f"{module}.bias", []).append(Delta("lora_bias", (bias.name,), scale))
        return {target: tuple(parts) for target, parts in deltas.items()}

    def _ia3_deltas(self) -> dict[str, tuple[Delta, ...]]:
        feedforward = self.settings.get("feedforward_modules") or []
        if isinstance(feedforward, str):
            feedforward = [feedforward]
        fan_in_fan_out = bool(self.settings.get("fan_in_fan_out"))
        modules, whole = self._parts()
        deltas = self._whole(whole)
        for module, parts in modules.items():
            ff = any(matches(key, module) for key in feedforward)
            target = f"{module}.weight"
            l_info = self.weights.infos[parts["l"]]
            out, inp = self._base_info(target, l_info.name).shape[:2]
            scaled = inp if ff != fan_in_fan_out else out
            if math.prod(l_info.shape) != scaled:
                raise InputError(
                    self.weights.path,
                    f"IA3 vector of {math.prod(l_info.shape)} entries for '{target}', whose "
                    f"{'input' if ff else 'output'} dimension is {scaled}",
                    l_info.name,
                )
            deltas.setdefault(target, []).append(
                Delta("ia3", (l_info.name,), feedforward=ff != fan_in_fan_out)
            )
            if not ff and f"{module}.bias" in self.base.infos:
                deltas.setdefault(f"{module}.bias", []).append(Delta("ia3_bias", (l_info.name,)))
        return {target: tuple(parts) for target, parts in deltas.items()}

    def _whole(self, whole: Mapping[str, str]) -> dict[str, list[Delta]]:
        for target, name in whole.items():
            self._check_shape(target, self.weights.infos[name].shape, name)
        return {target: [Delta("whole", (name,))] for target, name in whole.items()}

    # what the adapter adds
    def task_vector(self, name: str) -> torch.Tensor:
        """tau of base tensor `name`, fp32, shaped like it (zeros where the adapter changes
        nothing): the sum of its deltas (a LoRA update on a layer the adapter also saved whole)."""
        info = self.base.infos[name]
        tau = torch.zeros(info.shape, dtype=torch.float32)
        base = None
        for delta in self.deltas.get(name, ()):
            parts = [self.weights.read(t).float() for t in delta.tensors]
            if delta.kind in ("lora", "lora_embedding"):
                update = (parts[0] @ parts[1]).mul_(delta.scale)
                tau += update.t() if delta.transpose else update
            elif delta.kind == "lora_bias":
                tau += parts[0].mul_(delta.scale)
            else:  # made with the base's values
                base = self.base.read(name).float() if base is None else base
                if delta.kind == "whole":
                    tau += parts[0] - base
                else:  # IA3: the weight (or bias) scaled by l
                    scale = parts[0].reshape(-1)
                    if delta.kind == "ia3":
                        scale = scale.reshape((1, -1) if delta.feedforward else (-1, 1))
                    tau += base * (scale - 1)
        return tau

    def lora_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(B [m, r], A [r, n], s) with tau(name) = s B A, as stored, when the adapter's whole
        update of base tensor `name` is one LoRA product; None otherwise."""
        lora = self._only_lora(name)
        if lora is None:
            return None
        b, a = (self.weights.read(t) for t in lora.tensors)
        return (a.t(), b.t(), lora.scale) if lora.transpose else (b, a, lora.scale)

    def lora_rank(self, name: str) -> int | None:
        """r of `lora_factors(name)` from the adapter's header (None where that is None)."""
        lora = self._only_lora(name)
        return None if lora is None else self.weights.infos[lora.tensors[1]].shape[0]

    def _only_lora(self, name: str) -> Delta | None:
        """The LoRA Delta of base tensor `name` when it is the adapter's whole update of it
        (found once per tensor)."""
        if name not in self._lora:
            deltas = self.deltas.get(name, ())
            lora = [d for d in deltas if d.kind in ("lora", "lora_embedding")]
            # PEFT saves a targeted embedding layer whole as well: as the base has it, it adds nothing
            same = [d for d in deltas if d.kind == "whole" and self._as_in_base(d.tensors[0], name)]
            self._lora[name] = lora[0] if len(lora) == 1 and len(lora) + len(same) == len(deltas) else None
        return self._lora[name]

    def ia3_scaling(self, name: str) -> tuple[torch.Tensor, int] | None:
        """(l - 1, axis) with tau(name) = W0 * (l - 1) broadcast along `axis` of the [m, n] view of
        base tensor `name` (0: one factor per row, 1: per column), when the adapter's whole update
        of it is one IA3 scaling; None otherwise."""
        deltas = self.deltas.get(name, ())
        if len(deltas) != 1 or deltas[0].kind not in ("ia3", "ia3_bias"):
            return None
        vector = self.weights.read(deltas[0].tensors[0]).float().reshape(-1) - 1
        return vector, 1 if deltas[0].feedforward else 0

    def _as_in_base(self, saved: str, name: str) -> bool:
        return torch.equal(self.weights.read(saved), self.base.read(name).to(self.weights.infos[saved].dtype))

    def adapter_bytes(self, name: str) -> int:
        """Bytes of the adapter's own tensors that make tensor `name`'s task vector."""
        return sum(self.weights.infos[t].nbytes for d in self.deltas.get(name, ()) for t in d.tensors)

    # read as the dense expert
    def read(self, name: str) -> torch.Tensor:
        """The dense expert's tensor `name`: base + tau, in the base's dtype."""
        base = self.base.read(name)
        if name not in self.deltas:
            return base
        return (base.float() + self.task_vector(name)).to(base.dtype)

    def read_range(self, name: str, lo: int, hi: int) -> torch.Tensor:
        return self.read(name).reshape(-1)[lo:hi]

    def read_into(self, name: str, out: torch.Tensor, staging: torch.Tensor) -> torch.Tensor:
        return out.copy_(self.read(name).reshape(out.shape))

    def content_digest(self) -> str:
        """A key that changes with the base's weights or the adapter's files."""
        return files_digest([self.weights.path, self.path / CONFIG_FILE]) + self.base.content_digest()


def open_expert(path: str | Path, base: Checkpoint) -> Checkpoint | AdapterCheckpoint:
    """An expert's checkpoint: a PEFT adapter folder on `base`, or a model as it is."""
    path = Path(path)
    return AdapterCheckpoint(path, base) if is_adapter(path) else Checkpoint(path)
