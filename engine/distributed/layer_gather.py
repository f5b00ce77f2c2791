"""Layer-by-layer gathering of the merged body (FSDP / ZeRO-3 style): `distributed.gather: layer`.

Rank r owns the merged piece [r S, (r + 1) S) of the flat body (see supermerge.distributed.plan).
Instead of all-gathering the whole body [N] once per step, each gather unit's merged tensors are
gathered from their owners just before the unit's module runs and freed when it returns; in
backward they are gathered again only if the unit's ops saved them (a linear layer saves its
weight, an embedding does not), and the unit's gradient is reduced to its owners, who add it to
their gradient piece [S], as soon as autograd has finished with the unit.

Units (`find_units`): every block of an nn.ModuleList (a transformer layer), and every other
module that holds merged tensors directly (an embedding, a LayerNorm, a Linear outside the
blocks). A unit's tensors may be parts of several owners' pieces: each owner broadcasts its part.
A tied tensor (one parameter in two modules' slots under one merged name, e.g. a causal LM's
output projection that is its input embedding) belongs to the unit of each module holding it:
each gathers it when it runs, and both units' gradients add up in the owners' gradient piece.

How it hooks into a forward that `torch.func.functional_call` runs on the task model's skeleton:
- a forward pre-hook gathers the unit into one flat buffer through `_Gather` (an autograd
  Function, so the unit's gradient reaches `_Gather.backward` in one flat tensor once every use
  of the unit is done) and puts views of it in the module's parameter slots; the post-hook puts
  the skeleton's tensors back and drops the buffer;
- a saved-tensor pack hook replaces every saved tensor that lives in a gathered buffer by a
  handle (unit, offset, size, stride), and the unpack hook gathers the unit again in backward.

Every gather and reduce is a collective: all ranks run the same passes (the trainer deals them
the same number of micro-batches) over the same graph, so they issue them in the same order.
With `ahead` > 0 each gather also starts broadcasting the units the previous pass gathered
next (`LayerGather`), so they travel while the current one computes (FSDP's prefetch).
Peak memory per rank: the piece, its gradient, the units in use (one at a time in a chain of
layers) and `ahead` prefetched ones, instead of the whole body and its gradient. Traffic per
micro-batch pass per rank (the same with prefetch, which only moves gathers earlier):
forward gather N b, backward gather at most N b, gradient reduce N 4 bytes, each times (R-1)/R
(b: bytes per merged element), independent of k.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from supermerge.distributed.comm import Comm, Pending
from supermerge.errors import SupermergeError
from supermerge.io.memory import nbytes


@dataclass
class Unit:
    """One gather unit: the merged tensors a module (with its submodules) uses.

    Attributes:
        label: the module's dotted name ("" for the root).
        module: the module whose forward hooks gather and free the unit.
        slots: (owning module, "_parameters" or "_buffers", attribute) of each tensor.
        tensors: index of each tensor in the body's order.
        shapes: shape of each tensor.
        starts: offset of each tensor in the unit's flat buffer.
        runs: (body lo, body hi, buffer offset) of the unit's contiguous stretches of the body.
        numel: elements of the unit.
    """

    label: str
    module: nn.Module
    slots: list[tuple[nn.Module, str, str]]
    tensors: list[int]
    shapes: list[tuple[int, ...]]
    starts: list[int]
    runs: list[tuple[int, int, int]]
    numel: int


def find_units(module: nn.Module, names: list[str], shapes: list[tuple[int, ...]]) -> list[Unit]:
    """The gather units of `module` for the merged tensors `names` (see module docstring).

    Raises SupermergeError naming any merged tensor that is not a parameter or buffer of a module.
    """
    index = {name: i for i, name in enumerate(names)}
    # a tied tensor is one object under several names: its other slots know it by identity
    tied = {
        id(tensor): index[name]
        for name, tensor in (
            *module.named_parameters(remove_duplicate=False),
            *module.named_buffers(remove_duplicate=False),
        )
        if name in index
    }
    body_starts = [0]
    for shape in shapes:
        body_starts.append(body_starts[-1] + math.prod(shape))
    units: list[Unit] = []

    def slots_of(mod: nn.Module, prefix: str, recurse: bool) -> list[tuple[nn.Module, str, str, int]]:
        found, seen = [], set()
        for sub_name, sub in mod.named_modules(remove_duplicate=False) if recurse else [("", mod)]:
            sub_prefix = f"{prefix}{sub_name}." if sub_name else prefix
            for kind in ("_parameters", "_buffers"):
                for attr, tensor in getattr(sub, kind).items():
                    t = None if tensor is None else index.get(sub_prefix + attr, tied.get(id(tensor)))
                    if t is not None and (id(sub), kind, attr) not in seen:  # a module met twice: one slot
                        seen.add((id(sub), kind, attr))
                        found.append((sub, kind, attr, t))
        return found

    def add(label: str, mod: nn.Module, found: list[tuple[nn.Module, str, str, int]]) -> None:
        found = sorted(found, key=lambda s: s[3])
        tensors = [t for *_, t in found]
        starts, runs, offset = [], [], 0
        for t in tensors:
            lo, hi = body_starts[t], body_starts[t + 1]
            starts.append(offset)
            if runs and runs[-1][1] == lo:
                runs[-1] = (runs[-1][0], hi, runs[-1][2])
            else:
                runs.append((lo, hi, offset))
            offset += hi - lo
        slots = [(m, k, a) for m, k, a, _ in found]
        units.append(Unit(label, mod, slots, tensors, [shapes[t] for t in tensors], starts, runs, offset))

    def visit(mod: nn.Module, prefix: str) -> None:
        direct = slots_of(mod, prefix, recurse=False)
        if direct:
            add(prefix.rstrip("."), mod, direct)
        for child_name, child in mod.named_children():
            child_prefix = f"{prefix}{child_name}."
            if isinstance(child, nn.ModuleList):
                for i, block in enumerate(child):
                    found = slots_of(block, f"{child_prefix}{i}.", recurse=True)
                    if found:
                        add(f"{child_prefix}{i}", block, found)
            else:
                visit(child, child_prefix)

    visit(module, "")
    missing = sorted(set(range(len(names))) - {t for unit in units for t in unit.tensors})
    if missing:
        what = [names[t] for t in missing[:3]]
        raise SupermergeError(
            f"distributed.gather layer: merged tensor(s) {what} are not held by any module of the "
            "model, so they cannot be gathered layer by layer; use distributed.gather: body"
        )
    return units


@dataclass
class Owners:
    """Where the merged body lives: rank r of `comm` owns elements [r S, (r + 1) S).

    Attributes:
        comm: the ranks training the body.
        piece_size: S.
        piece: [S] this rank's merged piece (the body's dtype).
        grad_piece: [S] fp32 gradient of the loss w.r.t. this rank's piece (accumulated).
    """

    comm: Comm
    piece_size: int
    piece: torch.Tensor
    grad_piece: torch.Tensor

    def _parts(self, lo: int, hi: int) -> Iterator[tuple[int, int, int]]:
        """(owner, lo, hi) of the owners' parts of body elements [lo, hi)."""
        s = self.piece_size
        for owner in range(lo // s, (hi - 1) // s + 1):
            yield owner, max(lo, owner * s), min(hi, (owner + 1) * s)

    def start_gather(self, out: torch.Tensor, lo: int, hi: int) -> list[Pending]:
        """Begin out [hi - lo] = merged body elements [lo, hi), from their owners (collective);
        `out` holds them once every returned handle has been waited on."""
        me, s = self.comm.rank, self.piece_size
        handles = []
        for owner, a, b in self._parts(lo, hi):
            part = out[a - lo : b - lo]
            if owner == me:
                part.copy_(self.piece[a - owner * s : b - owner * s])
            handles.append(self.comm.start_broadcast(part, owner, "merged"))
        return handles

    def gather(self, out: torch.Tensor, lo: int, hi: int) -> None:
        """out [hi - lo] = merged body elements [lo, hi), from their owners (collective)."""
        for handle in self.start_gather(out, lo, hi):
            handle.wait()

    def reduce(self, grad: torch.Tensor, lo: int, hi: int) -> None:
        """Sum every rank's fp32 `grad` of body elements [lo, hi) into the owners' grad_piece
        (collective; `grad` is overwritten)."""
        me, s = self.comm.rank, self.piece_size
        for owner, a, b in self._parts(lo, hi):
            part = grad[a - lo : b - lo]
            self.comm.reduce(part, owner, "grad")
            if owner == me:
                self.grad_piece[a - owner * s : b - owner * s] += part


class _Gather(torch.autograd.Function):
    """anchor -> the unit's flat merged buffer; backward reduces the unit's gradient to its owners."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, gather: LayerGather, unit: int) -> torch.Tensor:  # noqa: ARG004
        ctx.gather, ctx.unit = gather, unit
        return gather.materialise(unit)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, None, None]:
        ctx.gather.reduce_grad(ctx.unit, grad)
        return None, None, None


@dataclass
class _Handle:
    """A saved tensor that lives in unit `unit`'s buffer, packed without its data."""

    unit: int
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass
class LayerGather:
    """Gathers units just before use and frees them after (see module docstring), for one pass.

    Prefetch: a pass of the same kind (training or inference) over the same data gathers the same
    units in the same order, so the previous pass's order (`schedule`) says which units come
    next. While this pass repeats it, each gather also starts the broadcasts of the next `ahead`
    units of the schedule, which then travel while the current unit computes; once the pass
    departs from the schedule it prefetches nothing more. All ranks run the same passes, so
    they start the same collectives in the same order.

    Attributes:
        units: the gather units of the task model.
        owners: the pieces and their owners.
        dtype: dtype of the merged body.
        schedule: the units the previous pass of this kind gathered, in order ([]: no prefetch).
        ahead: units gathered ahead of use (0: none).
        live: unit -> its gathered flat buffer, for the units held now.
        gathers: the units this pass gathered, in order (the next pass's schedule).
        prefetched: how many of those gathers had been started ahead of use.
        peak_bytes: most bytes held at once in gathered buffers (prefetched ones included) and
            unit gradients.
    """

    units: list[Unit]
    owners: Owners
    dtype: torch.dtype
    schedule: list[int] = field(default_factory=list)
    ahead: int = 0
    live: dict[int, torch.Tensor] = field(default_factory=dict)
    gathers: list[int] = field(default_factory=list)
    prefetched: int = 0
    peak_bytes: int = 0
    _pending: dict[int, tuple[torch.Tensor, list[Pending]]] = field(default_factory=dict)
    _on_schedule: bool = True
    _storage_unit: dict[int, int] = field(default_factory=dict)

    def _observe(self, extra: int = 0) -> None:
        buffers = [*self.live.values(), *(buffer for buffer, _ in self._pending.values())]
        held = nbytes(*buffers) + extra
        self.peak_bytes = max(self.peak_bytes, held)

    def _start(self, u: int) -> tuple[torch.Tensor, list[Pending]]:
        unit = self.units[u]
        buffer = torch.empty(unit.numel, dtype=self.dtype, device=self.owners.piece.device)
        with torch.no_grad():
            handles = [
                handle
                for lo, hi, offset in unit.runs
                for handle in self.owners.start_gather(buffer[offset : offset + hi - lo], lo, hi)
            ]
        return buffer, handles

    def materialise(self, u: int) -> torch.Tensor:
        """Unit u's merged tensors in one flat buffer, gathered unless already held (collective)."""
        if u not in self.live:
            self.prefetched += u in self._pending
            buffer, handles = self._pending.pop(u, None) or self._start(u)
            for handle in handles:
                handle.wait()
            self.live[u] = buffer
            self._storage_unit[buffer.untyped_storage().data_ptr()] = u
            self.gathers.append(u)
            self._prefetch()
            self._observe()
        return self.live[u]

    def _prefetch(self) -> None:
        """Start the next `ahead` units of the schedule while this pass still follows it."""
        n = len(self.gathers)
        self._on_schedule = self._on_schedule and self.schedule[n - 1 : n] == self.gathers[-1:]
        if not self._on_schedule:
            return
        for v in self.schedule[n : n + self.ahead]:
            if v not in self.live and v not in self._pending:
                self._pending[v] = self._start(v)

    def _finish_prefetches(self) -> None:
        """Wait for the prefetched units the pass did not use (it left the schedule)."""
        for _, handles in self._pending.values():
            for handle in handles:
                handle.wait()

    def release(self, u: int) -> None:
        """Drop unit u's buffer (its memory is freed once no view of it is left)."""
        buffer = self.live.pop(u, None)
        if buffer is not None:
            del self._storage_unit[buffer.untyped_storage().data_ptr()]

    def reduce_grad(self, u: int, grad: torch.Tensor) -> None:
        """Send unit u's gradient [numel] to its owners and drop the unit (called by autograd)."""
        unit = self.units[u]
        grad32 = grad.detach().to(torch.float32, copy=True)
        self._observe(nbytes(grad, grad32))
        for lo, hi, offset in unit.runs:
            self.owners.reduce(grad32[offset : offset + hi - lo], lo, hi)
        self.release(u)

    def _views(self, u: int, flat: torch.Tensor) -> list[torch.Tensor]:
        unit = self.units[u]
        return [
            flat[start : start + math.prod(shape)].view(shape)
            for start, shape in zip(unit.starts, unit.shapes, strict=True)
        ]

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor | _Handle:
        if tensor.device.type == "meta" or tensor.layout != torch.strided:
            return tensor
        u = self._storage_unit.get(tensor.untyped_storage().data_ptr())
        if u is None:
            return tensor
        return _Handle(u, tensor.storage_offset(), tuple(tensor.size()), tuple(tensor.stride()))

    def _unpack(self, packed: torch.Tensor | _Handle) -> torch.Tensor:
        if not isinstance(packed, _Handle):
            return packed
        return self.materialise(packed.unit).as_strided(packed.size, packed.stride, packed.offset)

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Hooks on every unit's module, and the saved-tensor hooks, for the duration."""
        anchor = torch.zeros((), device=self.owners.piece.device, requires_grad=True)
        handles = []
        stacks: list[list[torch.Tensor]] = []  # per unit: the skeleton's tensors its calls replaced
        for u, unit in enumerate(self.units):
            saved: list[torch.Tensor] = []
            stacks.append(saved)

            def before(module: nn.Module, args: tuple, u: int = u, saved: list = saved) -> None:
                unit = self.units[u]
                flat = _Gather.apply(anchor, self, u) if torch.is_grad_enabled() else self.materialise(u)
                for (m, kind, attr), view in zip(unit.slots, self._views(u, flat), strict=True):
                    slots = getattr(m, kind)
                    saved.append(slots[attr])
                    slots[attr] = view

            def after(
                module: nn.Module, args: tuple, output: object, u: int = u, saved: list = saved
            ) -> None:
                unit = self.units[u]
                originals = saved[-len(unit.slots) :]
                del saved[-len(unit.slots) :]
                for (m, kind, attr), original in zip(unit.slots, originals, strict=True):
                    getattr(m, kind)[attr] = original
                if not saved:  # the outermost call of this module has returned
                    self.release(u)

            handles.append(unit.module.register_forward_pre_hook(before))
            handles.append(unit.module.register_forward_hook(after))
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
            self._finish_prefetches()
        finally:
            self._pending.clear()  # after an error unwaited: the collectives keep their tensors alive
            for handle in handles:
                handle.remove()
            for unit, saved in zip(self.units, stacks, strict=True):  # a forward that raised
                for (m, kind, attr), original in zip(unit.slots, saved[: len(unit.slots)], strict=False):
                    getattr(m, kind)[attr] = original
                saved.clear()


class GatheredTensors(Mapping):
    """The merged body by tensor name, each tensor gathered from its owners when asked for.

    Collective: every rank of the body's ranks must ask for the same names in the same order
    (the leader writes them; the others take part and drop them).
    """

    def __init__(self, names: list[str], shapes: list[tuple[int, ...]], owners: Owners, dtype: torch.dtype):
        self.names, self.shapes, self.owners, self.dtype = names, shapes, owners, dtype
        self._starts = [0]
        for shape in shapes:
            self._starts.append(self._starts[-1] + math.prod(shape))
        self._index = {name: i for i, name in enumerate(names)}

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self._index[name]
        lo, hi = self._starts[t], self._starts[t + 1]
        out = torch.empty(hi - lo, dtype=self.dtype, device=self.owners.piece.device)
        self.owners.gather(out, lo, hi)
        return out.view(self.shapes[t])

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)
