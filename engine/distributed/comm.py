"""Process groups for the distributed engine: launch detection, counted collectives, fault reports.

The same `supermerge merge` runs as one process (no launcher: a `Comm` of size 1 whose
collectives are no-ops), or under torchrun, `deepspeed` or `accelerate launch`, which all set
RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT. Backend: gloo for CPU, NCCL for CUDA.

Every collective goes through `Comm`, which
- counts the bytes each rank sends into it (`CommStats`), the figure the plan and the
  benchmarks report;
- turns a failure (a peer killed, crashed or timed out) into `PeerFailure`, whose message names
  the rank(s) that stopped answering: each rank records in the launcher's key-value store that
  it is alive and whether it failed, so the survivors can tell who is missing.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from supermerge.distributed.launch import Launch
from supermerge.errors import SupermergeError
from supermerge.io.memory import nbytes

log = logging.getLogger(__name__)
FAILED_KEY = "supermerge/failed/{rank}"
# torch 2.13 renamed the flat-tensor collectives (the old names warn); same arguments
_ALL_GATHER = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


class PeerFailure(SupermergeError):
    """A collective failed because another rank died or stopped answering."""


@dataclass
class CommStats:
    """Bytes this rank sent, per tag ("merged", "grad", "dW", ...), since the last reset.

    Counted as a ring algorithm moves them: all_gather (size - 1) x input, reduce_scatter
    (size - 1) / size x input, all_reduce 2 (size - 1) / size x input; broadcast and reduce as a
    pipelined chain, (size - 1) / size x the tensor (the average over the ranks: every rank but
    the last forwards it once).
    """

    bytes_by_tag: dict[str, int] = field(default_factory=dict)

    def add(self, tag: str, nbytes: int) -> None:
        self.bytes_by_tag[tag] = self.bytes_by_tag.get(tag, 0) + nbytes

    def reset(self) -> None:
        self.bytes_by_tag.clear()


class Comm:
    """A group of ranks (the whole job, or a subgroup) and its counted collectives.

    Attributes:
        group: the torch process group (None when the job is one process).
        ranks: global ranks of the members, in group order.
        rank: this process's index in `ranks`.
        stats: bytes this rank sent, shared by the subgroups split from this Comm.
    """

    def __init__(
        self, group: Any, ranks: list[int], rank: int, stats: CommStats | None = None, label: str = "world"
    ) -> None:
        self.group, self.ranks, self.rank = group, ranks, rank
        self.stats = stats if stats is not None else CommStats()
        self.label = label
        self.step: int | None = None  # the training step, for error messages
        self.failing = False
        self._subgroups: list[Comm] = []

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def global_rank(self) -> int:
        return self.ranks[self.rank]

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def _run(self, op: str, tag: str, nbytes: float, call: Callable[[], Any]) -> Any:
        if self.size == 1:
            return None
        self.stats.add(tag, int(nbytes))
        try:
            return call()
        except (RuntimeError, dist.DistBackendError) as e:
            raise self._failure(op, e) from None

    def all_reduce(self, tensor: torch.Tensor, tag: str) -> None:
        """In-place sum over the group."""
        wire = 2 * (self.size - 1) / self.size * nbytes(tensor)
        self._run("all_reduce", tag, wire, lambda: dist.all_reduce(tensor, group=self.group))

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, tag: str) -> None:
        """out (inp's size / group size) = this rank's piece of the sum of every rank's inp."""
        if self.size == 1:
            out.copy_(inp)
            return
        wire = (self.size - 1) / self.size * nbytes(inp)
        self._run("reduce_scatter", tag, wire, lambda: _REDUCE_SCATTER(out, inp, group=self.group))

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, tag: str) -> None:
        """out = every rank's inp, concatenated in group order."""
        if self.size == 1:
            out.copy_(inp)
            return
        wire = (self.size - 1) * nbytes(inp)
        self._run("all_gather", tag, wire, lambda: _ALL_GATHER(out, inp, group=self.group))

    def start_broadcast(self, tensor: torch.Tensor, src: int, tag: str) -> Pending:
        """Begin tensor = member `src`'s tensor, on every member; `tensor` must be left alone until
        the returned handle's `wait()` (collectives started later may complete before it)."""
        wire = (self.size - 1) / self.size * nbytes(tensor)
        work = self._run(
            "broadcast",
            tag,
            wire,
            lambda: dist.broadcast(tensor, self.ranks[src], group=self.group, async_op=True),
        )
        return Pending(self, "broadcast", work)

    def reduce(self, tensor: torch.Tensor, dst: int, tag: str) -> None:
        """Member `dst`'s tensor = the sum of every member's tensor (the others' are overwritten)."""
        wire = (self.size - 1) / self.size * nbytes(tensor)
        self._run("reduce", tag, wire, lambda: dist.reduce(tensor, self.ranks[dst], group=self.group))

    def broadcast_object(self, obj: Any) -> Any:
        """The leader's `obj` on every rank (small Python objects only)."""
        if self.size == 1:
            return obj
        box = [obj]
        self._run(
            "broadcast",
            "objects",
            0,
            lambda: dist.broadcast_object_list(box, src=self.ranks[0], group=self.group),
        )
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in group order, on every rank (small Python objects only)."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        self._run("all_gather", "objects", 0, lambda: dist.all_gather_object(out, obj, group=self.group))
        return out

    def barrier(self) -> None:
        self._run("barrier", "barrier", 0, lambda: dist.barrier(group=self.group))

    def split(self, colors: list[int], label: str) -> Comm:
        """Subgroups by color (one per global rank of this group); returns this rank's.

        Collective over the whole job: every rank must call it with the same colors.
        """
        if len(colors) != self.size:
            raise ValueError(f"need one color per rank of {self.label}, got {len(colors)}")
        mine = None
        for color in sorted(set(colors)):
            members = [r for r, c in zip(self.ranks, colors, strict=True) if c == color]
            group = dist.new_group(members) if self.size > 1 else None
            if color == colors[self.rank]:
                mine = Comm(group, members, members.index(self.global_rank), self.stats, f"{label}{color}")
        assert mine is not None
        self._subgroups.append(mine)
        return mine

    def release(self) -> None:
        """Drop this Comm's and its subgroups' references to their process groups."""
        for sub in self._subgroups:
            sub.release()
        self._subgroups.clear()
        self.group = None

    def _failure(self, op: str, error: Exception) -> PeerFailure:
        """Record this rank's failure in the store, wait briefly for the other survivors to do the
        same, and name the ranks that did not: those died or hang."""
        where = f"{op} over {self.label} (ranks {self.ranks})" + (
            f" at step {self.step}" if self.step is not None else ""
        )
        self.failing = True
        if op.startswith("signal"):
            where = op + (f" at step {self.step}" if self.step is not None else "")
        store = _default_store()
        missing: list[int] | None = None
        if store is not None:
            try:
                store.set(FAILED_KEY.format(rank=self.global_rank), where)
                deadline = time.monotonic() + 3.0
                while True:
                    keys = [FAILED_KEY.format(rank=r) for r in self.ranks]
                    missing = [r for r, key in zip(self.ranks, keys, strict=True) if not store.check([key])]
                    if not missing or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
            except (RuntimeError, dist.DistError):  # the store lived in a rank that is gone
                missing = None
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if missing:
            who = f"rank {missing[0]}" if len(missing) == 1 else f"ranks {missing}"
            return PeerFailure(f"rank {self.global_rank}: {who} stopped answering during {where} ({first})")
        return PeerFailure(
            f"rank {self.global_rank}: a peer rank failed during {where}; the rendezvous store is "
            f"unreachable, so rank 0 (its host) is the likely one ({first})"
        )


@dataclass
class Pending:
    """A collective started by `Comm.start_*`; `wait()` finishes it (a no-op on one process)."""

    comm: Comm
    op: str
    work: Any

    def wait(self) -> None:
        if self.work is None:
            return
        try:
            self.work.wait()
        except (RuntimeError, dist.DistBackendError) as e:
            raise self.comm._failure(self.op, e) from None
        finally:
            self.work = None


def _default_store() -> Any:
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError):
        return None


def quiet_renamed_collectives() -> None:
    """Silence torch 2.13's deprecation warning for the renamed collectives, which torch's own
    helpers and DeepSpeed still call on every step."""
    deprecated = r"`torch\.distributed\.\w+` is deprecated"
    warnings.filterwarnings("ignore", message=deprecated, category=FutureWarning)


def prefer_this_environments_tools() -> None:
    """Put this interpreter's bin folder first on PATH (what activating its venv does), so that
    DeepSpeed's op builds find the venv's ninja: a system ninja of another version cannot read
    the build log the venv's wrote and rebuilds the op (3.5 min for async_io on 2 cores)."""
    bin_dir = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def init_comm(launch: Launch, device: torch.device, timeout_s: float) -> Comm:
    """The job's Comm: joins the launcher's process group, or a size-1 Comm without a launcher.

    Args:
        launch: this process's place in the job.
        device: where this rank computes: cpu (gloo) or its CUDA device (NCCL).
        timeout_s: how long a collective waits for a silent peer before failing.
    """
    if not launch.launched:
        return Comm(None, [0], 0)
    quiet_renamed_collectives()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    world, rank = dist.get_world_size(), dist.get_rank()
    log.info("rank %d of %d (%s)", rank, world, dist.get_backend())
    comm = Comm(dist.group.WORLD, list(range(world)), rank)

    def stopped_by_launcher(signum: int, frame: object) -> None:
        # torchrun and the deepspeed launcher SIGTERM the other ranks when one dies: report who
        if comm.failing:  # already reporting a failed collective
            return
        raise comm._failure(
            f"signal {signal.Signals(signum).name} from the launcher", RuntimeError("stopped")
        )

    signal.signal(signal.SIGTERM, stopped_by_launcher)
    return comm


def close_comm(comm: Comm) -> None:
    """Leave the process group cleanly (after a barrier, so no rank exits mid-collective), and free
    the groups now rather than at interpreter exit: a gloo group destroyed during finalization
    may have its worker threads release tensors that need the GIL (pytorch PR 179291; see
    docs/architecture.md, "Decisions and why")."""
    if dist.is_initialized():  # also the group of one DeepSpeed makes for an offloaded store
        comm.barrier()
        dist.destroy_process_group()
    comm.release()
    gc.collect()
