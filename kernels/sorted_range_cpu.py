"""The exact magnitude trim in C++ (sorted_range.cpp) for CPU tensors, loaded through ctypes.

Built once per machine with the system's C++ compiler (`$CXX`, else g++ or c++; about a second,
no torch headers) into `$SUPERMERGE_CACHE` (default ~/.cache/supermerge)/native, named by the
hash of the source and the compiler, written to a temporary file and renamed into place. Where no
compiler is found or the build fails, `library()` is None (logged once) and callers use the
Python replay (supermerge.methods.sparsify), which gives the same entries more slowly.

The call runs on one thread and releases the GIL (ctypes does for every foreign call). Memory
besides tau: at most 4 bytes per entry (the side of the first partition that holds lo or hi, as
8-byte words when it has at most half the entries, else as int32 indices), and one bit per entry.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("sorted_range.cpp")
# dtypes whose bits the C++ compares: float32 as 32-bit words, bfloat16 / float16 as 16-bit ones
WORD_BITS = {torch.float32: 32, torch.bfloat16: 16, torch.float16: 16}
MAX_ELEMENTS = 2**31 - 1  # the indices are int32


def cache_dir() -> Path:
    """Where supermerge keeps what it builds for this machine."""
    return Path(os.environ.get("SUPERMERGE_CACHE", Path.home() / ".cache" / "supermerge"))


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and (path := shutil.which(name)):
            return path
    return None


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built library (building it on first use), or None where it cannot be built."""
    compiler = _compiler()
    if compiler is None:
        log.warning("no C++ compiler found ($CXX, g++, c++): magnitude trims use the slower Python replay")
        return None
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256(SOURCE.read_bytes() + version.encode()).hexdigest()[:16]
    target = cache_dir() / "native" / f"sorted_range-{digest}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            cmd = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", str(SOURCE), "-o", str(built)]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                log.warning(
                    "building %s failed (magnitude trims use the slower Python replay): %s",
                    SOURCE.name,
                    result.stderr.strip()[-500:],
                )
                return None
            os.replace(built, target)
    lib = ctypes.CDLL(str(target))
    for bits in (32, 16):
        fn = getattr(lib, f"keep_sorted_range_{bits}")
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
        fn.restype = None
    return lib


def supports(flat: torch.Tensor) -> bool:
    """True if `keep_sorted_range` can take `flat` (contiguous CPU float32/bfloat16/float16 of
    fewer than 2^31 entries) and the library is built."""
    return (
        flat.device.type == "cpu"
        and flat.dtype in WORD_BITS
        and flat.is_contiguous()
        and flat.numel() <= MAX_ELEMENTS
        and library() is not None
    )


def keep_sorted_range(flat: torch.Tensor, lo: int, hi: int, descending: bool) -> None:
    """Zero, in place, the entries of `flat` (1-D, see `supports`; no NaN) that
    torch.argsort(|flat|, descending) on the CPU does not put at positions [lo, hi)."""
    lib = library()
    assert lib is not None and supports(flat)
    fn = getattr(lib, f"keep_sorted_range_{WORD_BITS[flat.dtype]}")
    fn(flat.data_ptr(), flat.numel(), lo, hi, int(descending))
