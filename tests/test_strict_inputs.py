"""Strict inputs: corrupt safetensors headers and inconsistent shard indexes are refused through
the CLI, leaving every input byte-for-byte as it was; merges that run but do nothing are warned
about."""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from supermerge.cli import main
from supermerge.taskvectors.source import TaskVectorSource, open_source
from tests.test_cli_bad_input import assert_refused

INDEX = "model.safetensors.index.json"
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    """(header, data buffer) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_safetensors(path: Path, header: str, data: bytes) -> None:
    """Write a safetensors file from its header's JSON text and its data buffer, as given."""
    encoded = header.encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def by_offset(header: dict) -> list[str]:
    """Tensor names of a header in the order of their data in the buffer."""
    return sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"])


def shift(header: dict, name: str, by: int) -> None:
    header[name]["data_offsets"] = [x + by for x in header[name]["data_offsets"]]


def shifted_by_4(header: dict, data: bytes) -> tuple[str, bytes, str]:
    """The issue's case: a tensor's offsets moved 4 bytes on, into its neighbour's data."""
    name = by_offset(header)[1]
    shift(header, name, 4)
    return json.dumps(header), data, name


def overlapping(header: dict, data: bytes) -> tuple[str, bytes, str]:
    name = by_offset(header)[1]
    shift(header, name, -4)
    return json.dumps(header), data, name


def gap(header: dict, data: bytes) -> tuple[str, bytes, str]:
    """Eight unused bytes inserted before a tensor's data, the offsets after them moved on."""
    names = by_offset(header)
    begin = header[names[2]]["data_offsets"][0]
    for name in names[2:]:
        shift(header, name, 8)
    return json.dumps(header), data[:begin] + bytes(8) + data[begin:], names[2]


def trailing_bytes(header: dict, data: bytes) -> tuple[str, bytes, str]:
    return json.dumps(header), data + bytes(8), by_offset(header)[-1]


def wrong_byte_length(header: dict, data: bytes) -> tuple[str, bytes, str]:
    name = "layer.0.linear.weight"
    header[name]["shape"] = [16, 15]
    return json.dumps(header), data, name


def unknown_dtype(header: dict, data: bytes) -> tuple[str, bytes, str]:
    header["embed.weight"]["dtype"] = "F31"
    return json.dumps(header), data, "embed.weight"


def duplicate_name(header: dict, data: bytes) -> tuple[str, bytes, str]:
    """The same tensor twice in the JSON text (json.loads would silently keep the second)."""
    name = "layer.1.norm.weight"
    return json.dumps(header)[:-1] + f", {json.dumps(name)}: {json.dumps(header[name])}}}", data, name


def out_of_bounds(header: dict, data: bytes) -> tuple[str, bytes, str]:
    """The last tensor made one element longer: its offsets end past the data buffer."""
    name = by_offset(header)[-1]
    header[name]["shape"][-1] += 1
    header[name]["data_offsets"][1] += 4
    return json.dumps(header), data, name


# (corruption, words of the error it gets)
HEADER_CORRUPTIONS = [
    (shifted_by_4, "leave a gap of 4 bytes after tensor"),
    (overlapping, "overlap tensor"),
    (gap, "leave a gap of 8 bytes after tensor"),
    (trailing_bytes, "8 trailing bytes after the last tensor"),
    (wrong_byte_length, "hold 1024 bytes, shape [16, 15] of F32 needs 960"),
    (unknown_dtype, "unknown dtype 'F31'"),
    (duplicate_name, "two entries of this name"),
    (out_of_bounds, "run past the"),
]


@pytest.mark.parametrize(
    "corrupt, words", HEADER_CORRUPTIONS, ids=[c.__name__ for c, _ in HEADER_CORRUPTIONS]
)
def test_corrupt_safetensors_header_is_refused_naming_file_and_tensor(
    capsys, make_models, write_yaml, corrupt: Callable, words: str
) -> None:
    base, experts = make_models()
    weights = experts[1] / "model.safetensors"
    header, data = read_safetensors(weights)
    text, data, tensor = corrupt(header, data)
    write_safetensors(weights, text, data)
    config = write_yaml(base, experts)
    assert_refused(capsys, config, "expert1/model.safetensors", f"'{tensor}'", words, inputs=[base, *experts])


@pytest.mark.parametrize(
    "header, words",
    [
        ('{"__metadata__": {"format": 1}}', "__metadata__ is not a str -> str mapping"),
        ("  {}", "header is not a JSON object"),
    ],
    ids=["metadata_not_str_to_str", "not_starting_with_brace"],
)
def test_malformed_safetensors_header_is_refused(
    capsys, make_models, write_yaml, header: str, words: str
) -> None:
    base, experts = make_models()
    write_safetensors(experts[0] / "model.safetensors", header, b"")
    config = write_yaml(base, experts)
    assert_refused(capsys, config, "expert0/model.safetensors", words, inputs=[base, *experts])


def test_header_length_beyond_the_file_is_refused(capsys, make_models, write_yaml) -> None:
    base, experts = make_models()
    weights = experts[2] / "model.safetensors"
    weights.write_bytes(struct.pack("<Q", 2**40) + weights.read_bytes()[8:])
    config = write_yaml(base, experts)
    assert_refused(capsys, config, "expert2/model.safetensors", "header too long", inputs=[base, *experts])


def test_tensor_in_two_shards_is_refused_naming_both_files(capsys, make_models, write_yaml) -> None:
    base, experts = make_models(shards=2)
    first, second = load_file(str(experts[1] / SHARD1)), load_file(str(experts[1] / SHARD2))
    save_file({**second, **{n: t + 1 for n, t in first.items()}}, str(experts[1] / SHARD2))
    config = write_yaml(base, experts)
    tensor = min(first)
    assert_refused(
        capsys,
        config,
        f"expert1/{SHARD2}",
        f"expert1/{SHARD1}",
        f"'{tensor}'",
        "two shards",
        inputs=[base, *experts],
    )


def edit_weight_map(folder: Path, edit: Callable[[dict], None]) -> None:
    index = json.loads((folder / INDEX).read_text())
    edit(index["weight_map"])
    (folder / INDEX).write_text(json.dumps(index))


def shard_tensor(folder: Path, shard: str) -> str:
    """The first tensor (by name) that `shard` of `folder` holds."""
    return min(load_file(str(folder / shard)))


def test_shard_tensor_missing_from_the_index_is_refused(capsys, make_models, write_yaml) -> None:
    base, experts = make_models(shards=2)
    tensor = shard_tensor(experts[0], SHARD2)
    edit_weight_map(experts[0], lambda weight_map: weight_map.pop(tensor))
    config = write_yaml(base, experts)
    assert_refused(
        capsys, config, f"expert0/{SHARD2}", f"'{tensor}'", f"not listed in {INDEX}", inputs=[base, *experts]
    )


def test_index_naming_a_missing_shard_file_is_refused(capsys, make_models, write_yaml) -> None:
    base, experts = make_models(shards=2)
    tensor = shard_tensor(experts[0], SHARD1)
    edit_weight_map(
        experts[0], lambda weight_map: weight_map.update({tensor: "model-00003-of-00002.safetensors"})
    )
    config = write_yaml(base, experts)
    assert_refused(
        capsys,
        config,
        "expert0/model-00003-of-00002.safetensors",
        f"'{tensor}'",
        "no such shard",
        inputs=[base, *experts],
    )


def test_index_placing_a_tensor_in_the_wrong_shard_is_refused(capsys, make_models, write_yaml) -> None:
    base, experts = make_models(shards=2)
    tensor = shard_tensor(experts[2], SHARD1)
    edit_weight_map(experts[2], lambda weight_map: weight_map.update({tensor: SHARD2}))
    config = write_yaml(base, experts)
    assert_refused(
        capsys,
        config,
        f"expert2/{SHARD2}",
        f"'{tensor}'",
        f"it is in {experts[2] / SHARD1}",
        inputs=[base, *experts],
    )


def test_index_naming_a_tensor_no_shard_holds_is_refused(capsys, make_models, write_yaml) -> None:
    base, experts = make_models(shards=2)
    edit_weight_map(experts[2], lambda weight_map: weight_map.update({"ghost.weight": SHARD1}))
    config = write_yaml(base, experts)
    assert_refused(
        capsys, config, f"expert2/{SHARD1}", "'ghost.weight'", "no shard holds it", inputs=[base, *experts]
    )


@pytest.mark.parametrize(
    "index, words",
    [
        ("{not json", "corrupt index (not JSON)"),
        ('{"weight_map": ["embed.weight"]}', "corrupt index (no 'weight_map' object)"),
        (
            f'{{"weight_map": {{"embed.weight": "{SHARD1}", "embed.weight": "{SHARD2}"}}}}',
            "tensor 'embed.weight': listed twice in 'weight_map'",
        ),
        ('{"weight_map": {"embed.weight": "../base/model.safetensors"}}', "not a file name in the folder"),
    ],
    ids=["not_json", "weight_map_not_an_object", "tensor_listed_twice", "shard_outside_the_folder"],
)
def test_malformed_index_is_refused(capsys, make_models, write_yaml, index: str, words: str) -> None:
    base, experts = make_models(shards=2)
    (experts[1] / INDEX).write_text(index)
    config = write_yaml(base, experts)
    assert_refused(capsys, config, f"expert1/{INDEX}", words, inputs=[base, *experts])


def read_all_task_vectors(base: Path, experts: list[Path]) -> TaskVectorSource:
    """Open base + experts and read every mergeable tensor's task vectors in full; the source."""
    source = open_source(base, [(p.name, p) for p in experts], heads=())
    for name in source.names:
        source.task_vectors(name, source.read_base(name))
    return source


def test_expert_identical_to_the_base_is_warned_about(caplog, make_models, base_state) -> None:
    base, experts = make_models(edit=lambda i, state: state.update(base_state) if i == 1 else None)
    source = read_all_task_vectors(base, experts)
    with caplog.at_level(logging.WARNING):
        source.warn_identical_experts()
    assert [r.getMessage() for r in caplog.records] == [
        f"expert 'expert1' ({experts[1]}) is identical to the base in every merged tensor: "
        "its task vector is zero and it changes nothing"
    ]


@pytest.mark.parametrize("method", ["task_arithmetic", "supermerge"])
def test_a_merge_warns_about_an_expert_identical_to_the_base(
    caplog, make_models, base_state, write_yaml, toy, tmp_path: Path, method: str
) -> None:
    if method == "supermerge":  # the toy's expert b with its body replaced by the base's
        same = tmp_path / "expert_b_as_base"
        same.mkdir()
        state = load_file(str(toy.experts["b"] / "model.safetensors"))
        body = load_file(str(toy.base / "model.safetensors"))
        save_file({n: body.get(n, t) for n, t in state.items()}, str(same / "model.safetensors"))
        experts = dict(toy.experts) | {"b": same}
        doc = {"method": {"name": "supermerge", "steps": 1, "validation_size": 8}, "heads": ["head.*"]}
        doc |= {"model": {"kind": "torch_module", "factory": "supermerge.demo.toy:make_mlp"}}
        config = write_yaml(toy.base, list(experts.values()), **doc)
        raw = yaml.safe_load(config.read_text())
        for entry, task in zip(raw["experts"], experts, strict=True):
            entry.update(name=task, data=str(toy.validation[task]))
        config.write_text(yaml.safe_dump(raw))
        culprit = f"expert 'b' ({same})"
    else:
        base, paths = make_models(edit=lambda i, state: state.update(base_state) if i == 1 else None)
        config, culprit = write_yaml(base, paths), f"expert 'expert1' ({paths[1]})"
    with caplog.at_level(logging.WARNING):
        assert main(["-q", "merge", str(config)]) == 0
    assert [r.getMessage() for r in caplog.records if "identical to the base" in r.getMessage()] == [
        f"{culprit} is identical to the base in every merged tensor: its task vector is zero and it "
        "changes nothing"
    ]


@pytest.mark.parametrize("read", ["first half of each tensor", "all tensors but one"])
def test_identical_expert_read_in_part_is_not_judged(caplog, make_models, base_state, read: str) -> None:
    base, experts = make_models(k=2, edit=lambda i, state: state.update(base_state))
    source = open_source(base, [(p.name, p) for p in experts], heads=())
    for name in source.names[: -1 if read == "all tensors but one" else None]:
        numel = source.base.infos[name].numel
        span = (0, numel // 2) if read == "first half of each tensor" else None
        b = source.read_base(name, span)
        for i in range(source.k):
            source.task_vector(name, b, i, span)
    with caplog.at_level(logging.WARNING):
        source.warn_identical_experts()
    assert caplog.records == []


def test_expert_without_config_json_is_warned_about(caplog, make_models, write_yaml, tmp_path) -> None:
    base, experts = make_models()
    (experts[2] / "config.json").unlink()
    with caplog.at_level(logging.WARNING):
        assert main(["-q", "merge", str(write_yaml(base, experts))]) == 0
    assert [r.getMessage() for r in caplog.records] == [
        f"architecture of expert 'expert2' ({experts[2]}) not checked against the base: it has no config.json"
    ]
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_base_without_config_json_gives_one_warning(caplog, make_models, write_yaml) -> None:
    base, experts = make_models()
    for folder in (base, experts[0]):
        (folder / "config.json").unlink()
    with caplog.at_level(logging.WARNING):
        assert main(["-q", "merge", str(write_yaml(base, experts))]) == 0
    assert [r.getMessage() for r in caplog.records] == [
        f"architectures not checked: the base ({base}) has no config.json to compare the experts' with"
    ]
