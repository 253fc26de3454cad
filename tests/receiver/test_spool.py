"""The spool's segment log on its own: records, group commit, read marks, segment reuse, the
disk watermark, and recovery after a crash (a torn tail record, a record failing its checksum)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

import receiver.spool
from receiver import status
from receiver.associations import AssociationTracker, CallerPolicy
from receiver.errors import SpoolFullError, SpoolLockedError
from receiver.scp import ScpConfig, start_scp
from receiver.spool import Spool, new_association_id
from receiver.spool_log import ALIGN, segment_name
from tests.factories import make_small_series, to_p10_bytes
from tests.receiver.conftest import AE_TITLE, TEST_SEGMENT_SIZE, Env, free_port, spooled


def _spool(env: Env, *, min_free_bytes: int = 0, segment_size: int = TEST_SEGMENT_SIZE) -> Spool:
    return Spool(env.spool_dir, min_free_bytes=min_free_bytes, min_free_fraction=0.0, segment_size=segment_size)


def _recorded(env: Env) -> set[str]:
    import sqlalchemy as sa

    with env.repo.engine.connect() as conn:
        return {row[0] for row in conn.execute(sa.text("select sop_uid from instance"))}


def test_records_keep_bytes_metadata_and_order(env: Env) -> None:
    assoc = new_association_id()
    a = env.spool.write(b"x" * 5000, sop_uid="1.2.3", association_id=assoc, calling_ae="CT 1/\\x")
    b = env.spool.write(b"y", sop_uid="1.2.4", association_id=assoc, calling_ae="")
    assert a.position is not None and b.position is not None
    assert b.position.offset == a.position.offset + 2 * ALIGN  # each record on its own pages
    records = spooled(env.spool)
    assert [(e.sop_uid, e.calling_ae, e.association_id, raw) for e, raw in records] == [
        ("1.2.3", "CT 1/\\x", assoc, b"x" * 5000),
        ("1.2.4", "", assoc, b"y"),
    ]
    assert records[0][0] == a
    assert env.spool.depth() == (2, 5001)
    assert env.spool.has_files_of(assoc)


def test_write_refuses_paths_and_bad_ids(env: Env) -> None:
    for uid in ("../../etc/passwd", "1.2.abc", "", "1." * 40):
        with pytest.raises(ValueError):
            env.spool.write(b"x", sop_uid=uid, association_id=new_association_id(), calling_ae="A")
    with pytest.raises(ValueError):
        env.spool.write(b"x", sop_uid="1.2", association_id="../x", calling_ae="A")
    assert env.spool.count() == 0


def test_one_receiver_per_spool(env: Env) -> None:
    env.spool.recover()
    other = _spool(env)
    # flock locks belong to the open file description, so a second open in the same
    # process conflicts just as another process would; a write takes the lock too.
    with pytest.raises(SpoolLockedError):
        other.lock()
    with pytest.raises(SpoolLockedError):
        other.write(b"x", sop_uid="1.2", association_id=new_association_id(), calling_ae="A")
    env.spool.close()
    other.write(b"x", sop_uid="1.2", association_id=new_association_id(), calling_ae="A")
    other.close()
    assert env.spool.count() == 1


def test_watermark_answers_out_of_resources_then_recovers(env: Env) -> None:
    full = _spool(env, min_free_bytes=1 << 62)  # more than any disk has
    with pytest.raises(SpoolFullError):
        full.write(b"x", sop_uid="1.2", association_id=new_association_id(), calling_ae="A")
    port = free_port()
    server = start_scp(ScpConfig(ae_title=AE_TITLE, host="127.0.0.1", port=port), full, AssociationTracker(), CallerPolicy())
    try:
        ae = AE(ae_title="SCU")
        ae.add_requested_context(MRImageStorage)
        (ds,) = make_small_series(1, seed=31)
        assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
        assert assoc.send_c_store(ds).Status == status.OUT_OF_RESOURCES
        full.min_free_bytes = 0  # space came back
        assert assoc.send_c_store(ds).Status == status.SUCCESS
        assoc.release()
    finally:
        server.shutdown()
        full.close()
    assert [e.sop_uid for e, _ in spooled(env.spool)] == [ds.SOPInstanceUID]


def test_ingest_advances_the_mark_and_a_lost_mark_only_replays(env: Env) -> None:
    ds_list = make_small_series(3, seed=32)
    assoc = new_association_id()
    for ds in ds_list:
        env.spool.write(to_p10_bytes(ds), sop_uid=ds.SOPInstanceUID, association_id=assoc, calling_ae="A")
    mark = env.spool.marks_dir / "0"
    assert env.ingester().drain() == 3
    assert env.spool.count() == 0 and not env.spool.has_files_of(assoc)
    assert env.ingester().drain() == 0  # a new worker resumes from the durable mark
    # A crash after recording, before the mark was saved: the records come back, as duplicates.
    mark.unlink()
    ing = env.ingester()
    assert ing.drain() == 3
    assert [r.duplicate for r in ing.reports] == [3]
    assert env.instance_count() == 3
    for ds in ds_list:
        assert env.store.get(f"instances/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm") == to_p10_bytes(ds)
    assert list(env.spool.stage_dir.iterdir()) == []


def test_unparseable_record_is_rejected_not_lost(env: Env) -> None:
    env.spool.write(b"not dicom at all", sop_uid="1.2.9", association_id=new_association_id(), calling_ae="A")
    assert env.ingester().drain() == 0
    rejected = sorted(env.spool.rejected_dir.iterdir())
    assert [p.suffix for p in rejected] == [".dcm", ".reason"]
    assert rejected[0].read_bytes() == b"not dicom at all"
    assert "does not parse" in rejected[1].read_text()
    assert env.spool.count() == 0


def test_uncommitted_data_set_never_becomes_a_record_and_large_ones_spill(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(receiver.spool, "SPILL_BYTES", 100_000)
    assoc = new_association_id()
    with env.spool.open_entry(sop_uid="1.2.3", association_id=assoc, calling_ae="A") as writer:
        for piece in (b"head", memoryview(b"x" * 200_000), bytearray(b"tail")):  # crosses SPILL_BYTES
            writer.write(piece)
        assert writer.read_back(4) == b"x" * 200_000 + b"tail"
        entry = writer.commit()
    with env.spool.open_entry(sop_uid="1.2.4", association_id=assoc, calling_ae="A") as writer:
        writer.write(b"half of a data set")
    with pytest.raises(ValueError):
        writer.write(b"more")
    assert [(e, raw) for e, raw in spooled(env.spool)] == [(entry, b"head" + b"x" * 200_000 + b"tail")]
    assert list(env.spool.tmp_dir.iterdir()) == []


def test_concurrent_writers_share_fdatasyncs(env: Env) -> None:
    """Group commit: ten writers at once cost fewer syncs than records, and none is lost."""
    per_thread = 30
    errors: list[BaseException] = []

    def send(k: int) -> None:
        assoc = new_association_id()
        try:
            for i in range(per_thread):
                env.spool.write(f"{k}:{i}".encode() * 100, sop_uid=f"1.2.{k}.{i}", association_id=assoc, calling_ae=f"A{k}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(k,)) for k in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = env.spool.stats
    assert stats.records == 10 * per_thread
    assert stats.syncs < stats.records, stats.line()
    records = spooled(env.spool)
    assert len(records) == 10 * per_thread
    for k in range(10):  # each writer's records in its own order, with its bytes
        mine = [(e.sop_uid, raw) for e, raw in records if e.calling_ae == f"A{k}"]
        assert mine == [(f"1.2.{k}.{i}", f"{k}:{i}".encode() * 100) for i in range(per_thread)]


def test_segments_roll_over_and_ingested_ones_are_reused(env: Env) -> None:
    spool = env.spool
    spool.close()
    spool = _spool(env, segment_size=256 * 1024)
    datasets = make_small_series(40, 128, 128, seed=33)
    assoc = new_association_id()
    for ds in datasets[:20]:
        spool.write(to_p10_bytes(ds), sop_uid=ds.SOPInstanceUID, association_id=assoc, calling_ae="A")
    first = sorted(p.name for p in spool.segments_dir.glob("0*.seg"))
    assert len(first) >= 3  # 20 × ~36 KB in 256 KiB segments
    from receiver.ingest import Ingester

    assert Ingester(spool, env.store, env.repo).drain() == 20
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any((spool.segments_dir / n).exists() for n in first[:-1]):
        time.sleep(0.05)
    assert not any((spool.segments_dir / n).exists() for n in first[:-1])  # all but the live one recycled
    free = {p.stat().st_ino for p in spool.segments_dir.glob("free-*.seg")}
    assert free
    for ds in datasets[20:]:
        spool.write(to_p10_bytes(ds), sop_uid=ds.SOPInstanceUID, association_id=assoc, calling_ae="A")
    in_use = {p.stat().st_ino for p in spool.segments_dir.glob("0*.seg")}
    assert free & in_use  # a recycled file holds new records; its old ones are not read again
    assert [e.sop_uid for e, _ in spooled(spool)] == [ds.SOPInstanceUID for ds in datasets[20:]]
    assert Ingester(spool, env.store, env.repo).drain() == 20
    spool.close()
    assert _recorded(env) == {ds.SOPInstanceUID for ds in datasets}


def _crash_copy(env: Env) -> Path:
    """The spool folder as a kill -9 would leave it (copied while its writer is open)."""
    copy = env.root / "crashed-spool"
    shutil.copytree(env.spool_dir, copy, ignore=shutil.ignore_patterns(".lock"))
    return copy


def _segment_with_records(root: Path) -> Path:
    (path,) = [p for p in (root / "segments").glob("0*.seg") if p.name == segment_name(1)]
    return path


@pytest.mark.parametrize("damage", ["truncate-mid-record", "checksum"])
def test_recovery_keeps_every_complete_record_and_drops_only_the_torn_one(env: Env, damage: str) -> None:
    datasets = make_small_series(6, seed=34)
    assoc = new_association_id()
    entries = [
        env.spool.write(to_p10_bytes(ds), sop_uid=ds.SOPInstanceUID, association_id=assoc, calling_ae="A")
        for ds in datasets
    ]
    crashed = _crash_copy(env)
    env.spool.close()
    segment = _segment_with_records(crashed)
    if damage == "truncate-mid-record":
        torn = entries[-1]  # the tail record: cut in the middle of its data
        assert torn.position is not None
        os.truncate(segment, torn.position.offset + 200 + torn.size // 2)
    else:
        torn = entries[2]  # a record in the middle: one byte of its data flipped
        assert torn.position is not None
        with open(segment, "r+b") as f:
            f.seek(torn.position.offset + 300)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))

    spool = Spool(crashed, min_free_bytes=0, min_free_fraction=0.0, segment_size=TEST_SEGMENT_SIZE)
    found = spool.recover(1)
    assert (found.pending, found.dropped) == (5, 1)
    kept = [ds.SOPInstanceUID for ds in datasets if ds.SOPInstanceUID != torn.sop_uid]
    assert [e.sop_uid for e, _ in spooled(spool)] == kept
    later = make_small_series(2, seed=35)  # the restarted receiver goes on appending
    for ds in later:
        spool.write(to_p10_bytes(ds), sop_uid=ds.SOPInstanceUID, association_id=assoc, calling_ae="A")
    from receiver.ingest import Ingester

    assert Ingester(spool, env.store, env.repo).drain() == 7
    spool.close()
    assert _recorded(env) == set(kept) | {ds.SOPInstanceUID for ds in later}
    for ds in datasets:
        if ds.SOPInstanceUID != torn.sop_uid:
            key = f"instances/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
            assert env.store.get(key) == to_p10_bytes(ds)
    again = Spool(crashed, min_free_bytes=0, min_free_fraction=0.0, segment_size=TEST_SEGMENT_SIZE)
    assert again.recover(1).pending == 0  # all ingested: nothing replays a second time
    again.close()


def test_depth_seen_from_another_process_counts_instances_and_bytes_per_worker_share(env: Env) -> None:
    """What ``dcmflow status`` shows: a Spool object of its own (no lock) reads the head and marks."""
    datasets = make_small_series(10, seed=36)
    assoc = new_association_id()
    raws = [to_p10_bytes(ds) for ds in datasets]
    for ds, raw in zip(datasets, raws, strict=True):
        env.spool.write(raw, sop_uid=ds.SOPInstanceUID, association_id=assoc, calling_ae="A")
    env.spool.close()
    env.spool.recover(2)  # a receiver with two ingest workers
    status_view = _spool(env)
    assert status_view.depth() == (10, sum(len(r) for r in raws))
    from receiver.ingest import Ingester
    from receiver.spool import worker_of

    taken = Ingester(env.spool, env.store, env.repo, worker_index=0, worker_count=2).drain()
    rest = [r for ds, r in zip(datasets, raws, strict=True) if worker_of(ds.SOPInstanceUID, 2) == 1]
    assert 0 < taken < 10 and taken + len(rest) == 10
    assert status_view.depth() == (len(rest), sum(len(r) for r in rest))
    assert env.spool.has_files_of(assoc)  # worker 1 still holds some
    Ingester(env.spool, env.store, env.repo, worker_index=1, worker_count=2).drain()
    assert status_view.depth() == (0, 0)
    assert not env.spool.has_files_of(assoc)


def test_large_data_sets_stream_into_slots_and_a_void_slot_is_skipped(env: Env) -> None:
    """After a large data set, the association's next ones are written into the log while they
    arrive; one that outgrows its slot, or is dropped half-way, never becomes a record there."""
    assoc = new_association_id()
    size = receiver.spool.SLOT_FROM + 1000
    first = env.spool.write(b"a" * size, sop_uid="1.2.1", association_id=assoc, calling_ae="CT")
    with env.spool.open_entry(sop_uid="1.2.2", association_id=assoc, calling_ae="CT") as writer:
        assert writer.streaming
        for _ in range(size // 1000):
            writer.write(b"b" * 1000)
        assert writer.read_back(size // 1000 * 1000 - 2000) == b"b" * 2000
        second = writer.commit()
    with env.spool.open_entry(sop_uid="1.2.3", association_id=assoc, calling_ae="CT") as writer:
        assert writer.streaming
        writer.write(b"c" * size)
        writer.write(b"c" * size)  # outgrows the slot: continues in memory
        assert not writer.streaming
        third = writer.commit()
    with env.spool.open_entry(sop_uid="1.2.4", association_id=assoc, calling_ae="CT") as writer:
        assert writer.streaming
        writer.write(b"d" * 5000)  # the association ends here
    last = env.spool.write(b"e", sop_uid="1.2.5", association_id=assoc, calling_ae="CT")
    records = spooled(env.spool)
    assert [(e, raw) for e, raw in records] == [
        (first, b"a" * size),
        (second, b"b" * (size // 1000 * 1000)),
        (third, b"c" * 2 * size),
        (last, b"e"),
    ]
    assert env.spool.depth() == (4, size + size // 1000 * 1000 + 2 * size + 1)


def test_a_crash_while_a_slot_fills_keeps_the_records_acknowledged_after_it(env: Env) -> None:
    """Another association's record, acknowledged while a large data set still streams into
    its slot, survives a kill -9; the unfinished slot is dropped."""
    slow, fast = new_association_id(), new_association_id()
    size = receiver.spool.SLOT_FROM + 1000
    env.spool.write(b"a" * size, sop_uid="1.2.1", association_id=slow, calling_ae="SLOW")
    writer = env.spool.open_entry(sop_uid="1.2.2", association_id=slow, calling_ae="SLOW")
    assert writer.streaming
    writer.write(b"b" * (size // 2))
    acked = env.spool.write(b"f" * 3000, sop_uid="1.3.1", association_id=fast, calling_ae="FAST")
    crashed = _crash_copy(env)  # the SLOW data set never completed
    writer.discard()
    spool = Spool(crashed, min_free_bytes=0, min_free_fraction=0.0, segment_size=TEST_SEGMENT_SIZE)
    found = spool.recover(1)
    assert (found.pending, found.dropped) == (2, 1)
    assert [(e.sop_uid, raw) for e, raw in spooled(spool)] == [("1.2.1", b"a" * size), ("1.3.1", b"f" * 3000)]
    assert spooled(spool)[1][0] == acked
    spool.close()
