"""The object-store interface: one API over a local folder and an S3/MinIO bucket.

Everything above :mod:`storage` (ingest, archive, session files) talks to an
:class:`ObjectStore` and never to ``minio`` or ``os`` directly, so the embedded single-machine
setup (local folder) and the scaled one (MinIO) behave the same, and the same tests run
against both.

Quick start::

    from pathlib import Path
    from storage.objects import open_object_store

    store = open_object_store(local_root=Path(".dcmflow/objects"))   # or endpoint="host:9000", ...
    store.put("instances/1.2/1.2.3/1.2.3.4.dcm", b"...")
    store.get_range("instances/1.2/1.2.3/1.2.3.4.dcm", offset=128, length=4)   # b"DICM"

Contract shared by both stores (the tests in ``tests/storage/test_objects.py`` hold both to it):

* every key passes :func:`storage.keys.validate_key`; a bad key raises
  :class:`~storage.errors.InvalidKeyError` before any I/O;
* writes are atomic: a reader sees the old object or the new one, never a torn one;
* ``put_if_absent`` is a real conditional write (S3 ``If-None-Match: *``; a hard link locally),
  so two writers racing for one key get exactly one winner;
* a missing key raises :class:`~storage.errors.ObjectNotFoundError`; an unreachable store
  raises :class:`~storage.errors.ObjectStoreUnavailableError` within seconds;
* ``get_range(key, offset, length)`` returns exactly ``length`` bytes starting at ``offset``
  (``length`` is a byte count, not an inclusive end), or raises
  :class:`~storage.errors.ObjectRangeError`.
"""

from __future__ import annotations

import hashlib
import io
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, BinaryIO

from storage.errors import ObjectRangeError
from storage.keys import validate_key

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "ObjectInfo",
    "PutResult",
    "ObjectStore",
    "open_object_store",
    "DEFAULT_CONTENT_TYPE",
]

DEFAULT_CONTENT_TYPE = "application/octet-stream"
"""Content type given to objects when the caller names none."""

_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing or ``stat`` says about one stored object.

    Attributes
    ----------
    key : str
        The object key.
    size : int
        Size in bytes.
    etag : str
        An opaque version tag: the S3 ETag (without quotes), or locally a tag derived from the
        file's modification time and size. Equal tags mean "not rewritten since".
    last_modified : datetime
        Time of the last write, timezone-aware (UTC).
    """

    key: str
    size: int
    etag: str
    last_modified: datetime


@dataclass(frozen=True)
class PutResult:
    """What a write stored.

    Attributes
    ----------
    key : str
        The object key.
    size : int
        Number of bytes written.
    sha256 : str
        Lower-case hex SHA-256 of the bytes written, computed while streaming so the caller
        never hashes twice (storage_perf.md §5.2: hash once, at receive time).
    """

    key: str
    size: int
    sha256: str


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes and counts what passes through it.

    Both stores read the caller's data through this wrapper, so SHA-256 and size come out
    of the single pass that uploads or writes the bytes.
    """

    def __init__(self, source: BinaryIO, limit: int | None = None) -> None:
        super().__init__()
        self._source = source
        self._remaining = limit
        self.sha256 = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            chunks = []
            while chunk := self.read(_CHUNK):
                chunks.append(chunk)
            return b"".join(chunks)
        if self._remaining is not None:
            size = min(size, self._remaining)
            if size == 0:
                return b""
        data = self._source.read(size)
        if data:
            self.sha256.update(data)
            self.size += len(data)
            if self._remaining is not None:
                self._remaining -= len(data)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _as_stream(data: bytes | bytearray | memoryview | BinaryIO, length: int | None) -> tuple[BinaryIO, int | None]:
    """Return ``(stream, length)`` for bytes or a readable binary stream."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        if length is not None and length != len(raw):
            raise ValueError(f"length={length} but {len(raw)} bytes were given")
        return io.BytesIO(raw), len(raw)
    if not callable(getattr(data, "read", None)):
        raise TypeError(f"data must be bytes or a readable binary stream, not {type(data).__name__}")
    if length is not None and length < 0:
        raise ValueError(f"length must be >= 0 or None, not {length}")
    return data, length


class ObjectStore(ABC):
    """Store and fetch immutable-by-convention byte objects under validated keys.

    The public methods validate keys and arguments, then call the ``_``-prefixed hooks that
    the two implementations (:class:`storage.local.LocalObjectStore`,
    :class:`storage.s3.S3ObjectStore`) provide, so "a bad key never reaches I/O" holds by
    construction rather than by each implementation remembering to check.
    """

    #: Human-readable location (folder or ``endpoint/bucket``), used in error messages.
    location: str

    # -- writes -----------------------------------------------------------------------------

    def put(
        self,
        key: str,
        data: bytes | BinaryIO,
        length: int | None = None,
        content_type: str = DEFAULT_CONTENT_TYPE,
    ) -> PutResult:
        """Write ``data`` under ``key``, replacing any existing object atomically.

        Parameters
        ----------
        key : str
            Object key; validated before any I/O.
        data : bytes or BinaryIO
            The bytes, or a readable binary stream. A stream is read in chunks and never held
            whole in memory (on S3, objects over 10 MiB go multipart).
        length : int, optional
            Number of bytes to take from a stream. ``None`` reads to the end.
        content_type : str
            MIME type recorded with the object (S3 only; local files have none).

        Returns
        -------
        PutResult
            Key, size and SHA-256 of what was written.

        Raises
        ------
        InvalidKeyError
            If ``key`` is not a valid object key.
        ObjectStoreUnavailableError
            If the store cannot be written.
        """
        validate_key(key)
        stream, length = _as_stream(data, length)
        return self._put(key, _HashingReader(stream, length), length, content_type)

    def put_if_absent(self, key: str, data: bytes | BinaryIO, length: int | None = None) -> PutResult:
        """Write ``data`` under ``key`` only if no object exists there yet.

        This is a real conditional write done by the store itself (S3 ``If-None-Match: *``,
        or an atomic hard link locally), not a check followed by a write: of any number of
        concurrent callers exactly one succeeds, and the object holds the winner's bytes.

        Parameters
        ----------
        key : str
            Object key; validated before any I/O.
        data : bytes or BinaryIO
            The bytes or a readable stream. On S3 the body is held in memory (a conditional
            PUT is a single request), so use this for instances and indexes, not for
            multi-GiB objects.
        length : int, optional
            Number of bytes to take from a stream; ``None`` reads to the end.

        Returns
        -------
        PutResult
            Key, size and SHA-256 of what was written.

        Raises
        ------
        ObjectExistsError
            If the key already holds an object (also when another writer won a race).
        InvalidKeyError
            If ``key`` is not a valid object key.
        ObjectStoreUnavailableError
            If the store cannot be written.
        """
        validate_key(key)
        stream, length = _as_stream(data, length)
        return self._put_if_absent(key, _HashingReader(stream, length), length)

    def delete(self, key: str) -> None:
        """Remove ``key``; removing a missing key is not an error (idempotent, as in S3).

        Raises
        ------
        InvalidKeyError
            If ``key`` is not a valid object key.
        ObjectStoreUnavailableError
            If the store cannot be reached.
        """
        self._delete(validate_key(key))

    # -- reads ------------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        """Return the whole object.

        Raises
        ------
        ObjectNotFoundError
            If ``key`` does not exist.
        InvalidKeyError, ObjectStoreUnavailableError
            As for :meth:`put`.
        """
        return self._get(validate_key(key))

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """Return exactly ``length`` bytes of ``key`` starting at byte ``offset``.

        One ranged request on S3 (``Range: bytes=offset-(offset+length-1)``), one ``pread``
        locally. ``length`` is a count, so ``get_range(k, o, n) == get(k)[o:o + n]`` whenever
        ``o + n <= size``; there is no inclusive/exclusive end to get wrong.

        Parameters
        ----------
        key : str
            Object key.
        offset : int
            First byte, 0-based, ``>= 0``.
        length : int
            Number of bytes, ``>= 0``. ``0`` returns ``b""`` (after checking the key exists).

        Raises
        ------
        ObjectRangeError
            If the object has fewer than ``offset + length`` bytes, or offset/length are
            negative (checked before any I/O).
        ObjectNotFoundError
            If ``key`` does not exist.
        """
        validate_key(key)
        if not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or length < 0:
            raise ObjectRangeError(f"invalid range offset={offset!r} length={length!r} for {key}")
        if length == 0:
            self._stat(key)
            return b""
        data = self._get_range(key, offset, length)
        if len(data) != length:
            raise ObjectRangeError(
                f"range offset={offset} length={length} runs past the end of {key} (got {len(data)} bytes)"
            )
        return data

    def open_stream(self, key: str) -> BinaryIO:
        """Open ``key`` for streaming reads; close the result (it is a context manager).

        Raises
        ------
        ObjectNotFoundError
            If ``key`` does not exist.
        """
        return self._open_stream(validate_key(key))

    def exists(self, key: str) -> bool:
        """True when ``key`` holds an object.

        Raises
        ------
        InvalidKeyError, ObjectStoreUnavailableError
            As for :meth:`put`.
        """
        return self._exists(validate_key(key))

    def stat(self, key: str) -> ObjectInfo:
        """Return size, etag and modification time of ``key`` without reading it.

        Raises
        ------
        ObjectNotFoundError
            If ``key`` does not exist.
        """
        return self._stat(validate_key(key))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Yield every object whose key starts with ``prefix``, recursively, sorted by key.

        ``prefix`` is a plain string prefix (``"archives/1.2"`` matches ``archives/1.2.3/x``),
        as in S3. Its complete segments are validated; the last, partial segment may be empty.

        Raises
        ------
        InvalidKeyError
            If ``prefix`` contains an invalid complete segment.
        """
        if not isinstance(prefix, str):
            raise TypeError("prefix must be a string")
        if prefix:
            head = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
            if head:
                validate_key(head)
            tail = prefix.rsplit("/", 1)[-1]
            if tail:
                validate_key(tail)
        return self._list(prefix)

    @abstractmethod
    def check(self) -> None:
        """Cheap round trip to the store.

        Raises
        ------
        ObjectStoreUnavailableError
            If the store is unreachable, the bucket is missing or credentials are refused.
        """

    # -- hooks ------------------------------------------------------------------------------

    @abstractmethod
    def _put(self, key: str, reader: _HashingReader, length: int | None, content_type: str) -> PutResult: ...

    @abstractmethod
    def _put_if_absent(self, key: str, reader: _HashingReader, length: int | None) -> PutResult: ...

    @abstractmethod
    def _delete(self, key: str) -> None: ...

    @abstractmethod
    def _get(self, key: str) -> bytes: ...

    @abstractmethod
    def _get_range(self, key: str, offset: int, length: int) -> bytes: ...

    @abstractmethod
    def _open_stream(self, key: str) -> BinaryIO: ...

    @abstractmethod
    def _exists(self, key: str) -> bool: ...

    @abstractmethod
    def _stat(self, key: str) -> ObjectInfo: ...

    @abstractmethod
    def _list(self, prefix: str) -> Iterator[ObjectInfo]: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"


def open_object_store(
    *,
    local_root: Path,
    endpoint: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    bucket: str = "dcmflow",
    secure: bool = False,
    region: str | None = None,
) -> ObjectStore:
    """Open the object store the settings describe (DESIGN.md: unset endpoint = local store).

    Parameters
    ----------
    local_root : Path
        Folder of the local store, used when ``endpoint`` is ``None``. Created if missing.
    endpoint : str, optional
        ``host:port`` of an S3 API (MinIO, moto, AWS). ``None`` selects the local store.
    access_key, secret_key : str, optional
        S3 credentials.
    bucket : str
        Bucket name; created when missing.
    secure : bool
        Use HTTPS.
    region : str, optional
        S3 region; ``None`` lets the client ask the server once per bucket.

    Returns
    -------
    ObjectStore
        A :class:`~storage.local.LocalObjectStore` or :class:`~storage.s3.S3ObjectStore`.

    Raises
    ------
    ObjectStoreUnavailableError
        If the S3 endpoint cannot be reached or the bucket cannot be created.
    """
    if endpoint is None:
        from storage.local import LocalObjectStore

        return LocalObjectStore(local_root)
    from storage.s3 import S3ObjectStore

    store = S3ObjectStore(
        endpoint,
        bucket,
        access_key=access_key,
        secret_key=secret_key,
        secure=secure,
        region=region,
    )
    store.ensure_bucket()
    return store
