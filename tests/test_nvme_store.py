"""Task-vector shards on NVMe through DeepSpeed's async I/O op (distributed.offload: nvme).

These run where DeepSpeed's async_io op can be built (libaio and its headers: Debian
`apt-get install libaio-dev`). .ci/run installs libaio-dev, and with CI set a missing op fails
them; elsewhere they are skipped. Building the op takes about 3.5 min on 2 cores, once per
machine (cached in TORCH_EXTENSIONS_DIR).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from supermerge.distributed.plan import ShardPlan
from supermerge.distributed.stores.nvme import NvmeShardStore
from supermerge.distributed.stores.resident import ShardStore
from supermerge.io.checkpoint import Checkpoint
from supermerge.taskvectors.source import Expert, TaskVectorSource
from tests.jobs import EXTENSIONS, assert_clean_success, assert_same_merge, run_job, write_config


def _aio_missing() -> str | None:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(EXTENSIONS))
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if AsyncIOBuilder().is_compatible(verbose=False):
        return None
    return "DeepSpeed's async_io op needs libaio-dev (not installed here)"


MISSING = _aio_missing()


@pytest.fixture(autouse=True)
def async_io_op() -> None:
    """CI must test the NVMe path (its .ci/run installs libaio-dev): there a missing op fails the
    test; elsewhere it skips it."""
    if MISSING:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(MISSING)


@pytest.fixture
def source(make_models) -> TaskVectorSource:
    base, experts = make_models(k=5)
    return TaskVectorSource(Checkpoint(base), [Expert(p.name, Checkpoint(p)) for p in experts])


@pytest.mark.parametrize(("ranks", "groups", "chunk"), [(1, 1, 64), (4, 2, 300), (3, 1, 10**6)])
def test_layer_groups_read_back_from_the_drive_equal_the_resident_shard(
    source: TaskVectorSource, ranks: int, groups: int, chunk: int, tmp_path: Path
) -> None:
    numels = [source.base.infos[n].numel for n in source.names]
    tasks = [e.name for e in source.experts]
    plan = ShardPlan(
        names=list(source.names),
        numels=numels,
        tasks=tasks,
        ranks=ranks,
        task_groups=groups,
        storage_itemsize=4,
        base_itemsize=4,
        columns=5,
        offload="nvme",
        prefetch_elements=chunk,
    )
    cpu = torch.device("cpu")
    for rank in range(ranks):
        resident = ShardStore.build(source, plan, rank, torch.float32, cpu)
        store = NvmeShardStore.build(source, plan, rank, torch.float32, cpu, chunk, tmp_path)
        assert store.path.parent == tmp_path and store.offloaded_bytes >= resident.task_vector_bytes
        staged = sum(b.numel() * b.element_size() for b in store.buffers)  # blocks padded to 4 KiB
        assert 0 <= staged - plan.memory(rank)["staged layer groups (2)"] < 2 * 4096
        assert float(resident.tau_local.abs().max()) > 0
        torch.testing.assert_close(store.base_piece, resident.base_piece, rtol=0, atol=0)
        left_early = store.chunks()  # a stream abandoned with a read in flight
        next(left_early)
        left_early.close()
        for _ in range(2):  # a step streams the shard twice: forward and backward
            covered = 0
            for c in store.chunks():
                assert c.lo == covered
                torch.testing.assert_close(c.tau, resident.tau_local[:, c.lo : c.hi], rtol=0, atol=0)
                assert int(c.offsets[-1]) == c.hi - c.lo
                covered = c.hi
            assert covered == resident.n_local
        path = store.path
        del store
        assert not path.exists(), "the store's file is deleted with the store"


@pytest.mark.slow
@pytest.mark.parametrize(("launcher", "ranks", "gather"), [("none", 1, "body"), ("torchrun", 2, "layer")])
def test_task_vectors_on_nvme_give_the_same_merge(
    launcher: str, ranks: int, gather: str, toy, reference, tmp_path: Path
) -> None:
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    distributed = {"offload": "nvme", "nvme_path": str(nvme), "prefetch_elements": 100, "gather": gather}
    config = write_config(tmp_path, toy, "flat", distributed=distributed)
    result = run_job(launcher, ranks, config)
    assert_clean_success(result)
    assert_same_merge(reference["flat"], tmp_path / "flat")
    nodes = json.loads((tmp_path / "flat" / "coefficients.json").read_text())["nodes"]
    assert nodes[-1]["rank_task_vector_bytes"] == [0] * ranks, "the task vectors stay on the drive"
    assert not list(nvme.iterdir()), "every rank deleted its file"
