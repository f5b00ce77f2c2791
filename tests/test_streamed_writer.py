"""The streamed writer (a layout given up front): shards planned as the dynamic writer fills them,
each tensor written to its place by a background thread, the same files' contents, and every
way it can go wrong refused with nothing left behind."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from supermerge.errors import SupermergeError
from supermerge.io.checkpoint import Checkpoint
from supermerge.io.writer import ShardedWriter, safetensors_header


def tensors(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "embed.weight": torch.randn(50, 8, generator=gen),
        "layers.0.w": torch.randn(8, 8, generator=gen).bfloat16(),
        "layers.0.norm": torch.randn(8, generator=gen).half(),
        "position_ids": torch.arange(7),
        "flag": torch.tensor([True, False]),
        "head.weight": torch.randn(3, 8, generator=gen),
    }


def layout(state: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(n, tuple(t.shape), t.dtype) for n, t in state.items()]


@pytest.mark.parametrize(
    "shard_bytes", [64, 1000, 1 << 20], ids=["shard_per_tensor", "some_shards", "one_file"]
)
def test_streamed_shards_hold_what_the_dynamic_writer_writes(
    tmp_path: Path, gen: torch.Generator, shard_bytes: int
) -> None:
    state = tensors(gen)
    for out, plan in ((tmp_path / "dynamic", None), (tmp_path / "streamed", layout(state))):
        with ShardedWriter(out, shard_bytes, layout=plan) as writer:
            for name, tensor in state.items():
                writer.add(name, tensor)
            writer.commit()
    dynamic, streamed = tmp_path / "dynamic", tmp_path / "streamed"
    assert sorted(p.name for p in dynamic.iterdir()) == sorted(p.name for p in streamed.iterdir())
    for file in dynamic.glob("*.safetensors"):
        ours, theirs = load_file(streamed / file.name), load_file(file)
        assert list(ours) == list(theirs) or sorted(ours) == sorted(theirs)
        assert all(torch.equal(ours[n], theirs[n]) and ours[n].dtype == theirs[n].dtype for n in theirs)
    if (dynamic / "model.safetensors.index.json").is_file():
        index = json.loads((streamed / "model.safetensors.index.json").read_text())
        assert index == json.loads((dynamic / "model.safetensors.index.json").read_text())
    Checkpoint(streamed)  # our strict reader accepts the files (header padding, offsets)


def test_a_header_is_padded_to_eight_bytes_with_its_length_first() -> None:
    header = safetensors_header([("w", (2, 3), torch.float32)])
    length = int.from_bytes(header[:8], "little")
    assert len(header) == 8 + length and length % 8 == 0
    assert json.loads(header[8:])["w"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}


@pytest.mark.parametrize(
    ("adds", "needle"),
    [
        ([("b", torch.ones(4))], "tensor 'b' [4] torch.float32 came where the layout has 'a' [16]"),
        ([("a", torch.ones(16)), ("b", torch.ones(5))], "tensor 'b' [5]"),
        ([("a", torch.ones(16))], "the output's tensor 'b' never came"),
    ],
    ids=["out_of_order", "wrong_shape", "missing"],
)
def test_a_tensor_out_of_layout_is_refused_and_nothing_is_left(tmp_path: Path, adds, needle: str) -> None:
    out = tmp_path / "merged"
    plan = [("a", (16,), torch.float32), ("b", (4,), torch.float32)]
    with (
        pytest.raises(ValueError, match=needle.replace("[", r"\[")),
        ShardedWriter(out, 64, layout=plan) as writer,
    ):
        for name, tensor in adds:
            writer.add(name, tensor)
        writer.commit()
    assert not out.exists() and [p for p in tmp_path.iterdir()] == []


def test_a_full_disk_met_by_the_writing_thread_is_one_line(monkeypatch, tmp_path: Path) -> None:
    from supermerge.io import writer as writer_module

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writer_module, "safetensors_header", no_space)
    out = tmp_path / "merged"
    plan = [("a", (16,), torch.float32), ("b", (4,), torch.float32)]
    with pytest.raises(SupermergeError) as info, ShardedWriter(out, 64, layout=plan) as writer:
        writer.add("a", torch.ones(16))
        writer.add("b", torch.ones(4))
        writer.commit()
    assert str(info.value).startswith(f"{out}: no space left on device") and "\n" not in str(info.value)
    assert not out.exists() and [p for p in tmp_path.iterdir()] == []
