"""Writing a file or a folder so that its path holds either the old version or the new one.

The new version is written under a temporary name beside the target (same file system, so the
final `os.replace` is atomic) and renamed into place only once it is complete; if writing fails,
the temporary file or folder is removed and the target is left as it was. A full file system is
reported as one line (`disk_full_error`) rather than the writer's own exception.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import socket
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from supermerge.errors import SupermergeError
from supermerge.io.lock import OutputLock
from supermerge.io.memory import human_bytes

log = logging.getLogger(__name__)

# what follows `.<name>.` in a temporary folder's name: tmp-<host>-<pid>, or old-... for the output
# being replaced; before hosts were named: tmp-<pid>
_LEFTOVER = re.compile(r"(?:tmp|old)-(?:(?P<host>.+)-)?(?P<pid>\d+)")


def is_disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether `exc`, raised while writing into `folder`, means its file system is full.

    Call it before removing what was written: torch.save's zip writer reports a full disk only as
    "unexpected pos", so its errors count as a full disk when no block is left for this user.
    """
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    if isinstance(exc, SafetensorError):  # carries the OS error as text only
        return "os error 28" in str(exc)
    if isinstance(exc, RuntimeError) and "inline_container" in str(exc):
        return os.statvfs(folder).f_bavail == 0
    return False


def disk_full_error(target: Path, needed: int | None = None, at_least: bool = False) -> SupermergeError:
    """`<target>: no space left on device (needed ~X, free Y)`; `needed` in bytes (None: unknown;
    `at_least`: a lower bound), free space measured now on `target`'s parent's file system."""
    free = f"free {human_bytes(shutil.disk_usage(target.parent).free)}"
    if needed is not None:
        free = f"needed {'at least ' if at_least else '~'}{human_bytes(needed)}, {free}"
    return SupermergeError(f"{target}: no space left on device ({free})")


def raise_if_disk_full(
    exc: BaseException,
    target: Path,
    cleanup: Callable[[], None],
    needed: int | None = None,
    at_least: bool = False,
) -> None:
    """If `exc` (raised while writing `target`) means a full disk: run `cleanup` (remove what was
    written), then raise `disk_full_error` in its place."""
    if is_disk_full(exc, target.parent):
        # the failed writer's frames may hold its file open (torch.save's do): free its space
        failed: BaseException | None = exc
        while failed is not None:
            traceback.clear_frames(failed.__traceback__)
            failed = failed.__context__
        cleanup()
        raise disk_full_error(target, needed, at_least) from None


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write the file at; when the block ends, the file is
    flushed to disk and renamed to `path` (replacing it). If the block raises, it is removed (a
    full disk raises `disk_full_error`).

    The temporary name keeps `path`'s stem (`run.state.pt` -> `run.state.tmp`): writers that name
    their contents after the file (torch.save names its zip records after it) write the same
    bytes as they would at `path`. A leftover of a killed run is overwritten by the next write.
    """
    tmp = path.with_suffix(".tmp")
    try:
        yield tmp
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        raise_if_disk_full(e, path, lambda: tmp.unlink(missing_ok=True))
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    """Whether process `pid` of this host exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        pass
    return True


def remove_leftovers(target: Path) -> None:
    """Remove the temporary folders of `target` (`.<name>.tmp-<host>-<pid>`, and `.old-` ones
    moved aside by `TempFolder.commit`) that killed runs of this host left, with a warning each.

    Raises:
        SupermergeError: a leftover of a live process (another run writing `target`) or of another
            host (whose liveness cannot be checked: it is to be removed by hand).
    """
    prefix = f".{target.name}."
    host, me = socket.gethostname(), os.getpid()
    for path in sorted(target.parent.iterdir()):
        match = _LEFTOVER.fullmatch(path.name[len(prefix) :]) if path.name.startswith(prefix) else None
        if match is None or not path.is_dir():
            continue
        pid, owner = int(match["pid"]), match["host"] or host
        if owner != host:
            raise SupermergeError(
                f"{path}: left by a run on host {owner} (pid {pid}), which cannot be checked from "
                f"{host}; remove it by hand if that run is gone"
            )
        if pid != me and _alive(pid):
            raise SupermergeError(
                f"{target}: another run (pid {pid}) is writing it into {path}; wait for it to end or stop it"
            )
        log.warning("removing %s, left by a run that was killed (pid %d)", path, pid)
        shutil.rmtree(path)


class TempFolder:
    """A new, empty folder beside `target` (`.<name>.tmp-<host>-<pid>`) that `commit()` renames to
    `target`, holding `target`'s `OutputLock` from creation to `commit()` or `discard()`.

    Missing parent folders are created; leftovers of killed runs are removed first (see
    `remove_leftovers`). `commit()` replaces an existing `target`: the old folder is moved aside
    (`.<name>.old-<host>-<pid>`), the new one moved in, and only then is the old one deleted, so
    `target` is missing only between two renames.

    Raises:
        SupermergeError: another run holds the lock or left a live or foreign leftover; the disk
            is full.
    """

    def __init__(self, target: Path) -> None:
        self.target = target
        stamp = f"{socket.gethostname()}-{os.getpid()}"
        self.path = target.parent / f".{target.name}.tmp-{stamp}"
        self._trash = target.parent / f".{target.name}.old-{stamp}"
        target.parent.mkdir(parents=True, exist_ok=True)
        self._lock = OutputLock(target)
        self._lock.acquire()
        try:
            remove_leftovers(target)
            self.path.mkdir()
        except BaseException as e:
            self._lock.release()
            raise_if_disk_full(e, target, lambda: None)
            raise

    def commit(self) -> Path:
        """Move the folder to `target`, replacing what is there; returns `target`."""
        if self.target.exists():
            os.replace(self.target, self._trash)
            os.replace(self.path, self.target)
            shutil.rmtree(self._trash, ignore_errors=True)
        else:
            os.replace(self.path, self.target)
        self._lock.release()
        return self.target

    def discard(self) -> None:
        """Remove the folder and what was written into it (nothing to do after `commit()`)."""
        shutil.rmtree(self.path, ignore_errors=True)
        self._lock.release()


@contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yields a new, empty temporary folder beside `target` (see `TempFolder`); when the block ends
    it is renamed to `target`, replacing an existing one. If the block raises, it is removed."""
    folder = TempFolder(target)
    try:
        yield folder.path
        folder.commit()
    finally:
        folder.discard()
