"""What every merge writes besides its own files: the tensors in the base's order, the experts'
heads, the base's config and tokenizer, the record of the run (supermerge_merge.json), the
complete config that makes the output again (supermerge_config.yaml) and a model card
(README.md); and the summary line it prints."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save as safetensors_bytes
from tqdm import tqdm

from supermerge import __version__
from supermerge.io.checkpoint import Checkpoint
from supermerge.io.memory import human_bytes
from supermerge.io.writer import Planned, ShardedWriter
from supermerge.taskvectors.source import TaskVectorSource

CONFIG_NAME = "supermerge_config.yaml"
# a model folder in the Hugging Face cache: .../models--<owner>--<name>/snapshots/<revision>
HUB_CACHE_FOLDER = re.compile(r"^models--([\w.-]+?)--([\w.-]+)$")


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


def output_layout(source: TaskVectorSource, dtype: torch.dtype | None) -> list[Planned]:
    """The tensors `write_tensors` writes, in order: every base tensor, the merged ones in
    `dtype` (None: the base's), as (name, shape, dtype)."""
    mergeable = set(source.names)
    return [
        (name, info.shape, dtype if dtype is not None and name in mergeable else info.dtype)
        for name, info in source.base.infos.items()
    ]


def output_bytes(source: TaskVectorSource, dtype: torch.dtype | None) -> int:
    """Bytes of the tensors `write_tensors` writes."""
    return sum(math.prod(shape) * kind.itemsize for _, shape, kind in output_layout(source, dtype))


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
    for name, _, out_dtype in tqdm(
        output_layout(source, dtype), desc="tensors", unit="tensor", disable=not progress
    ):
        if name in mergeable:
            writer.add(name, merged_tensor(name).to(out_dtype))
        else:
            writer.add(name, source.base.read(name))


class _ConfigDumper(yaml.SafeDumper):
    """YAML with lists of scalars in flow style ([0, 0.5, 1]), the rest in block style."""


def _list(dumper: yaml.SafeDumper, data: list) -> yaml.SequenceNode:
    flow = all(isinstance(x, bool | int | float | str) or x is None for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_ConfigDumper.add_representer(list, _list)


def config_yaml(doc: Mapping[str, Any]) -> str:
    """A config (MergeConfig.record() or a converted one) as YAML text, keys in their order."""
    return yaml.dump(dict(doc), Dumper=_ConfigDumper, sort_keys=False)


def write_extras(
    writer: ShardedWriter,
    source: TaskVectorSource,
    record: dict,
    carried_from: Checkpoint | None = None,
    model_config: Mapping[str, Any] | None = None,
) -> None:
    """Heads of every expert (heads/<task>.safetensors), config.json and the tokenizer files,
    `record` as supermerge_merge.json, its config as supermerge_config.yaml, and README.md.

    Args:
        writer: the output being written.
        source: the merge's inputs (the experts' heads; the base's files by default).
        record: {"config": MergeConfig.record(), "summary": ...}.
        carried_from: whose tokenizer and generation files the output carries (default: the
            base's).
        model_config: the output's config.json (default: the base's, as it is).
    """
    for expert in source.experts:
        heads = source.heads(expert)
        if heads:
            data = safetensors_bytes({n: t.contiguous() for n, t in heads.items()})
            writer.write_file(f"heads/{expert.name}.safetensors", data)
    for path in source.base.carried:
        if path.name == "config.json":
            if model_config is None:
                writer.copy_file(path)
            else:
                writer.write_file(path.name, json.dumps(model_config, indent=2).encode())
    for path in (carried_from or source.base).carried:
        if path.name != "config.json":
            writer.copy_file(path)
    writer.write_file("supermerge_merge.json", json.dumps(record, indent=2).encode())
    config = config_yaml(record["config"])
    writer.write_file(CONFIG_NAME, config.encode())
    writer.write_file(
        "README.md", model_card(record["config"], config, Path(record["config"]["output"]).name).encode()
    )


def _hub_id(path: str) -> str | None:
    """The Hugging Face model id of a folder in the hub's cache (owner/name), else None."""
    for part in Path(path).parts:
        match = HUB_CACHE_FOLDER.match(part)
        if match:
            return f"{match.group(1)}/{match.group(2)}"
    return None


def _values(params: Mapping[str, Any]) -> str:
    """Parameters as `key: value, ...` (settings in their YAML flow form)."""
    flow = {
        k: yaml.safe_dump(v, default_flow_style=True, width=2**31).strip().removesuffix("...").strip()
        for k, v in params.items()
    }
    return ", ".join(f"{k}: {v}" for k, v in flow.items()) or "defaults"


def model_card(config: Mapping[str, Any], config_yaml: str, name: str) -> str:
    """The output's README.md: the Hugging Face metadata block (base_model: the hub ids of the
    models where their folders say them; tags; library_name), the method and its parameters,
    the experts and their sources, the layer plan, the supermerge version and the config."""
    method = dict(config["method"])
    method_name = method.pop("name")
    experts = config["experts"]
    hub = [h for h in (_hub_id(p) for p in [config["base"], *(e["path"] for e in experts)]) if h]
    metadata = yaml.safe_dump(
        {
            "base_model": list(dict.fromkeys(hub)),
            "tags": ["merge", "supermerge"],
            "library_name": "transformers",
        },
        sort_keys=False,
    )
    carrier = any(e["path"] == config["base"] for e in experts)
    own = [{k: v for k, v in e.items() if k not in ("name", "path", "data")} for e in experts]
    rows = [f"| {e['name']} | `{e['path']}` | {_values(p)} |" for e, p in zip(experts, own, strict=True)]
    lines = [
        "---",
        metadata.rstrip(),
        "---",
        f"# {name}",
        "",
        f"A merge of pre-trained models made with supermerge {__version__}.",
        "",
        "## Merge details",
        "",
        f"Method: `{method_name}` ({_values(method)}).",
        "",
        f"Base model: `{config['base']}`"
        + (" (it carries the tensors; the experts are merged)." if carrier else "."),
        "",
        "| expert | source | parameters |",
        "|---|---|---|",
        *rows,
    ]
    if config.get("slices"):
        lines += ["", "Layers (each output layer merges one layer of every source of its slice):", ""]
        lines += ["| output layers | sources |", "|---|---|"]
        start = 0
        for piece in config["slices"]:
            first, end = piece["sources"][0]["layer_range"]
            sources = ", ".join(
                f"{x['model']} [{x['layer_range'][0]}, {x['layer_range'][1]})" for x in piece["sources"]
            )
            lines.append(f"| [{start}, {start + end - first}) | {sources} |")
            start += end - first
    low = config.get("compute_dtype") not in (None, "float32")
    arithmetic = f"mergekit's in {config['compute_dtype']} (inputs rounded to it)" if low else "float32"
    lines += [
        "",
        f"Arithmetic: {arithmetic}; output dtype: {config.get('dtype') or 'as the base model'}.",
        "",
        "## Configuration",
        "",
        f"The complete configuration ({CONFIG_NAME}; `supermerge merge {CONFIG_NAME} OUT_PATH` makes",
        "this model again):",
        "",
        "```yaml",
        config_yaml.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
