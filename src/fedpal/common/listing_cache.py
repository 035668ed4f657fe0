"""A text listing cached across commands, so ``fedpal algorithms`` answers without importing torch.

Listing the methods means importing every method module, and with it torch (2-6 s). The listing depends only on
the package's source files, so it is kept in the user's cache directory under a key made from those files' paths,
sizes and modification times: any edit or upgrade makes a new key, and the first call after it builds the text.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # fedpal/ (its __init__.py holds the version)


def source_key(package_dir: Path) -> str:
    """A digest of every ``.py`` file of the package by path, size and modification time (stat calls only)."""
    digest = hashlib.sha256()
    for path in sorted(package_dir.rglob("*.py")):
        stat = path.stat()
        digest.update(f"{path.relative_to(package_dir)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "fedpal"


def cached_listing(name: str, build: Callable[[], str]) -> str:
    """The text ``build()`` returns, read from the cache when the package's sources have not changed since it was
    written; an unwritable cache only costs the rebuild."""
    path = cache_dir() / f"{name}-{source_key(PACKAGE_DIR)}.txt"
    try:
        return path.read_text()
    except OSError:
        pass
    text = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for old in path.parent.glob(f"{name}-*.txt"):  # listings of earlier sources
            old.unlink(missing_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    except OSError:
        pass
    return text
