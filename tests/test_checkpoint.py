"""Checkpoint reading: every layout, lazily, and clear errors for broken files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from supermerge.errors import InputError
from supermerge.io import checkpoint
from supermerge.io.checkpoint import Checkpoint
from tests.conftest import random_state, write_folder


def assert_same_state(ckpt: Checkpoint, state: dict[str, torch.Tensor]) -> None:
    assert sorted(ckpt.names) == sorted(state)
    for name, tensor in state.items():
        assert ckpt.infos[name].shape == tuple(tensor.shape)
        torch.testing.assert_close(ckpt.read(name), tensor, rtol=0, atol=0)


@pytest.mark.parametrize("shards", [1, 3])
def test_reads_hf_folder_single_and_sharded(tmp_path: Path, base_state, shards: int) -> None:
    ckpt = Checkpoint(write_folder(tmp_path / "m", base_state, shards=shards))
    assert_same_state(ckpt, base_state)
    assert ckpt.config == {"model_type": "toy", "hidden_size": 16}
    assert [p.name for p in ckpt.carried] == ["config.json"]


def test_reads_plain_safetensors_file(tmp_path: Path, base_state) -> None:
    save_file(base_state, str(tmp_path / "w.safetensors"))
    assert_same_state(Checkpoint(tmp_path / "w.safetensors"), base_state)


@pytest.mark.parametrize("nested", [False, True])
def test_reads_torch_state_dict_file(tmp_path: Path, base_state, nested: bool) -> None:
    torch.save({"state_dict": base_state} if nested else base_state, tmp_path / "w.pt")
    assert_same_state(Checkpoint(tmp_path / "w.pt"), base_state)


def test_reads_bf16_and_keeps_dtype(tmp_path: Path) -> None:
    state = {n: t.to(torch.bfloat16) for n, t in random_state(3).items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    ckpt = Checkpoint(tmp_path / "w.safetensors")
    assert ckpt.read("embed.weight").dtype == torch.bfloat16
    assert_same_state(ckpt, state)


def test_read_returns_fresh_memory_not_shared_between_calls(tmp_path: Path, base_state) -> None:
    save_file(base_state, str(tmp_path / "w.safetensors"))
    ckpt = Checkpoint(tmp_path / "w.safetensors")
    a = ckpt.read("embed.weight")
    a.add_(1.0)
    torch.testing.assert_close(ckpt.read("embed.weight"), base_state["embed.weight"])


def test_truncated_safetensors_file_is_rejected_naming_the_file_and_tensor(
    tmp_path: Path, base_state
) -> None:
    path = tmp_path / "w.safetensors"
    save_file(base_state, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputError, match=r"w\.safetensors: tensor '[\w.]+': truncated"):
        Checkpoint(path)


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\x01", "no header"),
        (b"\xff" * 8 + b"{}", "header too long"),
        (b"\x04" + b"\0" * 7 + b"nope", "not JSON"),
    ],
)
def test_corrupt_safetensors_header_is_rejected(tmp_path: Path, payload: bytes, message: str) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(payload)
    with pytest.raises(InputError, match=message):
        Checkpoint(path)


def test_strict_header_checks_accept_every_tensor_kind_safetensors_writes(tmp_path: Path) -> None:
    state = {
        "scalar": torch.tensor(3.0),
        "empty": torch.zeros(0, 4),
        "mask": torch.tensor([True, False]),
        "position_ids": torch.arange(5),
        "bf16": torch.ones(3, dtype=torch.bfloat16),
        "fp8": torch.ones(3, dtype=torch.float8_e4m3fn),
    }
    save_file(state, str(tmp_path / "w.safetensors"), metadata={"format": "pt"})
    ckpt = Checkpoint(tmp_path / "w.safetensors")
    assert sorted(ckpt.names) == sorted(state)
    for name, tensor in state.items():
        assert ckpt.read(name).dtype == tensor.dtype
        assert torch.equal(ckpt.read(name).float(), tensor.float())


def test_header_over_the_format_limit_is_rejected(tmp_path: Path, base_state, monkeypatch) -> None:
    save_file(base_state, str(tmp_path / "w.safetensors"))
    monkeypatch.setattr(checkpoint, "MAX_HEADER_BYTES", 16)
    with pytest.raises(
        InputError, match=r"w\.safetensors: corrupt safetensors file \(header of \d+ bytes, over 16\)"
    ):
        Checkpoint(tmp_path / "w.safetensors")


def test_missing_path_and_folder_without_weights_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file or folder"):
        Checkpoint(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no model.safetensors"):
        Checkpoint(tmp_path / "empty")


def test_index_naming_a_tensor_missing_from_its_shard_is_rejected(tmp_path: Path, base_state) -> None:
    folder = write_folder(tmp_path / "m", base_state, shards=2)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="ghost.weight"):
        Checkpoint(folder)


def test_non_checkpoint_file_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "w.pt").write_bytes(b"not a zip")
    with pytest.raises(InputError, match=r"w\.pt: cannot load torch state_dict"):
        Checkpoint(tmp_path / "w.pt")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(InputError, match="unknown checkpoint format"):
        Checkpoint(tmp_path / "w.txt")
