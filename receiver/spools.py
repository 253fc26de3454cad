"""The spool folders of a receiver with several receiving processes: one spool each.

Spool 0 is ``Settings.spool_dir`` itself (the layout of a single process, so going from one
process to several, or back, keeps what waits there); spool ``i > 0`` is the sub-folder ``i``
of it (a :class:`~receiver.spool.Spool` only looks at its own named sub-folders). Each has its
own lock, log and read marks, written by one receiving process and read by its own ingest
processes.
"""

from __future__ import annotations

from pathlib import Path

from receiver.spool import Spool

__all__ = ["spool_root", "spool_roots", "total_depth", "waiting_count"]


def spool_root(root: Path, index: int) -> Path:
    """The folder of spool ``index`` under the receiver's spool folder ``root``."""
    return root if index == 0 else root / str(index)


def spool_roots(root: Path) -> list[Path]:
    """Spool 0 and every numbered spool that exists under ``root``, by index."""
    extra = sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit()) if root.is_dir() else []
    return [root, *(spool_root(root, i) for i in extra if i > 0)]


def total_depth(root: Path) -> tuple[int, int]:
    """``(instances, bytes)`` acknowledged and not yet ingested, over every spool (``dcmflow status``)."""
    if not root.is_dir():
        return 0, 0
    depths = [Spool(path).depth() for path in spool_roots(root)]
    return sum(d[0] for d in depths), sum(d[1] for d in depths)


def waiting_count(root: Path) -> int:
    """How many spools a receiver must run so that none with records waiting is left unread.

    A spool past the configured count (the setting was lowered) still gets a receiving process
    and ingest until a later start finds it empty.
    """
    waiting = [int(p.name) for p in spool_roots(root)[1:] if Spool(p).depth()[0] > 0]
    return max(waiting, default=0) + 1
