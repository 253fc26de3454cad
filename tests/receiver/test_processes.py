"""Several receiving processes behind one port (SO_REUSEPORT), each with its own spool."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

from receiver import status
from receiver.processes import ReceivingProcesses
from receiver.runner import Receiver, ReceiverConfig
from receiver.scp import ScpConfig
from receiver.spool import Spool
from receiver.spool_log import Position
from receiver.spools import spool_root, total_depth
from tests.factories import make_small_series
from tests.receiver.conftest import AE_TITLE, TEST_SEGMENT_SIZE, Env, store_acknowledged


@pytest.fixture
def receiver(env: Env) -> Iterator[Receiver]:
    config = ReceiverConfig(
        scp=ScpConfig(ae_title=AE_TITLE, host="127.0.0.1", port=0),
        spool_dir=env.spool_dir,
        min_free_bytes=0,
        min_free_fraction=0.0,
        segment_size=TEST_SEGMENT_SIZE,
        processes=2,
        stable_age=60,
        completeness=False,
    )
    running = Receiver(config, env.factory(), env.repo)
    running.start()
    try:
        yield running
    finally:
        running.stop()


def _send(port: int, datasets: list[Dataset], acknowledged: list[str], pause: float = 0.0) -> None:
    """One association; every Success is appended to ``acknowledged`` (stops when it breaks)."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
    if not assoc.is_established:
        return
    for ds in datasets:
        ok = store_acknowledged(assoc, ds)
        if ok is None:
            break
        if ok:
            acknowledged.append(ds.SOPInstanceUID)
        time.sleep(pause)
    if assoc.is_established:
        assoc.release()


def _send_concurrently(port: int, batches: list[list[Dataset]], pause: float = 0.0) -> list[str]:
    acknowledged: list[str] = []
    threads = [threading.Thread(target=_send, args=(port, batch, acknowledged, pause)) for batch in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return acknowledged


def _recorded(env: Env, datasets: list[Dataset]) -> list[str]:
    return [i.sop_uid for s in {d.SeriesInstanceUID for d in datasets} for i in env.repo.list_instances(s)]


def _wait_recorded(env: Env, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and env.instance_count() < count:
        time.sleep(0.1)


def test_two_processes_share_the_port_and_both_spools_are_ingested(env: Env, receiver: Receiver) -> None:
    datasets = make_small_series(120, seed=91)
    batches = [datasets[i::12] for i in range(12)]  # 12 associations: all on one process has odds 2/4096
    acknowledged = _send_concurrently(receiver.port, batches)
    assert sorted(acknowledged) == sorted(d.SOPInstanceUID for d in datasets)
    _wait_recorded(env, len(datasets))
    recorded = _recorded(env, datasets)
    assert sorted(recorded) == sorted(acknowledged)  # every instance recorded once
    for index in (0, 1):  # both processes wrote records into their own spool
        assert Spool(spool_root(env.spool_dir, index)).read_head() > Position(1, 0)
    assert total_depth(env.spool_dir) == (0, 0)


def test_kill_9_of_one_receiving_process_loses_nothing_acknowledged(env: Env, receiver: Receiver) -> None:
    processes = receiver.processes
    assert isinstance(processes, ReceivingProcesses)
    victim = processes.pids[0]
    datasets = make_small_series(240, seed=92)
    batches = [datasets[i::8] for i in range(8)]
    killer = threading.Timer(0.3, os.kill, (victim, signal.SIGKILL))  # while C-STOREs are in flight
    killer.start()
    acknowledged = _send_concurrently(receiver.port, batches, pause=0.03)
    killer.join()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and processes.restarts < 1:
        time.sleep(0.1)
    assert processes.restarts == 1 and processes.pids[0] != victim
    assert receiver.failure is None
    # The restarted process receives again: everything sent afterwards lands too.
    more = make_small_series(40, seed=93)
    acknowledged += _send_concurrently(receiver.port, [more[i::4] for i in range(4)])
    _wait_recorded(env, len(set(acknowledged)))
    recorded = set(_recorded(env, datasets + more))
    missing = set(acknowledged) - recorded
    assert not missing, f"{len(missing)} acknowledged instances lost"
    assert set(d.SOPInstanceUID for d in more) <= recorded


def test_a_receiving_process_that_keeps_dying_stops_the_receiver_loudly(
    env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import receiver.processes as processes_module
    from receiver.processes import ReceivingSpec
    from receiver.reuseport import reserve_port

    monkeypatch.setattr(processes_module, "MAX_RESTARTS", 0)  # the first death is one too many
    reservation = reserve_port("127.0.0.1", 0)
    spec = ReceivingSpec(
        index=0,
        spool_dir=env.spool_dir,
        scp=ScpConfig(ae_title=AE_TITLE, host="127.0.0.1", port=reservation.getsockname()[1], reuse_port=True),
        min_free_bytes=0,
        min_free_fraction=0.0,
        segment_size=TEST_SEGMENT_SIZE,
        ingest_workers=1,
        accept_any=False,
        trusted_networks=("127.0.0.0/8",),
        storage=None,
    )
    failures: list[str] = []
    running = ReceivingProcesses([spec], lambda root: None, failures.append)
    try:
        running.start()
        os.kill(running.pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not failures:
            time.sleep(0.05)
        assert failures == ["receiving process 0 died 1 times within 60 s"]
        assert running.failure == failures[0] and not running.alive()
        assert "stopping the receiver" in caplog.text
    finally:
        running.stop()
        reservation.close()


def test_a_receiving_process_still_refuses_invalid_uids(env: Env, receiver: Receiver) -> None:
    # Receiving processes turn pydicom's (warning-only) UID validation off; the SCP's own checks
    # of the data set's UIDs must answer as before.
    good, bad = make_small_series(2, seed=93)
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):  # pydicom, in this process
        bad.StudyInstanceUID = "1.2.abc"
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title=AE_TITLE)
    assert assoc.is_established
    assert assoc.send_c_store(bad).Status == status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    assert assoc.send_c_store(good).Status == status.SUCCESS
    assoc.release()
    _wait_recorded(env, 1)
    assert _recorded(env, [good]) == [good.SOPInstanceUID]
