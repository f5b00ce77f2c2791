"""Writing a file or a folder so that its path holds either the old version or the new one.

The new version is written under a temporary name beside the target (same file system, so the
final `os.replace` is atomic) and renamed into place only once it is complete; if writing fails,
the temporary file or folder is removed and the target is left as it was.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write the file at; when the block ends, the file is
    flushed to disk and renamed to `path` (replacing it). If the block raises, it is removed.

    The temporary name keeps `path`'s stem (`run.state.pt` -> `run.state.tmp`): writers that name
    their contents after the file (torch.save names its zip records after it) write the same
    bytes as they would at `path`.
    """
    tmp = path.with_suffix(".tmp")
    try:
        yield tmp
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class TempFolder:
    """A new, empty folder beside `target` (`.<name>.tmp-<pid>`) that `commit()` renames to `target`.

    Missing parent folders are created; a leftover folder of the same name (a killed run of this
    pid) is removed first. `commit()`
    replaces an existing `target`: the old folder is moved aside, the new one moved in, and only
    then is the old one deleted, so `target` is missing only between two renames.
    """

    def __init__(self, target: Path) -> None:
        self.target = target
        self.path = target.parent / f".{target.name}.tmp-{os.getpid()}"
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)

    def commit(self) -> Path:
        """Move the folder to `target`, replacing what is there; returns `target`."""
        if self.target.exists():
            trash = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
            os.replace(self.target, trash)
            os.replace(self.path, self.target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.path, self.target)
        return self.target

    def discard(self) -> None:
        """Remove the folder and what was written into it (nothing to do after `commit()`)."""
        shutil.rmtree(self.path, ignore_errors=True)


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
