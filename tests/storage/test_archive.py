"""The series archive on both stores: exact ranged reads, index-only metadata, cheap appends.

Request counts are observed with :class:`CountingStore`, a real :class:`ObjectStore` that
forwards every call to a real local or S3 store underneath and records it.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pydicom
import pytest
import zstandard
from pydicom.uid import ImplicitVRLittleEndian

from storage.archive import (
    BULK_DATA_THRESHOLD,
    SeriesIndex,
    append_instances,
    index_key,
    list_metadata,
    pack_series,
    parse_bulk_data_uri,
    part_key,
    read_bulk_data,
    read_instance,
    read_series_index,
)
from storage.errors import (
    ArchiveError,
    ForeignInstanceError,
    InvalidKeyError,
    ObjectExistsError,
    ObjectNotFoundError,
)
from storage.objects import ObjectInfo, ObjectStore, PutResult, _HashingReader, open_object_store
from tests.factories import ct_small_bytes, make_ct_series, make_small_series, to_p10_bytes


class CountingStore(ObjectStore):
    """Forwards to a real store and records ``(operation, key)`` for every request."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.location = inner.location
        self.calls: list[tuple[str, str]] = []

    def reads(self) -> list[tuple[str, str]]:
        return [c for c in self.calls if c[0] in {"get", "get_range", "open_stream"}]

    def _put(self, key: str, reader: _HashingReader, length: int | None, content_type: str) -> PutResult:
        self.calls.append(("put", key))
        return self.inner._put(key, reader, length, content_type)

    def _put_if_absent(self, key: str, reader: _HashingReader, length: int | None) -> PutResult:
        self.calls.append(("put_if_absent", key))
        return self.inner._put_if_absent(key, reader, length)

    def _delete(self, key: str) -> None:
        self.calls.append(("delete", key))
        self.inner._delete(key)

    def _get(self, key: str) -> bytes:
        self.calls.append(("get", key))
        return self.inner._get(key)

    def _get_range(self, key: str, offset: int, length: int) -> bytes:
        self.calls.append(("get_range", key))
        return self.inner._get_range(key, offset, length)

    def _open_stream(self, key: str) -> BinaryIO:
        self.calls.append(("open_stream", key))
        return self.inner._open_stream(key)

    def _exists(self, key: str) -> bool:
        self.calls.append(("exists", key))
        return self.inner._exists(key)

    def _stat(self, key: str) -> ObjectInfo:
        self.calls.append(("stat", key))
        return self.inner._stat(key)

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        self.calls.append(("list", prefix))
        return self.inner._list(prefix)

    def check(self) -> None:
        self.inner.check()


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> CountingStore:
    if request.param == "local":
        inner = open_object_store(local_root=tmp_path / "objects")
    else:
        s3 = request.getfixturevalue("s3_endpoint")
        inner = open_object_store(
            local_root=tmp_path / "unused",
            endpoint=s3.endpoint,
            access_key=s3.access_key,
            secret_key=s3.secret_key,
            secure=s3.secure,
            bucket=request.getfixturevalue("s3_bucket_name"),
        )
    return CountingStore(inner)


@pytest.fixture(scope="module")
def mr_series() -> list[pydicom.Dataset]:
    return make_small_series(20, seed=11)


@pytest.fixture(scope="module")
def mr_files(mr_series: list[pydicom.Dataset]) -> list[bytes]:
    return [to_p10_bytes(ds) for ds in mr_series]


def _uids(ds: pydicom.Dataset) -> tuple[str, str]:
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


# -- pack and read ----------------------------------------------------------------------------


def test_pack_then_each_instance_is_one_ranged_get(
    store: CountingStore, mr_series: list[pydicom.Dataset], mr_files: list[bytes]
) -> None:
    study, series = _uids(mr_series[0])
    index = pack_series(store, study, series, mr_files)
    assert [e.sop_uid for e in index.instances] == [ds.SOPInstanceUID for ds in mr_series]
    assert [p.number for p in index.parts] == [0]
    keys = [o.key for o in store.list(f"archives/{study}/{series}/")]
    assert keys == [index_key(study, series), part_key(study, series, 0)]
    for ds, raw in zip(mr_series, mr_files):
        store.calls.clear()
        assert read_instance(store, index, ds.SOPInstanceUID) == raw
        assert store.calls == [("get_range", part_key(study, series, 0))]
        entry = index.find(ds.SOPInstanceUID)
        assert entry.length == entry.size == len(raw)
        assert entry.sha256 == hashlib.sha256(raw).hexdigest()
        # length is an exact byte count: get_range(offset, length) is the whole file, no more.
        assert store.get_range(index.part_key(entry.part), entry.offset, entry.length) == raw


def test_full_size_ct_instances_round_trip(store: CountingStore) -> None:
    series = make_ct_series(3, 512, 512, seed=5)
    files = [to_p10_bytes(ds) for ds in series]
    assert all(len(f) > 512 * 512 * 2 for f in files)
    study, series_uid = _uids(series[0])
    index = pack_series(store, study, series_uid, files)
    for ds, raw in zip(series, files):
        assert read_instance(store, (study, series_uid), ds.SOPInstanceUID) == raw
    meta = list_metadata(store, index)
    assert [m["00200013"]["Value"] for m in meta] == [[1], [2], [3]]
    # Pixel data and the 2 KiB GE histogram are BulkDataURIs that resolve to the exact values.
    for ds, m in zip(series, meta):
        assert read_bulk_data(store, m["7FE00010"]["BulkDataURI"]) == ds.PixelData
        assert read_bulk_data(store, m["00431029"]["BulkDataURI"]) == ds[0x00431029].value
        assert len(json.dumps(m)) < 20_000


def test_non_zero_preamble_is_kept_byte_for_byte(store: CountingStore) -> None:
    raw = ct_small_bytes()
    assert raw[:128] != b"\x00" * 128  # CT_small.dcm has a TIFF-like preamble (COD mislocates it)
    ds = pydicom.dcmread(io.BytesIO(raw))
    index = pack_series(store, *_uids(ds), [(ds.SOPInstanceUID, raw)])
    store.calls.clear()
    assert read_instance(store, index, ds.SOPInstanceUID) == raw
    assert len(store.calls) == 1
    meta = list_metadata(store, index)[0]
    assert read_bulk_data(store, meta["7FE00010"]["BulkDataURI"]) == ds.PixelData


def test_implicit_vr_instance(store: CountingStore, mr_series: list[pydicom.Dataset]) -> None:
    ds = mr_series[0].copy()
    ds.file_meta = mr_series[0].file_meta.copy()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    raw = to_p10_bytes(ds)
    index = pack_series(store, *_uids(ds), [raw])
    assert index.instances[0].transfer_syntax == ImplicitVRLittleEndian
    assert read_instance(store, index, ds.SOPInstanceUID) == raw
    uri = list_metadata(store, index)[0]["7FE00010"]["BulkDataURI"]
    assert read_bulk_data(store, uri) == ds.PixelData


def test_parts_are_plain_tars_with_512_byte_headers(
    store: CountingStore, mr_series: list[pydicom.Dataset], mr_files: list[bytes]
) -> None:
    study, series = _uids(mr_series[0])
    index = pack_series(store, study, series, mr_files)
    blob = store.get(part_key(study, series, 0))
    assert index.parts[0].size == len(blob)
    assert index.parts[0].sha256 == hashlib.sha256(blob).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [f"{ds.SOPInstanceUID}.dcm" for ds in mr_series]
        assert [m.offset_data for m in members] == [e.offset for e in index.instances]
        assert [m.offset_data - m.offset for m in members] == [512] * len(members)
        assert all(isinstance(m.mtime, int) and not m.pax_headers for m in members)
        for member, raw in zip(members, mr_files):
            assert tar.extractfile(member).read() == raw  # type: ignore[union-attr]


def test_index_is_one_zstd_frame_of_the_whole_series(
    store: CountingStore, mr_series: list[pydicom.Dataset], mr_files: list[bytes]
) -> None:
    study, series = _uids(mr_series[0])
    pack_series(store, study, series, mr_files)
    frame = store.get(index_key(study, series))
    params = zstandard.get_frame_parameters(frame)
    assert params.content_size > 0
    dobj = zstandard.ZstdDecompressor().decompressobj()
    body = dobj.decompress(frame)
    assert dobj.eof and dobj.unused_data == b""  # exactly one frame, nothing after it
    assert len(body) == params.content_size
    doc = json.loads(body)
    assert (doc["study_uid"], doc["series_uid"]) == (study, series)
    assert len(doc["instances"]) == len(mr_files)
    assert set(doc["instances"][0]) == {
        "sop_uid", "part", "offset", "length", "sha256", "size", "transfer_syntax", "sop_class", "metadata", "file_meta"
    }
    assert doc["instances"][0]["file_meta"]["00020010"] == {"vr": "UI", "Value": ["1.2.840.10008.1.2.1"]}
    assert doc["instances"][0]["sop_class"] == "1.2.840.10008.5.1.4.1.1.4"
    assert doc["instances"][0]["transfer_syntax"] == "1.2.840.10008.1.2.1"
    assert len(frame) * 5 < len(body)


def test_metadata_is_dicom_json_without_bulk_data(
    store: CountingStore, mr_series: list[pydicom.Dataset], mr_files: list[bytes]
) -> None:
    index = pack_series(store, *_uids(mr_series[0]), mr_files)
    for ds, meta in zip(mr_series, list_metadata(store, index)):
        assert meta["00080018"] == {"vr": "UI", "Value": [ds.SOPInstanceUID]}
        assert meta["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Synthetic^Head^MR"}]}
        assert set(meta["7FE00010"]) == {"vr", "BulkDataURI"}
        key, offset, length = parse_bulk_data_uri(meta["7FE00010"]["BulkDataURI"])
        assert key == part_key(*_uids(ds), 0) and length == len(ds.PixelData)
        for element in meta.values():
            assert len(element.get("InlineBinary", "")) <= BULK_DATA_THRESHOLD * 4 // 3 + 4
        # The rest equals pydicom's own DICOM JSON of the header.
        header = pydicom.dcmread(io.BytesIO(to_p10_bytes(ds)), stop_before_pixels=True).to_json_dict()
        assert {k: v for k, v in meta.items() if k != "7FE00010"} == header


def test_metadata_is_served_without_any_tar(
    store: CountingStore, mr_series: list[pydicom.Dataset], mr_files: list[bytes]
) -> None:
    study, series = _uids(mr_series[0])
    index = pack_series(store, study, series, mr_files)
    expected = list_metadata(store, index)
    store.delete(part_key(study, series, 0))  # no tar left at all
    store.calls.clear()
    assert list_metadata(store, (study, series)) == expected
    assert store.calls == [("get", index_key(study, series))]
    with pytest.raises(ObjectNotFoundError):
        read_instance(store, index, mr_series[0].SOPInstanceUID)


# -- append -----------------------------------------------------------------------------------


def test_append_writes_a_new_part_and_never_reads_old_parts(
    store: CountingStore, mr_series: list[pydicom.Dataset], mr_files: list[bytes]
) -> None:
    study, series = _uids(mr_series[0])
    pack_series(store, study, series, mr_files[:15])
    store.calls.clear()
    late = mr_files[15:] + mr_files[3:5]  # 5 new instances + 2 already archived
    index = append_instances(store, study, series, late)
    assert store.reads() == [("get", index_key(study, series))]
    writes = [c for c in store.calls if c[0] in {"put", "put_if_absent"}]
    assert writes == [("put_if_absent", part_key(study, series, 1)), ("put", index_key(study, series))]
    assert [p.count for p in index.parts] == [15, 5]
    assert [e.part for e in index.instances] == [0] * 15 + [1] * 5
    with tarfile.open(fileobj=io.BytesIO(store.get(part_key(study, series, 1)))) as tar:
        assert tar.getnames() == [f"{ds.SOPInstanceUID}.dcm" for ds in mr_series[15:]]
    assert read_series_index(store, study, series) == index
    for ds, raw in zip(mr_series, mr_files):
        assert read_instance(store, index, ds.SOPInstanceUID) == raw


def test_append_of_known_instances_writes_nothing(
    store: CountingStore, mr_series: list[pydicom.Dataset], mr_files: list[bytes]
) -> None:
    study, series = _uids(mr_series[0])
    before = pack_series(store, study, series, mr_files)
    store.calls.clear()
    assert append_instances(store, study, series, mr_files[:4]) == before
    assert store.calls == [("get", index_key(study, series))]


def test_append_to_a_missing_archive_creates_it(
    store: CountingStore, mr_series: list[pydicom.Dataset], mr_files: list[bytes]
) -> None:
    study, series = _uids(mr_series[0])
    index = append_instances(store, study, series, mr_files[:2])
    assert [p.number for p in index.parts] == [0]
    assert read_instance(store, (study, series), mr_series[1].SOPInstanceUID) == mr_files[1]


def test_different_bytes_under_a_known_sop_become_a_new_version(
    store: CountingStore, mr_series: list[pydicom.Dataset], mr_files: list[bytes]
) -> None:
    study, series = _uids(mr_series[0])
    pack_series(store, study, series, mr_files[:3])
    changed = mr_series[1].copy()
    changed.PatientName = "Corrected^Name"
    changed_raw = to_p10_bytes(changed)
    index = append_instances(store, study, series, [changed_raw])
    sop = mr_series[1].SOPInstanceUID
    assert [e.sop_uid for e in index.instances].count(sop) == 2
    assert read_instance(store, index, sop) == changed_raw
    assert read_instance(store, index, sop, sha256=hashlib.sha256(mr_files[1]).hexdigest()) == mr_files[1]
    meta = list_metadata(store, index)
    assert len(meta) == 3
    assert meta[1]["00100010"]["Value"] == [{"Alphabetic": "Corrected^Name"}]


def test_append_refuses_to_overwrite_an_unindexed_part(
    store: CountingStore, mr_series: list[pydicom.Dataset], mr_files: list[bytes]
) -> None:
    """A concurrent (or crashed) appender already wrote part-0001: ours must not clobber it."""
    study, series = _uids(mr_series[0])
    pack_series(store, study, series, mr_files[:10])
    store.put(part_key(study, series, 1), b"the other writer's part")
    with pytest.raises(ObjectExistsError):
        append_instances(store, study, series, mr_files[10:])
    assert store.get(part_key(study, series, 1)) == b"the other writer's part"
    assert len(read_series_index(store, study, series).instances) == 10


def test_pack_twice_is_refused(store: CountingStore, mr_series: list[pydicom.Dataset], mr_files: list[bytes]) -> None:
    study, series = _uids(mr_series[0])
    pack_series(store, study, series, mr_files[:2])
    with pytest.raises(ObjectExistsError):
        pack_series(store, study, series, mr_files[2:4])


def test_large_batches_are_split_into_parts(
    store: CountingStore, mr_series: list[pydicom.Dataset], mr_files: list[bytes]
) -> None:
    study, series = _uids(mr_series[0])
    index = pack_series(store, study, series, mr_files, max_part_bytes=4 * len(mr_files[0]))
    assert len(index.parts) >= 5
    assert sum(p.count for p in index.parts) == len(mr_files)
    for ds, raw in zip(mr_series, mr_files):
        assert read_instance(store, index, ds.SOPInstanceUID) == raw


# -- refusals ---------------------------------------------------------------------------------


def test_foreign_instances_are_refused_and_nothing_is_written(
    store: CountingStore, mr_series: list[pydicom.Dataset], mr_files: list[bytes]
) -> None:
    study, series = _uids(mr_series[0])
    other = make_small_series(1, seed=99)[0]
    foreign = to_p10_bytes(other)
    with pytest.raises(ForeignInstanceError, match=str(other.SeriesInstanceUID)):
        pack_series(store, study, series, [*mr_files[:5], foreign])
    assert list(store.list("archives/")) == []
    pack_series(store, study, series, mr_files[:5])
    same_series_other_study = mr_series[6].copy()
    same_series_other_study.StudyInstanceUID = "1.2.3.4"
    with pytest.raises(ForeignInstanceError):
        append_instances(store, study, series, [mr_files[5], to_p10_bytes(same_series_other_study)])
    assert [p.number for p in read_series_index(store, study, series).parts] == [0]


def test_invalid_uids_are_refused_before_io(store: CountingStore, mr_files: list[bytes]) -> None:
    for study, series in [("../1", "1.2"), ("1.2", "1.2/3"), ("1." + "2" * 64, "1"), ("", "1")]:
        with pytest.raises(InvalidKeyError):
            pack_series(store, study, series, mr_files[:1])
        with pytest.raises(InvalidKeyError):
            append_instances(store, study, series, mr_files[:1])
        with pytest.raises(InvalidKeyError):
            read_series_index(store, study, series)
    with pytest.raises(InvalidKeyError):
        read_instance(store, ("1.2", "1.3"), "../x")
    assert store.calls == []


def test_mismatched_sop_hint_and_non_dicom_are_refused(
    store: CountingStore, mr_series: list[pydicom.Dataset], mr_files: list[bytes]
) -> None:
    study, series = _uids(mr_series[0])
    with pytest.raises(ArchiveError, match="carries SOP Instance UID"):
        pack_series(store, study, series, [("1.2.3", mr_files[0])])
    with pytest.raises(ArchiveError, match="not a DICOM"):
        pack_series(store, study, series, [b"not dicom at all" * 20])
    assert list(store.list("archives/")) == []


def test_corrupted_bytes_are_detected(
    store: CountingStore, mr_series: list[pydicom.Dataset], mr_files: list[bytes]
) -> None:
    study, series = _uids(mr_series[0])
    index = pack_series(store, study, series, mr_files[:2])
    blob = bytearray(store.get(part_key(study, series, 0)))
    blob[index.instances[1].offset + 2000] ^= 0xFF
    store.put(part_key(study, series, 0), bytes(blob))
    assert read_instance(store, index, mr_series[0].SOPInstanceUID) == mr_files[0]
    with pytest.raises(ArchiveError, match="SHA-256"):
        read_instance(store, index, mr_series[1].SOPInstanceUID)


def test_unreadable_index_is_an_archive_error(store: CountingStore) -> None:
    store.put(index_key("1.2", "1.2.3"), b"not zstd")
    with pytest.raises(ArchiveError):
        read_series_index(store, "1.2", "1.2.3")
    with pytest.raises(ObjectNotFoundError):
        read_series_index(store, "1.2", "1.2.4")


def test_index_round_trips_through_its_document(mr_series: list[pydicom.Dataset], mr_files: list[bytes], tmp_path: Path) -> None:
    store = open_object_store(local_root=tmp_path)
    index = pack_series(store, *_uids(mr_series[0]), mr_files[:3])
    assert SeriesIndex.from_document(json.loads(json.dumps(index.to_document()))) == index
    with pytest.raises(ArchiveError):
        SeriesIndex.from_document({"format": "something-else"})
