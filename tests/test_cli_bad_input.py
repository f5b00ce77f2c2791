"""Every kind of bad input: one clear line naming the culprit, exit code 2, nothing written."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from supermerge.cli import main
from tests.files import tree_hashes


def run_cli(capsys, config: Path, *extra: str) -> tuple[int, str]:
    code = main(["-q", "merge", str(config), *extra])
    return code, capsys.readouterr().err.strip()


def assert_refused(
    capsys, config: Path, *needles: str, inputs: Sequence[Path] = (), beside: Sequence[str] = ()
) -> None:
    """Exit code 2, a one-line error holding every needle, nothing at the output and nothing of
    it beside it but the names in `beside`; the config and every file under `inputs` unchanged."""
    before = tree_hashes(config, *inputs)
    code, err = run_cli(capsys, config)
    assert code == 2
    assert err.startswith("supermerge: error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    out = Path(yaml.safe_load(config.read_text())["output"])
    assert not out.exists()
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")) == sorted(
        beside
    )
    assert tree_hashes(config, *inputs) == before


def test_missing_expert_folder(capsys, make_models, write_yaml, tmp_path) -> None:
    base, experts = make_models(k=2)
    assert_refused(capsys, write_yaml(base, [experts[0], tmp_path / "nowhere"]), "nowhere", "no such file")


def test_missing_config_file(capsys, tmp_path) -> None:
    code, err = run_cli(capsys, tmp_path / "absent.yaml")
    assert code == 2 and "absent.yaml: config file not found" in err


def test_expert_missing_a_tensor(capsys, make_models, write_yaml) -> None:
    base, experts = make_models(edit=lambda i, s: s.pop("layer.1.norm.weight") if i == 1 else None)
    assert_refused(capsys, write_yaml(base, experts), "expert1", "'layer.1.norm.weight'", "missing tensor")


def test_expert_with_an_unexpected_tensor(capsys, make_models, write_yaml) -> None:
    def add(i, state):
        state["extra.weight"] = torch.ones(3)

    base, experts = make_models(edit=add)
    assert_refused(capsys, write_yaml(base, experts), "expert0", "'extra.weight'", "not in base")


def test_shape_mismatch(capsys, make_models, write_yaml) -> None:
    def grow(i, state):
        if i == 2:
            state["layer.0.linear.weight"] = torch.ones(16, 17)

    base, experts = make_models(edit=grow)
    assert_refused(capsys, write_yaml(base, experts), "expert2", "'layer.0.linear.weight'", "shape mismatch")


def test_dtype_mismatch(capsys, make_models, write_yaml) -> None:
    def half(i, state):
        if i == 0:
            state["embed.weight"] = state["embed.weight"].half()

    base, experts = make_models(edit=half)
    assert_refused(capsys, write_yaml(base, experts), "expert0", "'embed.weight'", "dtype mismatch")


def test_architecture_mismatch_in_config(capsys, make_models, write_yaml) -> None:
    base, experts = make_models()
    (experts[1] / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": 32}))
    assert_refused(capsys, write_yaml(base, experts), "expert1/config.json", "'hidden_size'")


def test_truncated_safetensors(capsys, make_models, write_yaml) -> None:
    base, experts = make_models()
    weights = experts[0] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    assert_refused(capsys, write_yaml(base, experts), "expert0/model.safetensors", "truncated")


def test_corrupt_safetensors_header(capsys, make_models, write_yaml) -> None:
    base, experts = make_models()
    weights = experts[1] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:12] = b"\xff\xfe\x00!"
    weights.write_bytes(bytes(data))
    assert_refused(capsys, write_yaml(base, experts), "expert1/model.safetensors", "corrupt")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_weight(capsys, make_models, write_yaml, bad: float) -> None:
    def poison(i, state):
        if i == 2:
            state["layer.1.linear.weight"][3, 4] = bad

    base, experts = make_models(edit=poison)
    word = "NaN" if bad != bad else "Inf"
    assert_refused(capsys, write_yaml(base, experts), "expert2", "'layer.1.linear.weight'", word)


def test_nan_in_the_base(capsys, make_models, write_yaml, base_state) -> None:
    base, experts = make_models()
    base_state["embed.weight"][0, 0] = float("nan")
    save_file(base_state, str(base / "model.safetensors"))
    assert_refused(capsys, write_yaml(base, experts), "base/model.safetensors", "'embed.weight'", "NaN")


@pytest.mark.parametrize(
    "override, field",
    [
        ({"method": {"name": "slerpy"}}, "method.name"),
        ({"method": {"name": "ties", "dens1ty": 0.3}}, "method.dens1ty"),
        ({"method": {"name": "ties", "density": 1.5}}, "method.density"),
        ({"colour": "blue"}, "colour"),
        ({"dtype": "float8"}, "dtype"),
        ({"shard_size": "lots"}, "shard_size"),
        ({"device": "tpu"}, "device"),
        ({"distributed": {"task_group": 2}}, "distributed.task_group"),
        ({"distributed": {"task_groups": 0}}, "distributed.task_groups"),
        ({"distributed": {"offload": "gpu"}}, "distributed.offload"),
        ({"distributed": {"offload": "nvme"}}, "distributed.nvme_path"),
        ({"distributed": {"offload": "nvme", "nvme_path": "/no/such/folder"}}, "distributed.nvme_path"),
        ({"distributed": {"nvme_path": "."}}, "distributed.nvme_path"),
        ({"distributed": {"gather": "tensor"}}, "distributed.gather"),
        ({"distributed": {"gather": "layer", "gather_ahead": -1}}, "distributed.gather_ahead"),
        ({"distributed": {"gather_ahead": 2}}, "distributed.gather_ahead"),
        ({"distributed": {"timeout_s": -1}}, "distributed.timeout_s"),
        ({"distributed": {"prefetch_elements": 0}}, "distributed.prefetch_elements"),
    ],
)
def test_bad_yaml_fields_name_the_field(capsys, make_models, write_yaml, override, field) -> None:
    base, experts = make_models(k=2)
    assert_refused(capsys, write_yaml(base, experts, **override), f"field '{field}'", "merge.yaml")


def test_duplicate_expert_names(capsys, make_models, write_yaml) -> None:
    base, experts = make_models(k=2)
    config = write_yaml(base, experts)
    doc = yaml.safe_load(config.read_text())
    doc["experts"][1]["name"] = doc["experts"][0]["name"]
    config.write_text(yaml.safe_dump(doc))
    assert_refused(capsys, config, "experts[1].name", "duplicate")


def test_invalid_yaml_syntax(capsys, tmp_path) -> None:
    config = tmp_path / "merge.yaml"
    config.write_text("base: [unclosed\n")
    code, err = run_cli(capsys, config)
    assert code == 2 and "merge.yaml: not valid YAML" in err


def test_existing_output_is_refused_without_overwrite(capsys, make_models, write_yaml, tmp_path) -> None:
    base, experts = make_models(k=2)
    config = write_yaml(base, experts)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = run_cli(capsys, config)
    assert code == 2 and "output folder exists" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "precious"
    code, _ = run_cli(capsys, config, "--overwrite")
    assert code == 0 and not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_every_command_has_help(capsys) -> None:
    for argv in (["--help"], ["merge", "--help"], ["methods", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
        assert "usage: supermerge" in capsys.readouterr().out
