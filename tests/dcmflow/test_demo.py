"""``dcmflow demo``: its synthetic study, its one-line errors, and its send against a real receiver.

The whole path needs ``dcmflow up`` (a Prefect server serving the deployments); the end-to-end
test of ``up`` + ``demo`` covers it. Here the receiver is a real ``dcmflow receive`` process
with no Prefect: the demo sends, sees the instances recorded and both series stable, then
times out waiting for the study, which only the events of ``up`` move on; or the test plays
the part of ``up``'s events and flows, writing through the repository the records they write.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
import typer
from typer.testing import CliRunner, Result

from dcmflow.cli import demo
from dcmflow.cli.services import app as services_app
from dcmflow.settings import Settings
from dcmflow.stack_state import StackState, write_state
from dcmflow.synthetic import DEMO_SERIES, make_ct_study, to_p10_bytes
from dcmflow.wiring import describe_database, repository_from
from storage.models import JobBase
from storage.repository import Repository
from tests.receiver.conftest import free_port
from tests.receiver.test_resilience import ReceiverProcess


def _app() -> typer.Typer:
    """The demo command in a group of its own, invoked as ``demo ...`` like the real CLI."""
    app = typer.Typer(pretty_exceptions_enable=False)

    @app.callback()
    def _root() -> None:
        """Test app."""

    app.command(name="demo")(demo.demo)
    return app


runner = CliRunner()


def _invoke(*args: str) -> Result:
    return runner.invoke(_app(), ["demo", *args])


def _one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


def _write_state(home: Path, port: int, pid: int) -> None:
    settings = Settings(home=home)
    write_state(home, StackState(
        pid=pid, api_url="http://127.0.0.1:9/api", ui_url="http://127.0.0.1:9", ae_title="DCMFLOW",
        dicom_host="0.0.0.0", dicom_port=port, home=str(home.resolve()), database=describe_database(settings),
        objects=str(settings.objects_dir), started_at=dt.datetime.now(dt.timezone.utc),
    ))


def test_study_is_two_ct_series_that_pydicom_reads_back() -> None:
    study = make_ct_study(n=6, rows=64, cols=64)
    assert [len(s) for s in study] == [6, 6]
    read = [[pydicom.dcmread(io.BytesIO(to_p10_bytes(ds))) for ds in slices] for slices in study]
    flat = [ds for slices in read for ds in slices]
    assert {ds.StudyInstanceUID for ds in flat} == {study[0][0].StudyInstanceUID}
    assert len({ds.SeriesInstanceUID for ds in flat}) == 2
    assert len({ds.SOPInstanceUID for ds in flat}) == 12
    assert [(s[0].SeriesDescription, s[0].SeriesNumber) for s in read] == list(DEMO_SERIES)
    for ds in flat:
        assert ds.Modality == "CT" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        assert ds.NumberOfSeriesRelatedInstances == 6  # (0020,1209): lets the receiver close it early
        assert str(ds.PatientName) == "DEMO^CT" and ds.StudyDescription == "dcmflow demo" and ds.AccessionNumber
        assert (ds.Rows, ds.Columns) == (64, 64) and len(ds.PixelData) == 64 * 64 * 2
        if _has_numpy():
            assert ds.pixel_array.shape == (64, 64)
    assert [ds.InstanceNumber for ds in read[0]] == list(range(1, 7))


def _has_numpy() -> bool:
    try:
        import numpy  # noqa: F401
    except ImportError:
        return False
    return True


def test_every_study_is_new() -> None:
    first, second = make_ct_study(n=1, rows=16, cols=16), make_ct_study(n=1, rows=16, cols=16)
    assert first[0][0].StudyInstanceUID != second[0][0].StudyInstanceUID
    assert first[0][0].SeriesInstanceUID != second[0][0].SeriesInstanceUID


def test_without_a_running_stack_it_says_to_start_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCMFLOW_HOME", str(tmp_path))
    result = _invoke()
    assert result.exit_code == 1
    line = _one_error_line(result.output)
    assert f"no running stack for DCMFLOW_HOME={tmp_path.resolve()}" in line
    assert "start it with `dcmflow up`" in line


def test_a_state_file_of_a_dead_up_is_no_running_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCMFLOW_HOME", str(tmp_path))
    _write_state(tmp_path, free_port(), pid=2**22 + 12345)  # above pid_max: never alive
    result = _invoke()
    assert result.exit_code == 1
    assert "no running stack" in _one_error_line(result.output)


def test_nobody_listening_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCMFLOW_HOME", str(tmp_path))
    _write_state(tmp_path, 1, pid=os.getpid())  # our own pid: a "running" stack
    with socket.socket() as closed:  # a port we hold but do not listen on: connections are refused
        closed.bind(("127.0.0.1", 0))
        result = _invoke("--port", str(closed.getsockname()[1]), "--timeout", "5")
    assert result.exit_code == 1
    line = _one_error_line(result.output)
    assert "no DICOM receiver answered at DCMFLOW@127.0.0.1:" in line
    # Before sending it enabled the built-in preview and QC, so the flows have something to show.
    assert "enabled the built-in service preview" in result.output
    assert "enabled the built-in service qc" in result.output
    assert sorted(s.name for s in repository_from(Settings(home=tmp_path)).list_services()) == ["preview", "qc"]


def test_a_stack_with_services_is_left_as_its_user_set_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCMFLOW_HOME", str(tmp_path))
    _write_state(tmp_path, 1, pid=os.getpid())
    repository = repository_from(Settings(home=tmp_path))
    assert runner.invoke(services_app, ["enable", "preview"]).exit_code == 0
    assert runner.invoke(services_app, ["disable", "preview"]).exit_code == 0
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        result = _invoke("--port", str(closed.getsockname()[1]), "--timeout", "5")
    assert result.exit_code == 1 and "enabled the built-in" not in result.output
    assert repository.list_services() == []  # the disabled preview stays off, qc stays unused


@dataclass
class Stack:
    """A real ``dcmflow receive`` (no Prefect) and the state file that makes it "the stack"."""

    home: Path
    receiver: ReceiverProcess

    @property
    def repository(self) -> Repository:
        return repository_from(Settings(home=self.home))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One receiver for the module (its start and stop cost ~7 s); every demo sends a new study."""
    home = tmp_path_factory.mktemp("stack")
    receiver = ReceiverProcess(home, free_port(), workers=1)
    try:
        _write_state(home, receiver.port, pid=receiver.proc.pid)
        yield Stack(home, receiver)
    finally:
        assert receiver.terminate() == 0, receiver.output()


@pytest.fixture
def stack_env(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Stack:
    monkeypatch.setenv("DCMFLOW_HOME", str(stack.home))
    return stack


def test_sends_to_a_real_receiver_and_follows_it_until_the_timeout(stack_env: Stack) -> None:
    since = dt.datetime.now(dt.timezone.utc)
    result = _invoke("--timeout", "6")
    assert result.exit_code == 1, result.output + stack_env.receiver.output()
    assert re.search(r"sent study [0-9.]+ \(2 series, 40 instances, patient DEMO\^CT\) to DCMFLOW@127\.0\.0\.1", result.output)
    for description, number in DEMO_SERIES:
        assert f"series {number} ({description}): 20 of 20 instances recorded" in result.output
        # (0020,1209) closed each series when its association did: no quiet period needed.
        assert f"series {number} ({description}): stable, revision 1" in result.output
    assert "timed out after 6 s waiting for the study to become stable" in _one_error_line(result.output)
    series = [s for s in stack_env.repository.list_series() if s.last_received_at and s.last_received_at >= since]
    assert sorted((s.description, s.instance_count, s.expected_instance_count, s.state) for s in series) == [
        ("AXIAL 1.25mm LUNG", 20, 20, "stable"),
        ("AXIAL 1.25mm STND", 20, 20, "stable"),
    ]


def test_a_rejected_association_is_one_line(stack_env: Stack) -> None:
    result = _invoke("--ae-title", "NOT-THIS-ONE", "--timeout", "5")  # wrong called AE title
    assert result.exit_code == 1
    assert "NOT-THIS-ONE@127.0.0.1" in _one_error_line(result.output)
    assert "rejected the association from DCMFLOW-DEMO" in result.output


def _stable_series(repository: Repository, count: int, since: dt.datetime, timeout: float = 30.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stable = [s for s in repository.list_series(state="stable") if s.last_received_at and s.last_received_at >= since]
        if len(stable) == count:
            return stable
        time.sleep(0.1)
    raise AssertionError(f"not {count} stable series after {timeout} s")


def _play_up(repository: Repository, since: dt.datetime, failing_error: str | None) -> None:
    """What ``up`` does once the series are stable: mark the events sent, let the study become
    stable, run one job per flow (series, series, study); the study's job fails when asked."""
    series = _stable_series(repository, 2, since)
    study_uid = series[0].study_uid
    for record in series:
        repository.mark_series_emitted(record.series_uid, record.revision)
    repository.mark_study_received_emitted(study_uid)
    repository.claim_due_studies(now=dt.datetime.now(dt.timezone.utc), claimer="test")
    for series_uid in [s.series_uid for s in series] + [None]:
        session = repository.create_session(series_uid=series_uid, study_uid=study_uid, revision=1,
                                            trigger="test", flow_run_id=str(uuid.uuid4()))
        name = "preview" if series_uid else "study-report"  # preview: the demo links its artifact
        (job,) = repository.create_jobs(session.id, [JobBase(service_name=name, service_version=1, job_name=name)])
        repository.update_job(job.id, state="running", attempts=1)
        time.sleep(0.6)  # a poll sees it running
        fails = failing_error is not None and series_uid is None
        repository.update_job(job.id, state="failed" if fails else "succeeded", exit_code=3 if fails else 0,
                              error=failing_error if fails else None)
        repository.finish_session(session.id, "failed" if fails else "completed")


@pytest.mark.parametrize("failing_error", [None, "boom: no such file"])
def test_follows_the_flow_runs_to_the_end(stack_env: Stack, failing_error: str | None) -> None:
    since = dt.datetime.now(dt.timezone.utc)
    args = ["--timeout", "60"] + (["--json"] if failing_error is None else [])
    box: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: box.update(result=_invoke(*args)))
    thread.start()
    try:
        _play_up(stack_env.repository, since, failing_error)
    finally:
        thread.join(90)
    result = box["result"]
    assert "study: stable, revision 1" in result.stderr
    assert "study: flow run started" in result.stderr
    if failing_error is None:
        assert result.exit_code == 0, result.output
        out = json.loads(result.stdout)
        assert [s["state"] for s in out["sessions"]] == ["completed"] * 3
        assert all(re.fullmatch(r"http://127\.0\.0\.1:9/runs/flow-run/[0-9a-f-]{36}", s["url"]) for s in out["sessions"])
        assert [j["state"] for j in out["jobs"]] == ["succeeded"] * 3
        assert len(out["series"]) == 2 and out["study_uid"]
        assert sorted(a["url"] for a in out["artifacts"]) == sorted(
            f"http://127.0.0.1:9/artifacts/key/preview-series-{s['series_uid'].replace('.', '-')}" for s in out["series"])
    else:
        assert result.exit_code == 1, result.output
        line = _one_error_line(result.stderr)
        assert "1 of 3 flow runs did not complete" in line
        assert "job study-report failed: boom: no such file" in line
        assert "jobs of the demo study" in result.stdout  # the job table, then one link per run
        assert result.stdout.count("/runs/flow-run/") == 3
        assert result.stdout.count("/artifacts/key/preview-series-") == 2  # where to click for the images


def test_help_teaches() -> None:
    result = _invoke("--help")
    assert result.exit_code == 0
    for words in ("dcmflow up", "--timeout", "--host", "--ae-title", "(0020,1209)"):
        assert words in result.output
