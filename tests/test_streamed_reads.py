"""The streaming merge's reads: reused buffers (io.memory.Scratch), tensors read piece by piece
into them (Checkpoint.read_into), and task vectors made there equal to freshly made ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from supermerge.io.checkpoint import Checkpoint
from supermerge.io.memory import SHRINK_FROM, Scratch
from supermerge.taskvectors.source import Expert, TaskVectorSource
from tests.conftest import write_folder


def test_a_slot_keeps_its_memory_for_the_next_tensor_and_grows_for_a_larger_one() -> None:
    scratch = Scratch()
    first = scratch.take("tau", (64, 64), torch.float32)
    again = scratch.take("tau", (32, 64), torch.float32)
    assert again.data_ptr() == first.data_ptr()
    larger = scratch.take("tau", (128, 64), torch.float32)
    assert larger.shape == (128, 64) and scratch.nbytes == 128 * 64 * 4
    assert scratch.take("other", (4,), torch.bfloat16).data_ptr() != larger.data_ptr()


def test_a_slot_shrinks_for_a_much_smaller_large_tensor_but_not_for_a_small_one() -> None:
    scratch = Scratch()
    huge = 16 * SHRINK_FROM
    scratch.take("tau", (huge,), torch.uint8)
    scratch.take("tau", (16,), torch.float32)  # a norm's weight: the slot stays
    assert scratch.nbytes == huge
    scratch.take("tau", (SHRINK_FROM,), torch.uint8)  # a layer's matrix, 16x smaller
    assert scratch.nbytes == SHRINK_FROM


def test_holds_tells_a_view_of_a_slot_from_other_memory() -> None:
    scratch = Scratch()
    view = scratch.take("base", (10, 10), torch.float32)
    assert scratch.holds(view) and scratch.holds(view[3:])
    assert not scratch.holds(view.clone())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("staging_bytes", [6, 64, 1 << 20])
def test_read_into_converts_the_tensor_piece_by_piece(
    tmp_path: Path, gen: torch.Generator, dtype: torch.dtype, staging_bytes: int
) -> None:
    state = {"w": torch.randn(37, 11, generator=gen).to(dtype), "b": torch.randn(5, generator=gen).to(dtype)}
    ckpt = Checkpoint(write_folder(tmp_path / "m", state))
    for name, tensor in state.items():
        out = torch.full(tensor.shape, float("nan"))  # poisoned: every element must be written
        ckpt.read_into(name, out, torch.empty(staging_bytes, dtype=torch.uint8))
        assert torch.equal(out, tensor.float())


def test_task_vectors_made_in_scratch_equal_fresh_ones(make_models) -> None:
    base, experts = make_models(k=3)
    fresh = TaskVectorSource(Checkpoint(base), [Expert(p.name, Checkpoint(p)) for p in experts])
    streamed = TaskVectorSource(
        Checkpoint(base), [Expert(p.name, Checkpoint(p)) for p in experts], scratch=Scratch()
    )
    for name in fresh.names:
        want = [t.clone() for t in fresh.task_vectors(name, fresh.read_base(name))]
        got = streamed.task_vectors(name, streamed.read_base(name))
        assert all(streamed.scratch.holds(t) for t in got)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
    assert streamed.bytes_read == fresh.bytes_read


def test_an_expert_that_is_the_base_is_not_read_again(make_models) -> None:
    """mergekit's linear without a base_model: the first model carries the tensors and is an
    expert; its task vector is zero without reading its tensors a second time."""
    base, experts = make_models(k=1)
    source = TaskVectorSource(
        Checkpoint(base), [Expert("base", Checkpoint(base)), Expert("e", Checkpoint(experts[0]))]
    )
    for name in source.names:
        taus = source.task_vectors(name, source.read_base(name))
        assert not taus[0].any() and taus[1].any()
    once = sum(source.base.infos[n].nbytes for n in source.names)
    assert source.bytes_read == 2 * once  # the base and the other expert, each once
