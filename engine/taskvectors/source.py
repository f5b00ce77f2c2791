"""Task vectors tau(i, j) = expert_i(j) - base(j), computed lazily tensor by tensor.

`TaskVectorSource` checks compatibility of the base and all experts up front (tensor names,
shapes, dtypes, architecture fields of config.json) and then yields, per mergeable tensor, the
base and the k task vectors in the accumulation dtype (fp32), cast to the storage dtype when asked.
Tensors matching the user's head patterns are task-specific: they are never merged and may
differ in shape or be absent from the base. Non-float tensors (integer buffers such as
`position_ids`) are not weights: they are carried from the base and need not be in the experts.

Two merges that run but do nothing useful are warned about (logging, one line each): an expert
whose config.json cannot be compared with the base's (`open_source`), and an expert identical to
the base (`TaskVectorSource.warn_identical_experts`, once its task vectors have been read).
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from supermerge.errors import InputError
from supermerge.io.adapters import AdapterCheckpoint, open_expert
from supermerge.io.checkpoint import Checkpoint
from supermerge.io.finite import non_finite
from supermerge.io.memory import Scratch, nbytes

log = logging.getLogger(__name__)

STAGING_BYTES = 16 << 20  # a streaming merge reads tensors through a buffer of this size

# config.json fields that fix the architecture: experts must agree with the base on these.
ARCHITECTURE_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "head_dim",
    "d_model",
    "num_layers",
    "n_embd",
    "n_layer",
    "n_head",
)


@dataclass
class Expert:
    """One fine-tuned model to merge: a task name and its checkpoint (a model, or a PEFT adapter on
    the base)."""

    name: str
    checkpoint: Checkpoint | AdapterCheckpoint


def is_head(name: str, head_patterns: Sequence[str]) -> bool:
    """True if tensor `name` matches any glob in `head_patterns` (task-specific, not merged)."""
    return any(fnmatch.fnmatchcase(name, p) for p in head_patterns)


def check_finite(tensor: torch.Tensor, checkpoint: Checkpoint, name: str) -> None:
    """Raise InputError naming the file and tensor if `tensor` holds NaN or Inf."""
    bad = non_finite(tensor)
    if bad is not None:
        raise InputError(checkpoint.infos[name].file, f"weight contains {bad}", name)


class TaskVectorSource:
    """The base model and k experts, read as task vectors one tensor at a time.

    Args:
        base: the shared base checkpoint.
        experts: the fine-tuned experts, in task order.
        head_patterns: globs of task-specific tensor names (never merged).
        storage_dtype: dtype task vectors are returned in (None: fp32, the accumulation dtype).
        input_dtype: every base and expert tensor is rounded to this dtype as it is read, before
            anything else (a merge computing as mergekit does in its dtype, which loads its
            inputs in it); None: as stored.
        scratch: where a streaming merge reads: then `read_base` and `task_vector(s)` return
            tensors in its slots (CPU), valid until the next tensor is read (io.memory.Scratch);
            None: fresh tensors the caller may keep.

    Raises:
        InputError: at construction, for any incompatibility (missing or extra tensor, shape
            or dtype mismatch, architecture mismatch), naming the expert file and tensor.
    """

    def __init__(
        self,
        base: Checkpoint,
        experts: Sequence[Expert],
        head_patterns: Sequence[str] = (),
        storage_dtype: torch.dtype | None = None,
        input_dtype: torch.dtype | None = None,
        scratch: Scratch | None = None,
    ) -> None:
        if not experts:
            raise InputError(base.path, "no experts to merge")
        self.base = base
        self.experts = list(experts)
        self.head_patterns = tuple(head_patterns)
        self.storage_dtype = storage_dtype or torch.float32
        self.input_dtype = input_dtype
        self.scratch = scratch
        self.names = [n for n in base.names if self.mergeable(base, n)]
        self.bytes_read = 0
        # per expert: a task vector tensor with a nonzero entry was read; else the names read in full
        self._differs = [False] * self.k
        self._zero_in_full: list[set[str]] = [set() for _ in self.experts]
        for expert in self.experts:
            self._check_compatible(expert)

    def mergeable(self, checkpoint: Checkpoint, name: str) -> bool:
        """True for a float tensor that is not a task-specific head."""
        return checkpoint.infos[name].dtype.is_floating_point and not is_head(name, self.head_patterns)

    @property
    def k(self) -> int:
        return len(self.experts)

    @property
    def has_adapters(self) -> bool:
        """Whether any expert is a PEFT adapter."""
        return any(isinstance(e.checkpoint, AdapterCheckpoint) for e in self.experts)

    @property
    def merged_dtype(self) -> torch.dtype:
        """dtype of the merged body: the base's, or float32 where its tensors' dtypes differ."""
        dtypes = {self.base.infos[n].dtype for n in self.names}
        return dtypes.pop() if len(dtypes) == 1 else torch.float32

    def _check_compatible(self, expert: Expert) -> None:
        ckpt = expert.checkpoint
        if self.base.config is not None and ckpt.config is not None:
            for field in ARCHITECTURE_FIELDS:
                a, b = self.base.config.get(field), ckpt.config.get(field)
                if a != b:
                    raise InputError(
                        ckpt.path / "config.json",
                        f"architecture mismatch: field '{field}' is {b!r}, base has {a!r}",
                    )
        for name in self.names:
            if name not in ckpt:
                raise InputError(ckpt.path, "missing tensor (present in base)", name)
            got, want = ckpt.infos[name], self.base.infos[name]
            if got.shape != want.shape:
                raise InputError(
                    got.file, f"shape mismatch: {list(got.shape)} vs base {list(want.shape)}", name
                )
            if got.dtype != want.dtype:
                raise InputError(got.file, f"dtype mismatch: {got.dtype} vs base {want.dtype}", name)
        for name in ckpt.names:
            if name not in self.base and self.mergeable(ckpt, name):
                raise InputError(
                    ckpt.infos[name].file,
                    "tensor not in base (mark it as a task-specific head if it is one)",
                    name,
                )

    def _read(self, checkpoint: Checkpoint, name: str, span: tuple[int, int] | None = None) -> torch.Tensor:
        tensor = checkpoint.read(name) if span is None else checkpoint.read_range(name, *span)
        self.bytes_read += nbytes(tensor)
        check_finite(tensor, checkpoint, name)
        return tensor

    def _input(self, checkpoint: Checkpoint, name: str, span: tuple[int, int] | None) -> torch.Tensor:
        tensor = self._read(checkpoint, name, span)
        return tensor if self.input_dtype is None else tensor.to(self.input_dtype)

    def _read_fp32(self, checkpoint: Checkpoint, name: str, slot: str) -> torch.Tensor:
        """Tensor `name` in fp32 in the scratch slot `slot`, read piece by piece, checked finite."""
        assert self.scratch is not None
        info = checkpoint.infos[name]
        out = self.scratch.take(slot, info.shape, torch.float32)
        checkpoint.read_into(name, out, self.scratch.take("staging", (STAGING_BYTES,), torch.uint8))
        self.bytes_read += info.nbytes
        check_finite(out, checkpoint, name)
        return out

    def read_base(self, name: str, span: tuple[int, int] | None = None) -> torch.Tensor:
        """Base tensor `name` in fp32 (only its flattened elements [lo, hi) when `span` is given)."""
        if self.scratch is not None and span is None and self.input_dtype is None:
            return self._read_fp32(self.base, name, "base")
        return self._input(self.base, name, span).float()

    def task_vectors(self, name: str, base: torch.Tensor) -> list[torch.Tensor]:
        """The k task vectors of tensor `name`, each (expert - base) in fp32, cast to storage dtype.

        Args:
            name: a mergeable tensor name (in `self.names`).
            base: the fp32 base tensor of `name` (from `read_base`), on the device to compute on.
        Returns:
            k tensors shaped like `base`, on its device, one expert read at a time.
        """
        return [self.task_vector(name, base, i) for i in range(self.k)]

    def task_vector(
        self, name: str, base: torch.Tensor, index: int, span: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Task vector of expert `index` for tensor `name` (see `task_vectors`); with `span`, only
        its flattened elements [lo, hi), `base` then being the same span of the base.

        The difference is taken in `base`'s dtype: fp32 as `read_base` returns it, or the lower
        precision a method computes in as mergekit's does (supermerge.merge, compute_dtype).
        """
        expert = self.experts[index].checkpoint
        if isinstance(expert, AdapterCheckpoint):
            return self._adapter_task_vector(index, name, base, span)
        in_scratch = self.scratch is not None and span is None and self.input_dtype is None
        in_scratch = in_scratch and base.device.type == "cpu" and base.dtype == torch.float32
        same = self._same_bytes(expert, name)  # e.g. mergekit's linear without a base: model 1 is it
        slot = f"task vector {index}"
        if same and in_scratch:
            tau = self.scratch.take(slot, base.shape, base.dtype).zero_()
        elif same:
            tau = torch.zeros_like(base)
        elif in_scratch:
            tau = self._read_fp32(expert, name, slot).sub_(base)
        else:  # a copy: read() may hand out memory-mapped data that must not change
            tau = self._input(expert, name, span).to(base.device, base.dtype, copy=True).sub_(base)
        if same:
            self._zero_in_full[index].add(name)
        else:
            self._note_zero(index, name, tau, span)
        return tau.to(self.storage_dtype)

    def _adapter_task_vector(
        self, index: int, name: str, base: torch.Tensor, span: tuple[int, int] | None
    ) -> torch.Tensor:
        """What expert `index`, a PEFT adapter, adds to tensor `name`: made from its factors or
        vectors in fp32 (not through the dense expert), on `base`'s device and in its dtype."""
        adapter = self.experts[index].checkpoint
        assert isinstance(adapter, AdapterCheckpoint)
        tau = adapter.task_vector(name)
        if span is not None:
            tau = tau.reshape(-1)[span[0] : span[1]]
        self.bytes_read += adapter.adapter_bytes(name)
        check_finite(tau, adapter, name)
        self._note_zero(index, name, tau, span)
        return tau.to(base.device, base.dtype).to(self.storage_dtype)

    def _note_zero(self, index: int, name: str, tau: torch.Tensor, span: tuple[int, int] | None) -> None:
        """Remember whether expert `index` differs from the base (see warn_identical_experts)."""
        if self._differs[index]:
            return
        if bool(tau.any()):
            self._differs[index] = True
        elif span is None or span == (0, self.base.infos[name].numel):
            self._zero_in_full[index].add(name)

    def _same_bytes(self, expert: Checkpoint, name: str) -> bool:
        """True when the expert's tensor `name` is the base's own bytes (same file and offset)."""
        mine, theirs = expert.infos[name], self.base.infos[name]
        return mine.offset >= 0 and (mine.file, mine.offset) == (theirs.file, theirs.offset)

    def warn_identical_experts(self) -> None:
        """Log a warning for each expert identical to the base: every mergeable tensor's task
        vector was read in full (by `task_vector(s)`) and all of them were zero. Call it once a
        merge has read its task vectors; experts only partly read (tensor ranges) are not judged.
        """
        for expert, differs, zero in zip(self.experts, self._differs, self._zero_in_full, strict=True):
            if self.names and not differs and zero.issuperset(self.names):
                log.warning(
                    "expert '%s' (%s) is identical to the base in every merged tensor: "
                    "its task vector is zero and it changes nothing",
                    expert.name,
                    expert.checkpoint.path,
                )

    def heads(self, expert: Expert) -> dict[str, torch.Tensor]:
        """The task-specific tensors of one expert (names matching the head patterns)."""
        return {
            n: self._read(expert.checkpoint, n)
            for n in expert.checkpoint.names
            if is_head(n, self.head_patterns)
        }


def open_source(
    base: Path,
    experts: Sequence[tuple[str, Path]],
    heads: Sequence[str],
    input_dtype: torch.dtype | None = None,
    scratch: Scratch | None = None,
) -> TaskVectorSource:
    """Open base and experts ((name, path) pairs) lazily and check they are compatible (no tensor
    data is read); `input_dtype` and `scratch` as TaskVectorSource takes them.

    The architecture fields of config.json are compared only where the base and the expert both
    have one; otherwise a warning says so: one per expert without config.json when the base has
    one, a single one when the base has none (then no expert can be checked, whatever it has).
    Names, shapes and dtypes of the tensors are checked in every case.
    """
    base_checkpoint = Checkpoint(base)
    source = TaskVectorSource(
        base_checkpoint,
        [Expert(name, open_expert(path, base_checkpoint)) for name, path in experts],
        heads,
        input_dtype=input_dtype,
        scratch=scratch,
    )
    if source.base.config is None:
        log.warning(
            "architectures not checked: the base (%s) has no config.json to compare the experts' with",
            source.base.path,
        )
    else:
        for expert in source.experts:
            if expert.checkpoint.config is None:
                log.warning(
                    "architecture of expert '%s' (%s) not checked against the base: it has no config.json",
                    expert.name,
                    expert.checkpoint.path,
                )
    return source
