"""Running a learned merge (SuperMerge, AdaMerging), from config to output folder.

Top to bottom (`run_learned_merge`):
  1. the launcher's ranks join (`distributed.launch`, `distributed.comm`); no launcher: one process
  2. the output and the run state `<output>.run/` are checked (`RunState.prepare`)
  3. what every node reads is loaded once (`load_inputs`): the tasks' validation data and heads,
     the task model's skeleton, the base's fixed buffers
  4. the tree is planned level by level (`learned.tree.TreePlan`): flat, it is the root alone;
     hierarchical, each level's unfinished nodes are trained and written (`learned.node`), in
     waves over disjoint rank groups, and read back as the inputs of the level above
  5. the root is trained on every rank and written to the output with its coefficients,
     validation accuracy and plots; the run state is removed.

Flat: one store of all k task vectors; W [k, G] is trained on every task's validation set.
Hierarchical (`group_size` g < k): only one node's store is resident at a time, at most g task
vectors, the base and one merged body, so peak memory follows g, not k.

`<output>.run/` keeps the state of an unfinished run: finished tree nodes and the checkpoint
of W of the node being trained. `--resume` picks it up; it is removed when the run succeeds.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from supermerge.config import MergeConfig
from supermerge.distributed.comm import Comm, close_comm, init_comm
from supermerge.distributed.launch import Launch
from supermerge.errors import InputError, SupermergeError
from supermerge.io.completions import Template
from supermerge.io.lock import OutputLock
from supermerge.io.memory import TensorBytes, cuda_peak_bytes, peak_rss_bytes
from supermerge.io.output import MergeSummary, output_bytes, write_extras, write_tensors
from supermerge.io.paths import check_apart
from supermerge.io.writer import ShardedWriter, prepare_output
from supermerge.learned.body import Body
from supermerge.learned.coefficients import CoefficientLayout
from supermerge.learned.data import TaskData, load_completion_data, load_jsonl_data, load_tensor_data
from supermerge.learned.node import (
    LearnedInputs,
    NodeRecord,
    read_node,
    shard_plan,
    take_part_in_gathers,
    train_node,
    write_node,
)
from supermerge.learned.objectives import needs_labels
from supermerge.learned.report import plot_heatmap, plot_losses
from supermerge.learned.task_models import TaskModel, build_task_model
from supermerge.learned.teacher import expert_teacher
from supermerge.learned.trainer import Task
from supermerge.learned.tree import (
    TreeNode,
    TreePlan,
    check_groups,
    effective_coefficients,
    in_order_groups,
    waves,
)
from supermerge.methods.learned import STORAGE_DTYPES
from supermerge.taskvectors.similarity import similarity_groups
from supermerge.taskvectors.source import Expert, TaskVectorSource, is_head, open_source

log = logging.getLogger(__name__)


class RunState:
    """The folder `<output>.run/`: finished tree nodes (`tree/<node>/`, a model folder each,
    renamed into place when complete) and the training state of the node being trained."""

    def __init__(self, output: Path) -> None:
        self.dir = output.parent / f"{output.name}.run"

    def prepare(self, overwrite: bool, resume: bool, comm: Comm) -> None:
        """Refuse an unfinished run's state unless resuming or overwriting (then remove it);
        collective, so that no rank reads the old state after the leader removed it."""
        if self.dir.exists() and not resume:
            if not overwrite:
                raise SupermergeError(
                    f"{self.dir}: an unfinished run is there; pass --resume to continue it "
                    "or --overwrite to start over"
                )
            comm.barrier()
            if comm.is_leader:
                shutil.rmtree(self.dir)
        comm.barrier()

    def state_path(self, node: str) -> Path:
        """The checkpoint of W (and Adam) of a node being trained."""
        self.dir.mkdir(exist_ok=True)
        return self.dir / f"{node}.state.pt"

    def node_dir(self, node: str) -> Path:
        return self.dir / "tree" / node

    def finished(self, node: str) -> bool:
        return (self.node_dir(node) / "node.json").exists()

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def load_inputs(cfg: MergeConfig, device: torch.device) -> LearnedInputs:
    """Open base and experts and load each task's validation data and head onto `device`."""
    params = cfg.method.params
    source = open_source(cfg.base, [(e.name, e.path) for e in cfg.experts], cfg.heads)
    model = build_task_model(cfg.model, source.base)
    tasks = {}
    tokenizer = functools.cache(lambda: _auto_tokenizer(cfg.base))
    for spec, expert in zip(cfg.experts, source.experts, strict=True):
        head = source.heads(expert)
        wanted = f"{cfg.model.head}.weight"
        if cfg.model.kind == "hf_encoder" and wanted not in head:
            raise InputError(
                expert.checkpoint.path, f"no head tensor '{wanted}' among heads matching {list(cfg.heads)}"
            )
        data = _task_data(cfg, spec.data, expert, tokenizer)
        data.check_labels(TaskModel.num_classes(head))
        tasks[expert.name] = Task(expert.name, data, {n: t.to(device) for n, t in head.items()})
    mergeable = set(source.names)
    fixed = {  # integer buffers such as position_ids: the base's values, never merged
        n: source.base.read(n).to(device)
        for n in source.base.names
        if n not in mergeable and not is_head(n, cfg.heads)
    }
    return LearnedInputs(
        cfg=cfg, params=params, device=device, source=source, model=model, tasks=tasks, fixed=fixed
    )


def _auto_tokenizer(base: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)


def _task_data(cfg: MergeConfig, path: Path, expert: Expert, tokenizer: Callable[[], Any]) -> TaskData:
    """A task's validation data in the format its file and the model kind call for; `tokenizer()`
    gives the base's tokenizer."""
    params, spec = cfg.method.params, cfg.model
    size, seed = params.validation_size, cfg.seed
    if path.suffix != ".jsonl":
        return load_tensor_data(path, expert.name, size, seed, needs_labels(params.objective))
    tokenizer = tokenizer()
    if spec.kind == "hf_causal_lm":
        template = (
            Template(spec.prompt_template, spec.completion_template)
            if spec.prompt_template is not None
            else None
        )
        return load_completion_data(
            path, expert.name, size, seed, tokenizer, spec.max_length, spec.chat_template, template
        )
    label2id = (expert.checkpoint.config or {}).get("label2id")
    labelled = needs_labels(params.objective)
    return load_jsonl_data(path, expert.name, size, seed, labelled, tokenizer, spec.max_length, label2id)


class LearnedMerge:
    """One learned-merge run (see module docstring); `run` does the work.

    Args:
        cfg: a validated config whose method is supermerge or adamerging.
        comm: the job's ranks.
        device: this rank's compute device.
        progress: show progress bars (leader rank only).
    """

    def __init__(self, cfg: MergeConfig, comm: Comm, device: torch.device, progress: bool = True) -> None:
        self.cfg, self.comm, self.device = cfg, comm, device
        self.params = cfg.method.params
        self.progress = progress and comm.is_leader
        self.state = RunState(cfg.output)
        self.held = TensorBytes()
        self.bytes_read = 0
        self.records: list[NodeRecord] = []

    def run(self, overwrite: bool = False, resume: bool = False) -> MergeSummary:
        """Train the tree (or the flat merge) and write the output; returns the summary."""
        written = [("the run-state folder", self.state.dir)]
        cache = self.params.targets_cache
        if cache is not None:
            check_apart(cache, self.cfg.inputs(), "distillation targets cache")
            written.append(("the distillation targets cache", cache))
        check_apart(self.cfg.output, [*self.cfg.inputs(), *written])
        check_apart(self.state.dir, self.cfg.inputs(), "run-state folder")
        lock = OutputLock(self.cfg.output)  # one lock for the output and its run state
        problem = None
        if self.comm.is_leader:  # the leader speaks for the job; every rank learns the answer
            try:
                lock.acquire()
            except SupermergeError as e:
                problem = str(e)
        problem = self.comm.broadcast_object(problem)
        if problem is not None:
            raise SupermergeError(problem)
        try:
            return self._run(overwrite, resume)
        finally:
            lock.release()

    def _run(self, overwrite: bool, resume: bool) -> MergeSummary:
        start = time.perf_counter()
        prepare_output(self.cfg.output, overwrite)
        self.state.prepare(overwrite, resume, self.comm)
        inputs = load_inputs(self.cfg, self.device)
        if self.params.objective == "distill":
            self._attach_teachers(inputs)
        params = self.params
        tree = TreePlan(list(inputs.tasks), params.group_size, params.init, params.upper_init)
        available = {e.name: e for e in inputs.source.experts}  # a level's inputs, by name
        while tree.needs_level:
            level = len(tree.levels)
            nodes = tree.add_level(self._groups(inputs, [available[n] for n in tree.inputs], level))
            for node in nodes:
                if self.state.finished(node.id):
                    log.info("node %s: finished in an earlier run, reused", node.id)
            self._train_level(inputs, level, [n for n in nodes if not self.state.finished(n.id)], available)
            for node in nodes:
                available[node.id], record = read_node(self.state.node_dir(node.id))
                self.records.append(record)
        groups = self.cfg.distributed.task_groups
        body, source, record = self._train(inputs, tree.root(), available, self.comm, groups)
        self.records.append(record)
        return self._write_output(inputs, body, source, record, start, overwrite)

    def _attach_teachers(self, inputs: LearnedInputs) -> None:
        """Give every task its expert's distillation targets (`learned.teacher`): the leader
        computes the missing ones into the cache, then every rank reads them."""
        cache = self.params.targets_cache or self.state.dir / "targets"
        head_names = {e.name: list(inputs.source.heads(e)) for e in inputs.source.experts}
        experts = {e.name: e.checkpoint for e in inputs.source.experts}

        def attach() -> None:
            for name, task in inputs.tasks.items():
                task.data.teacher = expert_teacher(
                    inputs.model, experts[name], head_names[name], inputs.fixed, task.data,
                    self.params.top_k, self.params.batch_size, cache, self.device,
                )  # fmt: skip

        if self.comm.is_leader:
            attach()
        self.comm.barrier()
        if not self.comm.is_leader:  # the leader's files are complete: read them
            attach()

    def _train(
        self,
        inputs: LearnedInputs,
        node: TreeNode,
        available: dict[str, Expert],
        comm: Comm,
        task_groups: int,
    ) -> tuple[Body, TaskVectorSource, NodeRecord]:
        children = [available[c] for c in node.children]
        state = self.state.state_path(node.id)
        body, source, record = train_node(inputs, node, children, comm, state, task_groups, self.progress)
        self.bytes_read += source.bytes_read
        self.held.observe(body.tracked_bytes)
        return body, source, record

    def _groups(self, inputs: LearnedInputs, children: list[Expert], level: int) -> list[list[str]]:
        """A level's groups: `method.groups` at level 0 if given, else by task-vector similarity
        (computed by the leader, the same answer for every rank)."""
        g = self.params.group_size
        if level == 0 and self.params.groups is not None:
            return check_groups(self.params.groups, [c.name for c in children], g)
        groups = None
        if self.comm.is_leader:
            sample = self.params.similarity_tensors
            groups = similarity_groups(inputs.source.base, children, g, sample, self.cfg.heads)
        return self.comm.broadcast_object(groups)

    def _train_level(
        self, inputs: LearnedInputs, level: int, todo: list[TreeNode], available: dict[str, Expert]
    ) -> None:
        """Train and write a level's unfinished nodes; with several ranks, up to one node per rank
        group at once. DeepSpeed partitions a ZeRO-offloaded store over the whole job: its nodes
        train one by one on every rank."""
        size = self.comm.size if self.cfg.distributed.offload != "cpu" else 1
        for wave, colors in waves(len(todo), size):
            comm = self.comm.split(colors, f"level{level}-node") if size > 1 else self.comm
            node = todo[wave[colors[self.comm.rank] if size > 1 else 0]]
            task_groups = self.cfg.distributed.task_groups if comm is self.comm else 1
            body, source, record = self._train(inputs, node, available, comm, task_groups)
            write_node(self.state.node_dir(node.id), body, source, record, comm, self.cfg.shard_size)
            del body, source
        self.comm.barrier()

    def _write_output(
        self,
        inputs: LearnedInputs,
        body: Body,
        source: TaskVectorSource,
        root: NodeRecord,
        start: float,
        overwrite: bool,
    ) -> MergeSummary:
        cfg, tasks = self.cfg, list(inputs.tasks)
        merged = body.merged_tensors()  # collective
        nodes = [(r.node, r.children, r.coefficients) for r in self.records]
        effective = effective_coefficients(nodes, tasks)
        if not self.comm.is_leader:
            take_part_in_gathers(merged, source)
            self.comm.barrier()  # the leader writes; return once the output is in place
            return self._summary(inputs, start, root, None)
        expected = output_bytes(source, cfg.dtype)
        with ShardedWriter(cfg.output, cfg.shard_size, overwrite, expected) as writer:
            write_tensors(writer, source, merged.__getitem__, cfg.dtype, self.progress)
            coefficients = {
                "tasks": tasks,
                "columns": root.columns,
                "tensors": body.layout.column_of(body.names),
                "effective": effective,
                "nodes": [asdict(r) for r in self.records],
            }
            writer.write_file("coefficients.json", json.dumps(coefficients, indent=2).encode())
            writer.write_file("validation_accuracy.json", json.dumps(root.accuracy_after, indent=2).encode())
            plot_heatmap(
                writer.tmp_dir / "coefficients.png",
                [effective[t] for t in tasks],
                tasks,
                root.columns,
                f"{cfg.method.name}: effective coefficient per task and {self.params.granularity}",
            )
            plot_losses(writer.tmp_dir / "loss.png", {r.node: r.losses for r in self.records})
            summary = self._summary(inputs, start, root, writer)
            write_extras(writer, inputs.source, {"config": cfg.record(), "summary": asdict(summary)})
            writer.commit()
        self.state.remove()
        self.comm.barrier()
        return summary

    def _summary(
        self, inputs: LearnedInputs, start: float, root: NodeRecord, writer: ShardedWriter | None
    ) -> MergeSummary:
        g = self.params.group_size
        method = f"{self.cfg.method.name} (hierarchical, g={g})" if g else self.cfg.method.name
        return MergeSummary(
            output=str(self.cfg.output),
            method=method + (f" on {self.comm.size} ranks" if self.comm.size > 1 else ""),
            experts=len(inputs.tasks),
            tensors=len(inputs.source.base.names),
            bytes_read=self.bytes_read + inputs.source.bytes_read,
            bytes_written=writer.bytes_written if writer is not None else 0,
            seconds=time.perf_counter() - start,
            peak_rss_bytes=peak_rss_bytes(),
            peak_tensor_bytes=self.held.peak,
            peak_cuda_bytes=cuda_peak_bytes(str(self.device)),
            validation_accuracy=root.accuracy_after,
            ranks=self.comm.size,
            comm_bytes_per_step=root.comm_bytes_per_step,
        )


def run_learned_merge(
    cfg: MergeConfig, overwrite: bool = False, resume: bool = False, progress: bool = True
) -> MergeSummary:
    """Run a learned merge per `cfg` (see module docstring), on every rank the launcher started."""
    launch = Launch.from_env()
    device = launch.device(cfg.device)
    comm = init_comm(launch, device, cfg.distributed.timeout_s)
    summary = LearnedMerge(cfg, comm, device, progress).run(overwrite, resume)
    close_comm(comm)
    return summary


def describe_job(cfg: MergeConfig, ranks: int) -> str:
    """The plan of a learned-merge config on `ranks` ranks, as `supermerge plan` prints it.

    Reads only the checkpoints' headers. For a hierarchical merge it also says how the first
    level's nodes are spread over rank groups.
    """
    params, spec = cfg.method.params, cfg.distributed
    source = open_source(cfg.base, [(e.name, e.path) for e in cfg.experts], cfg.heads)
    layout = CoefficientLayout.build(source.names, params.granularity, params.blocks)
    g = params.group_size
    tree = TreePlan([e.name for e in source.experts], g, params.init, params.upper_init)
    lines = []
    if tree.needs_level:
        first = math.ceil(source.k / g)
        grouping = "given in method.groups" if params.groups else "by task-vector similarity at run time"
        if spec.offload != "cpu":
            schedule = (
                f"they train {min(first, ranks)} at a time on disjoint groups of about "
                f"{max(1, ranks // first)} rank(s) ({math.ceil(first / ranks)} wave(s))"
            )
        else:
            schedule = "they train one after another on all ranks (ZeRO-offloaded store)"
        lines.append(
            f"hierarchical, g = {g}: level 0 has {first} node(s) of at most {g} tasks ({grouping}); "
            f"{schedule}; each node holds at most g task vectors over its ranks. "
            "The root (below, with its inputs as tasks) trains on all ranks."
        )
    while tree.needs_level:  # the tree's shape: groups of g in order (the real grouping may differ)
        tree.add_level(in_order_groups(tree.inputs, g))
    module = build_task_model(cfg.model, source.base).module
    groups = spec.task_groups if ranks > 1 else 1
    dtype = STORAGE_DTYPES[params.storage_dtype]
    plan = shard_plan(source, list(tree.root().children), ranks, groups, dtype, layout.groups, spec, module)
    return "\n".join([*lines, plan.describe()])
