"""Ingest: move acknowledged instances from the spool into the object store and the records.

Runs in worker processes separate from the SCP (pynetdicom's association threads share one
GIL, storage_perf.md §3.7/§4, so parsing and hashing there would slow every C-STORE), or
in-process for tests (:meth:`Ingester.run_once`).

For every record of the spool's log, in order (:class:`receiver.spool.SpoolReader`; with
several workers each takes its share, split by SOP Instance UID):

1. parse the header from the bytes: :func:`receiver.header.read_header` walks the elements up
   to (0020,1209) with :mod:`struct` and gives pydicom's values; for what it does not handle
   (big endian, deflate, multi-valued text, ...) ``read_partial`` with ``specific_tags`` and a
   stop after (0020,1209). Pixel data and later groups are never parsed. (0020,1209) Number of
   Series Related Instances, when a sender writes it, is the series' expected instance count
   (:func:`expected_count`), which lets completeness close it before the quiet period;
2. put the bytes under the immutable key ``instances/{study}/{series}/{sop}.dcm`` with
   ``put_if_absent``, taking the SHA-256 from the store's single streaming pass. With the local
   object store each record is written to a staging file instead; the batch's files are made
   durable with one ``syncfs`` and then hard-linked under their keys (their names fsynced once
   per folder). If a key holds other bytes (a re-send with different content), the bytes go
   under :func:`storage.keys.instance_version_key` instead; identical bytes are a no-op (so a
   replay after a crash is harmless: that, not the read mark alone, gives exactly-once records);
3. every ``batch_size`` instances (or ``batch_bytes``), or ``batch_seconds`` after the first,
   whichever comes first, ``Repository.record_instances`` in one transaction (which decides
   new / duplicate / new version from the hashes);
4. only then save the worker's durable read mark past the batch; the spool reuses segments
   every mark has passed.

If the object store or the database is unreachable (or fails in any other way but a bad key),
or does not answer for ``stall_seconds``, the mark stays where it is: the worker logs one line
when the outage starts and one when it ends, each with the spool's backlog, backs off (0.25 s
doubling to ``backoff_max``) and retries the same step, so every acknowledged record is
delivered once they return. A record that can never be ingested (it does not parse, or its
UIDs are invalid) is copied to ``spool/rejected/`` with a reason; it is never dropped.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.filereader import read_partial

from receiver.header import FIELD_OF_KEYWORD, LAST_TAG, HeaderValues, read_header
from receiver.spool import start_writeback
from storage.errors import InvalidKeyError, ObjectExistsError, StorageError
from storage.keys import instance_key, instance_version_key
from storage.local import LocalObjectStore
from storage.repository import InstanceIn, RecordOutcome, RecordStatus

if TYPE_CHECKING:
    from storage.objects import ObjectStore
    from storage.repository import Repository

    from receiver.spool import Spool, SpoolEntry, SpoolReader

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_BATCH_SECONDS",
    "IngestOptions",
    "Ingester",
    "BatchReport",
    "StorageFactory",
    "IngestPool",
    "start_ingest_processes",
    "read_instance",
    "expected_count",
    "store_instance_object",
]

log = logging.getLogger("receiver.ingest")

DEFAULT_BATCH_SIZE = 200
"""Instances recorded per transaction at most."""

DEFAULT_BATCH_SECONDS = 0.2
"""A batch is recorded at the latest this long after its first instance was prepared."""

DEFAULT_NICENESS = 5
"""Nice increment of ingest processes relative to the receiver."""

DEFAULT_STORE_THREADS = 8
"""Object puts in flight per ingest worker."""

DEFAULT_BATCH_BYTES = 64 * 1024**2
"""Data bytes of one batch at most (they are held in memory until the batch is recorded)."""

DEFAULT_STALL_SECONDS = 10.0
"""A store or database step that has not answered for this long is logged as an outage."""

_T = TypeVar("_T")

# The header elements ingest reads (PS3.3 C.7.1.1 Patient, C.7.2.1 General Study, C.7.3.1
# General Series, C.7.6.1 General Image, C.12.1 SOP Common), nothing else: one list for both
# paths, kept in receiver.header.
_HEADER_TAGS = ["SpecificCharacterSet", *FIELD_OF_KEYWORD]
_TAG_OF: dict[str, int] = {k: int(tag_for_keyword(k)) for k in _HEADER_TAGS}  # type: ignore[arg-type]
_HEADER_TAG_NUMBERS: list[Any] = list(_TAG_OF.values())
_IS_NUMBER = {keyword: dictionary_VR(keyword) == "IS" for keyword in FIELD_OF_KEYWORD}  # read with _int
_LAST_HEADER_TAG = LAST_TAG


class StorageFactory(Protocol):
    """Opens the object store and repository inside a worker process (must be picklable).

    Example: ``functools.partial(open_storage, settings)`` with a module-level
    ``open_storage(settings) -> (ObjectStore, Repository)``.
    """

    def __call__(self) -> tuple[ObjectStore, Repository]: ...


@dataclass(frozen=True, kw_only=True)
class IngestOptions:
    """Tuning of an ingest worker.

    Attributes
    ----------
    batch_size : int
        Instances per ``record_instances`` call at most.
    batch_seconds : float
        Record a batch at the latest this long after its first instance.
    poll_seconds : float
        Pause between spool scans when idle.
    backoff_max : float
        Longest pause between retries during an outage.
    niceness : int
        Added to the worker process's nice value (``os.nice``), so that on a busy machine the
        SCP's acknowledgement path gets the CPU first and ingest catches up in the gaps.
    batch_bytes : int
        Data bytes of one batch at most (held in memory until it is recorded).
    stall_seconds : float
        A store or database call that has not returned after this long is logged as the
        start of an outage (a frozen endpoint raises nothing; it just does not answer).
    store_threads : int
        Object puts in flight at once (object stores other than the local one). Puts wait on fsync (local store) or the network (S3),
        not on the CPU, so overlapping them lets the file system merge their journal commits
        (or the S3 endpoint serve them in parallel) while parsing continues.
    """

    batch_size: int = DEFAULT_BATCH_SIZE
    batch_seconds: float = DEFAULT_BATCH_SECONDS
    batch_bytes: int = DEFAULT_BATCH_BYTES
    stall_seconds: float = DEFAULT_STALL_SECONDS
    poll_seconds: float = 0.02
    backoff_max: float = 10.0
    store_threads: int = DEFAULT_STORE_THREADS
    niceness: int = DEFAULT_NICENESS


@dataclass(frozen=True)
class BatchReport:
    """What one recorded batch did (also the one log line per batch)."""

    worker: int
    count: int
    new: int
    duplicate: int
    new_version: int
    rejected: int
    size: int
    seconds: float

    def line(self) -> str:
        """The log line."""
        return (
            f"ingest[{self.worker}]: {self.count} instances ({self.new} new, {self.duplicate} duplicate, "
            f"{self.new_version} new version{'s' if self.new_version != 1 else ''}"
            f"{f', {self.rejected} rejected' if self.rejected else ''}), "
            f"{self.size / 1e6:.1f} MB in {self.seconds:.2f} s"
        )


def _value(ds: Any, keyword: str) -> Any:
    element = ds.get(_TAG_OF[keyword])  # by tag: skips pydicom's keyword → tag lookup
    return None if element is None else element.value


def _text(ds: Any, keyword: str) -> str:
    value = _value(ds, keyword)
    if value is None:
        return ""
    return str(value).strip("\0 ")


def _int(ds: Any, keyword: str) -> int | None:
    value = _value(ds, keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def expected_count(series_related_instances: int | None) -> int | None:
    """The series' expected instance count from one instance's header, or ``None``: unknown.

    Only (0020,1209) Number of Series Related Instances says how many instances the series
    has (PS3.3 C.6.1.1.4; PACS and gateways write it when they forward a whole series). The
    per-acquisition counts some peers use (Orthanc's ``CompletedSeries``: (0020,1002) Images in
    Acquisition, (0054,0081) Number of Slices, ...) are not taken: an axial CT has one
    acquisition per rotation, so a count of 4 in a 200-slice series would close it early,
    and a modality that sends one association per image would then open a revision per image.
    A wrong or absent count costs only the quiet period.
    """
    return series_related_instances if series_related_instances and series_related_instances > 0 else None


def _stop_after_header(tag: int, vr: str | None, length: int) -> bool:
    # Every tag ingest reads is at or below (0020,1209) Number of Series Related Instances;
    # elements are in ascending tag order (PS3.5 §7.1), so the rest (image pixel module,
    # private groups, pixel data) is never parsed.
    return tag > _LAST_HEADER_TAG


def read_instance(raw: bytes, entry: SpoolEntry, *, hash_bytes: bool = True) -> tuple[InstanceIn, str]:
    """Parse the header of a spooled file into an :class:`~storage.repository.InstanceIn`.

    The byte-level :func:`receiver.header.read_header` reads it when it can (~10× cheaper,
    ``bench/ingest/header_bench.py``); pydicom reads the rest, with the same values either way
    (``tests/receiver/test_header.py``).

    Parameters
    ----------
    raw : bytes
        The PS3.10 file bytes.
    entry : SpoolEntry
        Its spool entry (receive time, calling AE).
    hash_bytes : bool
        Compute the SHA-256 here. ``False`` leaves ``sha256`` empty for
        :func:`store_instance_object` to fill from the store's own single-pass hash.

    Returns
    -------
    (InstanceIn, sha256) : tuple
        The instance with ``object_key`` set to the immutable key, and the hex SHA-256.

    Raises
    ------
    InvalidKeyError
        If a UID is missing or invalid (PS3.5 §9.1).
    Exception
        Whatever pydicom raises on bytes that do not parse.
    """
    header = read_header(raw)
    if header is None:
        return _read_instance_pydicom(raw, entry, hash_bytes=hash_bytes)
    return _instance(header, raw, entry, hash_bytes=hash_bytes)


def _instance(header: HeaderValues, raw: bytes, entry: SpoolEntry, *, hash_bytes: bool) -> tuple[InstanceIn, str]:
    """The :class:`InstanceIn` of one file from its header values, whichever path read them."""
    key = instance_key(header.study_uid, header.series_uid, header.sop_uid)  # validates all three
    sha = hashlib.sha256(raw).hexdigest() if hash_bytes else ""
    return (
        InstanceIn(
            study_uid=header.study_uid,
            series_uid=header.series_uid,
            sop_uid=header.sop_uid,
            sha256=sha,
            size=len(raw),
            object_key=key,
            received_at=entry.received_at,
            sop_class_uid=header.sop_class_uid or header.media_storage_sop_class_uid,
            transfer_syntax_uid=header.transfer_syntax_uid,
            instance_number=header.instance_number,
            calling_ae=entry.calling_ae,
            patient_id=header.patient_id,
            patient_name=header.patient_name,
            patient_birth_date=header.patient_birth_date,
            patient_sex=header.patient_sex,
            study_date=header.study_date,
            study_time=header.study_time,
            study_description=header.study_description,
            accession_number=header.accession_number,
            referring_physician=header.referring_physician,
            modality=header.modality,
            series_number=header.series_number,
            series_description=header.series_description,
            body_part=header.body_part,
            expected_instance_count=expected_count(header.series_related_instances),
        ),
        sha,
    )


def _read_instance_pydicom(raw: bytes, entry: SpoolEntry, *, hash_bytes: bool = True) -> tuple[InstanceIn, str]:
    """:func:`read_instance` with pydicom only: for files :func:`read_header` leaves to it (and tests)."""
    ds = read_partial(io.BytesIO(raw), stop_when=_stop_after_header, specific_tags=_HEADER_TAG_NUMBERS)
    # Bad UIDs are reported before any other value is converted, as this path always did.
    instance_key(_text(ds, "StudyInstanceUID"), _text(ds, "SeriesInstanceUID"), _text(ds, "SOPInstanceUID"))
    meta = ds.file_meta
    values: dict[str, Any] = {
        field: (_int if _IS_NUMBER[keyword] else _text)(ds, keyword) for keyword, field in FIELD_OF_KEYWORD.items()
    }
    header = HeaderValues(
        transfer_syntax_uid=str(getattr(meta, "TransferSyntaxUID", "") or ""),
        media_storage_sop_class_uid=str(getattr(meta, "MediaStorageSOPClassUID", "") or ""),
        **values,
    )
    return _instance(header, raw, entry, hash_bytes=hash_bytes)


def store_instance_object(
    store: ObjectStore, raw: bytes, item: InstanceIn, *, spool_file: Path | None = None, sync: bool = True
) -> InstanceIn:
    """Put an instance's bytes under its immutable key, or beside it as a version if the key differs.

    Parameters
    ----------
    store : ObjectStore
        Where instance objects go.
    raw : bytes
        The PS3.10 file as received.
    item : InstanceIn
        The parsed instance (``object_key`` = :func:`storage.keys.instance_key`).
    spool_file : Path, optional
        A durable (data synced), never-modified file holding ``raw``: ingest's staging file
        of a spool record. With the local object store the object is then a hard link to it (:meth:`storage.local.LocalObjectStore.put_file_if_absent`:
        no second copy, no second data fsync). Never pass a user's file (an import): the
        object would share its inode.
    sync : bool
        ``False``: the hard link's name is not fsynced here; the caller must call
        :meth:`storage.local.LocalObjectStore.sync_names` before relying on it (recording it).

    Returns
    -------
    InstanceIn
        ``item`` with ``sha256`` set (taken from the store's streaming hash when the caller
        left it empty) and ``object_key`` pointing at where the bytes are: the instance key
        (new, or identical bytes already there) or a version key named by the hash.

    Raises
    ------
    StorageError, OSError
        The store failed (retry with :meth:`Ingester.store_with_retry`).
    """
    if spool_file is not None and isinstance(store, LocalObjectStore):
        if not item.sha256:
            item = replace(item, sha256=hashlib.sha256(raw).hexdigest())
        try:
            store.put_file_if_absent(item.object_key, spool_file, sha256=item.sha256, sync=sync)
            return item
        except ObjectExistsError:
            pass
    else:
        try:
            put = store.put_if_absent(item.object_key, raw)
            return item if item.sha256 else replace(item, sha256=put.sha256)
        except ObjectExistsError:
            pass
    if not item.sha256:
        item = replace(item, sha256=hashlib.sha256(raw).hexdigest())
    existing = store.get(item.object_key)
    if hashlib.sha256(existing).hexdigest() == item.sha256:
        return item  # identical bytes already stored: a replay or a re-send
    key = instance_version_key(item.study_uid, item.series_uid, item.sop_uid, item.sha256)
    try:
        store.put_if_absent(key, raw)
    except ObjectExistsError:
        pass  # the key is named by the hash: whatever is there holds these bytes
    return _with_key(item, key)


class _Stopped(Exception):
    """Raised inside a retry loop when the worker was asked to stop."""


def _load_syncfs() -> Callable[[int], int] | None:
    # os has no syncfs(2); libc has, on Linux.
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


_syncfs = _load_syncfs()


def sync_files(folder: Path, paths: Sequence[Path]) -> None:
    """Make the data of ``paths`` (all in ``folder``'s file system) durable.

    One ``syncfs`` of the file system where Linux has it (one journal commit for a whole
    batch); otherwise an ``fsync`` per file.

    Raises
    ------
    OSError
        If the disk fails.
    """
    if not paths:
        return
    if _syncfs is not None:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _syncfs(fd) != 0:
                error = ctypes.get_errno()
                raise OSError(error, os.strerror(error))
        finally:
            os.close(fd)
        return
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass
class _Pending:
    """One record of the batch being ingested."""

    entry: SpoolEntry
    raw: bytes
    item: InstanceIn
    stage: Path | None = None
    future: Future[InstanceIn] | None = None


class Ingester:
    """One ingest worker: spool log → object store → records (see the module docstring).

    Parameters
    ----------
    spool : Spool
        The receive spool.
    store : ObjectStore
        Where instance objects go.
    repository : Repository
        Where instances are recorded.
    worker_index, worker_count : int
        This worker's share of the log (records are split by SOP Instance UID).
    options : IngestOptions
        Batch sizes and timings.
    should_stop : callable, optional
        Polled between steps; when it returns True the worker stops after the current batch
        (and immediately during an outage, leaving the records in the spool).
    """

    def __init__(
        self,
        spool: Spool,
        store: ObjectStore,
        repository: Repository,
        *,
        worker_index: int = 0,
        worker_count: int = 1,
        options: IngestOptions = IngestOptions(),
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.spool = spool
        self.store = store
        self.repository = repository
        self.worker_index = worker_index
        self.worker_count = worker_count
        self.options = options
        self._should_stop = should_stop or (lambda: False)
        self._outage: str | None = None
        self._outage_since = 0.0
        self._outage_lock = threading.Lock()
        self._active: dict[int, tuple[str, float]] = {}
        self._watch: threading.Thread | None = None
        self._watch_stop = threading.Event()
        self._pool: ThreadPoolExecutor | None = None
        self._reader: SpoolReader | None = None
        self.reports: list[BatchReport] = []

    # -- outages ------------------------------------------------------------------------------

    def _backlog(self) -> str:
        if self.spool is None:
            return ""
        try:
            count, size = self.spool.depth()
        except OSError:
            return ""
        return f"; backlog {count} instance{'s' if count != 1 else ''} ({size / 1e6:.1f} MB) in the spool"

    def _outage_started(self, what: str, reason: str, since: float) -> None:
        with self._outage_lock:
            if self._outage is not None:
                return
            self._outage, self._outage_since = what, since
        log.error(
            "ingest[%d]: %s unavailable (%s)%s; keeping it and retrying",
            self.worker_index,
            what,
            reason,
            self._backlog(),
        )

    def _outage_ended(self) -> None:
        with self._outage_lock:
            what, self._outage = self._outage, None
        if what is not None:
            log.warning(
                "ingest[%d]: %s works again after %.1f s%s; resuming",
                self.worker_index,
                what,
                time.monotonic() - self._outage_since,
                self._backlog(),
            )

    def _watch_stalls(self) -> None:
        """Watchdog thread: a store or database that hangs (no error, no answer) is an outage too."""
        while not self._watch_stop.wait(0.25):
            active = list(self._active.values())
            if not active:
                continue
            what, since = min(active, key=lambda a: a[1])
            waited = time.monotonic() - since
            if waited >= self.options.stall_seconds:
                self._outage_started(what, f"no answer for {waited:.0f} s", since)

    def _start_watch(self) -> None:
        if self._watch is None:
            self._watch_stop.clear()
            self._watch = threading.Thread(target=self._watch_stalls, name="ingest-watch", daemon=True)
            self._watch.start()

    # -- retries ------------------------------------------------------------------------------

    def retry(self, what: str, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` until it succeeds, backing off while the store or database is down.

        An outage is logged once when it starts (an error, or no answer for
        ``options.stall_seconds``) and once when it ends, each with the spool's backlog.

        Parameters
        ----------
        what : str
            What ``fn`` uses (``"object store"``, ``"database"``), for the outage log lines.
        fn : callable
            The step; a storage failure or database outage makes it run again after a
            back-off (up to ``options.backoff_max``).

        Returns
        -------
        Whatever ``fn`` returns.

        Raises
        ------
        InvalidKeyError
            Not retried: the input is bad.
        Exception
            Anything from ``fn`` that is not an outage; or an internal stop signal when
            ``should_stop`` turns True during an outage.
        """
        delay = 0.25
        me = threading.get_ident()
        while True:
            self._active[me] = (what, time.monotonic())
            try:
                result = fn()
            except InvalidKeyError:
                raise
            except (StorageError, OSError) as exc:
                # Unavailable stores and refused transactions, but also any other storage
                # failure: waiting loudly with the records kept beats crashing or dropping them.
                self._outage_started(what, _reason(exc), time.monotonic())
            except Exception as exc:
                if not _is_db_outage(exc):
                    raise
                self._outage_started(what, _reason(exc), time.monotonic())
            else:
                if self._outage is not None:
                    self._outage_ended()
                return result
            finally:
                self._active.pop(me, None)
            if self._should_stop():
                raise _Stopped
            time.sleep(delay)
            delay = min(delay * 2, self.options.backoff_max)

    # -- one instance -------------------------------------------------------------------------

    def store_with_retry(
        self, raw: bytes, item: InstanceIn, *, spool_file: Path | None = None, sync: bool = True
    ) -> InstanceIn:
        """:func:`store_instance_object` into this ingester's store, waiting out outages."""
        return self.retry(
            "object store", partial(store_instance_object, self.store, raw, item, spool_file=spool_file, sync=sync)
        )

    def record_with_retry(self, items: list[InstanceIn]) -> list[RecordOutcome]:
        """Record one batch (``Repository.record_instances``), waiting out database outages."""
        return self.retry("database", partial(self.repository.record_instances, items))

    def _parse(self, entry: SpoolEntry, raw: bytes) -> InstanceIn | None:
        """Parse one record; ``None`` if it was rejected (kept in ``rejected/``)."""
        try:
            item, _sha = read_instance(raw, entry, hash_bytes=False)
        except InvalidKeyError as exc:
            self.retry("spool", partial(self.spool.reject, entry, raw, f"invalid UID: {exc}"))
            return None
        except Exception as exc:
            self.retry("spool", partial(self.spool.reject, entry, raw, f"does not parse: {type(exc).__name__}: {exc}"))
            return None
        return item

    def _stage(self, raw: bytes) -> Path:
        """Write ``raw`` to a staging file (made durable per batch, then hard-linked as the object)."""
        path = self.spool.stage_dir / f"{self.worker_index}-{uuid.uuid4().hex}.dcm"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view) :]
            start_writeback(fd, 0, len(raw))
        finally:
            os.close(fd)
        return path

    def _clear_stage(self) -> None:
        """Delete staging files a killed worker of this index left (their objects were never recorded)."""
        prefix = f"{self.worker_index}-"
        for path in self.spool.stage_dir.glob(f"{prefix}*.dcm"):
            path.unlink(missing_ok=True)

    def _submit_store(self, raw: bytes, item: InstanceIn) -> Future[InstanceIn]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.options.store_threads, thread_name_prefix="ingest-put")
        return self._pool.submit(partial(self.store_with_retry, raw, item))

    def close(self) -> None:
        """Stop the put threads and the watchdog (the Ingester can still be used; they restart)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._watch is not None:
            self._watch_stop.set()
            self._watch.join()
            self._watch = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    # -- batches ------------------------------------------------------------------------------

    def _local(self) -> bool:
        return isinstance(self.store, LocalObjectStore)

    def run_once(self, *, wait: bool = False) -> BatchReport | None:
        """Ingest one batch of what is waiting; ``None`` when there was nothing.

        Parameters
        ----------
        wait : bool
            Keep collecting for up to ``batch_seconds`` after the first record (the background
            loop does this); ``False`` takes only what is there now.
        """
        opts = self.options
        self._start_watch()
        if self._reader is None:
            self._clear_stage()
            self._reader = self.spool.reader(self.worker_index, self.worker_count)
        reader = self._reader
        local = self._local()
        batch: list[_Pending] = []
        by_sop: dict[str, Future[InstanceIn]] = {}
        size = rejected = 0
        started = time.monotonic()
        deadline: float | None = None
        before = reader.position
        while len(batch) < opts.batch_size and size < opts.batch_bytes:
            fresh = reader.read(opts.batch_size - len(batch), max_bytes=opts.batch_bytes - size)
            for entry, raw in fresh:
                item = self._parse(entry, raw)
                if item is None:
                    rejected += 1
                    continue
                pending = _Pending(entry, raw, item)
                if local:
                    pending.stage = self.retry("spool", partial(self._stage, raw))
                else:
                    earlier = by_sop.get(item.sop_uid)
                    if earlier is not None:
                        earlier.result()  # versions of one SOP reach the store in arrival order
                    pending.future = by_sop[item.sop_uid] = self._submit_store(raw, item)
                batch.append(pending)
                size += len(raw)
                if deadline is None:
                    deadline = time.monotonic() + opts.batch_seconds
            if not wait or self._should_stop():
                if not fresh:
                    break
                continue
            if deadline is not None and time.monotonic() >= deadline:
                break
            if not fresh:
                if deadline is None:
                    break  # nothing at all: let the caller idle
                time.sleep(opts.poll_seconds)
        try:
            items = self._store_batch(batch)  # raises _Stopped during an outage + stop
            outcomes = self.record_with_retry(items) if items else []
            if reader.position != before:
                self.retry("spool", reader.save)  # only now: every record before it is stored and recorded
        finally:
            for pending in batch:
                if pending.stage is not None:
                    pending.stage.unlink(missing_ok=True)
        if not items:
            return None if not rejected else BatchReport(self.worker_index, 0, 0, 0, 0, rejected, 0, 0.0)
        counts = {s: 0 for s in RecordStatus}
        for outcome in outcomes:
            counts[outcome.status] += 1
        report = BatchReport(
            self.worker_index,
            len(items),
            counts[RecordStatus.NEW],
            counts[RecordStatus.DUPLICATE],
            counts[RecordStatus.NEW_VERSION],
            rejected,
            size,
            time.monotonic() - started,
        )
        self.reports.append(report)
        log.info("%s", report.line())
        return report

    def _store_batch(self, batch: list[_Pending]) -> list[InstanceIn]:
        """Put the batch's objects; with the local store: one data sync, then hard links, one name sync per folder."""
        if not batch:
            return []
        if not self._local():
            return [p.future.result() for p in batch if p.future is not None]
        stages = [p.stage for p in batch if p.stage is not None]
        self.retry("object store", partial(sync_files, self.spool.stage_dir, stages))
        items = [self.store_with_retry(p.raw, p.item, spool_file=p.stage, sync=False) for p in batch]
        assert isinstance(self.store, LocalObjectStore)
        self.retry("object store", partial(self.store.sync_names, [item.object_key for item in items]))
        return items

    def drain(self) -> int:
        """Ingest everything waiting now (tests, replay); returns the number of instances."""
        total = 0
        while (report := self.run_once()) is not None:
            total += report.count
        return total

    def run(self) -> None:
        """Loop until ``should_stop`` returns True, idling ``poll_seconds`` when the spool is empty."""
        while not self._should_stop():
            try:
                report = self.run_once(wait=True)
            except _Stopped:
                break
            if report is None:
                time.sleep(self.options.poll_seconds)
        self.close()
        log.info("ingest[%d]: stopped", self.worker_index)


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _with_key(item: InstanceIn, key: str) -> InstanceIn:
    return replace(item, object_key=key)


def _is_db_outage(exc: BaseException) -> bool:
    """True for SQLAlchemy errors that mean "database unreachable", not "bad statement"."""
    try:
        from sqlalchemy.exc import DBAPIError, OperationalError
    except ImportError:  # pragma: no cover
        return False
    if isinstance(exc, OperationalError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


# -- processes --------------------------------------------------------------------------------


def _process_main(
    factory: StorageFactory,
    spool_root: str,
    worker_index: int,
    worker_count: int,
    options: IngestOptions,
    stop: multiprocessing.connection.Connection,
    log_level: int,
) -> None:
    """Entry point of one ingest process; ``stop`` is the read end of its pipe from the parent."""
    from receiver.spool import Spool

    parent = os.getppid()

    def should_stop() -> bool:
        # Stop when asked (a message, or the pipe's end: the parent is gone), and when the
        # receiver died without asking (SIGKILL): a restarted receiver starts its own workers,
        # and two workers on one share would race.
        return stop.poll() or os.getppid() != parent

    if options.niceness:
        os.nice(options.niceness)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us through the pipe
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    delay, failing = 0.25, False
    while True:  # the store may be down when we start (S3 checks its bucket on open)
        try:
            store, repository = factory()
            break
        except Exception as exc:
            if not failing:
                log.error("ingest[%d]: cannot open storage yet, retrying: %s", worker_index, exc)
                failing = True
            if stop.poll(delay) or should_stop():
                return
            delay = min(delay * 2, options.backoff_max)
    spool = Spool(Path(spool_root), min_free_bytes=0, min_free_fraction=0.0)
    Ingester(
        spool,
        store,
        repository,
        worker_index=worker_index,
        worker_count=worker_count,
        options=options,
        should_stop=should_stop,
    ).run()


class IngestPool:
    """Ingest worker processes started by :func:`start_ingest_processes`.

    Each is stopped through its own pipe, not a shared multiprocessing Event: setting an Event
    that a SIGKILLed worker was waiting on can block forever (its lock dies with the worker).
    """

    def __init__(
        self,
        processes: Sequence[multiprocessing.process.BaseProcess],
        stops: Sequence[multiprocessing.connection.Connection],
    ) -> None:
        self.processes = processes
        self._stops = stops

    def alive(self) -> bool:
        """True while every worker runs."""
        return all(p.is_alive() for p in self.processes)

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the workers to finish their batch and exit; terminate those that do not."""
        for conn in self._stops:
            try:
                conn.send("stop")
            except OSError:  # that worker is gone already (its end of the pipe closed)
                pass
        deadline = time.monotonic() + timeout
        for p in self.processes:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.processes:
            if p.is_alive():
                log.warning("ingest process %s did not stop; terminating it", p.pid)
                p.terminate()
                p.join(5)
        for conn in self._stops:
            conn.close()


def start_ingest_processes(
    factory: StorageFactory,
    spool_root: Path,
    count: int = 1,
    *,
    options: IngestOptions = IngestOptions(),
    log_level: int = logging.INFO,
) -> IngestPool:
    """Start ``count`` ingest worker processes (spawned, so no SCP thread is forked).

    Parameters
    ----------
    factory : StorageFactory
        Picklable callable returning ``(ObjectStore, Repository)``, run in each process.
    spool_root : Path
        The spool folder.
    count : int
        Number of processes (the spool is split among them by SOP Instance UID).
    options : IngestOptions
        Batch tuning.
    log_level : int
        Logging level in the workers.
    """
    if count < 1:
        raise ValueError("count must be >= 1")
    ctx = multiprocessing.get_context("spawn")
    processes, stops = [], []
    for index in range(count):
        receive_end, send_end = ctx.Pipe(duplex=False)
        p = ctx.Process(
            target=_process_main,
            args=(factory, os.fspath(spool_root), index, count, options, receive_end, log_level),
            name=f"dcmflow-ingest-{index}",
            daemon=True,
        )
        p.start()
        receive_end.close()  # the worker has its copy: the pipe ends when the parent's end closes
        processes.append(p)
        stops.append(send_end)
    return IngestPool(processes, stops)
