"""Layer-by-layer gathering (distributed.gather: layer) on a real Hugging Face BERT skeleton:
units, and 2 gloo ranks whose gathered forward, regathered backward and reduced gradient match a
float64 reference computed with the whole body in one process."""

from __future__ import annotations

import math
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.func import functional_call

from supermerge.distributed.comm import Comm
from supermerge.distributed.layer_gather import GatheredTensors, LayerGather, Owners, find_units
from supermerge.errors import SupermergeError
from tests.jobs import free_port

WORLD = 2
JOIN_TIMEOUT_S = 120


def bert(meta: bool) -> nn.Module:
    """A 2-layer BERT (real transformers code), in eval mode; on the meta device if `meta`."""
    from accelerate import init_empty_weights
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40, attn_implementation="eager",
    )  # fmt: skip
    if meta:
        with init_empty_weights():
            return BertModel(config).eval()
    return BertModel(config).eval()


def body_of(module: nn.Module, seed: int = 0) -> tuple[list[str], list[tuple[int, ...]], torch.Tensor]:
    """Names and shapes of every parameter, and a fresh random merged body [N] (fp32, not zero)."""
    names = [n for n, _ in module.named_parameters()]
    shapes = [tuple(p.shape) for _, p in module.named_parameters()]
    gen = torch.Generator().manual_seed(seed)
    n = sum(math.prod(s) for s in shapes)
    return names, shapes, 0.2 * torch.randn(n, generator=gen) + 0.01


def batch(rank: int) -> dict[str, torch.Tensor]:
    """A rank's batch: 3 sequences of 9 tokens, the last one padded after 5."""
    gen = torch.Generator().manual_seed(100 + rank)
    mask = torch.ones(3, 9, dtype=torch.int64)
    mask[-1, 5:] = 0
    return {"input_ids": torch.randint(0, 300, (3, 9), generator=gen), "attention_mask": mask}


def probe(seed: int = 7) -> torch.Tensor:
    """Fixed random weights [32] that turn the last hidden state into a scalar loss."""
    return torch.randn(32, generator=torch.Generator().manual_seed(seed))


def split(flat: torch.Tensor, names: list[str], shapes: list[tuple[int, ...]]) -> dict[str, torch.Tensor]:
    parts = torch.split(flat, [math.prod(s) for s in shapes])
    return {n: t.view(s) for n, t, s in zip(names, parts, shapes, strict=True)}


def test_units_are_the_blocks_and_the_modules_holding_tensors_each_tensor_once() -> None:
    module = bert(meta=True)
    names, shapes, _ = body_of(module)
    units = find_units(module, names, shapes)
    labels = [u.label for u in units]
    assert "encoder.layer.0" in labels and "encoder.layer.1" in labels
    assert {"embeddings.word_embeddings", "embeddings.LayerNorm", "pooler.dense"} <= set(labels)
    assert sorted(t for u in units for t in u.tensors) == list(range(len(names)))
    layer0 = units[labels.index("encoder.layer.0")]
    assert layer0.numel == sum(math.prod(shapes[t]) for t in layer0.tensors)
    assert len(layer0.runs) == 1  # a block's tensors are one stretch of the body (sorted names)


def test_units_refuse_a_merged_tensor_that_no_module_holds() -> None:
    module = bert(meta=True)
    names, shapes, _ = body_of(module)
    with pytest.raises(SupermergeError, match=r"'extra\.weight'.*use distributed.gather: body"):
        find_units(module, [*names, "extra.weight"], [*shapes, (4,)])


def _worker(rank: int, port: int, folder: str) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    comm = Comm(dist.group.WORLD, list(range(WORLD)), rank)
    module = bert(meta=True)
    names, shapes, flat = body_of(module)
    piece_size = math.ceil(flat.numel() / WORLD)
    padded = torch.cat([flat, torch.zeros(WORLD * piece_size - flat.numel())])
    piece = padded[rank * piece_size : (rank + 1) * piece_size].clone()
    owners = Owners(comm, piece_size, piece, torch.zeros(piece_size))
    units = find_units(module, names, shapes)
    gather = LayerGather(units, owners, torch.float32)
    with gather.installed():
        hidden = functional_call(module, {}, args=(), kwargs=batch(rank)).last_hidden_state
        assert not gather.live, "every unit is freed once its module has run"
        (hidden @ probe()).sum().backward()
    forward_and_backward = dict(comm.stats.bytes_by_tag)
    # the same pass again, prefetching along the first pass's gathers; then along a schedule that
    # the pass leaves after three gathers (the prefetched units it then skips are waited for)
    repeats = {}
    departing = [*gather.gathers[:3], *[gather.gathers[-1]] * 4]
    for name, schedule in (("prefetch", gather.gathers), ("departing", departing)):
        comm.stats.reset()
        again_owners = Owners(comm, piece_size, piece, torch.zeros(piece_size))
        repeat = LayerGather(units, again_owners, torch.float32, schedule, ahead=1)
        with repeat.installed():
            out = functional_call(module, {}, args=(), kwargs=batch(rank)).last_hidden_state
            (out @ probe()).sum().backward()
        repeats[name] = {
            "same": torch.equal(out, hidden) and torch.equal(again_owners.grad_piece, owners.grad_piece),
            "bytes": dict(comm.stats.bytes_by_tag), "gathers": len(repeat.gathers),
            "prefetched": repeat.prefetched, "peak": repeat.peak_bytes,
        }  # fmt: skip
    with torch.no_grad(), gather.installed():
        again = functional_call(module, {}, args=(), kwargs=batch(rank)).last_hidden_state
    assert all(p.device.type == "meta" for p in module.parameters()), "the skeleton gets its tensors back"
    gathered = GatheredTensors(names, shapes, owners, torch.float32)
    exact = all(torch.equal(gathered[n], t) for n, t in split(flat, names, shapes).items())
    torch.save(
        {
            "grad_piece": owners.grad_piece, "hidden": hidden.detach(), "again": again, "exact": exact,
            "peak": gather.peak_bytes, "bytes": forward_and_backward,
            "largest": max(u.numel for u in gather.units), "n": flat.numel(), "repeats": repeats,
        },
        Path(folder) / f"rank{rank}.pt",
    )  # fmt: skip
    dist.barrier()  # no rank leaves while another is still in a collective
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("layer_gather")
    context = mp.start_processes(
        _worker, args=(free_port(), str(folder)), nprocs=WORLD, join=False, start_method="spawn"
    )
    try:
        for _ in range(JOIN_TIMEOUT_S):
            if context.join(timeout=1):
                break
        else:
            pytest.fail(f"layer-gather ranks still running after {JOIN_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]


def float64_reference(flat: torch.Tensor, names: list[str], shapes: list[tuple[int, ...]]):
    """float64, whole body in one process: each rank's last hidden state, and the gradient of the
    summed loss of both ranks' batches w.r.t. the body [N]."""
    module = bert(meta=False).double()
    body = flat.double().requires_grad_()
    params = split(body, names, shapes)
    hidden = [
        functional_call(module, params, args=(), kwargs=batch(r)).last_hidden_state for r in range(WORLD)
    ]
    sum((h @ probe().double()).sum() for h in hidden).backward()
    return [h.detach() for h in hidden], body.grad


def test_layer_gathered_forward_and_gradient_match_the_whole_body_in_float64(two_ranks) -> None:
    names, shapes, flat = body_of(bert(meta=True))
    hidden, grad = float64_reference(flat, names, shapes)
    for rank, result in enumerate(two_ranks):
        torch.testing.assert_close(result["hidden"].double(), hidden[rank], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(result["again"].double(), hidden[rank], rtol=1e-4, atol=1e-5)
        assert result["exact"], "GatheredTensors gives each tensor exactly"
    pieces = torch.cat([r["grad_piece"] for r in two_ranks])[: flat.numel()]
    scale = grad.abs().max()
    assert float((pieces.double() - grad).abs().max() / scale) < 1e-5
    assert float(pieces.abs().max()) > 0


def test_layer_gathers_hold_one_unit_at_a_time_and_send_order_n_bytes(two_ranks) -> None:
    n, largest = two_ranks[0]["n"], two_ranks[0]["largest"]
    for result in two_ranks:
        # a unit's buffer, its gradient and the fp32 copy at most: far below the body
        assert 0 < result["peak"] <= largest * (4 + 4 + 4) < n * 4
        sent = result["bytes"]
        # forward gathers the whole body once; backward again at most once (linear layers save
        # their weights, embeddings do not); the gradient is reduced once: (R - 1) / R x N each
        body = (WORLD - 1) / WORLD * n * 4
        slack = 100  # bytes rounded down per collective
        assert body < sent["merged"] <= 2 * body + slack
        assert body / 2 < sent["grad"] <= body + slack


def test_prefetch_along_the_last_pass_changes_neither_result_nor_traffic(two_ranks) -> None:
    largest = two_ranks[0]["largest"]
    for result in two_ranks:
        prefetch, departing = result["repeats"]["prefetch"], result["repeats"]["departing"]
        assert prefetch["same"] and departing["same"], "bitwise the pass without prefetch"
        assert prefetch["bytes"] == result["bytes"], "prefetch only moves gathers earlier"
        assert prefetch["prefetched"] == prefetch["gathers"] - 1, "each gather started the next"
        assert prefetch["peak"] <= largest * (4 + 4 + 4) + largest * 4  # one more unit at most
        assert departing["prefetched"] <= 3  # nothing once the pass left the schedule
        assert departing["bytes"]["grad"] == result["bytes"]["grad"]


def test_a_forward_that_raises_gives_the_skeleton_its_tensors_back() -> None:
    module = bert(meta=True)
    names, shapes, flat = body_of(module)
    owners = Owners(Comm(None, [0], 0), flat.numel(), flat, torch.zeros(flat.numel()))
    gather = LayerGather(find_units(module, names, shapes), owners, torch.float32)
    inputs = batch(0) | {"input_ids": torch.full((3, 9), 10_000)}  # beyond the 300-word vocabulary
    with pytest.raises(IndexError), gather.installed():
        functional_call(module, {}, args=(), kwargs=inputs)
    assert all(p.device.type == "meta" for p in module.parameters())
