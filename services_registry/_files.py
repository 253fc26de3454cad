"""File helpers shared by the loaders: content hashes and paths for messages."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["IGNORED_PARTS", "iter_files", "hash_files", "display_path"]

IGNORED_PARTS = frozenset({"__pycache__", ".git", ".mypy_cache", ".pytest_cache", ".DS_Store"})
"""Names that never belong to a service's content (caches written by running it)."""


def iter_files(root: Path) -> Iterator[Path]:
    """Every file under ``root`` (or ``root`` itself if it is a file), sorted, caches skipped."""
    if root.is_file():
        yield root
        return
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part in IGNORED_PARTS for part in rel.parts) or path.suffix == ".pyc":
            continue
        if path.is_file():
            yield path


def hash_files(roots: Iterable[tuple[str, Path]], salt: str = "") -> str:
    """sha256 over names and bytes of every file under the labelled ``roots``.

    The hash changes when any file is added, removed, renamed or edited, and does not
    depend on where the folder lives or on file times, so re-installing an unchanged service
    is recognised as the same version.
    """
    digest = hashlib.sha256(salt.encode())
    for label, root in roots:
        for path in iter_files(root):
            rel = path.name if root.is_file() else path.relative_to(root).as_posix()
            digest.update(f"{label}/{rel}".encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def display_path(path: Path) -> str:
    """``path`` relative to the working directory when it is below it (shorter messages)."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)
