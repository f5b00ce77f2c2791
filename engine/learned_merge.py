"""Running a learned merge (SuperMerge, AdaMerging): flat, or hierarchical as a tree.

Flat: one store of all k task vectors; W [k, G] is trained on every task's validation set.
Hierarchical (`group_size` g < k): experts are grouped, g at a time (by task-vector cosine
similarity unless `groups` is given); each group is merged with SuperMerge on its own tasks
into an intermediate model saved under `<output>.run/tree/`; the next level merges those
intermediates (their task vector is intermediate - base) with fresh coefficients, up to the
root, which is written to the output. Only one node's store is resident at a time: at most g
task vectors, the base and one merged body, so peak memory follows g, not k.

Distributed (under torchrun, deepspeed or accelerate launch; `supermerge.distributed`): a node
trained by several ranks is laid out by `ShardPlan` (layer shards x task groups) and trained
with `ShardedBody`; the first levels of the tree train their nodes in parallel on disjoint rank
groups, then the ranks meet for the levels above. The leader rank of a group writes its files.

`<output>.run/` keeps the state of an unfinished run: finished tree nodes and the checkpoint
of W of the node being trained. `--resume` picks it up; it is removed when the run succeeds.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from supermerge.checkpoint import Checkpoint
from supermerge.coefficients import CoefficientLayout
from supermerge.config import MergeConfig
from supermerge.data import load_jsonl_data, load_tensor_data
from supermerge.distributed.body import ShardedBody
from supermerge.distributed.comm import Comm, close_comm, init_comm
from supermerge.distributed.nvme_store import NvmeShardStore
from supermerge.distributed.plan import ShardPlan
from supermerge.distributed.shard_store import ShardStore
from supermerge.distributed.zero_store import ZeroShardStore
from supermerge.errors import ConfigError, InputError, SupermergeError
from supermerge.memory import TensorBytes, cuda_peak_bytes, peak_rss_bytes
from supermerge.merge import MergeSummary, config_record, open_sources, write_extras, write_tensors
from supermerge.merged_body import MergedBody
from supermerge.methods.base import parse_params
from supermerge.methods.learned import LEARNED, STORAGE_DTYPES, SuperMergeParams
from supermerge.objectives import needs_labels
from supermerge.report import plot_heatmap, plot_losses
from supermerge.store import TaskVectorStore
from supermerge.task_models import TaskModel, build_task_model
from supermerge.taskvectors import Expert, TaskVectorSource, is_head
from supermerge.trainer import CoefficientTrainer, Task
from supermerge.writer import ShardedWriter, prepare_output

log = logging.getLogger(__name__)
Tensors = dict[str, torch.Tensor]
SIMILARITY_ELEMENTS = 65536  # entries per sampled tensor used for task-vector similarity


@dataclass
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


class LearnedMerge:
    """One learned-merge run, from config to output folder (see module docstring).

    Args:
        cfg: a validated config whose method is supermerge or adamerging.
        overwrite: replace an existing output and discard an unfinished run's state.
        resume: continue an unfinished run from `<output>.run/`.
        progress: show progress bars (leader rank only).
        comm: the job's ranks (None: this process alone).
    """

    def __init__(
        self,
        cfg: MergeConfig,
        overwrite: bool = False,
        resume: bool = False,
        progress: bool = True,
        comm: Comm | None = None,
    ):
        self.cfg = cfg
        self.comm = comm if comm is not None else Comm(None, [0], 0)
        self.progress = progress and self.comm.is_leader
        self.params: SuperMergeParams = parse_params(LEARNED[cfg.method], cfg.method_params, "method")
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and self.comm.size > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        self.storage_dtype = STORAGE_DTYPES[self.params.storage_dtype]
        self.run_dir = cfg.output.parent / f"{cfg.output.name}.run"
        self.overwrite = overwrite
        prepare_output(cfg.output, overwrite)
        if self.run_dir.exists() and not resume:
            if not overwrite:
                raise SupermergeError(
                    f"{self.run_dir}: an unfinished run is there; pass --resume to continue it "
                    "or --overwrite to start over"
                )
            self.comm.barrier()  # every rank has seen the old run before the leader removes it
            if self.comm.is_leader:
                shutil.rmtree(self.run_dir)
        self.comm.barrier()
        self.leaf_source = open_sources(cfg)
        self.base = self.leaf_source.base
        self.model: TaskModel = build_task_model(cfg.model, self.base)
        self.tasks = self._load_tasks()
        mergeable = set(self.leaf_source.names)
        self.fixed = {  # integer buffers such as position_ids: the base's values, never merged
            n: self.base.read(n).to(self.device)
            for n in self.base.names
            if n not in mergeable and not is_head(n, cfg.heads)
        }
        self.held = TensorBytes()
        self.bytes_read = 0
        self.records: list[NodeRecord] = []

    def _load_tasks(self) -> dict[str, Task]:
        labelled = needs_labels(self.params.objective)
        tokenizer = None
        tasks = {}
        for spec, expert in zip(self.cfg.experts, self.leaf_source.experts, strict=True):
            head = self.leaf_source.heads(expert)
            wanted = f"{self.cfg.model.head}.weight"
            if self.cfg.model.kind == "hf_encoder" and wanted not in head:
                raise InputError(
                    expert.checkpoint.path, f"no head tensor '{wanted}' among heads matching {self.cfg.heads}"
                )
            if spec.data.suffix == ".jsonl":
                if tokenizer is None:
                    from transformers import AutoTokenizer

                    tokenizer = AutoTokenizer.from_pretrained(self.base.path)
                label2id = (expert.checkpoint.config or {}).get("label2id")
                data = load_jsonl_data(
                    spec.data, expert.name, self.params.validation_size, self.cfg.seed, labelled,
                    tokenizer, self.cfg.model.max_length, label2id,
                )  # fmt: skip
            else:
                data = load_tensor_data(
                    spec.data, expert.name, self.params.validation_size, self.cfg.seed, labelled
                )
            data.check_labels(TaskModel.num_classes(head))
            tasks[expert.name] = Task(expert.name, data, {n: t.to(self.device) for n, t in head.items()})
        return tasks

    def _body(
        self, source: TaskVectorSource, layout: CoefficientLayout, init: float, comm: Comm
    ) -> MergedBody | ShardedBody:
        """One process: the whole store; several ranks (or offload): this rank's shard of the plan."""
        spec = self.cfg.distributed
        if comm.size == 1 and spec.offload == "none" and spec.gather == "body":
            store = TaskVectorStore.build(source, self.storage_dtype, self.device, self.progress)
            return MergedBody(store, layout, init, self.params.impl)
        groups = spec.task_groups if comm is self.comm else 1
        tasks = [e.name for e in source.experts]
        plan = ShardPlan.for_source(
            source, tasks, comm.size, groups, self.storage_dtype, layout.groups, spec, self.model.module
        )
        if comm.is_leader:
            log.info("%s", plan.describe())
        p, _ = plan.coords(comm.rank)
        # the Q ranks of one layer shard; new groups are made by every rank of the job
        shard_comm = (
            comm.split([plan.coords(r)[0] for r in range(comm.size)], "shard") if groups > 1 else None
        )
        args = (source, plan, comm.rank, self.storage_dtype, self.device)
        if spec.offload == "none":
            store = ShardStore.build(*args, self.progress)
        elif spec.offload == "cpu":
            store = ZeroShardStore.build(*args, spec.prefetch_elements, self.progress)
        else:
            store = NvmeShardStore.build(*args, spec.prefetch_elements, spec.nvme_path, self.progress)
        single = Comm(None, [comm.global_rank], 0, comm.stats, f"shard{p}")
        return ShardedBody(
            store, layout, comm, shard_comm or single, init, self.params.impl, spec.gather, spec.gather_ahead
        )

    def train_node(
        self, node: str, children: list[Expert], leaves: list[str], init: float, comm: Comm
    ) -> tuple[MergedBody | ShardedBody, TaskVectorSource, NodeRecord]:
        """Build the store of `children` (this rank's shard of it), learn W on the leaves' tasks."""
        start = time.perf_counter()
        source = TaskVectorSource(self.base, children, self.cfg.heads, self.storage_dtype)
        layout = CoefficientLayout.build(source.names, self.params.granularity, self.params.blocks)
        body = self._body(source, layout, init, comm)
        self.run_dir.mkdir(exist_ok=True)
        trainer = CoefficientTrainer(
            body, self.model, [self.tasks[t] for t in leaves], self.fixed,
            self.params.train_config(), self.run_dir / f"{node}.state.pt", comm,
        )  # fmt: skip
        log.info("node %s: %d inputs, %d tasks, W %s", node, len(children), len(leaves), tuple(body.w.shape))
        before = trainer.accuracy()
        comm.stats.reset()
        train_start = time.perf_counter()
        history = trainer.train(resume=True, progress=self.progress)
        train_seconds = time.perf_counter() - train_start
        steps_run = max(1, len(history.losses) - history.resumed_at)
        traffic = {tag: b // steps_run for tag, b in comm.stats.bytes_by_tag.items() if tag != "barrier"}
        after = trainer.accuracy()
        self.bytes_read += source.bytes_read
        self.held.observe(body.tracked_bytes)
        per_rank = comm.gather_objects((body.store.task_vector_bytes, peak_rss_bytes()))
        record = NodeRecord(
            node, [c.name for c in children], leaves, layout.labels, body.coefficients().tolist(),
            history.losses, before, after, body.tracked_bytes, time.perf_counter() - start, train_seconds,
            comm.size, traffic, [b for b, _ in per_rank], [r for _, r in per_rank],
        )  # fmt: skip
        return body, source, record

    def _write_node(
        self, node_dir: Path, body: MergedBody | ShardedBody, source: TaskVectorSource, record: NodeRecord,
        comm: Comm,
    ) -> None:  # fmt: skip
        merged = body.merged_tensors()  # collective: every rank of `comm` takes part
        if not comm.is_leader:
            take_part_in_gathers(merged, source)
            return
        (self.run_dir / "tree").mkdir(parents=True, exist_ok=True)
        with ShardedWriter(node_dir, self.cfg.shard_size, overwrite=True) as writer:
            write_tensors(writer, source, merged.__getitem__, None, progress=False)
            for path in self.base.carried:
                writer.copy_file(path)
            writer.write_file("node.json", json.dumps(asdict(record), indent=2).encode())
            writer.commit()

    def _groups(self, children: list[Expert], level: int) -> list[list[Expert]]:
        g = self.params.group_size
        if level == 0 and self.params.groups is not None:
            by_name = {c.name: c for c in children}
            listed = [n for group in self.params.groups for n in group]
            if sorted(listed) != sorted(by_name):
                raise ConfigError("method.groups", f"must list every task exactly once: {sorted(by_name)}")
            if any(len(group) > g for group in self.params.groups):
                raise ConfigError("method.groups", f"a group is larger than group_size {g}")
            return [[by_name[n] for n in group] for group in self.params.groups]
        names = None
        if self.comm.is_leader:  # one answer for every rank
            groups = similarity_groups(self.base, children, g, self.params.similarity_tensors, self.cfg.heads)
            names = [[c.name for c in group] for group in groups]
        names = self.comm.broadcast_object(names)
        by_name = {c.name: c for c in children}
        return [[by_name[n] for n in group] for group in names]

    def _train_level(self, level: int, todo: list[tuple[str, list[Expert], list[str]]]) -> None:
        """Train and write a level's nodes; with several ranks, up to one node per rank group at once."""
        init = self.params.init if level == 0 else self.params.upper_init
        # DeepSpeed partitions a ZeRO-offloaded store over the whole job: nodes then train one by one
        size = self.comm.size if self.cfg.distributed.offload != "cpu" else 1
        for first in range(0, len(todo), size):
            wave = todo[first : first + size]
            comm = self.comm
            mine = 0
            if size > 1:
                colors = [r * len(wave) // size for r in range(size)]
                comm = self.comm.split(colors, f"level{level}-node")
                mine = colors[self.comm.rank]
            for node, group, leaves in wave if size == 1 else [wave[mine]]:
                body, source, record = self.train_node(node, group, leaves, init, comm)
                self._write_node(self.run_dir / "tree" / node, body, source, record, comm)
                del body, source
        self.comm.barrier()

    def run(self) -> MergeSummary:
        """Train the tree (or the flat merge) and write the output; returns the summary."""
        start = time.perf_counter()
        children = list(self.leaf_source.experts)
        leaves_of = {c.name: [c.name] for c in children}
        g = self.params.group_size
        level = 0
        while g and len(children) > g:
            groups = self._groups(children, level)
            nodes = {f"level{level}-node{j}": group for j, group in enumerate(groups) if len(group) > 1}
            for node, group in nodes.items():
                leaves_of[node] = [leaf for c in group for leaf in leaves_of[c.name]]
            todo = [
                (node, group, leaves_of[node])
                for node, group in nodes.items()
                if not (self.run_dir / "tree" / node / "node.json").exists()
            ]
            for node in nodes:
                if node not in {t[0] for t in todo}:
                    log.info("node %s: finished in an earlier run, reused", node)
            self._train_level(level, todo)
            next_children = []
            for j, group in enumerate(groups):
                node = f"level{level}-node{j}"
                if node not in nodes:
                    next_children.append(group[0])
                    continue
                node_dir = self.run_dir / "tree" / node
                self.records.append(NodeRecord(**json.loads((node_dir / "node.json").read_text())))
                next_children.append(Expert(node, Checkpoint(node_dir)))
            children, level = next_children, level + 1
        leaves = [leaf for c in children for leaf in leaves_of[c.name]]
        body, source, record = self.train_node(
            "root", children, leaves, self.params.init if level == 0 else self.params.upper_init, self.comm
        )
        self.records.append(record)
        return self._write_output(body, source, record, start)

    def _write_output(
        self, body: MergedBody | ShardedBody, source: TaskVectorSource, root: NodeRecord, start: float
    ) -> MergeSummary:
        cfg = self.cfg
        merged = body.merged_tensors()  # collective
        effective = effective_coefficients(self.records, [t for t in self.tasks])
        if not self.comm.is_leader:
            take_part_in_gathers(merged, source)
            self.comm.barrier()  # the leader writes; return once the output is in place
            return self._summary(start, root, None)
        with ShardedWriter(cfg.output, cfg.shard_size, self.overwrite) as writer:
            write_tensors(writer, source, merged.__getitem__, cfg.dtype, self.progress)
            coefficients = {
                "tasks": list(self.tasks),
                "columns": root.columns,
                "tensors": body.layout.column_of(body.store.names),
                "effective": effective,
                "nodes": [asdict(r) for r in self.records],
            }  # fmt: skip
            writer.write_file("coefficients.json", json.dumps(coefficients, indent=2).encode())
            writer.write_file("validation_accuracy.json", json.dumps(root.accuracy_after, indent=2).encode())
            tmp = writer.tmp_dir
            plot_heatmap(
                tmp / "coefficients.png", [effective[t] for t in self.tasks], list(self.tasks), root.columns,
                f"{cfg.method}: effective coefficient per task and {self.params.granularity}",
            )  # fmt: skip
            plot_losses(tmp / "loss.png", {r.node: r.losses for r in self.records})
            summary = self._summary(start, root, writer)
            record = {"config": config_record(cfg) | {"method": {"name": cfg.method, **asdict(self.params)}}}
            write_extras(writer, self.leaf_source, record | {"summary": asdict(summary)})
            writer.commit()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.comm.barrier()
        return summary

    def _summary(self, start: float, root: NodeRecord, writer: ShardedWriter | None) -> MergeSummary:
        g = self.params.group_size
        method = f"{self.cfg.method} (hierarchical, g={g})" if g else self.cfg.method
        return MergeSummary(
            output=str(self.cfg.output),
            method=method + (f" on {self.comm.size} ranks" if self.comm.size > 1 else ""),
            experts=len(self.tasks),
            tensors=len(self.base.names),
            bytes_read=self.bytes_read + self.leaf_source.bytes_read,
            bytes_written=writer.bytes_written if writer is not None else 0,
            seconds=time.perf_counter() - start,
            peak_rss_bytes=peak_rss_bytes(),
            peak_tensor_bytes=self.held.peak,
            peak_cuda_bytes=cuda_peak_bytes(str(self.device)),
            validation_accuracy=root.accuracy_after,
            ranks=self.comm.size,
            comm_bytes_per_step=root.comm_bytes_per_step,
        )


def take_part_in_gathers(merged: Mapping[str, torch.Tensor], source: TaskVectorSource) -> None:
    """What a rank that does not write does while the leader writes: ask for every merged tensor
    in the writer's order (`write_tensors`), since layer mode gathers each one collectively."""
    for name in source.names:
        merged[name]


def effective_coefficients(records: list[NodeRecord], tasks: list[str]) -> dict[str, list[float]]:
    """Per task, the product of its coefficients along its path to the root, per column.

    A flat merge has one node: the effective coefficients are its tanh(W) rows.
    """
    parent: dict[str, tuple[NodeRecord, int]] = {}
    for record in records:
        for i, child in enumerate(record.children):
            parent[child] = (record, i)
    result = {}
    for task in tasks:
        product = [1.0] * len(records[-1].columns)
        name = task
        while name in parent:
            record, row = parent[name]
            product = [p * c for p, c in zip(product, record.coefficients[row], strict=True)]
            name = record.node
        result[task] = product
    return result


def similarity_groups(
    base: Checkpoint, children: list[Expert], g: int, sample: int, heads: list[str]
) -> list[list[Expert]]:
    """Greedy groups of at most g children with the most similar task vectors.

    Similarity: cosine of the task vectors over `sample` tensors spread evenly over the model,
    each tensor subsampled to at most SIMILARITY_ELEMENTS evenly strided entries, so the memory
    it takes is k x sample x SIMILARITY_ELEMENTS values plus one tensor, whatever the model size.
    The first ungrouped child takes the g - 1 ungrouped children most similar to it.
    """
    source = TaskVectorSource(base, children, heads)
    names = source.names
    picked = [names[round(i)] for i in torch.linspace(0, len(names) - 1, min(sample, len(names))).tolist()]
    parts: list[list[torch.Tensor]] = [[] for _ in children]
    for name in picked:
        b = source.read_base(name)
        stride = max(1, math.ceil(b.numel() / SIMILARITY_ELEMENTS))
        for i in range(len(children)):
            parts[i].append(source.task_vector(name, b, i).reshape(-1)[::stride].clone())
    vectors = torch.nn.functional.normalize(torch.stack([torch.cat(p) for p in parts]), dim=1)
    similarity = vectors @ vectors.T
    log.info("task-vector cosine similarity:\n%s", similarity)
    remaining = list(range(len(children)))
    groups = []
    while remaining:
        seed = remaining.pop(0)
        ranked = sorted(remaining, key=lambda j: -float(similarity[seed, j]))[: g - 1]
        remaining = [j for j in remaining if j not in ranked]
        groups.append([children[i] for i in [seed, *ranked]])
    return groups


def run_learned_merge(
    cfg: MergeConfig, overwrite: bool = False, resume: bool = False, progress: bool = True
) -> MergeSummary:
    """Run a learned merge per `cfg` (see LearnedMerge), on every rank the launcher started."""
    comm = init_comm(cfg.device, cfg.distributed.timeout_s)
    summary = LearnedMerge(cfg, overwrite, resume, progress, comm).run()
    close_comm(comm)
    return summary
