"""Executing one node of a learned merge: build its body, learn W on its tasks, write it.

A node (`supermerge.learned.tree.TreeNode`) merges its inputs (experts, or intermediate models
of the level below) with fresh coefficients trained on the validation sets of the tasks under
it. One process builds the whole task-vector store (`MergedBody`); several ranks, or an
offloaded store, build each rank's shard of it under a `ShardPlan` (`ShardedBody`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from supermerge.config import DistributedSpec, MergeConfig
from supermerge.distributed.body import ShardedBody
from supermerge.distributed.comm import Comm
from supermerge.distributed.layer_gather import find_units
from supermerge.distributed.plan import ShardPlan, row_length
from supermerge.distributed.stores.lowrank import LowRankShardStore, held_rank
from supermerge.distributed.stores.nvme import NvmeShardStore
from supermerge.distributed.stores.resident import ShardStore
from supermerge.distributed.stores.zero import ZeroShardStore
from supermerge.io.checkpoint import Checkpoint, Tensors
from supermerge.io.memory import peak_rss_bytes
from supermerge.io.output import output_bytes, write_tensors
from supermerge.io.writer import ShardedWriter
from supermerge.learned.body import Body, MergedBody
from supermerge.learned.coefficients import CoefficientLayout
from supermerge.learned.lowrank_body import LowRankBody
from supermerge.learned.task_models import TaskModel
from supermerge.learned.trainer import CoefficientTrainer, Task
from supermerge.learned.tree import TreeNode
from supermerge.methods.learned import STORAGE_DTYPES, SuperMergeParams
from supermerge.taskvectors.lowrank_store import LowRankStore
from supermerge.taskvectors.source import Expert, TaskVectorSource
from supermerge.taskvectors.store import TaskVectorStore

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class NodeRecord:
    """What one trained node of the tree (or the flat merge) learned.

    Attributes:
        node: node id ("root" for the output).
        children: merged inputs (task names at the first level, node ids above).
        leaves: tasks whose validation data trained it.
        columns: coefficient column labels.
        coefficients: tanh(W), [children][columns].
        losses: per-step mean loss per task.
        accuracy_before: validation accuracy per task at the initial W.
        accuracy_after: validation accuracy per task at the learned W.
        tracked_bytes: bytes of the store, the merged body and its gradient while training.
        seconds: wall time of the node, building the store included.
        train_seconds: wall time of the optimisation steps alone.
        ranks: ranks that trained it.
        comm_bytes_per_step: bytes one rank sent per training step, by collective tag.
        rank_task_vector_bytes: task-vector bytes each rank held on its compute device.
        rank_peak_rss: each rank's peak RSS when the node finished (process lifetime peak).
    """

    node: str
    children: list[str]
    leaves: list[str]
    columns: list[str]
    coefficients: list[list[float]]
    losses: list[dict[str, float]] = field(default_factory=list)
    accuracy_before: dict[str, float] = field(default_factory=dict)
    accuracy_after: dict[str, float] = field(default_factory=dict)
    tracked_bytes: int = 0
    seconds: float = 0.0
    train_seconds: float = 0.0
    ranks: int = 1
    comm_bytes_per_step: dict[str, int] = field(default_factory=dict)
    rank_task_vector_bytes: list[int] = field(default_factory=list)
    rank_peak_rss: list[int] = field(default_factory=list)


@dataclass(kw_only=True)
class LearnedInputs:
    """What every node of a learned merge reads: loaded once, before any node trains.

    Attributes:
        cfg: the run's config.
        params: the learned method's parameters.
        device: this rank's compute device.
        source: base and experts (the tree's leaves), opened lazily.
        model: computes a task's logits from body and head weights.
        tasks: per task, its validation data and its own head, on `device`.
        fixed: base tensors that are neither merged nor heads (integer buffers), on `device`.
    """

    cfg: MergeConfig
    params: SuperMergeParams
    device: torch.device
    source: TaskVectorSource
    model: TaskModel
    tasks: dict[str, Task]
    fixed: Tensors

    @property
    def storage_dtype(self) -> torch.dtype:
        return STORAGE_DTYPES[self.params.storage_dtype]


def shard_plan(
    source: TaskVectorSource,
    tasks: list[str],
    ranks: int,
    task_groups: int,
    storage_dtype: torch.dtype,
    columns: int,
    spec: DistributedSpec,
    module: nn.Module,
) -> ShardPlan:
    """The plan of `source`'s merged tensors (headers only) for `tasks` over `ranks` ranks;
    `module` (the task model's skeleton) gives the gather units of layer mode."""
    names, infos = list(source.names), source.base.infos
    held, row_lengths = (), ()
    if spec.offload == "none" and source.has_adapters:
        held = tuple(tuple(held_rank(source, n, i) for i in range(source.k)) for n in names)
        row_lengths = tuple(row_length(infos[n].shape) for n in names)
    largest = 0
    if spec.gather == "layer":
        largest = max(u.numel for u in find_units(module, names, [infos[n].shape for n in names]))
    return ShardPlan(
        names=names,
        numels=[infos[n].numel for n in names],
        tasks=tasks,
        ranks=ranks,
        task_groups=task_groups,
        storage_itemsize=storage_dtype.itemsize,
        base_itemsize=source.merged_dtype.itemsize,
        columns=columns,
        offload=spec.offload,
        memory_per_rank=spec.memory_per_rank,
        gather=spec.gather,
        largest_unit=largest,
        prefetch_elements=spec.prefetch_elements,
        gather_ahead=spec.gather_ahead,
        held=held,
        row_lengths=row_lengths,
    )


def build_body(
    inputs: LearnedInputs,
    source: TaskVectorSource,
    layout: CoefficientLayout,
    init: float,
    comm: Comm,
    task_groups: int,
    progress: bool,
) -> Body:
    """One process: the whole store (PEFT adapters kept as their factors or vectors); several ranks (or
    layer gathers): this rank's shard of the plan, with `task_groups` task groups (LoRA adapters
    kept as their factors); offloaded: dense task vectors streamed."""
    spec, dtype, device = inputs.cfg.distributed, inputs.storage_dtype, inputs.device
    impl = inputs.params.impl
    if comm.size == 1 and spec.offload == "none" and spec.gather == "body":
        if source.has_adapters:
            return LowRankBody(LowRankStore.build(source, dtype, device, progress), layout, init, impl)
        return MergedBody(TaskVectorStore.build(source, dtype, device, progress), layout, init, impl)
    tasks = [e.name for e in source.experts]
    plan = shard_plan(source, tasks, comm.size, task_groups, dtype, layout.groups, spec, inputs.model.module)
    if comm.is_leader:
        log.info("%s", plan.describe())
    p, _ = plan.coords(comm.rank)
    # the Q ranks of one layer shard; new groups are made by every rank of the job
    shard_comm = (
        comm.split([plan.coords(r)[0] for r in range(comm.size)], "shard")
        if task_groups > 1
        else Comm(None, [comm.global_rank], 0, comm.stats, f"shard{p}")
    )
    if spec.offload == "none":
        shards = LowRankShardStore if source.has_adapters else ShardStore
        store = shards.build(source, plan, comm.rank, dtype, device, progress)
    elif spec.offload == "cpu":
        store = ZeroShardStore.build(source, plan, comm.rank, dtype, device, spec.prefetch_elements, progress)
    else:
        store = NvmeShardStore.build(
            source, plan, comm.rank, dtype, device, spec.prefetch_elements, spec.nvme_path, progress
        )
    return ShardedBody(store, layout, comm, shard_comm, init, impl, spec.gather, spec.gather_ahead)


def train_node(
    inputs: LearnedInputs,
    node: TreeNode,
    children: list[Expert],
    comm: Comm,
    state_path: Path,
    task_groups: int = 1,
    progress: bool = False,
) -> tuple[Body, TaskVectorSource, NodeRecord]:
    """Build the store of `children` (this rank's shard of it) and learn W on the node's tasks;
    the training state is checkpointed to `state_path` and resumed from it if it is there."""
    start = time.perf_counter()
    params = inputs.params
    source = TaskVectorSource(inputs.source.base, children, inputs.cfg.heads, inputs.storage_dtype)
    layout = CoefficientLayout.build(source.names, params.granularity, params.blocks)
    body = build_body(inputs, source, layout, node.init, comm, task_groups, progress)
    source.warn_identical_experts()
    tasks = [inputs.tasks[t] for t in node.leaves]
    settings = params.train_config()
    names = [c.name for c in children]
    trainer = CoefficientTrainer(body, inputs.model, tasks, inputs.fixed, settings, state_path, comm, names)
    log.info("node %s: %d inputs, %d tasks, W %s", node.id, len(children), len(tasks), tuple(body.w.shape))
    before = trainer.accuracy()
    comm.stats.reset()
    train_start = time.perf_counter()
    history = trainer.train(resume=True, progress=progress)
    train_seconds = time.perf_counter() - train_start
    steps_run = max(1, len(history.losses) - history.resumed_at)
    traffic = {tag: b // steps_run for tag, b in comm.stats.bytes_by_tag.items() if tag != "barrier"}
    after = trainer.accuracy()
    per_rank = comm.gather_objects((body.task_vector_bytes, peak_rss_bytes()))
    record = NodeRecord(
        node=node.id,
        children=names,
        leaves=list(node.leaves),
        columns=layout.labels,
        coefficients=body.coefficients().tolist(),
        losses=history.losses,
        accuracy_before=before,
        accuracy_after=after,
        tracked_bytes=body.tracked_bytes,
        seconds=time.perf_counter() - start,
        train_seconds=train_seconds,
        ranks=comm.size,
        comm_bytes_per_step=traffic,
        rank_task_vector_bytes=[b for b, _ in per_rank],
        rank_peak_rss=[r for _, r in per_rank],
    )
    return body, source, record


def take_part_in_gathers(merged: Mapping[str, torch.Tensor], source: TaskVectorSource) -> None:
    """What a rank that does not write does while the leader writes: ask for every merged tensor
    in the writer's order (`write_tensors`), since layer mode gathers each one collectively."""
    for name in source.names:
        merged[name]


def write_node(
    node_dir: Path, body: Body, source: TaskVectorSource, record: NodeRecord, comm: Comm, shard_size: int
) -> None:
    """Write an intermediate node as a model folder with its record (node.json); collective:
    every rank of `comm` takes part in the gathers, the leader writes."""
    merged = body.merged_tensors()
    if not comm.is_leader:
        take_part_in_gathers(merged, source)
        return
    node_dir.parent.mkdir(parents=True, exist_ok=True)
    with ShardedWriter(
        node_dir, shard_size, overwrite=True, expected_bytes=output_bytes(source, None)
    ) as writer:
        write_tensors(writer, source, merged.__getitem__, None, progress=False)
        for path in source.base.carried:
            writer.copy_file(path)
        writer.write_file("node.json", json.dumps(asdict(record), indent=2).encode())
        writer.commit()


def read_node(node_dir: Path) -> tuple[Expert, NodeRecord]:
    """A written node as an input of the level above, and its record."""
    record = NodeRecord(**json.loads((node_dir / "node.json").read_text()))
    return Expert(record.node, Checkpoint(node_dir)), record
