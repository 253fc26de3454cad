"""Follow a drop folder: import every finished folder (and settled loose file) once.

The atomic-folder convention of the seed watcher: a writer creates ``<name>.tmp`` (any
extension starting with ``tmp``: ``study1.tmp``, ``x.tmp2``, ``a.TMP``), fills it, then renames
it; only then is the folder complete. So the watcher, polling the top level of its folder
every ``interval`` seconds (no dependency: ``watchdog`` is not installed, and polling also
works on network shares where inotify does not):

* ignores names whose extension starts with ``tmp`` and hidden names (``.``);
* imports every other sub-folder as one batch (:class:`receiver.importer.Importer`);
* imports a loose top-level file once its size and modification time did not change between
  two polls (writers of single files rarely follow the convention).

Imported once
-------------
What was imported is kept in a ledger file, one JSON line per folder or file, keyed by name,
device and inode (a folder renamed from ``.tmp`` keeps its inode; a new folder reusing an old
name gets a new one). The line is appended and fsynced only after the batch was recorded, so a
crash mid-import re-imports that folder on restart, which the records turn into duplicates
(no-ops). Files added to a folder after it was imported are not picked up (the convention says
a renamed folder is complete). The default ledger lives under ``DCMFLOW_HOME/watch/``, one
file per watched folder, so the watched folder itself is never written to.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from receiver.importer import ImportReport, iter_files

if TYPE_CHECKING:
    from receiver.importer import Importer, Skipped

__all__ = ["DEFAULT_INTERVAL", "is_in_progress", "ledger_path_for", "FolderWatcher"]

log = logging.getLogger("receiver.watch")

DEFAULT_INTERVAL = 2.0
"""Seconds between polls of the watched folder."""


def is_in_progress(name: str) -> bool:
    """True for a name still being written by the seed convention: an extension starting with ``tmp``.

    >>> is_in_progress("study1.tmp"), is_in_progress("x.tmp2"), is_in_progress("study1")
    (True, True, False)
    """
    suffix = Path(name).suffix
    return suffix.lower().startswith(".tmp")


def ledger_path_for(home: Path, root: Path) -> Path:
    """The default ledger of a watched folder: ``<home>/watch/<sha256(abs path)[:16]>.jsonl``."""
    digest = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
    return Path(home) / "watch" / f"{digest}.jsonl"


@dataclass(frozen=True)
class _Seen:
    size: int
    mtime_ns: int


class FolderWatcher:
    """Polls one folder and imports what is finished, once (see the module docstring).

    Parameters
    ----------
    root : Path
        The watched folder.
    importer : Importer
        Does the imports.
    ledger : Path
        JSON-lines file of what was imported (created if missing).
    interval : float
        Seconds between polls.
    on_batch : callable, optional
        Called with the name and report of each imported folder or file.
    on_file : callable, optional
        Passed to :meth:`Importer.import_paths` (progress).
    """

    def __init__(
        self,
        root: Path,
        importer: Importer,
        ledger: Path,
        *,
        interval: float = DEFAULT_INTERVAL,
        on_batch: Callable[[str, ImportReport], None] | None = None,
        on_file: Callable[[Path, Skipped | None], None] | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise NotADirectoryError(f"not a folder: {self.root}")
        self.importer = importer
        self.ledger = Path(ledger)
        self.interval = interval
        self.on_batch = on_batch
        self.on_file = on_file
        self.total = ImportReport()
        self._done = self._load()
        self._files: dict[str, _Seen] = {}
        self._stop = threading.Event()

    @staticmethod
    def _key(name: str, st: os.stat_result) -> str:
        return f"{name}\0{st.st_dev}\0{st.st_ino}"

    def _load(self) -> set[str]:
        done: set[str] = set()
        if not self.ledger.exists():
            return done
        for line in self.ledger.read_text(encoding="utf-8").splitlines():
            try:
                done.add(json.loads(line)["key"])
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by a crash: that batch is simply imported again
        return done

    def _remember(self, key: str, name: str, report: ImportReport) -> None:
        self.ledger.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"key": key, "name": name, "batch_id": report.batch_id, **report.as_dict()}) + "\n"
        with open(self.ledger, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._done.add(key)

    def scan_once(self) -> list[tuple[str, ImportReport]]:
        """Import whatever is finished now; returns ``(name, report)`` per imported item."""
        done: list[tuple[str, ImportReport]] = []
        try:
            entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        except OSError as exc:
            log.error("watch: cannot list %s: %s", self.root, exc)
            return done
        present: set[str] = set()
        for entry in entries:
            name = entry.name
            if name.startswith(".") or is_in_progress(name):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # renamed or removed meanwhile
            key = self._key(name, st)
            if key in self._done:
                continue
            if entry.is_dir(follow_symlinks=False):
                files = list(iter_files([Path(entry.path)]))
            elif entry.is_file(follow_symlinks=False):
                present.add(name)
                seen = _Seen(st.st_size, st.st_mtime_ns)
                if self._files.get(name) != seen:  # new or still growing: look again next poll
                    self._files[name] = seen
                    continue
                files = [Path(entry.path)]
            else:
                continue
            report = self.importer.import_paths([Path(entry.path)], files=files, on_file=self.on_file)
            self._remember(key, name, report)
            self._files.pop(name, None)
            self.total.add(report)
            log.info("watch: %s: %s", name, report.line())
            if self.on_batch is not None:
                self.on_batch(name, report)
            done.append((name, report))
        for gone in set(self._files) - present:
            del self._files[gone]
        return done

    def run(self) -> None:
        """Poll until :meth:`stop`."""
        log.info("watching %s every %.1f s (ledger %s)", self.root, self.interval, self.ledger)
        while not self._stop.is_set():
            self.scan_once()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        """Make :meth:`run` return after the current poll."""
        self._stop.set()

    def should_stop(self) -> bool:
        """True once :meth:`stop` was called (for the importer's outage retries)."""
        return self._stop.is_set()
