"""The object-store contract, held against both stores: a local folder and a real S3 API.

The S3 store talks HTTP to moto's threaded server on loopback (or MinIO when
``DCMFLOW_TEST_S3_ENDPOINT`` is set) through the same minio client code as production.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from storage.errors import (
    InvalidKeyError,
    ObjectExistsError,
    ObjectNotFoundError,
    ObjectRangeError,
    ObjectStoreUnavailableError,
)
from storage.local import LocalObjectStore
from storage.objects import ObjectInfo, ObjectStore, PutResult, open_object_store
from storage.s3 import PART_SIZE, S3ObjectStore

MiB = 1024 * 1024


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """Each test runs once on a fresh local folder and once on a fresh S3 bucket."""
    if request.param == "local":
        return open_object_store(local_root=tmp_path / "objects")
    s3 = request.getfixturevalue("s3_endpoint")
    return open_object_store(
        local_root=tmp_path / "unused",
        endpoint=s3.endpoint,
        access_key=s3.access_key,
        secret_key=s3.secret_key,
        secure=s3.secure,
        bucket=request.getfixturevalue("s3_bucket_name"),
    )


def _closed_port() -> int:
    """A loopback port with nobody listening (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _payload(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


class _TrackingStream(io.RawIOBase):
    """A readable stream that records the largest single read and can run a hook mid-way."""

    def __init__(self, data: bytes, hook_at: int | None = None, hook: Any = None) -> None:
        super().__init__()
        self._buf = io.BytesIO(data)
        self.max_read = 0
        self._hook_at, self._hook = hook_at, hook
        self.hook_result: Any = None

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if self._hook is not None and self._hook_at is not None and self._buf.tell() >= self._hook_at:
            self.hook_result, self._hook = self._hook(), None
        chunk = self._buf.read(size)
        self.max_read = max(self.max_read, len(chunk))
        return chunk


# -- writes and reads -------------------------------------------------------------------------


def test_put_get_round_trip_with_sha256(store: ObjectStore) -> None:
    data = _payload(300_000)
    result = store.put("instances/1.2/1.2.3/1.2.3.4.dcm", data)
    assert result == PutResult("instances/1.2/1.2.3/1.2.3.4.dcm", len(data), hashlib.sha256(data).hexdigest())
    assert store.get("instances/1.2/1.2.3/1.2.3.4.dcm") == data


def test_put_empty_object(store: ObjectStore) -> None:
    assert store.put("empty", b"").sha256 == hashlib.sha256(b"").hexdigest()
    assert store.get("empty") == b""
    assert store.stat("empty").size == 0


def test_put_overwrites(store: ObjectStore) -> None:
    store.put("a/b", b"first version")
    first = store.stat("a/b")
    time.sleep(0.01)
    store.put("a/b", b"second, longer version")
    assert store.get("a/b") == b"second, longer version"
    second = store.stat("a/b")
    assert second.size == len(b"second, longer version")
    assert second.etag != first.etag


@pytest.mark.parametrize("known_length", [True, False], ids=["length", "unknown-length"])
def test_streamed_put_larger_than_a_part(store: ObjectStore, known_length: bool) -> None:
    data = _payload(2 * PART_SIZE + 123_457, seed=7)
    stream = _TrackingStream(data)
    result = store.put("big/object.bin", stream, length=len(data) if known_length else None)  # type: ignore[arg-type]
    assert result.size == len(data)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    # Never more than one part (plus minio's one look-ahead byte) is read at a time.
    assert stream.max_read <= PART_SIZE + 1
    assert store.get("big/object.bin") == data
    with store.open_stream("big/object.bin") as f:
        assert hashlib.sha256(f.read()).hexdigest() == result.sha256
    if isinstance(store, S3ObjectStore):
        # An S3 multipart ETag is "<md5 of part md5s>-<part count>": proof the multipart path ran.
        assert store.stat("big/object.bin").etag.endswith("-3")


def test_put_takes_exactly_length_bytes_of_a_stream(store: ObjectStore) -> None:
    data = _payload(10_000)
    result = store.put("part", io.BytesIO(data), length=4_000)
    assert result.size == 4_000
    assert store.get("part") == data[:4_000]


def test_put_short_stream_is_an_error_and_writes_nothing(store: ObjectStore) -> None:
    with pytest.raises(ValueError):
        store.put("short", io.BytesIO(b"abc"), length=10)
    assert not store.exists("short")
    with pytest.raises(ValueError):
        store.put("short", b"abc", length=10)


def test_put_if_absent_refuses_a_second_writer(store: ObjectStore) -> None:
    first = store.put_if_absent("locks/series-1", b"writer one")
    assert first.sha256 == hashlib.sha256(b"writer one").hexdigest()
    with pytest.raises(ObjectExistsError) as info:
        store.put_if_absent("locks/series-1", b"writer two")
    assert info.value.key == "locks/series-1"
    assert store.get("locks/series-1") == b"writer one"


def test_put_if_absent_after_delete_succeeds(store: ObjectStore) -> None:
    store.put_if_absent("k", b"1")
    store.delete("k")
    store.put_if_absent("k", io.BytesIO(b"2"))  # type: ignore[arg-type]
    assert store.get("k") == b"2"


def test_concurrent_put_if_absent_has_exactly_one_winner(store: ObjectStore) -> None:
    writers = 8
    barrier = threading.Barrier(writers)
    winners: list[int] = []
    losers: list[int] = []
    errors: list[BaseException] = []

    def write(i: int) -> None:
        body = f"writer {i} ".encode() * 5000
        barrier.wait()
        try:
            store.put_if_absent("race/key", body)
            winners.append(i)
        except ObjectExistsError:
            losers.append(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert len(winners) == 1, winners
    assert len(losers) == writers - 1
    assert store.get("race/key") == f"writer {winners[0]} ".encode() * 5000


def test_ranged_reads_return_exact_bytes(store: ObjectStore) -> None:
    data = _payload(100_003, seed=3)
    store.put("r", data)
    n = len(data)
    for offset, length in [(0, 1), (0, 128), (128, 4), (0, n), (n - 1, 1), (n - 512, 512), (n // 2, 1000), (1, n - 1)]:
        assert store.get_range("r", offset, length) == data[offset : offset + length], (offset, length)
    assert store.get_range("r", 17, 0) == b""


@pytest.mark.parametrize(("offset", "length"), [(99, 2), (100, 1), (150, 10), (-1, 5), (0, -1)])
def test_ranged_read_outside_the_object_is_refused(store: ObjectStore, offset: int, length: int) -> None:
    store.put("r", _payload(100))
    with pytest.raises(ObjectRangeError):
        store.get_range("r", offset, length)


def test_exists_stat_and_delete_is_idempotent(store: ObjectStore) -> None:
    assert not store.exists("x/y")
    store.put("x/y", b"12345")
    assert store.exists("x/y")
    info = store.stat("x/y")
    assert isinstance(info, ObjectInfo)
    assert (info.key, info.size) == ("x/y", 5)
    assert info.last_modified.tzinfo is not None
    assert abs(info.last_modified.timestamp() - time.time()) < 120
    store.delete("x/y")
    assert not store.exists("x/y")
    store.delete("x/y")  # again: no error
    store.delete("never/existed")


def test_list_is_recursive_sorted_and_filtered_by_prefix(store: ObjectStore) -> None:
    keys = [
        "archives/1.2/1.2.3/part-0001.tar",
        "archives/1.2/1.2.3/index.json.zst",
        "archives/1.2/1.2.30/part-0000.tar",
        "archives/1.2/1.2.3/part-0000.tar",
        "archives/1.3/9/part-0000.tar",
        "instances/1.2/1.2.3/1.2.3.4.dcm",
        "top",
    ]
    for i, key in enumerate(keys):
        store.put(key, b"x" * (i + 1))
    everything = list(store.list())
    assert [o.key for o in everything] == sorted(keys)
    assert {o.key: o.size for o in everything} == {k: i + 1 for i, k in enumerate(keys)}
    assert [o.key for o in store.list("archives/1.2/1.2.3/")] == [
        "archives/1.2/1.2.3/index.json.zst",
        "archives/1.2/1.2.3/part-0000.tar",
        "archives/1.2/1.2.3/part-0001.tar",
    ]
    # A prefix is a string prefix, as in S3: 1.2.3 also matches 1.2.30.
    assert [o.key for o in store.list("archives/1.2/1.2.3")] == sorted(k for k in keys if k.startswith("archives/1.2/1.2.3"))
    assert [o.key for o in store.list("archives/1.2/1.2.3/part-")] == [
        "archives/1.2/1.2.3/part-0000.tar",
        "archives/1.2/1.2.3/part-0001.tar",
    ]
    assert list(store.list("nothing/here/")) == []
    assert list(store.list("top/")) == []


def test_objects_being_written_are_not_listed(store: ObjectStore) -> None:
    store.put("dir/done", b"done")
    data = _payload(2 * PART_SIZE + 1)  # S3: multipart, so the hook runs between part reads
    stream = _TrackingStream(data, hook_at=PART_SIZE, hook=lambda: [o.key for o in store.list("dir/")])
    store.put("dir/in-flight", stream, length=len(data))  # type: ignore[arg-type]
    assert stream.hook_result == ["dir/done"]  # listed mid-upload: no temp file, no partial object
    assert [o.key for o in store.list("dir/")] == ["dir/done", "dir/in-flight"]
    if isinstance(store, LocalObjectStore):
        assert sorted(p.name for p in (store.root / "dir").iterdir()) == ["done", "in-flight"]


def test_missing_keys_raise_object_not_found(store: ObjectStore) -> None:
    for call in (
        lambda: store.get("no/such/key"),
        lambda: store.get_range("no/such/key", 0, 10),
        lambda: store.get_range("no/such/key", 0, 0),
        lambda: store.stat("no/such/key"),
        lambda: store.open_stream("no/such/key"),
    ):
        with pytest.raises(ObjectNotFoundError) as info:
            call()
        assert info.value.key == "no/such/key"
    assert not store.exists("no/such/key")


def test_open_stream_reads_in_chunks(store: ObjectStore) -> None:
    data = _payload(2 * MiB + 5)
    store.put("s", data)
    with store.open_stream("s") as f:
        parts = []
        while chunk := f.read(65536):
            parts.append(chunk)
    assert b"".join(parts) == data


def test_check_passes_on_a_working_store(store: ObjectStore) -> None:
    store.check()


BAD_KEYS = ["../escape", "a/../../b", "/abs", "a//b", ".tmp-x", "a/b/", "", "a b"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_are_refused(store: ObjectStore, key: str) -> None:
    for call in (
        lambda: store.put(key, b"x"),
        lambda: store.put_if_absent(key, b"x"),
        lambda: store.get(key),
        lambda: store.get_range(key, 0, 1),
        lambda: store.open_stream(key),
        lambda: store.exists(key),
        lambda: store.stat(key),
        lambda: store.delete(key),
    ):
        with pytest.raises(InvalidKeyError):
            call()
    assert list(store.list()) == []


def test_bad_keys_are_refused_before_any_io() -> None:
    """Against an endpoint nobody listens on, a bad key is InvalidKeyError, not 'unavailable'."""
    dead = S3ObjectStore(f"127.0.0.1:{_closed_port()}", "dcmflow", access_key="a", secret_key="b")
    for key in BAD_KEYS:
        with pytest.raises(InvalidKeyError):
            dead.put(key, b"x")
        with pytest.raises(InvalidKeyError):
            dead.get_range(key, 0, 1)
        with pytest.raises(InvalidKeyError):
            dead.delete(key)
    with pytest.raises(InvalidKeyError):
        list(dead.list("../"))
    with pytest.raises(ObjectRangeError):
        dead.get_range("fine", -1, 1)


def test_local_store_never_writes_outside_its_root(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "root")
    with pytest.raises(InvalidKeyError):
        store.put("../outside", b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]


def test_local_store_data_lives_in_plain_files(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    store.put("instances/1.2/1.2.3/1.2.3.4.dcm", b"DICM")
    assert (tmp_path / "instances" / "1.2" / "1.2.3" / "1.2.3.4.dcm").read_bytes() == b"DICM"


# -- outages ----------------------------------------------------------------------------------


@pytest.fixture
def dead_endpoint() -> Iterator[str]:
    yield f"127.0.0.1:{_closed_port()}"


def test_open_unreachable_endpoint_fails_fast(tmp_path: Path, dead_endpoint: str) -> None:
    started = time.monotonic()
    with pytest.raises(ObjectStoreUnavailableError) as info:
        open_object_store(local_root=tmp_path, endpoint=dead_endpoint, access_key="a", secret_key="b")
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert dead_endpoint in message
    assert "\n" not in message


def test_operations_on_unreachable_endpoint_fail_fast(dead_endpoint: str) -> None:
    dead = S3ObjectStore(dead_endpoint, "dcmflow", access_key="a", secret_key="b", region="us-east-1")
    for call in (
        lambda: dead.put("k", b"x"),
        lambda: dead.put_if_absent("k", b"x"),
        lambda: dead.get("k"),
        lambda: dead.get_range("k", 0, 1),
        lambda: dead.stat("k"),
        lambda: dead.exists("k"),
        lambda: list(dead.list()),
        lambda: dead.delete("k"),
        dead.check,
    ):
        started = time.monotonic()
        with pytest.raises(ObjectStoreUnavailableError, match=dead_endpoint):
            call()
        assert time.monotonic() - started < 5


@pytest.mark.s3
def test_missing_bucket_is_reported_by_check(s3_endpoint: Any, s3_bucket_name: str) -> None:
    store = S3ObjectStore(
        s3_endpoint.endpoint, s3_bucket_name, access_key=s3_endpoint.access_key, secret_key=s3_endpoint.secret_key
    )
    with pytest.raises(ObjectStoreUnavailableError, match="does not exist"):
        store.check()
    store.ensure_bucket()
    store.ensure_bucket()  # idempotent
    store.check()


def test_local_check_reports_a_missing_root(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    store.check()
    (tmp_path / "objects").rmdir()
    with pytest.raises(ObjectStoreUnavailableError):
        store.check()


def test_invalid_bucket_name_is_refused() -> None:
    with pytest.raises(InvalidKeyError):
        S3ObjectStore("127.0.0.1:9", "x")


def test_local_put_file_if_absent_links_the_file_once(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    source = tmp_path / "spool-file.dcm"
    data = b"DICM" + bytes(range(256)) * 40
    source.write_bytes(data)
    put = store.put_file_if_absent("a/b/one.dcm", source)
    assert put == PutResult("a/b/one.dcm", len(data), hashlib.sha256(data).hexdigest())
    assert store.get("a/b/one.dcm") == data
    assert (tmp_path / "objects" / "a" / "b" / "one.dcm").stat().st_ino == source.stat().st_ino  # no copy
    with pytest.raises(ObjectExistsError):
        store.put_file_if_absent("a/b/one.dcm", source, sha256="0" * 64)
    source.unlink()  # the spool deletes its name: the object stays
    assert store.get("a/b/one.dcm") == data
    other = tmp_path / "other.dcm"
    other.write_bytes(b"x")
    assert store.put_file_if_absent("a/b/two.dcm", other, sha256="f" * 64).sha256 == "f" * 64  # trusted as given
    with pytest.raises(InvalidKeyError):
        store.put_file_if_absent("../escape.dcm", other)
    assert [o.key for o in store.list()] == ["a/b/one.dcm", "a/b/two.dcm"]


def test_local_links_without_sync_then_one_sync_per_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    keys = [f"s/{series}/{i}.dcm" for series in ("a", "b") for i in range(5)]
    for i, key in enumerate(keys):
        source = tmp_path / f"spool-{i}.dcm"
        source.write_bytes(b"DICM%d" % i)
        synced: list[int] = []
        monkeypatch.setattr("storage.local.os.fsync", synced.append)  # count the fsyncs, do not skip more
        store.put_file_if_absent(key, source, sha256="0" * 64, sync=False)
        monkeypatch.undo()
        # The link's folder is left to sync_names; a folder made for it has its parent synced
        # at once (s/ and s/a for the first key, s/b for the sixth).
        assert len(synced) == {0: 2, 5: 1}.get(i, 0), (key, synced)
    calls: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        calls.append(fd)
        real_fsync(fd)

    monkeypatch.setattr("storage.local.os.fsync", counting_fsync)
    store.sync_names(keys)
    assert len(calls) == 2  # one per folder, not one per object
    assert sorted(o.key for o in store.list()) == sorted(keys)
    with pytest.raises(InvalidKeyError):
        store.sync_names(["../escape.dcm"])
