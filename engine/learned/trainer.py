"""Learning W by gradient descent on the tasks' validation sets.

One step, top to bottom:
  1. with body.training_pass(model) as leaves:    fused weighted sum [N] as one leaf per tensor,
                                                   shared by every task (distributed: each
                                                   rank's shard, then all-gathered; layer mode:
                                                   nothing yet, each layer is gathered as it runs)
  2.   for each task, for each micro-batch:         one graph alive at a time (distributed:
           loss = objective(logits(leaves, head_task, batch), targets) / (n_task * k)
           loss.backward()
       -> g = dL/d(theta_m), summed over tasks      the batches are dealt over the ranks)
  3. on exit: fused gradient dW = (1 - tanh^2) <g, tau>  (distributed: g reduce-scattered to the
                                                   shard owners, dW all-reduced)
  4. Adam step on W
Memory does not grow with the number of tasks: one merged body, one micro-batch graph.
Every `checkpoint_every` steps the state (W, Adam, step, history) is saved atomically;
`resume` continues from it and ends with the same W as an uninterrupted run (full-batch steps
in a fixed order: nothing random to replay).
"""

from __future__ import annotations

import logging
import math
import os
import pickle
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from supermerge.distributed.comm import Comm
from supermerge.errors import SupermergeError
from supermerge.io.atomic import atomic_file
from supermerge.io.checkpoint import Tensors
from supermerge.learned.adam import Adam
from supermerge.learned.body import Body
from supermerge.learned.data import Batch, TaskData, TopK
from supermerge.learned.objectives import resolve_objective
from supermerge.learned.task_models import TaskModel
from supermerge.methods.learned import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class Task:
    """One task to serve: its validation data and its own head (never merged), on the body's device."""

    name: str
    data: TaskData
    head: Tensors


@dataclass
class History:
    """Per-step mean loss of every task (measured before that step's update)."""

    losses: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    resumed_at: int = 0  # the step this run started from

    @property
    def steps(self) -> int:
        return len(self.losses)


class CoefficientTrainer:
    """Trains a body's W on the tasks (see module docstring).

    Args:
        body: coefficients over the task-vector store.
        model: computes logits from body and head weights.
        tasks: tasks whose losses are averaged (each task weighs 1/len(tasks)).
        fixed: base tensors that are not merged (buffers), passed to every forward.
        cfg: optimisation settings.
        state_path: where the training state is checkpointed (None: never); the leader rank
            writes it, every rank reads it on resume.
        comm: the ranks training together (None: this process alone); they split the
            micro-batches and sum losses and gradients.
        inputs: names of W's rows, the merged inputs (default: the tasks, as in a flat merge).
    """

    def __init__(
        self,
        body: Body,
        model: TaskModel,
        tasks: list[Task],
        fixed: Tensors,
        cfg: TrainConfig,
        state_path: Path | None = None,
        comm: Comm | None = None,
        inputs: list[str] | None = None,
    ) -> None:
        self.body, self.model, self.tasks, self.fixed, self.cfg = body, model, tasks, fixed, cfg
        self.inputs = inputs if inputs is not None else [task.name for task in tasks]
        self.comm = comm if comm is not None else Comm(None, [0], 0)
        self.objective = resolve_objective(cfg.objective, cfg.temperature)
        self.state_path = state_path
        self.optimizer = Adam(body.w, lr=cfg.lr)
        self.device = body.w.device

    def _my_batches(self, tasks: list[Task]) -> Iterator[tuple[int, Task, Batch, bool]]:
        """(task index, task, batch, counted) of the micro-batches this rank computes: the
        job's (task, batch) pairs are dealt round-robin over the ranks, so the ranks together see
        every batch once; only the rank that computes a batch moves it to its device. A lockstep
        body (layer gathers: every forward is collective) needs every rank to run as many
        forwards as the busiest one: the others repeat the job's first batch, not counted."""
        jobs = [
            (t, task, batch)
            for t, task in enumerate(tasks)
            for batch in task.data.batches(self.cfg.batch_size)
        ]
        mine = [(*job, True) for job in jobs[self.comm.rank :: self.comm.size]]
        if self.body.lockstep and jobs:
            mine += [(*jobs[0], False)] * (-(-len(jobs) // self.comm.size) - len(mine))
        for t, task, (inputs, labels, teacher), counted in mine:
            batch = Batch(
                {k: v.to(self.device) for k, v in inputs.items()},
                None if labels is None else labels.to(self.device),
                None if teacher is None else teacher.to(self.device),
            )
            yield t, task, batch, counted

    def _targets(self, batch: Batch) -> torch.Tensor | TopK | None:
        """What the objective compares the logits with: the expert's top-k logits when the task
        has them (distillation), else the labels or completion tokens of each logits row."""
        if batch.teacher is not None:
            return batch.teacher
        return self.model.targets(batch.inputs, batch.labels)

    def losses_and_grad(self) -> dict[str, float]:
        """Mean loss per task at the current W; leaves dLoss/dW in body.w.grad."""
        totals = torch.zeros(len(self.tasks), dtype=torch.float64)
        with self.body.training_pass(self.model.module) as body:
            params = {**self.fixed, **body}
            for t, task, batch, counted in self._my_batches(self.tasks):
                logits = self.model.logits(params, task.head, batch.inputs)
                loss = self.objective(logits, self._targets(batch))
                scale = 1.0 / (len(task.data) * len(self.tasks)) if counted else 0.0
                (loss * scale).backward()
                totals[t] += float(loss.detach()) if counted else 0.0
        self.comm.all_reduce(totals, "loss")
        return {task.name: float(totals[t]) / len(task.data) for t, task in enumerate(self.tasks)}

    def _fingerprint(self) -> dict:
        cfg = asdict(self.cfg)
        cfg.pop("steps")  # a resumed run may be asked to go further
        return {"tasks": [t.name for t in self.tasks], "columns": self.body.layout.labels, **cfg}

    def _save(self, step: int, history: History, best: float, stale: int) -> None:
        state = {
            "step": step,
            "w": self.body.w.detach().cpu(),
            "optimizer": self.optimizer.state_dict(),
            "history": asdict(history),
            "best": best,
            "stale": stale,
            "fingerprint": self._fingerprint(),
        }
        with atomic_file(self.state_path) as tmp:
            torch.save(state, tmp)

    def _load(self) -> tuple[int, History, float, int]:
        try:  # tensors and plain types only: a tampered state must not run code
            state = torch.load(self.state_path, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            raise SupermergeError(
                f"{self.state_path}: not a training state this version reads safely "
                f"({str(e).splitlines()[0]}); start over with --overwrite"
            ) from None
        if state["fingerprint"] != self._fingerprint():
            raise SupermergeError(
                f"{self.state_path}: saved training state was made with other settings "
                "(tasks, coefficient layout or optimiser); start over with --overwrite"
            )
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except SupermergeError as e:
            raise SupermergeError(f"{self.state_path}: {e}; start over with --overwrite") from None
        with torch.no_grad():
            self.body.w.copy_(state["w"])
        history = History(**state["history"])
        log.info("resumed from %s at step %d", self.state_path, state["step"])
        return state["step"], history, state["best"], state["stale"]

    def _check_finite(self, step: int, losses: dict[str, float]) -> None:
        """Stop the run, naming the step and task, when a loss or W's gradient is not finite; the
        training state on disk stays at its last (good) checkpoint."""
        kept = "the last checkpoint of W is kept" if self.state_path is not None else "nothing was saved"
        for task, loss in losses.items():
            if not math.isfinite(loss):
                raise SupermergeError(f"step {step}: the loss of task '{task}' is {loss} ({kept})")
        rows = (~torch.isfinite(self.body.w.grad)).any(dim=1).nonzero().flatten().tolist()
        if rows:
            inputs = ", ".join(f"'{self.inputs[i]}'" for i in rows)
            raise SupermergeError(
                f"step {step}: the gradient of the coefficients of {inputs} is not finite ({kept})"
            )

    def train(self, resume: bool = False, progress: bool = True) -> History:
        """Run the optimisation; returns the per-step loss history."""
        step, history, best, stale = 0, History(), float("inf"), 0
        if resume and self.state_path is not None and self.state_path.exists():
            step, history, best, stale = self._load()
            history.resumed_at = step
        bar = tqdm(total=self.cfg.steps, initial=step, desc="supermerge", unit="step", disable=not progress)
        while step < self.cfg.steps and not history.stopped_early:
            self.comm.step = step + 1
            _maybe_die_for_test(self.comm.global_rank, step + 1)
            self.optimizer.zero_grad()
            losses = self.losses_and_grad()
            self._check_finite(step + 1, losses)
            self.optimizer.step()
            step += 1
            history.losses.append(losses)
            mean = sum(losses.values()) / len(losses)
            if mean < best - self.cfg.early_stop_min_delta:
                best, stale = mean, 0
            else:
                stale += 1
            history.stopped_early = 0 < self.cfg.early_stop_patience <= stale
            bar.set_postfix({"loss": f"{mean:.4f}", **{t: f"{v:.3f}" for t, v in losses.items()}})
            bar.update()
            if (
                self.state_path is not None
                and self.comm.is_leader
                and (step % self.cfg.checkpoint_every == 0 or step == self.cfg.steps or history.stopped_early)
            ):
                self._save(step, history, best, stale)
        bar.close()
        return history

    @torch.no_grad()
    def accuracy(self) -> dict[str, float]:
        """Validation accuracy per task at the current W (tasks with labels only)."""
        labelled = [
            task for task in self.tasks if self.model.targets(task.data.inputs, task.data.labels) is not None
        ]
        correct = torch.zeros(len(labelled), dtype=torch.float64)
        with self.body.inference_pass(self.model.module) as body:
            params = {**self.fixed, **body}
            for t, task, (inputs, labels, _), counted in self._my_batches(labelled):
                logits = self.model.logits(params, task.head, inputs)
                correct[t] += int(self.model.correct(logits, inputs, labels).sum()) if counted else 0
        self.comm.all_reduce(correct, "accuracy")
        return {task.name: float(correct[t]) / len(task.data) for t, task in enumerate(labelled)}


def _maybe_die_for_test(rank: int, step: int) -> None:
    """Test hook for fault handling: SUPERMERGE_TEST_KILL="RANK:STEP" SIGKILLs that rank as it
    starts that step (the fault tests kill one rank of a running job this way)."""
    target = os.environ.get("SUPERMERGE_TEST_KILL")
    if target and target == f"{rank}:{step}":
        log.error("rank %d: killed by SUPERMERGE_TEST_KILL at step %d", rank, step)
        os.kill(os.getpid(), 9)
