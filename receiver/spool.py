"""The crash-safe receive spool: an append-only segment log with group commit.

The C-STORE handler appends each received instance (the raw PS3.10 bytes, never decoded and
re-encoded) to the log as one record and answers Success only after the record is durable
(``fdatasync``). Ingest workers (:mod:`receiver.ingest`) read the records in order through a
:class:`SpoolReader`, store and record them, and only then advance their durable read mark; a
segment behind every mark is reused for new records (or deleted). So at every moment an
acknowledged instance is in the log ahead of a mark, in the object store and database, or both.

Why a log (issue 14): one file per instance cost a file creation, two fsyncs (file, then the
folder after the rename) and two journal commits, ≈ 1.8 ms per small instance here. Appending
to a preallocated file whose blocks are already written costs one ``fdatasync`` that flushes
data only (no journal commit: the size and allocation do not change), ≈ 0.7 ms; and
**group commit** shares that one call among concurrent associations: a writer whose record is
written finds either no sync running (it becomes the leader and syncs everything written so
far) or one in flight (it waits for the next one, which a waiting writer leads).

Layout under ``Settings.spool_dir``::

    .lock          flock()ed by the one receiving process (two receivers on one spool is an error)
    segments/      {seq:016d}.seg: log segments (format: receiver/spool_log.py);
                   free-*.seg: ingested segments kept for reuse
    head           how far the log is resolved (written after each group commit; readers stop there)
    marks/{i}      durable read mark of ingest worker i (position, worker index, worker count)
    tmp/           anonymous spill files of very large data sets while they arrive (O_TMPFILE)
    stage/         ingest's staging files (receiver/ingest.py)
    rejected/      records ingest could not use (kept for a person, with a ``.reason`` text beside)
    1/, 2/, …      the spools of further receiving processes, same layout (receiver/spools.py)

Disk watermark: appending refuses (:class:`~receiver.errors.SpoolFullError`, which the
handler answers with 0xA700 Out of Resources) when writing would leave less than
``min_free_bytes`` free, or less than ``min_free_fraction`` of the file system; a new segment
is never created past it either.
"""

from __future__ import annotations

import collections
import ctypes
import datetime as dt
import fcntl
import logging
import os
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Self

from receiver.errors import SpoolError, SpoolFullError, SpoolLockedError
from receiver.spool_log import (
    MAX_HEADER,
    Position,
    RecordHeader,
    aligned,
    decode_header,
    decode_position,
    encode_header,
    encode_position,
    header_length,
    iter_records,
    read_data,
    read_position_file,
    segment_name,
    segment_seq,
    write_position_file,
)
from storage.keys import is_valid_uid

__all__ = [
    "DEFAULT_MIN_FREE_BYTES",
    "DEFAULT_MIN_FREE_FRACTION",
    "DEFAULT_SEGMENT_SIZE",
    "SLOT_FROM",
    "SPILL_BYTES",
    "RecoveryReport",
    "Spool",
    "SpoolEntry",
    "SpoolReader",
    "SpoolStats",
    "SpoolWriter",
    "new_association_id",
    "start_writeback",
    "worker_of",
]

DEFAULT_MIN_FREE_BYTES = 1024**3
"""Refuse new instances when less than this many bytes would stay free (default 1 GiB)."""

DEFAULT_MIN_FREE_FRACTION = 0.02
"""Refuse new instances when less than this fraction of the spool file system would stay free (2 %)."""

DEFAULT_SEGMENT_SIZE = 64 * 1024**2
"""Bytes of one log segment (a record larger than a segment gets a segment of its own)."""

SPILL_BYTES = 32 * 1024**2
"""A data set larger than this is kept in an anonymous file in ``tmp/``, not in memory, until it
is complete and appended."""

SLOT_FROM = 256 * 1024
"""Stream a data set straight into the log (a slot) when its association's previous one was at
least this large: its bytes go to disk while the rest arrives, so the acknowledgement waits
for little more than the last fragment. Smaller ones are collected in memory and appended whole."""

_SEGMENTS = "segments"
_MARKS = "marks"
_TMP = "tmp"
_STAGE = "stage"
_REJECTED = "rejected"
_HEAD = "head"
_LOCK = ".lock"
_FREE_PREFIX = "free-"
_KEEP_FREE = 2  # ingested segments kept for reuse; more are deleted (their space goes back)
_KEEPER_INTERVAL = 0.2
_ZEROS = bytes(1024 * 1024)
_WRITEBACK_FROM = 64 * 1024  # start write-back of records at least this large at once
_WRITEBACK_CHUNK = 64 * 1024  # while a slot fills, start write-back every this many bytes
_HINTS_MAX = 4096  # associations whose last data-set size is remembered

log = logging.getLogger(__name__)


def new_association_id() -> str:
    """A fresh association id: 32 lower-case hex digits (stored in each record's header)."""
    return uuid.uuid4().hex


def worker_of(sop_uid: str, worker_count: int) -> int:
    """The ingest worker that takes an instance: all versions of one SOP go through one worker."""
    return zlib.crc32(sop_uid.encode()) % worker_count if worker_count > 1 else 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start write-out of dirty pages, do not wait


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    # os has no sync_file_range(2); libc has, on Linux. Elsewhere fdatasync does it all.
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing this range back now (a hint; errors surface at the sync)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


@dataclass(frozen=True)
class SpoolEntry:
    """One acknowledged instance in the log.

    Attributes
    ----------
    received_at : datetime.datetime
        When the handler appended it (UTC).
    association_id : str
        Receiver-chosen id of the association that delivered it (32 hex digits).
    calling_ae : str
        The sender's AE title, as sent (``""`` for folder imports).
    sop_uid : str
        The request's Affected SOP Instance UID (validated).
    position : Position, optional
        Where its record starts in the log (``None`` for instances that never were in it).
    size : int
        Bytes of the PS3.10 data.
    """

    received_at: dt.datetime
    association_id: str
    calling_ae: str
    sop_uid: str
    position: Position | None = None
    size: int = 0

    @property
    def name(self) -> str:
        """A name for logs and the ``rejected/`` folder (segment-offset, association, AE, UID)."""
        where = f"{self.position.segment}-{self.position.offset}" if self.position else "import"
        ae_hex = self.calling_ae.encode("ascii", "replace").hex()
        return f"{where}_{self.association_id}_{ae_hex}_{self.sop_uid}.dcm"

    @classmethod
    def of(cls, header: RecordHeader) -> SpoolEntry:
        """The entry of a decoded record header."""
        return cls(
            received_at=dt.datetime.fromtimestamp(header.received_ns / 1e9, tz=dt.UTC),
            association_id=header.association_id,
            calling_ae=header.calling_ae,
            sop_uid=header.sop_uid,
            position=header.position,
            size=header.data_length,
        )


@dataclass(frozen=True)
class RecoveryReport:
    """What :meth:`Spool.recover` found.

    Attributes
    ----------
    pending, pending_bytes : int
        Acknowledged instances (and their bytes) not yet ingested: ingest replays them.
    dropped : int
        Records whose data failed the checksum (torn by a crash, never acknowledged).
    segments : int
        Segment files in use.
    """

    pending: int
    pending_bytes: int
    dropped: int
    segments: int


@dataclass
class SpoolStats:
    """Counters of the writing side: records made durable, ``fdatasync`` calls, refusals."""

    records: int = 0
    syncs: int = 0
    bytes: int = 0
    refused: int = 0

    def line(self) -> str:
        """One log line."""
        per = self.syncs / self.records if self.records else 0.0
        return f"{self.records} records ({self.bytes / 1e6:.1f} MB), {self.syncs} fdatasyncs ({per:.2f} per instance)"


class SpoolWriter:
    """One instance being received (from :meth:`Spool.open_entry`).

    :meth:`write` takes the data set as it arrives, with its CRC-32: into a *slot* of the log
    reserved for it when the association's previous data set was large (:data:`SLOT_FROM`;
    written back to disk as it comes), otherwise in memory (a file in ``tmp/`` beyond
    :data:`SPILL_BYTES`). :meth:`commit` makes it one durable record and returns once it is.
    A data set that is discarded, never committed (leaving a ``with`` block) or outgrows its
    slot never becomes a record there: a half data set is never read as an instance.
    """

    def __init__(
        self,
        spool: Spool,
        *,
        sop_uid: str,
        association_id: str,
        calling_ae: str,
        received_ns: int,
        slot: _Ticket | None = None,
    ) -> None:
        self.sop_uid = sop_uid
        self.association_id = association_id
        self.calling_ae = calling_ae
        self.received_ns = received_ns
        self.size = 0
        self.crc = 0
        self._spool = spool
        self._slot = slot
        self._buffer: bytearray | None = bytearray() if slot is None else None
        self._spill: BinaryIO | None = None
        self._written_back = 0

    @property
    def streaming(self) -> bool:
        """True while the data set goes straight into a slot of the log."""
        return self._slot is not None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` to the data set."""
        if self._buffer is None and self._spill is None and self._slot is None:
            raise ValueError("spool writer is closed")
        self.crc = zlib.crc32(data, self.crc)
        slot = self._slot
        if slot is not None:
            if self.size + len(data) <= slot.capacity:
                _pwrite_all(slot.segment.fd, data, slot.data_offset + self.size)
                self.size += len(data)
                if self.size - self._written_back >= _WRITEBACK_CHUNK:
                    start_writeback(slot.segment.fd, slot.data_offset + self._written_back, self.size - self._written_back)
                    self._written_back = self.size
                return
            # Outgrew its slot: the slot is left void (skipped by readers) and this data set
            # continues in memory, to be appended whole.
            so_far = os.pread(slot.segment.fd, self.size, slot.data_offset)
            self._slot = None
            self._spool._void(slot)
            self._buffer = bytearray(so_far)
        if self._spill is None and self.size + len(data) > SPILL_BYTES:
            assert self._buffer is not None
            self._spill = tempfile.TemporaryFile(dir=self._spool.tmp_dir)  # O_TMPFILE: gone on a crash
            self._spill.write(self._buffer)
            self._buffer = None
        if self._spill is not None:
            self._spill.write(data)
        else:
            assert self._buffer is not None
            self._buffer += data
        self.size += len(data)

    def read_back(self, offset: int) -> bytes:
        """What was written from ``offset`` on (for rare re-checks)."""
        if self._slot is not None:
            return os.pread(self._slot.segment.fd, self.size - offset, self._slot.data_offset + offset)
        if self._spill is not None:
            self._spill.flush()
            return os.pread(self._spill.fileno(), self.size - offset, offset)
        if self._buffer is None:
            raise ValueError("spool writer is closed")
        return bytes(self._buffer[offset:])

    def copy_into(self, fd: int, offset: int) -> None:
        """Write the collected data set into ``fd`` at ``offset`` (used by the log while appending)."""
        if self._spill is not None:
            self._spill.flush()
            copied = 0
            while copied < self.size:
                n = os.copy_file_range(self._spill.fileno(), fd, self.size - copied, copied, offset + copied)
                if n == 0:
                    raise OSError("spill file ended early")
                copied += n
        else:
            assert self._buffer is not None
            _pwrite_all(fd, self._buffer, offset)

    def commit(self) -> SpoolEntry:
        """Make the data set a durable record of the log and wait until it is.

        Raises
        ------
        SpoolFullError
            Below the disk watermark (nothing was appended).
        OSError
            If the disk fails (the record is not acknowledged; recovery skips it).
        """
        if self._buffer is None and self._spill is None and self._slot is None:
            raise ValueError("spool writer is closed")
        try:
            if self._slot is not None:
                slot, self._slot = self._slot, None
                return self._spool._fill(slot, self)
            return self._spool._append(self)
        finally:
            self.discard()

    def discard(self) -> None:
        """Drop what was written (idempotent); a slot is left void."""
        if self._slot is not None:
            slot, self._slot = self._slot, None
            self._spool._void(slot)
        self._buffer = None
        if self._spill is not None:
            self._spill.close()
            self._spill = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


@dataclass(eq=False)
class _Segment:
    seq: int
    fd: int
    capacity: int
    used: int = 0


@dataclass(eq=False)
class _Ticket:
    """One reserved record: resolved when it is durable or has failed."""

    segment: _Segment
    offset: int
    end: Position
    association_id: str
    size: int
    header_length: int = 0
    capacity: int = 0  # data bytes a slot can take (0: a whole record)
    resolved: bool = False
    error: BaseException | None = None

    @property
    def data_offset(self) -> int:
        return self.offset + self.header_length


@dataclass
class _Marks:
    """The read marks on disk: per worker index, for the newest worker count."""

    count: int = 0
    by_index: dict[int, Position] = field(default_factory=dict)
    others: list[Position] = field(default_factory=list)  # marks of an older worker count

    @property
    def complete(self) -> bool:
        return self.count > 0 and all(i in self.by_index for i in range(self.count))

    def floor(self) -> Position | None:
        """Everything before this position is ingested by every worker; ``None``: nothing known."""
        if not self.complete:
            return None
        return min([*self.by_index.values(), *self.others])


class Spool:
    """The receive spool folder (see the module docstring for the layout and guarantees).

    Parameters
    ----------
    root : Path
        The spool folder (``Settings.spool_dir``); created with its sub-folders if missing.
    min_free_bytes : int
        Watermark in bytes: appending refuses when fewer would stay free.
    min_free_fraction : float
        Watermark as a fraction (0-1) of the file system size.
    segment_size : int
        Bytes per log segment (a multiple of 1 MiB is best).

    Raises
    ------
    SpoolError
        If the folder cannot be created.
    """

    def __init__(
        self,
        root: Path,
        *,
        min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
        min_free_fraction: float = DEFAULT_MIN_FREE_FRACTION,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
    ) -> None:
        if min_free_bytes < 0 or not 0 <= min_free_fraction < 1:
            raise ValueError("min_free_bytes must be >= 0 and min_free_fraction in [0, 1)")
        if segment_size < 64 * 1024:
            raise ValueError("segment_size must be at least 64 KiB")
        self.root = Path(root)
        self.segments_dir = self.root / _SEGMENTS
        self.marks_dir = self.root / _MARKS
        self.tmp_dir = self.root / _TMP
        self.stage_dir = self.root / _STAGE
        self.rejected_dir = self.root / _REJECTED
        self.head_path = self.root / _HEAD
        self.min_free_bytes = min_free_bytes
        self.min_free_fraction = min_free_fraction
        self.segment_size = segment_size
        try:
            for folder in (self.segments_dir, self.marks_dir, self.tmp_dir, self.stage_dir, self.rejected_dir):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"cannot create spool folder {self.root}: {exc}") from exc
        self.stats = SpoolStats()
        self._lock_fd: int | None = None
        # writing side (started by recover(), or by the first append)
        self._start_lock = threading.Lock()
        self._cond = threading.Condition(threading.Lock())
        self._prep_lock = threading.Lock()
        self._started = False
        self._closed = False
        self._current: _Segment | None = None
        self._next: _Segment | None = None
        self._sealed: dict[int, _Segment] = {}
        self._inflight: collections.deque[_Ticket] = collections.deque()
        self._written: list[_Ticket] = []
        self._syncing = False
        self._head: Position | None = None
        self._head_fd: int | None = None
        self._head_view_fd: int | None = None  # readers' (ingest's) open head file, read with pread
        self._last_end: dict[str, Position] = {}
        self._size_hints: dict[str, int] = {}
        self._keeper: threading.Thread | None = None
        self._keeper_stop = threading.Event()
        self._full_logged = False

    def __repr__(self) -> str:
        return f"Spool({str(self.root)!r})"

    # -- lock -------------------------------------------------------------------------------

    def lock(self) -> None:
        """Take the spool's exclusive lock for this process (one receiver per spool).

        Raises
        ------
        SpoolLockedError
            If another process (or another :class:`Spool` of this folder) holds it.
        """
        if self._lock_fd is not None:
            return
        fd = os.open(self.root / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise SpoolLockedError(f"spool {self.root} is in use by another receiver") from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        """Stop writing (the keeper thread, open segments) and release the lock (idempotent).

        The lock is also released when the process dies.
        """
        self._keeper_stop.set()
        if self._keeper is not None and self._keeper is not threading.current_thread():
            self._keeper.join()
        self._keeper = None
        with self._cond:
            self._closed = self._started
            segments = [*self._sealed.values(), *(s for s in (self._current, self._next) if s is not None)]
            self._sealed, self._current, self._next = {}, None, None
            self._started = False
            if self._head_fd is not None:
                os.close(self._head_fd)
                self._head_fd = None
            if self._head_view_fd is not None:
                os.close(self._head_view_fd)
                self._head_view_fd = None
        for segment in segments:
            os.close(segment.fd)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self.stats.records:
            log.info("spool %s: %s", self.root, self.stats.line())

    close = unlock

    # -- recovery ---------------------------------------------------------------------------

    def recover(self, worker_count: int | None = None) -> RecoveryReport:
        """Take the lock, find the end of the log after a start or a crash, and start writing.

        Scans every record after the read marks: a record whose data fails its checksum was
        torn by a crash (never acknowledged) and is dropped; the rest are pending, and ingest
        replays them. New records go to a fresh segment. With ``worker_count``, the read marks
        are rewritten for that many ingest workers (each gets the lowest mark, so a change of
        worker count replays rather than skips). Call it before the SCP and the ingest workers
        start (an append does it itself when it was not called).

        Returns
        -------
        RecoveryReport

        Raises
        ------
        SpoolLockedError
            If another process holds the spool.
        """
        with self._start_lock:
            if self._started:
                raise SpoolError("recover() must run before the spool starts writing")
            return self._recover(worker_count)

    def _recover(self, worker_count: int | None) -> RecoveryReport:
        """:meth:`recover` with the start lock held."""
        self.lock()
        self._closed = False
        marks = self._read_marks()
        floor = marks.floor() or Position(0, 0)
        if worker_count is not None:
            self._reset_marks(floor, worker_count)
            marks = self._read_marks()
        seqs = self._segment_seqs()
        pending = pending_bytes = dropped = 0
        end = floor
        for seq in seqs:
            if seq < floor.segment:
                continue
            fd = os.open(self.segments_dir / segment_name(seq), os.O_RDONLY)
            try:
                start = floor.offset if seq == floor.segment else 0
                for header in iter_records(fd, seq, start):
                    end = header.end
                    if read_data(fd, header) is None:
                        dropped += 1
                        continue
                    if self._unconsumed(header, marks):
                        pending += 1
                        pending_bytes += header.data_length
                        self._last_end[header.association_id] = header.end
            finally:
                os.close(fd)
        if dropped:
            log.warning(
                "spool %s: dropped %d record%s never acknowledged (torn by a crash, or a data set still arriving)",
                self.root,
                dropped,
                "" if dropped == 1 else "s",
            )
        if self._head_fd is None:
            self._head_fd = os.open(self.head_path, os.O_RDWR | os.O_CREAT, 0o644)
        self._publish_head(end)
        self._current = self._prepare((max(seqs) if seqs else 0) + 1)
        # The next segment too, before the first association: on a new spool that is where the
        # zero-filling happens (later segments are mostly reused ones).
        with self._prep_lock:
            if self._next is None:
                try:
                    self._next = self._prepare(self._current.seq + 1)
                except SpoolFullError:
                    pass  # the keeper tries again; appends answer 0xA700 meanwhile if need be
        self._started = True
        self._keeper_stop.clear()
        self._keeper = threading.Thread(target=self._keep, name="spool-keeper", daemon=True)
        self._keeper.start()
        return RecoveryReport(pending, pending_bytes, dropped, len(seqs))

    def _ensure_started(self) -> None:
        if self._started:
            return
        with self._start_lock:
            if not self._started:
                self._recover(None)

    # -- disk space -------------------------------------------------------------------------

    def free_bytes(self) -> tuple[int, int]:
        """``(free, total)`` bytes of the spool's file system, as seen by an unprivileged user."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    def has_room(self, incoming: int = 0) -> bool:
        """True when writing ``incoming`` more bytes keeps free space above both watermarks."""
        free, total = self.free_bytes()
        left = free - incoming
        return left >= self.min_free_bytes and (total == 0 or left >= self.min_free_fraction * total)

    def _refuse(self) -> SpoolFullError:
        free, _ = self.free_bytes()
        self.stats.refused += 1
        return SpoolFullError(f"spool {self.root} below its watermark ({free} bytes free)")

    # -- segments ---------------------------------------------------------------------------

    def _segment_seqs(self) -> list[int]:
        seqs = []
        for path in self.segments_dir.iterdir():
            seq = segment_seq(path)
            if seq is not None:
                seqs.append(seq)
        return sorted(seqs)

    def _free_files(self) -> list[Path]:
        return sorted(p for p in self.segments_dir.iterdir() if p.name.startswith(_FREE_PREFIX))

    def _prepare(self, seq: int) -> _Segment:
        """Segment ``seq`` ready for appending: a reused ingested one, or a new zero-filled one."""
        path = self.segments_dir / segment_name(seq)
        free = self._free_files()
        if free:
            os.rename(free[0], path)
        elif not self.has_room(self.segment_size):
            raise self._refuse()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size < self.segment_size:  # written once with zeros: later fdatasyncs flush data only
                if not self.has_room(self.segment_size - size):
                    raise self._refuse()
                offset = size
                while offset < self.segment_size:
                    chunk = _ZEROS[: min(len(_ZEROS), self.segment_size - offset)]
                    _pwrite_all(fd, chunk, offset)
                    offset += len(chunk)
                os.fdatasync(fd)
            _fsync_dir(self.segments_dir)
        except BaseException:
            os.close(fd)
            raise
        return _Segment(seq, fd, max(size, self.segment_size))

    def _roll(self, current: _Segment) -> _Segment:
        """Seal ``current`` and switch to the next segment (called with the writer lock held)."""
        with self._prep_lock:
            nxt, self._next = self._next, None
            if nxt is None or nxt.seq != current.seq + 1:
                if nxt is not None:
                    os.close(nxt.fd)
                nxt = self._prepare(current.seq + 1)
        self._sealed[current.seq] = current
        self._current = nxt
        return nxt

    def _keep(self) -> None:
        """Keeper thread: reuse segments every worker has passed, prepare the next one ahead
        (a rollover that finds none prepares it itself, holding up appends meanwhile)."""
        while not self._keeper_stop.wait(_KEEPER_INTERVAL):
            try:
                self._recycle()
                with self._prep_lock:
                    current = self._current
                    # Only once the current segment is half full: by then ingest has usually
                    # passed the previous one, which is reused instead of writing a new one.
                    if (
                        current is not None
                        and self._next is None
                        and current.used >= current.capacity // 2
                        and not self._keeper_stop.is_set()
                    ):
                        self._next = self._prepare(current.seq + 1)
                self._full_logged = False
            except SpoolFullError as exc:
                if not self._full_logged:
                    log.error("spool: cannot prepare the next segment: %s", exc)
                    self._full_logged = True
            except Exception:  # the keeper must not die: appends would stall on rollovers
                log.exception("spool: segment keeper failed; retrying")

    def _recycle(self) -> None:
        floor = self._read_marks().floor()
        if floor is None:
            return
        with self._cond:
            current = self._current.seq if self._current is not None else None
            active = {t.segment.seq for t in self._inflight}
            done = [s for s in self._segment_seqs() if s < floor.segment and s != current and s not in active]
            closing = [self._sealed.pop(s) for s in done if s in self._sealed]
        for segment in closing:
            os.close(segment.fd)
        if not done:
            return
        kept = len(self._free_files())
        for seq in done:
            path = self.segments_dir / segment_name(seq)
            if kept < _KEEP_FREE:
                os.rename(path, self.segments_dir / f"{_FREE_PREFIX}{uuid.uuid4().hex}.seg")
                kept += 1
            else:
                path.unlink(missing_ok=True)
        _fsync_dir(self.segments_dir)

    # -- appending --------------------------------------------------------------------------

    def open_entry(
        self,
        *,
        sop_uid: str,
        association_id: str,
        calling_ae: str,
        received_ns: int | None = None,
        incoming: int = 0,
    ) -> SpoolWriter:
        """Start receiving one instance; :meth:`SpoolWriter.commit` appends it durably.

        Parameters
        ----------
        sop_uid : str
            Affected SOP Instance UID of the request; must be a valid UID.
        association_id : str
            32 hex digits (:func:`new_association_id`).
        calling_ae : str
            Calling AE title (at most 16 ASCII characters; longer is cut).
        received_ns : int, optional
            Receive time in ns since the epoch; now when omitted.
        incoming : int
            Bytes expected, when known, for the watermark check.

        Returns
        -------
        SpoolWriter

        Raises
        ------
        SpoolFullError
            If the disk watermark would be crossed; nothing was written.
        ValueError
            If ``sop_uid`` or ``association_id`` is malformed.
        """
        if not is_valid_uid(sop_uid):
            raise ValueError(f"invalid SOP Instance UID {sop_uid!r}")
        if len(association_id) != 32 or not all(c in "0123456789abcdef" for c in association_id):
            raise ValueError(f"invalid association id {association_id!r}")
        if not self.has_room(incoming):
            raise self._refuse()
        ae = calling_ae.strip()[:16]
        ns = time.time_ns() if received_ns is None else received_ns
        slot = None
        hint = self._size_hints.get(association_id, 0)
        if SLOT_FROM <= hint and hint + hint // 8 + 8192 <= self.segment_size // 2:
            # Room for a little more than the association's previous data set (series of one
            # image size are the rule); a larger one leaves its slot and is appended whole.
            slot = self._reserve_slot(sop_uid, association_id, ae, ns, aligned(hint + hint // 8))
        return SpoolWriter(self, sop_uid=sop_uid, association_id=association_id, calling_ae=ae, received_ns=ns, slot=slot)

    def write(
        self,
        data: bytes,
        *,
        sop_uid: str,
        association_id: str,
        calling_ae: str,
        received_ns: int | None = None,
    ) -> SpoolEntry:
        """Durably append one received instance (:meth:`open_entry` in one go).

        Parameters
        ----------
        data : bytes
            The raw PS3.10 file bytes (preamble, file meta, dataset as received).
        sop_uid, association_id, calling_ae, received_ns
            As for :meth:`open_entry`.

        Returns
        -------
        SpoolEntry
            What ingest will see. When this returns, the record is durable.

        Raises
        ------
        SpoolFullError
            If the disk watermark would be crossed; nothing was written.
        ValueError
            If ``sop_uid`` or ``association_id`` is malformed.
        OSError
            If the disk write fails.
        """
        writer = self.open_entry(
            sop_uid=sop_uid, association_id=association_id, calling_ae=calling_ae, received_ns=received_ns, incoming=len(data)
        )
        with writer:
            writer.write(data)
            return writer.commit()

    def _reserve(self, extent_of: Callable[[int], int], header_of: Callable[[int], bytes], **ticket: Any) -> _Ticket:
        """Reserve the next record's space and write its header, in log order, under the lock.

        A header is written before any later record is reserved: so every header before an
        acknowledged record is durable with it, and recovery can walk the log.
        """
        self._ensure_started()
        with self._cond:
            segment = self._current
            if self._closed or segment is None:
                raise SpoolError(f"spool {self.root} is closed")
            header = header_of(segment.seq)
            if segment.used and segment.used + extent_of(len(header)) > segment.capacity:
                segment = self._roll(segment)
                header = header_of(segment.seq)
            offset = segment.used
            _pwrite_all(segment.fd, header, offset)
            segment.used = aligned(offset + extent_of(len(header)))
            reserved = _Ticket(segment, offset, Position(segment.seq, segment.used), header_length=len(header), **ticket)
            self._inflight.append(reserved)
            return reserved

    def _append(self, writer: SpoolWriter) -> SpoolEntry:
        """Append a collected data set as one record: reserve, write, group-commit."""
        if not self.has_room(writer.size):
            raise self._refuse()
        fields = self._fields(writer)
        ticket = self._reserve(
            lambda n: n + writer.size,
            lambda seq: encode_header(seq, data_length=writer.size, data_crc=writer.crc, **fields),
            association_id=writer.association_id,
            size=writer.size,
        )
        try:
            writer.copy_into(ticket.segment.fd, ticket.data_offset)
            if writer.size >= _WRITEBACK_FROM:
                start_writeback(ticket.segment.fd, ticket.offset, ticket.header_length + writer.size)
        except BaseException as exc:
            self._resolve(ticket, exc)
            raise
        return self._durable(ticket, writer)

    @staticmethod
    def _fields(writer: SpoolWriter) -> dict[str, Any]:
        return {
            "received_ns": writer.received_ns,
            "association_id": writer.association_id,
            "calling_ae": writer.calling_ae,
            "sop_uid": writer.sop_uid,
        }

    def _reserve_slot(self, sop_uid: str, association_id: str, calling_ae: str, received_ns: int, capacity: int) -> _Ticket:
        """Reserve a slot for a data set that is about to arrive (its header flagged as a slot)."""
        fields: dict[str, Any] = {
            "received_ns": received_ns,
            "association_id": association_id,
            "calling_ae": calling_ae,
            "sop_uid": sop_uid,
        }
        extent = header_length(calling_ae, sop_uid) + capacity
        return self._reserve(
            lambda _: extent,
            lambda seq: encode_header(seq, data_length=0, data_crc=0, slot=True, extent=extent, **fields),
            association_id=association_id,
            size=0,
            capacity=capacity,
        )

    def _fill(self, slot: _Ticket, writer: SpoolWriter) -> SpoolEntry:
        """Turn a filled slot into a record (its header rewritten in place), then group-commit."""
        if not self.has_room(0):
            self._void(slot)
            raise self._refuse()
        header = encode_header(
            slot.segment.seq,
            data_length=writer.size,
            data_crc=writer.crc,
            extent=slot.header_length + slot.capacity,
            **self._fields(writer),
        )
        assert len(header) == slot.header_length
        slot.size = writer.size
        try:
            _pwrite_all(slot.segment.fd, header, slot.offset)
        except BaseException as exc:
            self._resolve(slot, exc)
            raise
        return self._durable(slot, writer)

    def _void(self, slot: _Ticket) -> None:
        """Give up a slot: its header stays flagged, so readers and recovery skip it."""
        self._resolve(slot, None, void=True)

    def _resolve(self, ticket: _Ticket, error: BaseException | None, *, void: bool = False) -> None:
        with self._cond:
            ticket.resolved, ticket.error = True, error
            self._advance_head()
            self._cond.notify_all()

    def _durable(self, ticket: _Ticket, writer: SpoolWriter) -> SpoolEntry:
        self._commit(ticket)
        hints = self._size_hints
        if len(hints) >= _HINTS_MAX and writer.association_id not in hints:
            hints.clear()
        hints[writer.association_id] = writer.size
        return SpoolEntry(
            received_at=dt.datetime.fromtimestamp(writer.received_ns / 1e9, tz=dt.UTC),
            association_id=writer.association_id,
            calling_ae=writer.calling_ae,
            sop_uid=writer.sop_uid,
            position=Position(ticket.segment.seq, ticket.offset),
            size=writer.size,
        )

    def _commit(self, ticket: _Ticket) -> None:
        """Group commit: lead one ``fdatasync`` for everything written, or wait for the next one."""
        cond = self._cond
        with cond:
            self._written.append(ticket)
            while not ticket.resolved:
                if self._syncing:
                    cond.wait()
                    continue
                batch, self._written = self._written, []
                segments = {t.segment.seq: t.segment for t in batch}
                self._syncing = True
                cond.release()
                error: BaseException | None = None
                try:
                    for seq in sorted(segments):
                        os.fdatasync(segments[seq].fd)
                except BaseException as exc:  # the kernel may have dropped the pages: none is durable
                    error = exc
                finally:
                    cond.acquire()
                self._syncing = False
                self.stats.syncs += len(segments)
                for t in batch:
                    t.resolved, t.error = True, error
                    if error is None:
                        self.stats.records += 1
                        self.stats.bytes += t.size
                        self._last_end[t.association_id] = t.end
                self._advance_head()
                cond.notify_all()
        if ticket.error is not None:
            raise ticket.error

    def _advance_head(self) -> None:
        """Publish how far the log is resolved (called with the writer lock held)."""
        while self._inflight and self._inflight[0].resolved:
            self._inflight.popleft()
        if self._inflight:
            head = Position(self._inflight[0].segment.seq, self._inflight[0].offset)
        elif self._current is not None:
            head = Position(self._current.seq, self._current.used)
        else:
            return
        if head != self._head:
            self._publish_head(head)

    def _publish_head(self, head: Position) -> None:
        self._head = head
        if self._head_fd is not None:
            os.pwrite(self._head_fd, encode_position(head), 0)  # not synced: recovery recomputes it

    # -- reading side -----------------------------------------------------------------------

    def read_head(self) -> Position | None:
        """How far the log is resolved: readers never read a record that starts at or after it."""
        if self._head is not None and self._started:
            return self._head
        # Readers poll this many times a second: keep the file open (the writer rewrites it in
        # place, never replaces it) instead of opening and reading it through pathlib each time.
        if self._head_view_fd is None:
            try:
                self._head_view_fd = os.open(self.head_path, os.O_RDONLY)
            except FileNotFoundError:
                return None
        found = decode_position(os.pread(self._head_view_fd, 64, 0))
        return found[0] if found is not None else None

    def _read_marks(self) -> _Marks:
        found = []
        for path in self.marks_dir.iterdir():
            mark = read_position_file(path)
            if mark is not None:
                found.append(mark)
            elif path.name.isdigit():  # a torn mark: that worker starts from the beginning
                found.append((Position(0, 0), int(path.name), 0))
        marks = _Marks(count=max((c for _, _, c in found), default=0))
        for position, index, count in found:
            if count == marks.count:
                marks.by_index[index] = position
            else:
                marks.others.append(position)
        return marks

    def _reset_marks(self, floor: Position, worker_count: int) -> None:
        for path in self.marks_dir.iterdir():
            if not path.name.isdigit() or int(path.name) >= worker_count:
                path.unlink()
        for index in range(worker_count):
            write_position_file(self.marks_dir / str(index), floor, index=index, count=worker_count)
        _fsync_dir(self.marks_dir)

    def mark_of(self, worker_index: int, worker_count: int) -> Position:
        """Where worker ``worker_index`` of ``worker_count`` resumes: its mark, else the lowest one."""
        marks = self._read_marks()
        if marks.count == worker_count and worker_index in marks.by_index:
            return marks.by_index[worker_index]
        return marks.floor() or Position(0, 0)

    def save_mark(self, worker_index: int, worker_count: int, position: Position) -> None:
        """Make a worker's read mark durable: records before it are stored and recorded."""
        write_position_file(self.marks_dir / str(worker_index), position, index=worker_index, count=worker_count)

    def reader(self, worker_index: int = 0, worker_count: int = 1) -> SpoolReader:
        """A reader of one ingest worker's share, from its durable mark."""
        return SpoolReader(self, worker_index, worker_count)

    @staticmethod
    def _unconsumed(header: RecordHeader, marks: _Marks) -> bool:
        if not marks.complete:
            return True
        mark = marks.by_index[worker_of(header.sop_uid, marks.count)]
        return header.position >= mark

    def _walk(self, start: Position, head: Position) -> list[RecordHeader]:
        """Headers of the resolved records from ``start`` up to ``head`` (data not checked)."""
        out: list[RecordHeader] = []
        for seq in self._segment_seqs():
            if seq < start.segment or seq > head.segment:
                continue
            try:
                fd = os.open(self.segments_dir / segment_name(seq), os.O_RDONLY)
            except FileNotFoundError:
                continue  # recycled meanwhile
            try:
                first = start.offset if seq == start.segment else 0
                out.extend(iter_records(fd, seq, first, head.offset if seq == head.segment else None))
            finally:
                os.close(fd)
        return out

    def depth(self) -> tuple[int, int]:
        """``(instances, bytes)`` acknowledged and not yet ingested (``dcmflow status``)."""
        head = self.read_head()
        if head is None:
            return 0, 0
        marks = self._read_marks()
        start = marks.floor() or Position(0, 0)
        pending = [h for h in self._walk(start, head) if not h.slot and self._unconsumed(h, marks)]
        return len(pending), sum(h.data_length for h in pending)

    def count(self) -> int:
        """Number of instances waiting for ingest."""
        return self.depth()[0]

    def has_files_of(self, association_id: str) -> bool:
        """True while the log holds records of this association that ingest has not finished."""
        end = self._last_end.get(association_id)
        if end is None:
            return False
        floor = self._read_marks().floor()
        if floor is not None and floor >= end:
            self._last_end.pop(association_id, None)
            return False
        return True

    def reject(self, entry: SpoolEntry, raw: bytes, reason: str) -> Path:
        """Keep a record ingest cannot use in ``rejected/`` with a ``.reason`` file; never drop it."""
        target = self.rejected_dir / entry.name
        (self.rejected_dir / f"{entry.name}.reason").write_text(reason + "\n", encoding="utf-8")
        with open(target, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(self.rejected_dir)
        log.warning("spool: rejected %s: %s", entry.name, reason)
        return target


class SpoolReader:
    """Reads one ingest worker's share of the log in order, from its durable mark.

    :meth:`read` returns the next records of the share (checking each one's data CRC; a
    record that fails it was never acknowledged and is skipped) and moves :attr:`position`
    past every record it looked at; :meth:`save` makes :attr:`position` the worker's durable
    mark, which the caller does only once those records are stored and recorded.

    Parameters
    ----------
    spool : Spool
        The spool (any process; readers never write the log).
    worker_index, worker_count : int
        This worker's share (:func:`worker_of`).
    """

    def __init__(self, spool: Spool, worker_index: int = 0, worker_count: int = 1) -> None:
        if not 0 <= worker_index < worker_count:
            raise ValueError("need 0 <= worker_index < worker_count")
        self.spool = spool
        self.worker_index = worker_index
        self.worker_count = worker_count
        self.position = spool.mark_of(worker_index, worker_count)
        self.skipped = 0
        self._fd: int | None = None
        self._fd_seq = -1

    def _open(self, seq: int) -> int | None:
        if self._fd_seq == seq:
            return self._fd
        self.close()
        try:
            self._fd = os.open(self.spool.segments_dir / segment_name(seq), os.O_RDONLY)
        except FileNotFoundError:
            return None
        self._fd_seq = seq
        return self._fd

    def close(self) -> None:
        """Close the open segment file."""
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._fd_seq = None, -1

    def _next_segment(self, after: int, head: Position) -> bool:
        later = [s for s in self.spool._segment_seqs() if after < s <= head.segment]
        if not later:
            return False
        self.position = Position(later[0], 0)
        return True

    def read(self, limit: int, max_bytes: int | None = None) -> list[tuple[SpoolEntry, bytes]]:
        """Up to ``limit`` records of this share (fewer when the log has no more yet).

        Parameters
        ----------
        limit : int
            Records at most.
        max_bytes : int, optional
            Stop after this many data bytes (at least one record is returned).

        Returns
        -------
        list of (SpoolEntry, bytes)
        """
        out: list[tuple[SpoolEntry, bytes]] = []
        size = 0
        head = self.spool.read_head()
        if head is None:
            return out
        while len(out) < limit and (max_bytes is None or size < max_bytes) and self.position < head:
            seq = self.position.segment
            fd = self._open(seq)
            header = None
            if fd is not None:
                header = decode_header(os.pread(fd, MAX_HEADER, self.position.offset), seq, self.position.offset)
            if header is None or header.position >= head:
                if seq < head.segment and self._next_segment(seq, head):
                    continue  # this segment is complete: its first invalid header ends it
                break
            self.position = header.end
            if worker_of(header.sop_uid, self.worker_count) != self.worker_index:
                continue
            assert fd is not None
            data = read_data(fd, header)
            if data is None and header.slot:
                continue  # a slot left void (its data set outgrew it or never completed)
            if data is None:
                self.skipped += 1
                log.warning(
                    "spool: record at %d:%d (%s) fails its checksum: never acknowledged, skipped",
                    header.segment,
                    header.offset,
                    header.sop_uid,
                )
                continue
            out.append((SpoolEntry.of(header), data))
            size += len(data)
        return out

    def save(self) -> None:
        """Make :attr:`position` this worker's durable read mark."""
        self.spool.save_mark(self.worker_index, self.worker_count, self.position)

