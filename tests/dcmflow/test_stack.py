"""dcmflow/stack.py parts that need no whole stack: resuming runs against a real Prefect server,
the busy-port error of `dcmflow up`, and the orphan sweep."""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from dcmflow.stack import UP_HOME_MARK, _marked_processes, resume_runs, stop_orphans
from deployments.loader import runner_deployments
from receiver.completeness import CompletenessMonitor, MonitorOptions
from receiver.events import RecordingEmitter
from storage.repository import Repository
from tests.receiver.test_completeness import record

NOW = dt.datetime.now(dt.UTC)
STUDY = "1.2.826.0.1.3680043.8.498.77.1"


@pytest.fixture(scope="module")
def deployed(prefect_server) -> str:  # type: ignore[no-untyped-def]
    """The declared deployments registered (not served) on the session's server."""
    from tests.flows.conftest import prefect_client_env

    with prefect_client_env(prefect_server):
        for deployment in runner_deployments():
            deployment.apply()
    return str(prefect_server.api_url)


def _runs(api: str, series_uid: str) -> list[dict]:  # type: ignore[type-arg]
    body = {"deployments": {"name": {"any_": ["process-series"]}}, "limit": 200}
    return [r for r in httpx.post(f"{api}/flow_runs/filter", json=body, timeout=10).json() if r["parameters"].get("series_uid") == series_uid]


def _emitted(repo: Repository, series: str, at: dt.datetime) -> None:
    """A series received, stable and its event marked sent, as a receiver leaves it."""
    record(repo, STUDY, series, 2, at)
    CompletenessMonitor(repo, RecordingEmitter(), MonitorOptions(stable_age=1), claimer="t").tick(at + dt.timedelta(seconds=5))
    assert repo.get_series(series).emitted_revision == 1  # type: ignore[union-attr]


def test_an_emitted_revision_that_no_run_claimed_gets_its_run(repo: Repository, deployed: str) -> None:
    series = f"{STUDY}.{time.time_ns() % 10**9}"
    _emitted(repo, series, NOW - dt.timedelta(minutes=5))
    assert repo.list_unclaimed_emitted("series", stable_after=NOW - dt.timedelta(days=1), stable_before=NOW) == [(series, 1)]
    started = resume_runs(deployed, repo, own_server=True)
    (run,) = _runs(deployed, series)
    assert run["id"] in started
    assert run["parameters"] == {"series_uid": series, "revision": 1, "trigger": "recovery"}
    resume_runs(deployed, repo, own_server=True)  # the server knows that run now: no second one
    assert len(_runs(deployed, series)) == 1
    repo.claim_session("series", series, 1, study_uid=STUDY)
    assert repo.list_unclaimed_emitted("series", stable_after=NOW - dt.timedelta(days=1), stable_before=NOW) == []


def test_older_than_a_day_is_left_alone(repo: Repository) -> None:
    series = f"{STUDY}.{time.time_ns() % 10**9}"
    _emitted(repo, series, NOW - dt.timedelta(days=2))
    assert repo.list_unclaimed_emitted("series", stable_after=NOW - dt.timedelta(days=1), stable_before=NOW) == []


def _running_flow_run(api: str) -> str:
    deployment = httpx.get(f"{api}/deployments/name/process-series/process-series", timeout=10).json()
    run = httpx.post(f"{api}/deployments/{deployment['id']}/create_flow_run", json={"parameters": {"series_uid": "1.2.3"}}, timeout=10).json()
    httpx.post(f"{api}/flow_runs/{run['id']}/set_state", json={"state": {"type": "RUNNING"}, "force": True}, timeout=10).raise_for_status()
    return str(run["id"])


def test_an_interrupted_claimed_run_is_crashed_and_started_again(repo: Repository, deployed: str) -> None:
    series = f"{STUDY}.{time.time_ns() % 10**9}"
    record(repo, STUDY, series, 2, NOW)
    dead_run = _running_flow_run(deployed)
    claim = repo.claim_session("series", series, 1, study_uid=STUDY, trigger="dicom.series.stable", flow_run_id=dead_run)
    # an external server: the run may be alive on another machine, so it is left alone
    assert resume_runs(deployed, repo, own_server=False) == []
    assert repo.get_session(claim.session.id).state == "running"  # type: ignore[union-attr]
    # our own server restarted with us: nobody runs it any more
    (new_run,) = resume_runs(deployed, repo, own_server=True)
    assert repo.get_session(claim.session.id).state == "crashed"  # type: ignore[union-attr]
    old = httpx.get(f"{deployed}/flow_runs/{dead_run}", timeout=10).json()
    assert old["state"]["type"] == "CRASHED" and "interrupted" in old["state"]["message"]
    new = httpx.get(f"{deployed}/flow_runs/{new_run}", timeout=10).json()
    assert new["parameters"] == {"series_uid": series, "revision": 1, "trigger": "recovery"}
    assert repo.claim_session("series", series, 1, study_uid=STUDY).claimed  # the revision is free again


def test_up_on_a_busy_port_is_one_line_and_starts_nothing(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("DCMFLOW_", "PREFECT_API_URL"))},
               "DCMFLOW_HOME": str(tmp_path / "home")}
        done = subprocess.run(
            [sys.executable, "-c", "from dcmflow.cli import main; main()", "up", "--prefect-port", str(port)],
            env=env, capture_output=True, text=True, timeout=60,
        )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"Error: Prefect port 127.0.0.1:{port} is in use: set DCMFLOW_PREFECT_PORT, or PREFECT_API_URL to use the Prefect server that runs there"
    ]
    assert not (tmp_path / "home" / "prefect" / "prefect.db").exists()


def test_the_sweep_stops_only_processes_marked_with_this_home(tmp_path: Path) -> None:
    mine, other = tmp_path / "mine", tmp_path / "other"
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    left = subprocess.Popen(sleeper, env={**os.environ, UP_HOME_MARK: str(mine)}, start_new_session=True)
    kept = subprocess.Popen(sleeper, env={**os.environ, UP_HOME_MARK: str(other)}, start_new_session=True)
    try:
        assert left.pid in set(_marked_processes(mine))
        assert stop_orphans(mine) == [left.pid]
        assert left.wait(timeout=15) is not None
        assert kept.poll() is None
    finally:
        for proc in (left, kept):
            proc.kill()
            proc.wait()


def test_up_with_prefect_api_url_uses_that_server_and_leaves_it_running(prefect_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from dcmflow.stack_state import read_state
    from tests.receiver.conftest import free_port

    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DCMFLOW_", "PREFECT_"))}
    env.update(prefect_server.env(), DCMFLOW_HOME=str(home), DO_NOT_TRACK="1")
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(
        [sys.executable, "-c", "from dcmflow.cli import main; main()", "up", "--port", str(free_port())],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while (state := read_state(home)) is None:
            assert up.poll() is None and time.monotonic() < deadline, (tmp_path / "up.log").read_text()[-3000:]
            time.sleep(0.5)
        assert state.api_url == prefect_server.api_url and state.server_pid is None
        assert "(PREFECT_API_URL)" in (tmp_path / "up.log").read_text()
        served = httpx.get(f"{prefect_server.api_url}/deployments/name/process-series/process-series", timeout=10)
        assert served.status_code == 200
        status = subprocess.run(
            [sys.executable, "-c", "from dcmflow.cli import main; main()", "status", "--json"],
            env=env, capture_output=True, text=True, timeout=60,
        )
        assert status.returncode == 0 and '"prefect_healthy": true' in status.stdout
    finally:
        up.terminate()
        up.wait(timeout=60)
    assert up.returncode == 0
    assert httpx.get(f"{prefect_server.api_url}/health", timeout=10).status_code == 200  # not ours to stop
    assert read_state(home) is None
