"""Ingest: move acknowledged instances from the spool into the object store and the records.

Runs in worker processes separate from the SCP (pynetdicom's association threads share one
GIL, storage_perf.md §3.7/§4, so parsing and hashing there would slow every C-STORE), or
in-process for tests (:meth:`Ingester.run_once`).

For every spool file, oldest first (:meth:`receiver.spool.Spool.pending`):

1. parse the header from the bytes: :func:`receiver.header.read_header` walks the elements up
   to (0020,1209) with :mod:`struct` and gives pydicom's values; for what it does not handle
   (big endian, deflate, multi-valued text, ...) ``read_partial`` with ``specific_tags`` and a
   stop after (0020,1209). Pixel data and later groups are never parsed. (0020,1209) Number of
   Series Related Instances, when a sender writes it, is the series' expected instance count
   (:func:`expected_count`), which lets completeness close it before the quiet period;
2. put the bytes under the immutable key ``instances/{study}/{series}/{sop}.dcm`` with
   ``put_if_absent``, taking the SHA-256 from the store's single streaming pass (with the local
   object store the spool file itself is hard-linked under the key instead: it is already
   durable, so no second copy or data fsync, and the new names are fsynced once per folder and
   batch). If that key holds other bytes (a re-send with different content), put
   them under :func:`storage.keys.instance_version_key` instead; identical bytes are a no-op;
   Puts run in a small thread pool (``store_threads``), in arrival order per SOP Instance UID;
3. every ``batch_size`` instances or ``batch_seconds`` after the first, whichever comes first,
   ``Repository.record_instances`` in one transaction (which decides new / duplicate / new
   version from the hashes);
4. only then delete the batch's spool files.

If the object store or the database is unreachable (or fails in any other way but a bad key),
nothing is deleted: the worker logs one
line when the outage starts and one when it ends, backs off (0.25 s doubling to
``backoff_max``) and retries the same step, so every acknowledged file is delivered once they
return. A file that can never be ingested (it does not parse, or its UIDs are invalid) moves
to ``spool/rejected/`` with a reason; it is never deleted.
"""

from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing
import multiprocessing.context
import os
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.filereader import read_partial

from receiver.header import FIELD_OF_KEYWORD, LAST_TAG, HeaderValues, read_header
from storage.errors import InvalidKeyError, ObjectExistsError, StorageError
from storage.keys import instance_key, instance_version_key
from storage.local import LocalObjectStore
from storage.repository import InstanceIn, RecordOutcome, RecordStatus

if TYPE_CHECKING:
    from storage.objects import ObjectStore
    from storage.repository import Repository

    from receiver.spool import Spool, SpoolEntry

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
    store_threads : int
        Object puts in flight at once. Puts wait on fsync (local store) or the network (S3),
        not on the CPU, so overlapping them lets the file system merge their journal commits
        (or the S3 endpoint serve them in parallel) while parsing continues.
    """

    batch_size: int = DEFAULT_BATCH_SIZE
    batch_seconds: float = DEFAULT_BATCH_SECONDS
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
        The durable, never-modified spool file holding ``raw``. With the local object store
        the object is then a hard link to it (:meth:`storage.local.LocalObjectStore.put_file_if_absent`:
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


class Ingester:
    """One ingest worker: spool → object store → records (see the module docstring).

    Parameters
    ----------
    spool : Spool
        The receive spool.
    store : ObjectStore
        Where instance objects go.
    repository : Repository
        Where instances are recorded.
    worker_index, worker_count : int
        This worker's share of the spool (files are split by SOP Instance UID).
    options : IngestOptions
        Batch sizes and timings.
    should_stop : callable, optional
        Polled between steps; when it returns True the worker stops after the current batch
        (and immediately during an outage, leaving the files in the spool).
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
        self._pool: ThreadPoolExecutor | None = None
        self.reports: list[BatchReport] = []

    # -- retries ------------------------------------------------------------------------------

    def retry(self, what: str, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` until it succeeds, backing off while the store or database is down.

        Parameters
        ----------
        what : str
            What ``fn`` uses (``"object store"``, ``"database"``), for the outage log lines.
        fn : callable
            The step; a storage failure or database outage makes it run again after a
            back-off (up to ``options.backoff_max``), logged once per outage.

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
        while True:
            try:
                result = fn()
            except InvalidKeyError:
                raise
            except (StorageError, OSError) as exc:
                # Unavailable stores and refused transactions, but also any other storage
                # failure: waiting loudly with the files kept beats crashing or dropping them.
                self._outage_started(what, exc)
            except Exception as exc:
                if not _is_db_outage(exc):
                    raise
                self._outage_started(what, exc)
            else:
                if self._outage is not None:
                    log.warning("ingest[%d]: %s works again; resuming", self.worker_index, self._outage)
                    self._outage = None
                return result
            if self._should_stop():
                raise _Stopped
            time.sleep(delay)
            delay = min(delay * 2, self.options.backoff_max)

    def _outage_started(self, what: str, exc: BaseException) -> None:
        if self._outage is None:
            self._outage = what
            log.error(
                "ingest[%d]: %s unavailable, keeping files in the spool and retrying: %s: %s",
                self.worker_index,
                what,
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
            )

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

    def _parse(self, entry: SpoolEntry) -> tuple[InstanceIn, bytes] | None:
        """Read and parse one spool file; ``None`` if it is gone or was rejected."""
        try:
            raw = entry.path.read_bytes()
        except FileNotFoundError:
            return None  # taken care of by an earlier run (deleted after recording)
        try:
            item, _sha = read_instance(raw, entry, hash_bytes=False)
        except InvalidKeyError as exc:
            self.spool.reject(entry, f"invalid UID: {exc}")
            return None
        except Exception as exc:
            self.spool.reject(entry, f"does not parse: {type(exc).__name__}: {exc}")
            return None
        return item, raw

    def _submit_store(self, raw: bytes, item: InstanceIn, spool_file: Path) -> Future[InstanceIn]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.options.store_threads, thread_name_prefix="ingest-put")
        # Names made durable per batch, one fsync per folder (run_once → LocalObjectStore.sync_names).
        return self._pool.submit(partial(self.store_with_retry, raw, item, spool_file=spool_file, sync=False))

    def close(self) -> None:
        """Stop the put threads (the Ingester can still be used; they restart on demand)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # -- batches ------------------------------------------------------------------------------

    def run_once(self, *, wait: bool = False) -> BatchReport | None:
        """Ingest one batch of what is waiting; ``None`` when there was nothing.

        Parameters
        ----------
        wait : bool
            Keep collecting for up to ``batch_seconds`` after the first file (the background
            loop does this); ``False`` takes only what is there now.
        """
        opts = self.options
        entries: list[SpoolEntry] = []
        stores: list[Future[InstanceIn]] = []
        by_sop: dict[str, Future[InstanceIn]] = {}
        size = 0
        rejected = 0
        taken: set[str] = set()
        started = time.monotonic()
        deadline: float | None = None
        while len(entries) < opts.batch_size:
            fresh = self.spool.pending(
                opts.batch_size - len(entries),
                worker_index=self.worker_index,
                worker_count=self.worker_count,
                skip=taken,
            )
            for entry in fresh:
                taken.add(entry.name)
                parsed = self._parse(entry)
                if parsed is None:
                    rejected += 1
                    continue
                item, raw = parsed
                earlier = by_sop.get(item.sop_uid)
                if earlier is not None:
                    earlier.result()  # versions of one SOP reach the store in arrival order
                future = self._submit_store(raw, item, entry.path)
                by_sop[item.sop_uid] = future
                entries.append(entry)
                stores.append(future)
                size += len(raw)
                if deadline is None:
                    deadline = time.monotonic() + opts.batch_seconds
            now = time.monotonic()
            if not wait or self._should_stop():
                if not fresh:
                    break
                continue
            if deadline is not None and now >= deadline:
                break
            if not fresh:
                if deadline is None:
                    break  # nothing at all: let the caller idle
                time.sleep(opts.poll_seconds)
        items = [future.result() for future in stores]  # raises _Stopped during an outage + stop
        if not items:
            return None if not rejected else BatchReport(self.worker_index, 0, 0, 0, 0, rejected, 0, 0.0)
        if isinstance(self.store, LocalObjectStore):  # hard links made without their folder fsync
            self.retry("object store", partial(self.store.sync_names, [item.object_key for item in items]))
        outcomes = self.record_with_retry(items)
        self.spool.remove(entries)
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
    stop: Any,
    log_level: int,
) -> None:
    """Entry point of one ingest process."""
    from receiver.spool import Spool

    parent = os.getppid()

    def should_stop() -> bool:
        # Stop when asked, and when the receiver died without asking (SIGKILL): a restarted
        # receiver starts its own workers, and two workers on one share would race.
        return bool(stop.is_set()) or os.getppid() != parent

    if options.niceness:
        os.nice(options.niceness)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us through ``stop``
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
            if stop.wait(delay) or should_stop():
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
    """Ingest worker processes started by :func:`start_ingest_processes`."""

    def __init__(self, processes: Sequence[multiprocessing.process.BaseProcess], stop: Any) -> None:
        self.processes = processes
        self._stop = stop

    def alive(self) -> bool:
        """True while every worker runs."""
        return all(p.is_alive() for p in self.processes)

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the workers to finish their batch and exit; terminate those that do not."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for p in self.processes:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.processes:
            if p.is_alive():
                log.warning("ingest process %s did not stop; terminating it", p.pid)
                p.terminate()
                p.join(5)


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
    stop = ctx.Event()
    processes = []
    for index in range(count):
        p = ctx.Process(
            target=_process_main,
            args=(factory, os.fspath(spool_root), index, count, options, stop, log_level),
            name=f"dcmflow-ingest-{index}",
            daemon=True,
        )
        p.start()
        processes.append(p)
    return IngestPool(processes, stop)
