"""Memory accounting: peak process RSS, CUDA peak allocation, and bytes of tensors held.

`ru_maxrss` is a process-lifetime peak: to measure one run, run it in a fresh process
(the benchmarks do). `TensorBytes` counts what the engine itself holds (base, task vectors,
merged tensors, output buffers), which is deterministic and comparable across machines.
"""

from __future__ import annotations

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
