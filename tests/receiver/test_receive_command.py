"""`dcmflow receive` as a process: clean errors, association facts for the completeness monitor."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

from receiver import status
from receiver.associations import AssociationTracker, CallerPolicy, RepositoryFacts
from receiver.scp import ScpConfig, start_scp
from tests.factories import make_small_series
from tests.receiver.conftest import AE_TITLE, Env, free_port
from tests.receiver.test_resilience import REPO_ROOT, ReceiverProcess


def _run_receive(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCMFLOW_")}
    env |= {"DCMFLOW_HOME": str(home), "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "dcmflow.cli.receive", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_port_in_use_is_one_line_and_exit_1(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        result = _run_receive(tmp_path, "--port", str(busy.getsockname()[1]))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "Address already in use" in result.stderr


def test_second_receiver_on_the_same_spool_is_refused(env: Env) -> None:
    first = ReceiverProcess(env.root, free_port(), workers=1)
    try:
        result = _run_receive(env.root, "--port", str(free_port()))
        assert result.returncode == 1
        assert "in use by another receiver" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        assert first.terminate() == 0


def _associations(env: Env) -> list[tuple[str, str]]:
    with env.repo.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text("select id, calling_ae from association"))]  # type: ignore[misc]


def _series_of(env: Env) -> set[str]:
    with env.repo.engine.connect() as conn:
        return {r[0] for r in conn.execute(sa.text("select series_uid from association_series"))}


def _wait(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_association_facts_close_only_after_ingest(env: Env) -> None:
    facts = RepositoryFacts(env.repo, pending_files=env.spool.has_files_of, poll_seconds=0.05)
    tracker = AssociationTracker(facts)
    port = free_port()
    server = start_scp(ScpConfig(ae_title=AE_TITLE, host="127.0.0.1", port=port), env.spool, tracker, CallerPolicy())
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(MRImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
        datasets = make_small_series(5, seed=81)
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == status.SUCCESS
        assert _wait(lambda: len(_associations(env)) == 1)
        assert _associations(env)[0][1] == "MODALITY"
        assert _wait(lambda: _series_of(env) == {datasets[0].SeriesInstanceUID})
        assoc.release()
        time.sleep(0.5)
        # Released, but its instances still wait in the spool: the association stays "open"
        # for the completeness monitor.
        assert len(_associations(env)) == 1
        assert env.ingester().drain() == 5
        assert _wait(lambda: _associations(env) == [])
    finally:
        server.shutdown()
        facts.close()


def test_sigint_stops_cleanly(env: Env) -> None:
    import signal

    receiver = ReceiverProcess(env.root, free_port(), workers=1)
    receiver.proc.send_signal(signal.SIGINT)
    assert receiver.proc.wait(30) == 0, receiver.output()
    assert "stopping" in receiver.output()


def test_without_prefect_the_log_says_events_are_disabled(env: Env) -> None:
    receiver = ReceiverProcess(env.root, free_port(), workers=1)
    try:
        assert _wait(lambda: "events: " in receiver.output(), timeout=30), receiver.output()
        assert "events are off: no PREFECT_API_URL" in receiver.output()
    finally:
        assert receiver.terminate() == 0, receiver.output()
