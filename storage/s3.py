"""The S3 object store: one bucket of MinIO (production), moto (tests) or any S3 API.

Spoken to through ``minio`` 7.2.20 with our own ``urllib3`` pool, because the client's
defaults (5-minute timeouts, 5 retries, 10 connections) turn a MinIO outage into minutes of
silence and starve more than 10 ingest threads (storage_perf.md §3.5). With the settings
below an unreachable endpoint is reported in a few seconds.

Every minio/urllib3 error is translated into the :mod:`storage.errors` tree at this boundary;
nothing above :mod:`storage` sees ``S3Error`` or ``MaxRetryError``.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, BinaryIO

import certifi
import urllib3
from minio import Minio
from minio.helpers import check_bucket_name
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from urllib3.util import Retry, Timeout

from storage.errors import (
    InvalidKeyError,
    ObjectExistsError,
    ObjectNotFoundError,
    ObjectRangeError,
    ObjectStoreUnavailableError,
)
from storage.objects import DEFAULT_CONTENT_TYPE, ObjectInfo, ObjectStore, PutResult, _HashingReader

if TYPE_CHECKING:
    from urllib3 import BaseHTTPResponse

__all__ = [
    "S3ObjectStore",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_READ_TIMEOUT",
    "DEFAULT_RETRIES",
    "DEFAULT_POOL_SIZE",
    "PART_SIZE",
]

DEFAULT_CONNECT_TIMEOUT = 3.0
"""Seconds to wait for a TCP connection. Loopback or LAN MinIO connects in milliseconds."""

DEFAULT_READ_TIMEOUT = 60.0
"""Seconds a socket read may stall (not a whole-transfer limit), so big parts still work."""

DEFAULT_RETRIES = 2
"""urllib3 retries per request (connect errors and 5xx), with 0.2 s exponential backoff."""

DEFAULT_POOL_SIZE = 32
"""Connections kept per host; ≥ 16 so parallel ingest workers never queue for a socket."""

PART_SIZE = 10 * 1024 * 1024
"""Multipart part size for streams: bodies up to this size go as one PUT, larger ones in parts
of this size (at most 10,000 parts → 97 GiB objects). Each part is held in memory once."""

# Codes with which S3 (412) and some S3 implementations (409, the loser of two simultaneous
# conditional PUTs) refuse an If-None-Match: * write [storage_perf.md §1.7].
_EXISTS_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchObject", "ResourceNotFound"})
_BUCKET_EXISTS_CODES = frozenset({"BucketAlreadyOwnedByYou", "BucketAlreadyExists"})


class _ResponseStream(io.RawIOBase):
    """A GET response as a readable stream that returns its connection to the pool on close."""

    def __init__(self, response: BaseHTTPResponse, translate: Any) -> None:
        super().__init__()
        self._response = response
        self._translate = translate

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        with self._translate():
            data = self._response.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._response.close()
            self._response.release_conn()
        super().close()


class S3ObjectStore(ObjectStore):
    """Objects in one S3 bucket.

    Parameters
    ----------
    endpoint : str
        ``host:port`` of the S3 API.
    bucket : str
        Bucket name. Not created here; see :meth:`ensure_bucket`.
    access_key, secret_key : str, optional
        Credentials.
    secure : bool
        Use HTTPS.
    region : str, optional
        Region; ``None`` asks the server once per bucket (GetBucketLocation).
    connect_timeout, read_timeout : float
        See :data:`DEFAULT_CONNECT_TIMEOUT`, :data:`DEFAULT_READ_TIMEOUT`.
    retries : int
        See :data:`DEFAULT_RETRIES`.
    pool_size : int
        See :data:`DEFAULT_POOL_SIZE`.
    """

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        secure: bool = False,
        region: str | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        pool_size: int = DEFAULT_POOL_SIZE,
    ) -> None:
        try:
            check_bucket_name(bucket)
        except ValueError as exc:
            raise InvalidKeyError(f"invalid S3 bucket name: {bucket!r}") from exc
        self.endpoint = endpoint
        self.bucket = bucket
        self.location = f"{'https' if secure else 'http'}://{endpoint}/{bucket}"
        http = urllib3.PoolManager(
            timeout=Timeout(connect=connect_timeout, read=read_timeout),
            maxsize=pool_size,
            cert_reqs="CERT_REQUIRED",
            ca_certs=certifi.where(),
            retries=Retry(
                total=retries,
                connect=retries,
                read=retries,
                backoff_factor=0.2,
                status_forcelist=[500, 502, 503, 504],
                raise_on_status=False,  # let minio read the S3 error body of the last attempt
            ),
        )
        try:
            self.client = Minio(
                endpoint,
                access_key=access_key,
                secret_key=secret_key,
                secure=secure,
                region=region,
                http_client=http,
            )
        except ValueError as exc:
            raise ObjectStoreUnavailableError(f"invalid S3 endpoint {endpoint!r}: {exc}") from exc

    # -- error translation ------------------------------------------------------------------

    @contextmanager
    def _translate(self, key: str | None = None) -> Iterator[None]:
        """Map minio/urllib3 failures to :mod:`storage.errors` with a one-line message."""
        try:
            yield
        except S3Error as exc:
            if exc.code in _NOT_FOUND_CODES and key is not None:
                raise ObjectNotFoundError(key) from exc
            if exc.code == "InvalidRange":
                raise ObjectRangeError(f"range outside {key}: {exc.message}") from exc
            if exc.code in _EXISTS_CODES and key is not None:
                raise ObjectExistsError(key) from exc
            raise ObjectStoreUnavailableError(
                f"S3 endpoint {self.location} refused {key or 'the request'}: {exc.code}: {exc.message}"
            ) from exc
        except (ServerError, InvalidResponseError) as exc:
            raise ObjectStoreUnavailableError(
                f"S3 endpoint {self.location} failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from exc
        except (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ObjectStoreUnavailableError(
                f"S3 endpoint {self.endpoint} unreachable: {type(reason).__name__}: {str(reason).splitlines()[0][:200]}"
            ) from exc
        except MinioException as exc:  # pragma: no cover - any other client failure
            raise ObjectStoreUnavailableError(f"S3 endpoint {self.location}: {exc}") from exc

    # -- bucket -----------------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (tolerating a concurrent creator).

        Raises
        ------
        ObjectStoreUnavailableError
            If the endpoint is unreachable or refuses.
        """
        with self._translate():
            if self.client.bucket_exists(self.bucket):
                return
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as exc:
                if exc.code not in _BUCKET_EXISTS_CODES:
                    raise

    def check(self) -> None:
        """One HEAD on the bucket.

        Raises
        ------
        ObjectStoreUnavailableError
            If the endpoint is unreachable, refuses the credentials, or the bucket is missing.
        """
        with self._translate():
            found = self.client.bucket_exists(self.bucket)
        if not found:
            raise ObjectStoreUnavailableError(f"S3 bucket {self.location} does not exist")

    # -- hooks ------------------------------------------------------------------------------

    def _put(self, key: str, reader: _HashingReader, length: int | None, content_type: str) -> PutResult:
        with self._translate(key):
            try:
                self.client.put_object(
                    self.bucket,
                    key,
                    reader,  # type: ignore[arg-type]  # minio only calls .read(n) on it
                    length=-1 if length is None else length,
                    content_type=content_type or DEFAULT_CONTENT_TYPE,
                    part_size=PART_SIZE,
                )
            except OSError as exc:
                # minio raises IOError("stream having not enough data") for short streams
                if "not enough data" in str(exc):
                    raise ValueError(f"stream ended early for {key}: {exc}") from exc
                raise
        return PutResult(key, reader.size, reader.sha256.hexdigest())

    def _put_if_absent(self, key: str, reader: _HashingReader, length: int | None) -> PutResult:
        body = reader.read()
        if length is not None and len(body) != length:
            raise ValueError(f"stream ended after {len(body)} of {length} bytes for {key}")
        # minio 7.2.20's put_object(metadata=...) renames every header it does not know to
        # X-Amz-Meta-*, so {"If-None-Match": "*"} would become user metadata and the write
        # would silently overwrite (storage_perf.md §1.7). The client's _put_object sends
        # headers unchanged; it is private API, pinned by minio==7.2.20 in pyproject and
        # covered by test_put_if_absent_* against a real S3 endpoint.
        with self._translate(key):
            self.client._put_object(
                self.bucket,
                key,
                body,
                headers={"If-None-Match": "*", "Content-Type": DEFAULT_CONTENT_TYPE},
            )
        return PutResult(key, reader.size, reader.sha256.hexdigest())

    def _delete(self, key: str) -> None:
        with self._translate(key):
            self.client.remove_object(self.bucket, key)

    def _read_all(self, key: str, offset: int = 0, length: int = 0) -> bytes:
        with self._translate(key):
            response = self.client.get_object(self.bucket, key, offset=offset, length=length)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

    def _get(self, key: str) -> bytes:
        return self._read_all(key)

    def _get_range(self, key: str, offset: int, length: int) -> bytes:
        # minio sends Range: bytes={offset}-{offset+length-1}; S3 answers 416 InvalidRange when
        # offset is past the end and a short body when only the end is; the base class turns
        # a short body into ObjectRangeError.
        return self._read_all(key, offset, length)

    def _open_stream(self, key: str) -> BinaryIO:
        with self._translate(key):
            response = self.client.get_object(self.bucket, key)
        return io.BufferedReader(_ResponseStream(response, lambda: self._translate(key)), 1024 * 1024)  # type: ignore[return-value]

    def _exists(self, key: str) -> bool:
        try:
            self._stat(key)
        except ObjectNotFoundError:
            return False
        return True

    def _stat(self, key: str) -> ObjectInfo:
        with self._translate(key):
            st = self.client.stat_object(self.bucket, key)
        return ObjectInfo(
            key=key,
            size=int(st.size or 0),
            etag=(st.etag or "").strip('"'),
            last_modified=st.last_modified or datetime.fromtimestamp(0, tz=UTC),
        )

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        # ListObjectsV2 returns keys in UTF-8 binary order; our keys are ASCII, so that is
        # plain string order, and the listing streams page by page.
        with self._translate(prefix or None):
            for obj in self.client.list_objects(self.bucket, prefix=prefix or None, recursive=True):
                if obj.is_dir or obj.object_name is None:
                    continue
                yield ObjectInfo(
                    key=obj.object_name,
                    size=int(obj.size or 0),
                    etag=(obj.etag or "").strip('"'),
                    last_modified=obj.last_modified or datetime.fromtimestamp(0, tz=UTC),
                )

