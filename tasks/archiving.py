"""Write the series archive when a series revision is first processed.

The archive (:mod:`storage.archive`: ``part-NNNN.tar`` + ``index.json.zst``) is how a flow or
job on another machine gets a series: one GET per part instead of one per instance
(DESIGN.md "Where it scales"). This module adds to it what it lacks.

Where it is written, and why there
----------------------------------
In the processing flow's materialise step (:func:`tasks.jobs.materialise`), right after the
series cache is filled, for every series of the run. So the archive is written when a series
becomes stable (the ``dicom.series.stable`` trigger starts that flow for revision 1) and again
for each later revision (its late instances become one new part). Not in ``receiver/``:

* **C-STORE acks and the stable event are untouched.** The receiver no longer holds the bytes
  when a series becomes stable (ingest deletes each spool file once its object is stored), so
  an archiver there would GET every instance back from the store, and either hold the event
  back while it packs (seconds for a 300-instance CT, on the monitor thread that emits every
  series' event) or race the flow it triggers, which would then find no archive.
* **No extra GET.** The first run of a revision must fetch the instances that are not archived
  anyway; it packs them from its cache: one PUT per part plus one index PUT, no read.
* **Every run finishes what an earlier one could not**: a run whose archive write failed (the
  files are in place and the jobs run all the same) leaves the next run of the series to
  append the missing instances; series received before archives existed are archived by
  their next run.

Serialised per series by the object store, no lock service
-----------------------------------------------------------
Runs of one series can overlap: the trigger's claim is per (series, revision), so a revision
n+1 run, a manual ``dcmflow process`` or a study run may write at the same time.
:func:`storage.archive.append_instances` creates each part with ``put_if_absent`` at the
number after the index's last part, and writes the index only after winning its parts. The
loser of a race gets :class:`~storage.errors.ObjectExistsError`; :func:`archive_series` then
re-reads the index (which the winner writes next) and appends only what is still missing, at
the next number. Each index written is the index read plus parts its writer created, so every
entry always points at bytes that exist.

Idempotent: instances already archived with the same SHA-256 are skipped; when nothing is
missing nothing is written (one GET of the index, or none when the materialise step already
read it).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from storage.archive import MAX_PART_BYTES, append_instances, read_series_index
from storage.errors import ArchiveError, ObjectExistsError, ObjectNotFoundError

if TYPE_CHECKING:
    from storage.archive import SeriesIndex
    from storage.models import InstancePublic
    from storage.objects import ObjectStore

__all__ = ["ArchiveReport", "archive_series", "DEFAULT_ATTEMPTS"]

DEFAULT_ATTEMPTS = 6
"""Appends tried per batch when concurrent writers keep winning the next part number (the
back-off between them doubles from 0.1 s). A part that stays in the way is an orphan left by a
writer that died between part and index (see :mod:`storage.archive`)."""


@dataclass
class ArchiveReport:
    """What :func:`archive_series` did for one series.

    Attributes
    ----------
    already : int
        Instances the archive held before.
    appended : int
        Instances written now, in ``parts`` (new part numbers).
    conflicts : int
        Appends lost to a concurrent writer and retried.
    """

    already: int = 0
    appended: int = 0
    parts: list[int] = field(default_factory=list)
    conflicts: int = 0

    def line(self) -> str:
        """``archive: 300 instances appended as part 0 (0 already archived)``."""
        if not self.appended:
            return f"archive: complete ({self.already} instances), nothing written"
        numbers = ", ".join(str(n) for n in self.parts)
        return f"archive: {self.appended} instances appended as part {numbers} ({self.already} already archived)"


def _read_index(store: ObjectStore, study_uid: str, series_uid: str) -> SeriesIndex | None:
    try:
        return read_series_index(store, study_uid, series_uid)
    except ObjectNotFoundError:
        return None


def _missing(index: SeriesIndex | None, items: Sequence[tuple[InstancePublic, Path]]) -> list[tuple[InstancePublic, Path]]:
    known = {(e.sop_uid, e.sha256) for e in index.instances} if index is not None else set()
    return [(i, p) for i, p in items if (i.sop_uid, i.sha256) not in known]


def _batches(items: Sequence[tuple[InstancePublic, Path]], max_bytes: int) -> list[list[tuple[InstancePublic, Path]]]:
    """Consecutive batches of at most ``max_bytes`` (one instance at least): one part each,
    so no more than one part's bytes are in memory at a time."""
    batches: list[list[tuple[InstancePublic, Path]]] = []
    size = 0
    for item in items:
        if not batches or (size + item[0].size > max_bytes and batches[-1]):
            batches.append([])
            size = 0
        batches[-1].append(item)
        size += item[0].size
    return batches


def _load(batch: Sequence[tuple[InstancePublic, Path]]) -> list[tuple[str, bytes]]:
    """The cached bytes of ``batch``, each checked against its recorded SHA-256."""
    loaded = []
    for instance, path in batch:
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != instance.sha256:
            raise ArchiveError(f"cached file {path} does not match the recorded SHA-256 of {instance.sop_uid}; not archived")
        loaded.append((instance.sop_uid, data))
    return loaded


def archive_series(
    store: ObjectStore,
    instances: Sequence[InstancePublic],
    files: Sequence[Path],
    *,
    study_uid: str,
    series_uid: str,
    index: SeriesIndex | None = None,
    index_known: bool = False,
    max_part_bytes: int = MAX_PART_BYTES,
    attempts: int = DEFAULT_ATTEMPTS,
) -> ArchiveReport:
    """Append to the series archive the instances it lacks, from their cached files.

    Parameters
    ----------
    store
        The object store.
    instances
        Latest version of each instance (:meth:`Repository.list_instances`).
    files
        The cache file of each instance (:attr:`tasks.materialise.CachedSeries.files`).
    study_uid, series_uid
        The series.
    index, index_known
        The index the caller already read (``index_known=True``; ``index=None`` then means
        "no archive"), so it is not fetched twice.
    max_part_bytes
        At most this many bytes per new part (and in memory at once).
    attempts
        Appends tried per batch before giving up on a part number that stays taken.

    Returns
    -------
    ArchiveReport

    Raises
    ------
    ArchiveError
        A cached file does not match its recorded SHA-256, or the next part number stayed
        taken through every attempt (an orphan part: delete it, or the whole
        ``archives/<study>/<series>/`` prefix, to rebuild the archive).
    ObjectStoreUnavailableError
        The store cannot be reached.
    """
    if len(files) != len(instances):
        raise ValueError("one cache file per instance is needed")
    current = index if index_known else _read_index(store, study_uid, series_uid)
    items = list(zip(instances, files))
    todo = _missing(current, items)
    report = ArchiveReport(already=len(items) - len(todo))
    for batch in _batches(todo, max_part_bytes):
        delay = 0.1
        for attempt in range(1, attempts + 1):
            before = {p.number for p in current.parts} if current is not None else set()
            try:
                current = append_instances(store, study_uid, series_uid, _load(batch), max_part_bytes=max_part_bytes)
            except ObjectExistsError as exc:
                report.conflicts += 1
                if attempt == attempts:
                    raise ArchiveError(
                        f"archive of series {series_uid}: {exc} stayed taken through {attempts} attempts "
                        "(an orphan part left by a writer that died? delete it to resume archiving)"
                    ) from None
                time.sleep(delay)
                delay *= 2
                current = _read_index(store, study_uid, series_uid)
                batch = _missing(current, batch)
                if not batch:  # the concurrent writer archived them all
                    break
                continue
            new = sorted({p.number for p in current.parts} - before)
            report.parts.extend(new)
            report.appended += sum(1 for e in current.instances if e.part in new)
            break
    return report
