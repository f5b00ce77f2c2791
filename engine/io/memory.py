"""Memory accounting: peak process RSS, CUDA peak allocation, and bytes of tensors held.

`ru_maxrss` is a process-lifetime peak: to measure one run, run it in a fresh process
(the benchmarks do). `TensorBytes` counts what the engine itself holds (base, task vectors,
merged tensors, output buffers), which is deterministic and comparable across machines.
"""

from __future__ import annotations

import math
import resource

import torch


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cuda_peak_bytes(device: str) -> int | None:
    """torch.cuda.max_memory_allocated for a CUDA device, else None."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(torch.device(device))
    return None


def nbytes(*tensors: torch.Tensor) -> int:
    """Total bytes of the given tensors' elements."""
    return sum(t.numel() * t.element_size() for t in tensors)


class TensorBytes:
    """Tracks the peak of a byte count the caller reports at points of its choosing."""

    def __init__(self) -> None:
        self.peak = 0

    def observe(self, held: int) -> None:
        """Report `held` bytes currently held; keeps the maximum."""
        self.peak = max(self.peak, held)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


SHRINK_FROM = 1 << 20  # bytes: smaller requests (norms, biases) never shrink a slot


class Scratch:
    """CPU buffers reused from one tensor to the next, one per named slot.

    A merge that streams a model tensor by tensor asks for the same few slots (base, each task
    vector, a read buffer) for every tensor. A fresh large CPU tensor costs its page faults each
    time (the kernel maps and zeroes every 4 KiB page on first touch), about 4x the arithmetic
    done on it; a slot keeps its memory for the next tensor. It grows when a larger tensor comes
    and shrinks when one of at least SHRINK_FROM bytes needs under a quarter of it, so a model's
    few huge tensors (embeddings, head) do not pin their size over all its layers.
    """

    def __init__(self) -> None:
        self._slots: dict[str, torch.Tensor] = {}

    def take(self, slot: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """A tensor of `shape` and `dtype` in slot `slot`'s memory, its values undefined; valid
        until the next `take` of the same slot."""
        size = math.prod(shape) * dtype.itemsize
        buffer = self._slots.get(slot)
        if buffer is None or buffer.numel() < size or (size >= SHRINK_FROM and buffer.numel() > 4 * size):
            self._slots[slot] = buffer = None  # the old memory goes before the new comes
            self._slots[slot] = buffer = torch.empty(size, dtype=torch.uint8)
        return buffer[:size].view(dtype).view(shape)

    def holds(self, tensor: torch.Tensor) -> bool:
        """True if `tensor` lives in one of the slots (it must be copied to outlive them)."""
        ptr = tensor.untyped_storage().data_ptr()
        return any(b.untyped_storage().data_ptr() == ptr for b in self._slots.values())

    @property
    def nbytes(self) -> int:
        """Bytes held by all slots."""
        return sum(b.numel() for b in self._slots.values())
