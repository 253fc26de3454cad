"""Folder import: DICOM files and folders into the object store and the records, like received ones.

``dcmflow import PATH...`` (and the folder watcher, :mod:`receiver.watch`) go through the
receiver's ingest path (:mod:`receiver.ingest`), not a copy of it:

* headers are parsed by :func:`receiver.ingest.read_instance` (``stop_before_pixels``, the same
  tags, the same UID validation, PS3.5 §9.1);
* bytes are put by the ingest worker's object put (immutable key; a different file under an
  existing SOP Instance UID goes beside it under its hash, never over it);
* records are written in batches by ``Repository.record_instances`` through the worker's
  outage retry, so a store or database outage pauses an import instead of failing it.

An import is one *batch* with its own id, recorded like an association: it is opened
(``association_opened``), the series it touches are noted before each batch is recorded, and
it is closed at the end, so the completeness monitor never declares a series stable while
its files are still being imported. Instances carry the calling AE ``IMPORT`` (or the
``source`` label) and the import time as receive time, so the quiet period counts from the
import.

Files that are not DICOM (or have no valid UIDs) are reported, one line each, and counted;
they never stop the import and are never moved or changed.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.errors import InvalidDicomError

from receiver.ingest import DEFAULT_BATCH_SIZE, Ingester, read_instance
from receiver.spool import SpoolEntry
from storage.errors import InvalidKeyError
from storage.repository import InstanceIn, RecordStatus

if TYPE_CHECKING:
    from storage.objects import ObjectStore
    from storage.repository import Repository

__all__ = [
    "DEFAULT_SOURCE",
    "ImportReport",
    "Skipped",
    "Importer",
    "iter_files",
    "import_paths",
]

log = logging.getLogger("receiver.importer")

DEFAULT_SOURCE = "IMPORT"
"""Calling AE recorded for imported instances when no source label is given."""


@dataclass(frozen=True)
class Skipped:
    """A file that was not imported, and why."""

    path: Path
    reason: str

    def line(self) -> str:
        """One report line."""
        return f"not DICOM: {self.path}: {self.reason}"


@dataclass
class ImportReport:
    """What an import did.

    Attributes
    ----------
    files : int
        Files looked at.
    new, duplicates, new_versions : int
        Outcomes of the recorded instances (see :class:`storage.repository.RecordStatus`).
    skipped : list of Skipped
        Files that are not DICOM or have no valid UIDs.
    batch_id : str
        The import's association id (32 hex digits).
    series_uids : set of str
        Series touched.
    size : int
        Bytes imported.
    """

    files: int = 0
    new: int = 0
    duplicates: int = 0
    new_versions: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    batch_id: str = ""
    series_uids: set[str] = field(default_factory=set)
    size: int = 0

    @property
    def imported(self) -> int:
        """Instances recorded (new + duplicates + new versions)."""
        return self.new + self.duplicates + self.new_versions

    @property
    def not_dicom(self) -> int:
        """Files skipped."""
        return len(self.skipped)

    def add(self, other: ImportReport) -> None:
        """Fold another report into this one (watch mode totals)."""
        self.files += other.files
        self.new += other.new
        self.duplicates += other.duplicates
        self.new_versions += other.new_versions
        self.skipped.extend(other.skipped)
        self.series_uids |= other.series_uids
        self.size += other.size

    def line(self) -> str:
        """The summary line."""
        return (
            f"imported {self.imported} instance{'s' if self.imported != 1 else ''} "
            f"({self.new} new, {self.duplicates} duplicate{'s' if self.duplicates != 1 else ''}, "
            f"{self.new_versions} new version{'s' if self.new_versions != 1 else ''}) "
            f"in {len(self.series_uids)} series; {self.not_dicom} not DICOM"
        )

    def as_dict(self) -> dict[str, object]:
        """JSON-ready summary."""
        return {
            "files": self.files,
            "imported": self.imported,
            "new": self.new,
            "duplicates": self.duplicates,
            "new_versions": self.new_versions,
            "not_dicom": self.not_dicom,
            "skipped": [{"path": str(s.path), "reason": s.reason} for s in self.skipped],
            "series": sorted(self.series_uids),
            "batch_id": self.batch_id,
            "bytes": self.size,
        }


def iter_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Regular files under ``paths`` (files as given, folders recursively, sorted, symlinks to
    folders not followed); hidden names (``.``) inside folders are skipped.

    Raises
    ------
    FileNotFoundError
        If a given path does not exist.
    """
    for path in paths:
        path = Path(path)
        if path.is_file():
            yield path
            continue
        if not path.is_dir():
            raise FileNotFoundError(f"no such file or folder: {path}")
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if not name.startswith("."):
                    yield Path(root) / name


class Importer:
    """Imports files through the receiver's ingest path (see the module docstring).

    Parameters
    ----------
    store : ObjectStore
        Where instance objects go.
    repository : Repository
        Where instances are recorded.
    source : str
        Calling AE recorded for the instances (default ``IMPORT``).
    batch_size : int
        Instances per ``record_instances`` call.
    should_stop : callable, optional
        Polled during outage retries (a watcher being stopped).
    """

    def __init__(
        self,
        store: ObjectStore,
        repository: Repository,
        *,
        source: str = DEFAULT_SOURCE,
        batch_size: int = DEFAULT_BATCH_SIZE,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.store = store
        self.repository = repository
        self.source = source.strip() or DEFAULT_SOURCE
        self.batch_size = batch_size
        # The ingest worker's object put and batched record, with its outage retry. It reads
        # no spool for these two steps (see the report: a public hook is requested).
        self._ingest = Ingester(None, store, repository, should_stop=should_stop)  # type: ignore[arg-type]

    def import_paths(
        self,
        paths: Iterable[Path],
        *,
        on_file: Callable[[Path, Skipped | None], None] | None = None,
        files: list[Path] | None = None,
    ) -> ImportReport:
        """Import files and folders (recursively) as one batch.

        Parameters
        ----------
        paths : iterable of Path
            Files and folders.
        on_file : callable, optional
            Called after each file with the file and its :class:`Skipped` (or ``None``).
        files : list of Path, optional
            The files of ``paths`` when the caller already listed them (progress bars).

        Returns
        -------
        ImportReport

        Raises
        ------
        FileNotFoundError
            A given path does not exist (nothing was imported).
        """
        todo = list(files) if files is not None else list(iter_files(paths))
        report = ImportReport(batch_id=uuid.uuid4().hex)
        self.repository.association_opened(report.batch_id, self.source)
        try:
            pending: list[InstanceIn] = []
            for path in todo:
                report.files += 1
                skipped = self._prepare(path, report, pending)
                if skipped is not None:
                    report.skipped.append(skipped)
                    log.warning("%s", skipped.line())
                if len(pending) >= self.batch_size:
                    self._record(pending, report)
                    pending = []
                if on_file is not None:
                    on_file(path, skipped)
            if pending:
                self._record(pending, report)
        finally:
            self.repository.association_closed(report.batch_id)
        return report

    def _prepare(self, path: Path, report: ImportReport, pending: list[InstanceIn]) -> Skipped | None:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            return Skipped(path, f"cannot read: {exc.strerror or exc}")
        entry = SpoolEntry(
            received_at=dt.datetime.now(dt.UTC),
            association_id=report.batch_id,
            calling_ae=self.source,
            sop_uid="",
        )
        try:
            item, _sha = read_instance(raw, entry)
        except InvalidDicomError:
            return Skipped(path, "no DICOM file header (PS3.10 §7.1)")
        except InvalidKeyError as exc:
            return Skipped(path, f"invalid UID: {exc}")
        except Exception as exc:
            return Skipped(path, f"does not parse: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        stored = self._ingest.store_with_retry(raw, item)
        pending.append(stored)
        report.size += len(raw)
        return None

    def _record(self, batch: list[InstanceIn], report: ImportReport) -> None:
        series = {i.series_uid for i in batch}
        self.repository.association_touched_series(report.batch_id, series)
        for outcome in self._ingest.record_with_retry(batch):
            if outcome.status is RecordStatus.NEW:
                report.new += 1
            elif outcome.status is RecordStatus.DUPLICATE:
                report.duplicates += 1
            else:
                report.new_versions += 1
        report.series_uids |= series


def import_paths(
    paths: Iterable[Path],
    *,
    store: ObjectStore,
    repository: Repository,
    source: str = DEFAULT_SOURCE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_file: Callable[[Path, Skipped | None], None] | None = None,
) -> ImportReport:
    """Import files and folders recursively as one batch (see :class:`Importer`).

    Parameters
    ----------
    paths : iterable of Path
        Files and folders.
    store, repository
        Storage to import into.
    source : str
        Calling AE recorded for the instances.
    batch_size : int
        Instances per record transaction.
    on_file : callable, optional
        Progress callback ``(path, skipped_or_None)``.

    Returns
    -------
    ImportReport
    """
    return Importer(store, repository, source=source, batch_size=batch_size).import_paths(paths, on_file=on_file)
