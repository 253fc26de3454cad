"""The series archive as the read path (issue 12 item 5), on the local store and a real S3 endpoint.

What the materialise step does for each series — :func:`fill_cache`, :func:`place_series`,
then :func:`archive_series` — and the headers of :func:`load_series_target`, with every
request counted by :class:`CountingStore` (a real store underneath).
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import io
import threading
from collections.abc import Sequence
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from services_registry.headers import headers_from_dataset
from storage.archive import index_key, part_key, read_series_index
from storage.errors import ArchiveError, ObjectExistsError
from storage.keys import instance_key, instance_version_key
from storage.models import InstancePublic
from storage.objects import ObjectStore, PutResult, _HashingReader, open_object_store
from storage.repository import InstanceIn, Repository
from tasks.archiving import archive_series
from tasks.context import load_series_target
from tasks.materialise import CachedSeries, fill_cache, materialise_series, place_series
from tests.factories import make_ct_series, make_small_series, to_p10_bytes
from tests.storage.test_archive import CountingStore, store  # noqa: F401 - the same counted store fixture (local and S3)
from tests.tasks.helpers import make_home

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return make_home(tmp_path / "home").repo


def receive(repo: Repository, store: ObjectStore, datasets: Sequence[Dataset], at: dt.datetime = T0) -> dict[str, bytes]:
    """Record ``datasets`` as the receiver does: an immutable object per instance version."""
    batch, files = [], {}
    for ds in datasets:
        data = to_p10_bytes(ds)
        sha = hashlib.sha256(data).hexdigest()
        study, series, sop = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
        key = instance_key(study, series, sop)
        try:
            store.put_if_absent(key, data)
        except ObjectExistsError:  # a new version of this SOP: beside the first, never over it
            key = instance_version_key(study, series, sop, sha)
            store.put_if_absent(key, data)
        files[sop] = data
        batch.append(InstanceIn(
            study_uid=study, series_uid=series, sop_uid=sop, sha256=sha, size=len(data), object_key=key,
            received_at=at, sop_class_uid=str(ds.SOPClassUID), transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            instance_number=int(ds.InstanceNumber), modality=str(ds.Modality), calling_ae="CT1",
        ))
    repo.record_instances(batch)
    return files


def make_stable(repo: Repository, at: dt.datetime) -> int:
    (claim,) = repo.claim_due_series(now=at, default_stable_age=60, claimer="test")
    repo.mark_series_emitted(claim.series_uid, claim.revision)
    return claim.revision


def materialise_step(store: ObjectStore, repo: Repository, series_uid: str, cache: Path, target: Path) -> CachedSeries:
    """What ``tasks.jobs.materialise`` does for one series (without Prefect)."""
    series = repo.get_series(series_uid)
    assert series is not None
    instances = repo.list_instances(series_uid)
    cached = fill_cache(store, instances, study_uid=series.study_uid, series_uid=series_uid, cache_dir=cache)
    place_series(instances, cached, target)
    archive_series(store, instances, cached.files, study_uid=series.study_uid, series_uid=series_uid,
                   index=cached.index, index_known=cached.index_read)
    return cached


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def mr() -> list[Dataset]:
    return make_small_series(12, seed=41)


def _ids(ds: Dataset) -> tuple[str, str]:
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


# -- written when stable, appended per revision -----------------------------------------------


def test_archive_is_written_at_stable_and_each_revision_adds_a_part_of_only_its_new_instances(
    store: CountingStore, repo: Repository, mr: list[Dataset], tmp_path: Path
) -> None:
    study, series = _ids(mr[0])
    receive(repo, store, mr[:8])
    assert make_stable(repo, T0 + dt.timedelta(seconds=61)) == 1
    first = materialise_step(store, repo, series, tmp_path / "cache1", tmp_path / "s1")
    assert (first.from_objects, first.from_archive) == (8, 0)  # no archive yet: one GET per object
    index = read_series_index(store, study, series)
    assert [(p.number, p.count) for p in index.parts] == [(0, 8)]

    # revision 2: four late instances and a new version of instance 2 (other bytes, same SOP)
    changed = copy.deepcopy(mr[2])
    changed.ImageComments = "corrected"
    late_at = T0 + dt.timedelta(seconds=100)
    late = receive(repo, store, [*mr[8:], changed], at=late_at)
    assert make_stable(repo, late_at + dt.timedelta(seconds=61)) == 2
    store.calls.clear()
    materialise_step(store, repo, series, tmp_path / "cache1", tmp_path / "s2")
    index = read_series_index(store, study, series)
    assert [(p.number, p.count) for p in index.parts] == [(0, 8), (1, 5)]
    assert {e.sop_uid for e in index.instances if e.part == 1} == set(late)
    assert index.find(str(changed.SOPInstanceUID)).sha256 == hashlib.sha256(late[str(changed.SOPInstanceUID)]).hexdigest()
    writes = [c for c in store.calls if c[0] in {"put", "put_if_absent"}]
    assert writes == [("put_if_absent", part_key(study, series, 1)), ("put", index_key(study, series))]
    assert not any(c == ("get", part_key(study, series, 0)) for c in store.calls)  # part 0 never read back

    # the same revision again (another run, another machine's cache): nothing is written
    store.calls.clear()
    materialise_step(store, repo, series, tmp_path / "cache2", tmp_path / "s3")
    assert [c for c in store.calls if c[0] in {"put", "put_if_absent", "delete"}] == []


# -- the read path ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ct() -> list[Dataset]:
    return make_ct_series(24, 128, 128, seed=43)


def test_archive_gives_the_same_bytes_as_the_instance_objects_with_one_get_per_part(
    store: CountingStore, repo: Repository, ct: list[Dataset], tmp_path: Path
) -> None:
    study, series = _ids(ct[0])
    receive(repo, store, ct)
    instances = repo.list_instances(series)
    store.calls.clear()
    by_object = tmp_path / "by-object"
    assert materialise_series(store, instances, study_uid=study, series_uid=series, cache_dir=tmp_path / "c1", target=by_object) == 24
    assert len(store.reads()) == 1 + 24  # the index lookup (absent), then one GET per instance

    cached = CachedSeries(files=[tmp_path / "c1" / study / series / f"{i.sop_uid}-{i.sha256[:16]}.dcm" for i in instances])
    archive_series(store, instances, cached.files, study_uid=study, series_uid=series)

    # another machine: empty cache, the whole series from the archive
    store.calls.clear()
    from_archive = tmp_path / "from-archive"
    got = fill_cache(store, instances, study_uid=study, series_uid=series, cache_dir=tmp_path / "c2")
    place_series(instances, got, from_archive)
    assert store.reads() == [("get", index_key(study, series)), ("open_stream", part_key(study, series, 0))]
    assert (got.from_archive, got.from_objects, got.requests) == (24, 0, 2)
    assert folder_bytes(from_archive) == folder_bytes(by_object)
    assert all(pydicom.dcmread(p).SeriesInstanceUID == series for p in from_archive.iterdir())

    # a cache missing two instances: one ranged GET each, not the whole part
    for path in got.files[5:7]:
        path.unlink()
    store.calls.clear()
    again = fill_cache(store, instances, study_uid=study, series_uid=series, cache_dir=tmp_path / "c2")
    assert store.reads() == [("get", index_key(study, series))] + [("get_range", part_key(study, series, 0))] * 2
    assert (again.from_cache, again.from_archive) == (22, 2)
    assert [p.read_bytes() for p in again.files] == [p.read_bytes() for p in got.files]

    # a full cache reads nothing at all
    store.calls.clear()
    fill_cache(store, instances, study_uid=study, series_uid=series, cache_dir=tmp_path / "c2")
    assert store.reads() == []


def test_series_without_an_archive_falls_back_to_instance_objects(
    store: CountingStore, repo: Repository, mr: list[Dataset], tmp_path: Path
) -> None:
    study, series = _ids(mr[0])
    files = receive(repo, store, mr)
    instances = repo.list_instances(series)
    store.calls.clear()
    got = fill_cache(store, instances, study_uid=study, series_uid=series, cache_dir=tmp_path / "c")
    assert got.index is None and (got.from_objects, got.from_archive) == (12, 0)
    assert store.reads() == [("get", index_key(study, series))] + [("get", i.object_key) for i in instances]
    assert [p.read_bytes() for p in got.files] == [files[i.sop_uid] for i in instances]


def test_instances_not_yet_archived_come_from_their_objects_the_rest_from_the_archive(
    store: CountingStore, repo: Repository, mr: list[Dataset], tmp_path: Path
) -> None:
    study, series = _ids(mr[0])
    receive(repo, store, mr[:10])
    materialise_step(store, repo, series, tmp_path / "c1", tmp_path / "s1")
    receive(repo, store, mr[10:], at=T0 + dt.timedelta(seconds=5))  # not archived yet
    instances = repo.list_instances(series)
    store.calls.clear()
    got = fill_cache(store, instances, study_uid=study, series_uid=series, cache_dir=tmp_path / "c2")
    assert (got.from_archive, got.from_objects) == (10, 2)
    assert store.reads() == [
        ("get", index_key(study, series)),
        ("open_stream", part_key(study, series, 0)),
        *(("get", i.object_key) for i in instances if i.sop_uid in {str(d.SOPInstanceUID) for d in mr[10:]}),
    ]


# -- damage is an error, never wrong data -----------------------------------------------------


def _archived_series(store: CountingStore, repo: Repository, mr: list[Dataset], tmp_path: Path) -> tuple[str, str, list[InstancePublic]]:
    study, series = _ids(mr[0])
    receive(repo, store, mr)
    materialise_step(store, repo, series, tmp_path / "c0", tmp_path / "s0")
    return study, series, repo.list_instances(series)


@pytest.mark.parametrize("whole", [True, False], ids=["whole-part", "ranged"])
def test_a_corrupted_part_is_a_clear_error_and_leaves_no_wrong_file(
    store: CountingStore, repo: Repository, mr: list[Dataset], tmp_path: Path, whole: bool
) -> None:
    study, series, instances = _archived_series(store, repo, mr, tmp_path)
    index = read_series_index(store, study, series)
    blob = bytearray(store.get(part_key(study, series, 0)))
    victim = index.find(instances[3].sop_uid)
    blob[victim.offset + victim.length - 10] ^= 0xFF  # one flipped byte in the pixel data
    store.put(part_key(study, series, 0), bytes(blob))
    if whole:  # a new machine: empty cache, the part is streamed
        cache = tmp_path / "c"
    else:  # a cache missing the damaged instance and one other: two ranged GETs
        cache = tmp_path / "c0"
        for instance in (instances[3], instances[7]):
            (cache / study / series / f"{instance.sop_uid}-{instance.sha256[:16]}.dcm").unlink()
    store.calls.clear()
    with pytest.raises(ArchiveError, match=rf"instance {instances[3].sop_uid} in {part_key(study, series, 0)} does not match its SHA-256"):
        fill_cache(store, instances, study_uid=study, series_uid=series, cache_dir=cache)
    assert ("open_stream" if whole else "get_range", part_key(study, series, 0)) in store.reads()
    bad = cache / study / series / f"{instances[3].sop_uid}-{instances[3].sha256[:16]}.dcm"
    assert not bad.exists()


def test_a_missing_part_is_a_clear_error(store: CountingStore, repo: Repository, mr: list[Dataset], tmp_path: Path) -> None:
    study, series, instances = _archived_series(store, repo, mr, tmp_path)
    store.delete(part_key(study, series, 0))
    with pytest.raises(ArchiveError, match=rf"series archive part {part_key(study, series, 0)} is missing"):
        fill_cache(store, instances, study_uid=study, series_uid=series, cache_dir=tmp_path / "c")


def test_an_unreadable_index_is_a_clear_error(store: CountingStore, repo: Repository, mr: list[Dataset], tmp_path: Path) -> None:
    study, series, instances = _archived_series(store, repo, mr, tmp_path)
    store.put(index_key(study, series), b"garbage")
    with pytest.raises(ArchiveError, match="unreadable series archive index"):
        fill_cache(store, instances, study_uid=study, series_uid=series, cache_dir=tmp_path / "c")


# -- writers of one series are serialised by put_if_absent ------------------------------------


class RacingStore(CountingStore):
    """Lets another writer append to the series just before our first part write."""

    def __init__(self, inner: ObjectStore, before_part: threading.Event, rival: object) -> None:
        super().__init__(inner)
        self.before_part = before_part
        self.rival = rival

    def _put_if_absent(self, key: str, reader: _HashingReader, length: int | None) -> PutResult:
        if key.endswith(".tar") and not self.before_part.is_set():
            self.before_part.set()
            self.rival()  # type: ignore[operator]
        return super()._put_if_absent(key, reader, length)


def test_a_writer_that_loses_the_part_number_re_reads_the_index_and_appends_after_the_winner(
    repo: Repository, mr: list[Dataset], tmp_path: Path
) -> None:
    inner = open_object_store(local_root=tmp_path / "objects")
    study, series = _ids(mr[0])
    receive(repo, inner, mr)
    instances = repo.list_instances(series)
    cached = fill_cache(inner, instances, study_uid=study, series_uid=series, cache_dir=tmp_path / "c")

    def rival() -> None:  # another run archived the first six meanwhile
        archive_series(inner, instances[:6], cached.files[:6], study_uid=study, series_uid=series)

    store = RacingStore(inner, threading.Event(), rival)
    report = archive_series(store, instances, cached.files, study_uid=study, series_uid=series)
    assert report.conflicts == 1 and report.parts == [1] and report.appended == 6
    index = read_series_index(inner, study, series)
    assert [(p.number, p.count) for p in index.parts] == [(0, 6), (1, 6)]
    assert sorted(e.sop_uid for e in index.instances) == sorted(i.sop_uid for i in instances)


def test_an_orphan_part_stops_archiving_with_a_clear_error(repo: Repository, mr: list[Dataset], tmp_path: Path) -> None:
    store = open_object_store(local_root=tmp_path / "objects")
    study, series = _ids(mr[0])
    receive(repo, store, mr)
    instances = repo.list_instances(series)
    cached = fill_cache(store, instances, study_uid=study, series_uid=series, cache_dir=tmp_path / "c")
    store.put(part_key(study, series, 0), b"left by a writer that died before its index")
    with pytest.raises(ArchiveError, match="stayed taken through 2 attempts"):
        archive_series(store, instances, cached.files, study_uid=study, series_uid=series, attempts=2)


# -- headers from the index -------------------------------------------------------------------


def test_headers_come_from_the_index_without_reading_pixel_data(
    store: CountingStore, repo: Repository, ct: list[Dataset], tmp_path: Path
) -> None:
    study, series = _ids(ct[0])
    receive(repo, store, ct)
    before = load_series_target(repo, store, series)  # no archive: the representative's object
    materialise_step(store, repo, series, tmp_path / "c", tmp_path / "s")
    store.calls.clear()
    after = load_series_target(repo, store, series)
    assert store.reads() == [("get", index_key(study, series))]
    assert after.headers == before.headers
    first = repo.list_instances(series)[0]
    direct = headers_from_dataset(
        pydicom.dcmread(io.BytesIO(store.get(first.object_key)), stop_before_pixels=True),
        dcmpath=after.headers["dcmpath"],
        calling_ae=repo.get_series(series).calling_ae,  # type: ignore[union-attr]
    )
    assert after.headers == direct and after.headers["TransferSyntaxUID"] == "1.2.840.10008.1.2.1"


@pytest.mark.parametrize("whole", [True, False], ids=["whole-part", "ranged"])
def test_a_truncated_part_is_a_clear_error(
    store: CountingStore, repo: Repository, mr: list[Dataset], tmp_path: Path, whole: bool
) -> None:
    study, series, instances = _archived_series(store, repo, mr, tmp_path)
    blob = store.get(part_key(study, series, 0))
    store.put(part_key(study, series, 0), blob[: len(blob) // 2])
    cache = tmp_path / ("c" if whole else "c0")
    if not whole:
        last = instances[-1]
        (cache / study / series / f"{last.sop_uid}-{last.sha256[:16]}.dcm").unlink()
    message = "is truncated" if whole else "is missing or shorter than its index says"
    with pytest.raises(ArchiveError, match=rf"series archive part {part_key(study, series, 0)} .*{message}"):
        fill_cache(store, instances, study_uid=study, series_uid=series, cache_dir=cache)
