"""What the tests check on disk: that inputs are left byte for byte as they were."""

from __future__ import annotations

import hashlib
from pathlib import Path


def tree_hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file under each root (a root may be a file), by path."""
    hashes = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            hashes[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes
