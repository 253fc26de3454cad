"""The spool on its own: names, recovery, lock, watermark, replay of already-ingested files."""

from __future__ import annotations

import time

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

from receiver import status
from receiver.associations import AssociationTracker, CallerPolicy
from receiver.errors import SpoolFullError, SpoolLockedError
from receiver.scp import ScpConfig, start_scp
from receiver.spool import Spool, SpoolEntry, new_association_id
from tests.factories import make_small_series, to_p10_bytes
from tests.receiver.conftest import AE_TITLE, Env, free_port


def test_entry_name_round_trips_and_sorts_in_arrival_order(env: Env) -> None:
    assoc = new_association_id()
    a = env.spool.write(b"x", sop_uid="1.2.3", association_id=assoc, calling_ae="CT 1/\\x")
    b = env.spool.write(b"y", sop_uid="1.2.4", association_id=assoc, calling_ae="")
    pending = env.spool.pending()
    assert [e.sop_uid for e in pending] == ["1.2.3", "1.2.4"]
    assert env.spool.pending(skip={a.path.name}) == pending[1:]  # what ingest already holds
    assert env.spool.pending(1, skip={a.path.name}) == pending[1:]
    assert pending[0] == SpoolEntry.parse(a.path)
    assert pending[0].calling_ae == "CT 1/\\x"
    assert pending[0].association_id == assoc
    assert "/" not in a.path.name and "\\" not in a.path.name
    assert b.path.read_bytes() == b"y"
    assert env.spool.has_files_of(assoc)
    env.spool.remove(pending)
    assert not env.spool.has_files_of(assoc)


def test_write_refuses_paths_and_bad_ids(env: Env) -> None:
    for uid in ("../../etc/passwd", "1.2.abc", "", "1." * 40):
        with pytest.raises(ValueError):
            env.spool.write(b"x", sop_uid=uid, association_id=new_association_id(), calling_ae="A")
    with pytest.raises(ValueError):
        env.spool.write(b"x", sop_uid="1.2", association_id="../x", calling_ae="A")
    assert env.spool.count() == 0


def test_recover_deletes_unacknowledged_temp_files_keeps_ready(env: Env) -> None:
    env.spool.write(b"acked", sop_uid="1.2.3", association_id=new_association_id(), calling_ae="A")
    (env.spool.tmp_dir / "whatever.dcm.part").write_bytes(b"half")
    assert env.spool.recover() == (1, 1)
    assert not list(env.spool.tmp_dir.iterdir())
    assert env.spool.count() == 1


def test_one_receiver_per_spool(env: Env) -> None:
    env.spool.lock()
    other = Spool(env.spool_dir)
    # flock locks belong to the open file description, so a second open in the same
    # process conflicts just as another process would.
    with pytest.raises(SpoolLockedError):
        other.lock()
    env.spool.unlock()
    other.lock()
    other.unlock()


def test_watermark_answers_out_of_resources_then_recovers(env: Env) -> None:
    full = Spool(env.spool_dir, min_free_bytes=1 << 62)  # more than any disk has
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
    assert env.spool.count() == 1


def test_replay_of_ingested_but_undeleted_files_is_a_noop(env: Env) -> None:
    ds_list = make_small_series(3, seed=32)
    assoc = new_association_id()
    for ds in ds_list:
        env.spool.write(to_p10_bytes(ds), sop_uid=ds.SOPInstanceUID, association_id=assoc, calling_ae="A")
    kept = [e.path.read_bytes() for e in env.spool.pending()]
    assert env.ingester().drain() == 3
    # Crash after recording, before deleting: the files come back on restart.
    for ds, raw in zip(ds_list, kept, strict=True):
        env.spool.write(raw, sop_uid=ds.SOPInstanceUID, association_id=assoc, calling_ae="A")
    ing = env.ingester()
    assert ing.drain() == 3
    assert [r.duplicate for r in ing.reports] == [3]
    assert env.instance_count() == 3


def test_unparseable_spool_file_is_rejected_not_lost(env: Env) -> None:
    env.spool.write(b"not dicom at all", sop_uid="1.2.9", association_id=new_association_id(), calling_ae="A")
    (env.spool.ready_dir / "stray.dcm").write_bytes(b"?")
    assert env.ingester().drain() == 0
    names = sorted(p.name for p in env.spool.rejected_dir.iterdir())
    assert len([n for n in names if n.endswith(".dcm")]) == 2
    assert len([n for n in names if n.endswith(".reason")]) == 2
    assert env.spool.count() == 0


def test_writer_commits_durably_and_discards_what_was_never_acknowledged(env: Env) -> None:
    assoc = new_association_id()
    with env.spool.open_entry(sop_uid="1.2.3", association_id=assoc, calling_ae="A") as writer:
        for piece in (b"head", memoryview(b"x" * 200_000), bytearray(b"tail")):  # crosses WRITEBACK_CHUNK
            writer.write(piece)
        assert writer.read_back(4) == b"x" * 200_000 + b"tail"
        entry = writer.commit()
    assert entry.path.read_bytes() == b"head" + b"x" * 200_000 + b"tail"
    assert [e.sop_uid for e in env.spool.pending()] == ["1.2.3"]
    with env.spool.open_entry(sop_uid="1.2.4", association_id=assoc, calling_ae="A") as writer:
        writer.write(b"half of a data set")
    assert list(env.spool.tmp_dir.iterdir()) == []  # left without commit: dropped
    assert [e.sop_uid for e in env.spool.pending()] == ["1.2.3"]
    with pytest.raises(ValueError):
        writer.write(b"more")


def test_a_receiving_spool_writes_into_blank_files_made_ahead_and_leaves_none_behind(env: Env) -> None:
    """After lock + recover, instances go into files a background thread created beforehand
    (creating a file waits for the journal); discarded and unused ones are deleted, and a
    crash's leftovers are swept by the next recover."""
    env.spool.lock()
    env.spool.recover()
    deadline = time.monotonic() + 10
    while len(list(env.spool.tmp_dir.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    made_ahead = {p.stat().st_ino for p in env.spool.tmp_dir.iterdir()}
    assert len(made_ahead) >= 2
    assoc = new_association_id()
    entries = [
        env.spool.write(f"data set {i}".encode(), sop_uid=f"1.2.{i}", association_id=assoc, calling_ae="A")
        for i in range(20)
    ]
    assert [e.path.read_bytes() for e in entries] == [f"data set {i}".encode() for i in range(20)]
    assert {e.path.stat().st_ino for e in entries} & made_ahead  # a blank file became an instance
    with env.spool.open_entry(sop_uid="1.2.99", association_id=assoc, calling_ae="A") as writer:
        writer.write(b"never acknowledged")
    assert not any(p.read_bytes() for p in env.spool.tmp_dir.iterdir())  # only blank files
    env.spool.unlock()
    assert list(env.spool.tmp_dir.iterdir()) == []
    assert [e.sop_uid for e in env.spool.pending()] == [f"1.2.{i}" for i in range(20)]

    (env.spool.tmp_dir / "blank-1-dead.part").write_bytes(b"")  # left by a killed receiver
    env.spool.lock()
    assert env.spool.recover() == (1, 20)
    env.spool.unlock()
