"""The crash-safe receive spool: acknowledged instances live here until ingest has stored them.

The C-STORE handler writes the raw PS3.10 bytes it received (``event.encoded_dataset()``, never
decoded and re-encoded) here and answers Success only after the bytes and their name are on disk.
Ingest workers (:mod:`receiver.ingest`) take files in arrival order, store and record them, and
delete them only afterwards; so at every moment an acknowledged instance is in the spool, in
the object store and database, or both.

Layout under ``Settings.spool_dir``::

    .lock      flock()ed by the one receiving process (two receivers on one spool is an error)
    tmp/       files being written; never acknowledged, so deleted on start (:meth:`Spool.recover`)
    ready/     durable, acknowledged instances waiting for ingest
    rejected/  files ingest could not use (kept for a person, with a ``.reason`` text beside)

Writing one instance (:meth:`Spool.open_entry` → :class:`SpoolWriter`, or :meth:`Spool.write`
in one go): write ``tmp/<unique>.part`` (while the data set still arrives, starting the
kernel's write-back every 64 KiB) → ``fsync`` the file → ``rename`` into ``ready/`` (atomic
within one file system, which is why ``tmp/`` is a sibling) → ``fsync`` the ``ready/`` folder so
the new name survives a power cut. Only then does the caller answer Success. The ``tmp/`` file
itself is usually a blank one a background thread created ahead (:class:`_BlankFiles`), because
creating a file waits for the file system's journal as long as both fsyncs together.

What ingest needs besides the bytes travels in the file name, so no database and no sidecar
file is involved (one file = one atomic rename)::

    {receive_ns:019d}-{pid:07d}-{seq:010d}_{association_id}_{calling_ae_hex}_{sop_uid}.dcm

* ``receive_ns`` (wall clock, ns since the epoch), ``pid`` and a per-process counter make the
  name unique and make lexical order = arrival order;
* ``association_id`` is 32 lower-case hex digits (a UUID) chosen by the receiver;
* ``calling_ae_hex`` is the calling AE title as hex of its ASCII bytes (an AE title may hold
  spaces and punctuation, PS3.5 §6.2, that do not belong in a file name);
* ``sop_uid`` is the request's Affected SOP Instance UID, validated as a UID (PS3.5 §9.1)
  before the name is built, so nothing from the wire can add a ``/`` or ``..``.

Disk watermark: :meth:`Spool.write` refuses (:class:`~receiver.errors.SpoolFullError`, which
the handler answers with 0xA700 Out of Resources) when writing would leave less than
``min_free_bytes`` free, or less than ``min_free_fraction`` of the file system.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import fcntl
import itertools
import logging
import os
import queue
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from receiver.errors import SpoolError, SpoolFullError, SpoolLockedError
from storage.keys import is_valid_uid

__all__ = [
    "DEFAULT_MIN_FREE_BYTES",
    "DEFAULT_MIN_FREE_FRACTION",
    "WRITEBACK_CHUNK",
    "Spool",
    "SpoolEntry",
    "SpoolWriter",
    "new_association_id",
]

DEFAULT_MIN_FREE_BYTES = 1024**3
"""Refuse new instances when less than this many bytes would stay free (default 1 GiB)."""

DEFAULT_MIN_FREE_FRACTION = 0.02
"""Refuse new instances when less than this fraction of the spool file system would stay free (2 %)."""

_SUFFIX = ".dcm"
_PART = ".part"
_READY = "ready"
_TMP = "tmp"
_REJECTED = "rejected"
_LOCK = ".lock"
_AE_MAX_HEX = 32  # AE titles are at most 16 characters (PS3.5 §6.2)
_BLANK_DEPTH = 8  # blank files kept ahead: enough for several associations' next instance

log = logging.getLogger(__name__)


def new_association_id() -> str:
    """A fresh association id: 32 lower-case hex digits (the spool's file-name field)."""
    return uuid.uuid4().hex


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


WRITEBACK_CHUNK = 64 * 1024
"""Start the kernel's write-back of a spool file every this many bytes written (Linux)."""

_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start write-out of dirty pages, do not wait


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    # os has no sync_file_range(2); libc has, on Linux. Elsewhere commit's fsync does it all.
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


_sync_file_range = _load_sync_file_range()


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing this range back now (a hint; errors surface at fsync)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


@dataclass(frozen=True)
class SpoolEntry:
    """One acknowledged instance waiting in ``ready/``.

    Attributes
    ----------
    path : Path
        The file (raw PS3.10 bytes exactly as received).
    received_at : datetime.datetime
        When the handler wrote it (UTC).
    association_id : str
        Receiver-chosen id of the association that delivered it (32 hex digits).
    calling_ae : str
        The sender's AE title, as sent (``""`` for folder imports).
    sop_uid : str
        The request's Affected SOP Instance UID (validated).
    """

    path: Path
    received_at: dt.datetime
    association_id: str
    calling_ae: str
    sop_uid: str

    @property
    def name(self) -> str:
        """The file name (sorts in arrival order)."""
        return self.path.name

    @classmethod
    def parse(cls, path: Path) -> SpoolEntry | None:
        """Decode a ``ready/`` file name; ``None`` when it is not one of ours."""
        name = path.name
        if not name.endswith(_SUFFIX):
            return None
        parts = name[: -len(_SUFFIX)].split("_")
        if len(parts) != 4:
            return None
        stamp, assoc, ae_hex, sop = parts
        try:
            ns = int(stamp.split("-", 1)[0])
            calling_ae = bytes.fromhex(ae_hex).decode("ascii")
        except ValueError:
            return None
        if not is_valid_uid(sop) or len(assoc) != 32:
            return None
        received = dt.datetime.fromtimestamp(ns / 1e9, tz=dt.UTC)
        return cls(path=path, received_at=received, association_id=assoc, calling_ae=calling_ae, sop_uid=sop)


class SpoolWriter:
    """One instance being written into the spool (from :meth:`Spool.open_entry`).

    :meth:`write` appends bytes to ``tmp/<name>.part`` and, every :data:`WRITEBACK_CHUNK`
    bytes, asks the kernel to start writing them back (Linux ``sync_file_range``), so that
    :meth:`commit` (``fsync`` → ``rename`` into ``ready/`` → ``fsync`` of ``ready/``) waits for
    little more than the journal. :meth:`discard` (also on leaving a ``with`` block without a
    commit) removes the temporary file: it was never acknowledged.
    """

    def __init__(self, spool: Spool, entry: SpoolEntry, tmp: Path, fd: int | None = None) -> None:
        self.entry = entry
        self.size = 0
        self._spool = spool
        self._tmp = tmp
        self._fd: int | None = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644) if fd is None else fd
        self._unsynced_from = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` (written fully)."""
        if self._fd is None:
            raise ValueError("spool writer is closed")
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
            self.size += written
        if self.size - self._unsynced_from >= WRITEBACK_CHUNK:
            _start_writeback(self._fd, self._unsynced_from, self.size - self._unsynced_from)
            self._unsynced_from = self.size

    def commit(self) -> SpoolEntry:
        """Make the file and its name durable in ``ready/``; then the sender may be answered.

        Raises
        ------
        OSError
            If the disk fails (the temporary file is removed).
        """
        if self._fd is None:
            raise ValueError("spool writer is closed")
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            os.rename(self._tmp, self.entry.path)
        except BaseException:
            self.discard()
            raise
        _fsync_dir(self._spool.ready_dir)
        return self.entry

    def discard(self) -> None:
        """Drop what was written (idempotent; a committed entry stays)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._tmp.unlink(missing_ok=True)

    def read_back(self, offset: int) -> bytes:
        """What was written from ``offset`` on (from the page cache; for rare re-checks)."""
        if self._fd is None:
            raise ValueError("spool writer is closed")
        return os.pread(self._fd, self.size - offset, offset)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


class _BlankFiles:
    """Empty files in ``tmp/``, created ahead by a background thread for :meth:`Spool.open_entry`.

    Creating a file has to join the file system's running journal transaction, and waits
    while a commit (this receiver's or ingest's fsyncs) holds it: traced at 1.75 ms mean per
    ``openat(O_CREAT)`` in the receiver here, as long as the file and folder fsyncs of an
    instance together. A thread that keeps a few blank files open ahead takes that wait off
    the acknowledgement path; when none is left, :meth:`take` returns ``None`` and the caller
    creates its own. Blank files are never acknowledged data: :meth:`Spool.recover` deletes
    them with the rest of ``tmp/``.
    """

    def __init__(self, folder: Path, depth: int = _BLANK_DEPTH) -> None:
        self._folder = folder
        self._files: queue.Queue[tuple[int, Path]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="spool-blank-files", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def take(self) -> tuple[int, Path] | None:
        """An open blank file and its path, or ``None`` when the thread has not kept up."""
        try:
            return self._files.get_nowait()
        except queue.Empty:
            return None

    def stop(self) -> None:
        """End the thread and delete the blank files not taken."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        while (item := self.take()) is not None:
            os.close(item[0])
            item[1].unlink(missing_ok=True)

    def _fill(self) -> None:
        pid = os.getpid()
        while not self._stop.is_set():
            path = self._folder / f"blank-{pid}-{uuid.uuid4().hex}{_PART}"
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except OSError as exc:  # the caller creates its own meanwhile, and reports any error
                log.warning("spool: cannot create a blank file in %s: %s", self._folder, exc)
                self._stop.wait(1.0)
                continue
            while True:
                try:
                    self._files.put((fd, path), timeout=0.2)
                    break
                except queue.Full:
                    if self._stop.is_set():
                        os.close(fd)
                        path.unlink(missing_ok=True)
                        return


class Spool:
    """The receive spool folder (see the module docstring for the layout and guarantees).

    Parameters
    ----------
    root : Path
        The spool folder (``Settings.spool_dir``); created with its sub-folders if missing.
    min_free_bytes : int
        Watermark in bytes: :meth:`write` refuses when fewer would stay free.
    min_free_fraction : float
        Watermark as a fraction (0-1) of the file system size.

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
    ) -> None:
        if min_free_bytes < 0 or not 0 <= min_free_fraction < 1:
            raise ValueError("min_free_bytes must be >= 0 and min_free_fraction in [0, 1)")
        self.root = Path(root)
        self.ready_dir = self.root / _READY
        self.tmp_dir = self.root / _TMP
        self.rejected_dir = self.root / _REJECTED
        self.min_free_bytes = min_free_bytes
        self.min_free_fraction = min_free_fraction
        try:
            for folder in (self.ready_dir, self.tmp_dir, self.rejected_dir):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"cannot create spool folder {self.root}: {exc}") from exc
        self._pid = os.getpid()
        self._seq = itertools.count()
        self._seq_lock = threading.Lock()
        self._lock_fd: int | None = None
        self._blanks: _BlankFiles | None = None

    def __repr__(self) -> str:
        return f"Spool({str(self.root)!r})"

    # -- receiving side ---------------------------------------------------------------------

    def lock(self) -> None:
        """Take the spool's exclusive lock for this process (one receiver per spool).

        Raises
        ------
        SpoolLockedError
            If another process holds it.
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
        """Release the lock taken by :meth:`lock` (also released when the process dies)."""
        if self._blanks is not None:
            self._blanks.stop()
            self._blanks = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def recover(self) -> tuple[int, int]:
        """Prepare for receiving after a start or a crash.

        Deletes leftover ``tmp/`` files (they were never acknowledged: the handler answers only
        after the rename), counts the ``ready/`` files, which ingest will replay, and starts
        making blank files ahead (:class:`_BlankFiles`, until :meth:`unlock`). Call it after
        :meth:`lock`, before the SCP starts.

        Returns
        -------
        (deleted_tmp, pending_ready) : tuple of int
        """
        deleted = 0
        for path in self.tmp_dir.iterdir():
            path.unlink(missing_ok=True)
            deleted += 1
        if deleted:
            _fsync_dir(self.tmp_dir)
        pending = sum(1 for _ in self._ready_names())
        if self._blanks is None and self._lock_fd is not None:
            self._blanks = _BlankFiles(self.tmp_dir)
            self._blanks.start()
        return deleted, pending

    def free_bytes(self) -> tuple[int, int]:
        """``(free, total)`` bytes of the spool's file system, as seen by an unprivileged user."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    def has_room(self, incoming: int = 0) -> bool:
        """True when writing ``incoming`` more bytes keeps free space above both watermarks."""
        free, total = self.free_bytes()
        left = free - incoming
        return left >= self.min_free_bytes and (total == 0 or left >= self.min_free_fraction * total)

    def open_entry(
        self,
        *,
        sop_uid: str,
        association_id: str,
        calling_ae: str,
        received_ns: int | None = None,
        incoming: int = 0,
    ) -> SpoolWriter:
        """Start writing one received instance into ``tmp/``; :meth:`SpoolWriter.commit` makes it durable.

        Lets the receiver write a data set while it is still arriving (each fragment goes to the
        page cache at once and its write-back starts early), so that answering Success waits
        only for what is left to flush.

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
        OSError
            If the temporary file cannot be created.
        """
        if not is_valid_uid(sop_uid):
            raise ValueError(f"invalid SOP Instance UID {sop_uid!r}")
        if len(association_id) != 32 or not all(c in "0123456789abcdef" for c in association_id):
            raise ValueError(f"invalid association id {association_id!r}")
        if not self.has_room(incoming):
            free, _ = self.free_bytes()
            raise SpoolFullError(f"spool {self.root} below its watermark ({free} bytes free)")
        ns = time.time_ns() if received_ns is None else received_ns
        with self._seq_lock:
            seq = next(self._seq)
        ae_hex = calling_ae.strip().encode("ascii", "replace")[:16].hex()[:_AE_MAX_HEX]
        name = f"{ns:019d}-{self._pid:07d}-{seq:010d}_{association_id}_{ae_hex}_{sop_uid}{_SUFFIX}"
        entry = SpoolEntry(
            path=self.ready_dir / name,
            received_at=dt.datetime.fromtimestamp(ns / 1e9, tz=dt.UTC),
            association_id=association_id,
            calling_ae=calling_ae.strip(),
            sop_uid=sop_uid,
        )
        blank = self._blanks.take() if self._blanks is not None else None
        if blank is not None:
            return SpoolWriter(self, entry, blank[1], blank[0])
        return SpoolWriter(self, entry, self.tmp_dir / f"{name}{_PART}")

    def write(
        self,
        data: bytes,
        *,
        sop_uid: str,
        association_id: str,
        calling_ae: str,
        received_ns: int | None = None,
    ) -> SpoolEntry:
        """Durably store one received instance in ``ready/`` (:meth:`open_entry` in one go).

        Parameters
        ----------
        data : bytes
            The raw PS3.10 file bytes (preamble, file meta, dataset as received).
        sop_uid, association_id, calling_ae, received_ns
            As for :meth:`open_entry`.

        Returns
        -------
        SpoolEntry
            What ingest will see. When this returns, file and name are fsynced.

        Raises
        ------
        SpoolFullError
            If the disk watermark would be crossed; nothing was written.
        ValueError
            If ``sop_uid`` or ``association_id`` is malformed.
        OSError
            If the disk write fails (the temporary file is removed).
        """
        writer = self.open_entry(
            sop_uid=sop_uid, association_id=association_id, calling_ae=calling_ae, received_ns=received_ns, incoming=len(data)
        )
        with writer:
            writer.write(data)
            return writer.commit()

    # -- ingest side ------------------------------------------------------------------------

    def _ready_names(self) -> Iterator[str]:
        with os.scandir(self.ready_dir) as it:
            for item in it:
                if item.name.endswith(_SUFFIX):
                    yield item.name

    def pending(
        self,
        limit: int | None = None,
        *,
        worker_index: int = 0,
        worker_count: int = 1,
        skip: Container[str] = (),
    ) -> list[SpoolEntry]:
        """The waiting instances of one ingest worker, oldest first.

        Files are split among ``worker_count`` workers by a hash of the SOP Instance UID, so
        all versions of one SOP go through the same worker, in arrival order.

        Parameters
        ----------
        limit : int, optional
            At most this many entries.
        worker_index, worker_count : int
            This worker's share (``0 <= worker_index < worker_count``).
        skip : container of str
            File names the caller already holds: passed over before any parsing (ingest polls
            while a batch fills, and re-parsing its batch on every poll cost a third of its CPU).

        Returns
        -------
        list of SpoolEntry
        """
        names = sorted(self._ready_names())
        out: list[SpoolEntry] = []
        for name in names:
            if name in skip:
                continue
            entry = SpoolEntry.parse(self.ready_dir / name)
            if entry is None:
                if worker_index == 0:  # one worker cleans up, the others skip it
                    try:
                        self._reject_path(self.ready_dir / name, "file name is not a spool entry")
                    except FileNotFoundError:
                        pass
                continue
            if worker_count > 1 and zlib.crc32(entry.sop_uid.encode()) % worker_count != worker_index:
                continue
            out.append(entry)
            if limit is not None and len(out) >= limit:
                break
        return out

    def has_files_of(self, association_id: str) -> bool:
        """True while ``ready/`` holds a file delivered by this association."""
        needle = f"_{association_id}_"
        return any(needle in name for name in self._ready_names())

    def count(self) -> int:
        """Number of files waiting in ``ready/``."""
        return sum(1 for _ in self._ready_names())

    def remove(self, entries: Iterable[SpoolEntry]) -> None:
        """Delete ingested entries (a deletion lost in a crash only causes a harmless replay)."""
        for entry in entries:
            entry.path.unlink(missing_ok=True)

    def reject(self, entry: SpoolEntry, reason: str) -> Path:
        """Move an entry ingest cannot use to ``rejected/`` with a ``.reason`` file; never delete it."""
        return self._reject_path(entry.path, reason)

    def _reject_path(self, path: Path, reason: str) -> Path:
        target = self.rejected_dir / path.name
        (self.rejected_dir / f"{path.name}.reason").write_text(reason + "\n", encoding="utf-8")
        os.replace(path, target)
        _fsync_dir(self.rejected_dir)
        log.warning("spool: rejected %s: %s", path.name, reason)
        return target
