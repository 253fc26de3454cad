"""Nothing acknowledged is lost: SIGKILL of the receiver mid-study, object-store outages."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage, Verification  # type: ignore[attr-defined]

from receiver import status
from receiver.associations import AssociationTracker, CallerPolicy
from receiver.ingest import IngestOptions, Ingester
from receiver.scp import ScpConfig, start_scp
from storage.keys import instance_key
from storage.s3 import S3ObjectStore
from tests.factories import make_small_series
from tests.receiver.conftest import AE_TITLE, Env, free_port, store_acknowledged

REPO_ROOT = Path(__file__).resolve().parents[2]


def _wait_for_echo(port: int, timeout: float = 30.0) -> None:
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
        if assoc.is_established:
            assoc.release()
            return
        time.sleep(0.2)
    raise AssertionError(f"receiver on port {port} did not answer C-ECHO within {timeout} s")


class ReceiverProcess:
    """``python -m dcmflow.cli.receive`` in its own process group (so SIGKILL hits the workers too)."""

    def __init__(self, home: Path, port: int, workers: int = 2, extra_env: dict[str, str] | None = None) -> None:
        self.log = home / f"receiver-{time.monotonic_ns()}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DCMFLOW_", "PREFECT_"))}
        env |= {"DCMFLOW_HOME": str(home), "PYTHONPATH": str(REPO_ROOT), "PREFECT_HOME": str(home / "prefect")}
        env |= extra_env or {}
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dcmflow.cli.receive", "--port", str(port), "--ingest-workers", str(workers)],
                cwd=REPO_ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.port = port
        _wait_for_echo(port)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def test_sigkill_mid_study_then_restart_loses_nothing_acknowledged(env: Env) -> None:
    home = env.root
    port = free_port()
    datasets = make_small_series(400, seed=41)
    acknowledged: list[str] = []
    receiver = ReceiverProcess(home, port)
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(MRImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
        assert assoc.is_established
        killer = threading.Timer(0.0, lambda: None)
        for i, ds in enumerate(datasets):
            if i == 150:
                killer = threading.Timer(0.05, receiver.kill)  # SIGKILL while C-STOREs are in flight
                killer.start()
            ok = store_acknowledged(assoc, ds)
            if ok is None:
                break
            if ok:
                acknowledged.append(ds.SOPInstanceUID)
        killer.join()
        assoc.abort()
    finally:
        if receiver.proc.poll() is None:
            receiver.kill()
    assert 150 <= len(acknowledged) < len(datasets), "the kill should land mid-study"

    restarted = ReceiverProcess(home, port)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and env.instance_count() < len(acknowledged):
            time.sleep(0.2)
        recorded = {i.sop_uid for s in {d.SeriesInstanceUID for d in datasets} for i in env.repo.list_instances(s)}
        missing = set(acknowledged) - recorded
        assert not missing, f"{len(missing)} acknowledged instances lost\n{restarted.output()}"
        for ds in datasets:
            if ds.SOPInstanceUID in acknowledged:
                key = instance_key(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
                assert env.store.exists(key)
    finally:
        code = restarted.terminate()
    assert code == 0, restarted.output()
    assert "stopping" in restarted.output()
    assert not list((home / "spool" / "tmp").iterdir())


@pytest.fixture
def moto_port() -> Iterator[int]:
    yield free_port()


def _moto(port: int):  # type: ignore[no-untyped-def]
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


@pytest.mark.s3
def test_s3_outage_during_receipt_loses_nothing_and_delivers_after_recovery(env: Env, moto_port: int) -> None:
    bucket = "dcmflow-outage"
    server = _moto(moto_port)
    store = S3ObjectStore(
        f"127.0.0.1:{moto_port}", bucket, access_key="testing", secret_key="testing", connect_timeout=0.5, retries=0
    )
    store.ensure_bucket()
    first, second = make_small_series(20, seed=51), make_small_series(30, seed=52)

    stop = threading.Event()
    ingester = Ingester(
        env.spool, store, env.repo, options=IngestOptions(batch_size=10, backoff_max=0.5), should_stop=stop.is_set
    )
    worker = threading.Thread(target=ingester.run)
    worker.start()
    port = free_port()
    scp = start_scp(ScpConfig(ae_title=AE_TITLE, host="127.0.0.1", port=port), env.spool, AssociationTracker(), CallerPolicy())
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(MRImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
        for ds in first:
            assert assoc.send_c_store(ds).Status == status.SUCCESS
        deadline = time.monotonic() + 20
        while env.instance_count() < len(first) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert env.instance_count() == len(first)

        server.stop()  # the object store goes away while the modality keeps sending
        for ds in second:
            assert assoc.send_c_store(ds).Status == status.SUCCESS  # still acknowledged
        assoc.release()
        time.sleep(1.0)
        assert env.instance_count() == len(first)
        assert env.spool.count() == len(second)  # kept, not lost

        server = _moto(moto_port)  # back on the same port (moto starts empty: recreate the bucket)
        store.ensure_bucket()
        deadline = time.monotonic() + 30
        while env.instance_count() < len(first) + len(second) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(30)
        scp.shutdown()
        server.stop()
    assert env.instance_count() == len(first) + len(second)
    assert env.spool.count() == 0
    assert ingester._outage is None


def test_local_store_outage_keeps_files_and_delivers_after_recovery(env: Env) -> None:
    datasets = make_small_series(12, seed=61)
    port = free_port()
    scp = start_scp(ScpConfig(ae_title=AE_TITLE, host="127.0.0.1", port=port), env.spool, AssociationTracker(), CallerPolicy())
    # The store's folder is replaced by a plain file: every write fails with an OSError
    # (works as root, unlike chmod).
    moved = env.objects_dir.with_name("objects.away")
    env.objects_dir.rename(moved)
    env.objects_dir.write_bytes(b"")
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(MRImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == status.SUCCESS
        assoc.release()
    finally:
        scp.shutdown()
    attempts = {"n": 0}

    def stop_after_a_few_tries() -> bool:
        attempts["n"] += 1
        return attempts["n"] > 3

    ing = env.ingester(options=IngestOptions(backoff_max=0.05), should_stop=stop_after_a_few_tries)
    ing.run()
    assert env.instance_count() == 0
    assert env.spool.count() == len(datasets)
    env.objects_dir.unlink()
    moved.rename(env.objects_dir)
    assert env.ingester().drain() == len(datasets)
    assert env.spool.count() == 0
    assert env.instance_count() == len(datasets)


def _storage_that_never_opens(called: str) -> tuple[object, object]:
    """A storage factory for ingest processes whose store is down: they wait and retry.

    Each call leaves a file named by the worker's pid in ``called``, so the test knows the
    workers got that far (spawned workers take seconds to import on a busy machine).
    """
    (Path(called) / str(os.getpid())).touch()
    raise ConnectionError("object store unreachable (test)")


def test_stopping_ingest_after_one_worker_was_killed_while_waiting_does_not_hang(env: Env, tmp_path: Path) -> None:
    import functools

    from receiver.ingest import start_ingest_processes

    pool = start_ingest_processes(
        functools.partial(_storage_that_never_opens, str(tmp_path)),  # type: ignore[arg-type]
        env.spool_dir,
        count=2,
        options=IngestOptions(backoff_max=0.5),
    )
    victim, survivor = pool.processes
    deadline = time.monotonic() + 60
    while {str(victim.pid), str(survivor.pid)} - {f.name for f in tmp_path.iterdir()}:
        assert time.monotonic() < deadline, "the ingest workers never tried to open storage"
        time.sleep(0.05)
    time.sleep(0.3)  # both are in their retry wait ("cannot open storage yet")
    assert victim.pid is not None and pool.alive()
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(5)
    t = time.monotonic()
    pool.stop(timeout=10)
    assert time.monotonic() - t < 5
    assert victim.exitcode == -signal.SIGKILL
    assert survivor.exitcode == 0  # it stopped when asked; it was not terminated
