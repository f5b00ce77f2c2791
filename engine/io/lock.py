"""An exclusive lock on an output path, so that two runs never write the same output at once.

The lock is `flock` on `<parent>/.<name>.lock`. The kernel releases it when the holding process
ends, however it ends, so a lock file left by a killed run blocks nothing: flock on it succeeds.
The holder writes "<pid> <host>" into the file, for the message of a run that is refused.

The holder removes the file on release, while it still holds the lock, so that no `.lock` file is
left beside the output. This is race-free: a run that opened the file before it was removed may
then lock the removed file, so after locking, a run checks that the path still names the file it
locked, and starts over if not.

Within one process the lock is re-entrant: a driver that holds it for a whole run can hand the
same path to a writer, which takes it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from supermerge.errors import SupermergeError

log = logging.getLogger(__name__)


@dataclass
class _Held:
    fd: int | None  # None: the file system cannot lock
    depth: int


_held: dict[Path, _Held] = {}  # this process's lock files


def lock_path(target: Path) -> Path:
    """The lock file of output `target`: `<parent>/.<name>.lock`."""
    return target.parent.resolve() / f".{target.name}.lock"


class OutputLock:
    """Exclusive, re-entrant lock on output `target` (a folder or file; it need not exist, its
    parent must). Use as a context manager, or `acquire()` / `release()`.

    Raises:
        SupermergeError: at acquire, when another process holds the lock (naming its pid and
            host) or the lock file cannot be created. A file system without flock (some network
            file systems) only logs a warning: the run goes on unprotected.
    """

    def __init__(self, target: Path) -> None:
        self.target = target
        self.path = lock_path(target)
        self._acquired = False

    def acquire(self) -> None:
        """Take the lock (again, if this process holds it already); at once or never: no waiting."""
        if self._acquired:
            return
        held = _held.get(self.path)
        if held is not None:
            held.depth += 1
        else:
            _held[self.path] = _Held(_lock(self.target, self.path), 1)
        self._acquired = True

    def release(self) -> None:
        """Release what `acquire` took; nothing to do if it took nothing (a rank that never locked)."""
        if not self._acquired:
            return
        self._acquired = False
        held = _held[self.path]
        held.depth -= 1
        if held.depth == 0:
            del _held[self.path]
            if held.fd is not None:
                self.path.unlink(missing_ok=True)
                os.close(held.fd)

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _lock(target: Path, path: Path) -> int | None:
    """flock `path` (created if missing) for `target`; returns its descriptor, or None where the
    file system cannot lock."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise SupermergeError(f"{path}: cannot create the lock file of {target} ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").split()
            os.close(fd)
            pid, host = (holder + ["?", "?"])[:2]
            raise SupermergeError(
                f"{target}: another run is writing it (pid {pid} on host {host}, lock {path}); "
                "wait for it to end or stop it"
            ) from None
        except OSError as e:
            os.close(fd)
            log.warning("%s: cannot lock %s (%s): no protection from a second run", target, path, e.strerror)
            return None
        if _names(path, fd):
            break
        os.close(fd)  # its holder removed it after we opened it: lock the new file
    with contextlib.suppress(OSError):  # the holder's name only serves messages: a full disk may lose it
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    return fd


def _names(path: Path, fd: int) -> bool:
    """Whether `path` still names the file open at `fd`."""
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (opened.st_dev, opened.st_ino)
