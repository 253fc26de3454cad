"""``dcmflow doctor`` through the CLI, against the real things it checks: the embedded defaults,
an S3 endpoint on loopback and a closed port, PostgreSQL, a foreign socket and our own SCP on
the DICOM port, an installed service broken after install, and a real Prefect server."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner, Result

from dcmflow.cli import app
from dcmflow.doctor import DCMTK_TOOLS
from dcmflow.stack_state import StackState, write_state

runner = CliRunner()

CHECKS = ["settings", "database", "object store", "dicom port", "prefect api", "prefect deployments", "services", "dcmtk"]
EXAMPLE_SERVICE = Path(__file__).resolve().parents[2] / "services_registry" / "examples" / "series_summary_folder"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    return _free_port()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh DCMFLOW_HOME with a DICOM port nobody else on this machine uses."""
    monkeypatch.setenv("DCMFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DCMFLOW_DICOM_PORT", str(_free_port()))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    return tmp_path / "home"


def doctor(*args: str) -> tuple[Result, dict[str, dict[str, Any]]]:
    """Run ``dcmflow doctor --json``; the result and its rows by check name."""
    result = runner.invoke(app, ["doctor", "--json", "--timeout", "4", *args])
    rows = json.loads(result.stdout)
    assert [r["check"] for r in rows if not r["check"].startswith("service ")] == CHECKS, rows
    return result, {r["check"]: r for r in rows}


def _error_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, never a traceback
    return lines[0]


def test_fresh_home_passes_with_every_check(home: Path) -> None:
    result, rows = doctor()
    assert result.exit_code == 0, result.output
    assert {r["status"] for r in rows.values()} <= {"ok", "warn", "skip"}
    assert rows["database"]["status"] == "ok" and "not created yet" in rows["database"]["detail"]
    assert not (home / "dcmflow.db").exists()  # doctor does not create the database
    assert rows["object store"]["status"] == "ok" and str(home / "objects") in rows["object store"]["detail"]
    assert not list((home / "objects").rglob("*.probe"))  # the probe object was deleted
    assert rows["dicom port"]["status"] == "ok" and os.environ["DCMFLOW_DICOM_PORT"] in rows["dicom port"]["detail"]
    assert rows["prefect api"] == {**rows["prefect api"], "status": "warn", "fix": "start it with dcmflow up"}
    assert rows["prefect deployments"]["status"] == "skip"
    assert rows["services"]["status"] == "ok"
    dcmtk_present = all(os.access(tool, os.X_OK) for tool in DCMTK_TOOLS)
    assert rows["dcmtk"]["status"] == ("ok" if dcmtk_present else "warn")
    assert "1 warning(s), 0 failed" in result.stderr


def test_table_output_names_checks_and_fixes(home: Path) -> None:
    result = runner.invoke(app, ["doctor"], env={"COLUMNS": "240"})
    assert result.exit_code == 0, result.output
    for check in CHECKS:
        assert check in result.stdout
    assert "start it with dcmflow up" in result.stdout
    assert result.stdout.strip().splitlines()[-1].endswith("0 failed, 1 skipped")


def test_migrated_database_is_at_head(home: Path) -> None:
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    result, rows = doctor()
    assert result.exit_code == 0, result.output
    from storage.db import head_revision

    assert rows["database"]["status"] == "ok" and f"at revision {head_revision()}" in rows["database"]["detail"]
    assert rows["services"] == {**rows["services"], "status": "ok", "detail": "no services installed"}


def test_unreachable_object_store_fails_naming_it(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = _closed_port()
    monkeypatch.setenv("DCMFLOW_S3_ENDPOINT", f"127.0.0.1:{port}")
    result, rows = doctor()
    assert result.exit_code == 1
    assert rows["object store"]["status"] == "fail"
    assert f"127.0.0.1:{port}" in rows["object store"]["detail"] and "DCMFLOW_S3_ENDPOINT" in rows["object store"]["fix"]
    assert rows["database"]["status"] == "ok"  # only the broken part is named
    assert rows["services"]["status"] == "skip"
    assert _error_line(result).startswith("Error: failed: object store (")


def test_real_s3_endpoint_passes_and_leaves_no_probe(home: Path, monkeypatch: pytest.MonkeyPatch, s3_endpoint,  # type: ignore[no-untyped-def]
                                                     s3_bucket_name: str) -> None:
    monkeypatch.setenv("DCMFLOW_S3_ENDPOINT", s3_endpoint.endpoint)
    monkeypatch.setenv("DCMFLOW_S3_ACCESS_KEY", s3_endpoint.access_key)
    monkeypatch.setenv("DCMFLOW_S3_SECRET_KEY", s3_endpoint.secret_key)
    monkeypatch.setenv("DCMFLOW_S3_SECURE", str(s3_endpoint.secure).lower())
    monkeypatch.setenv("DCMFLOW_S3_BUCKET", s3_bucket_name)
    result, rows = doctor()
    assert result.exit_code == 0, result.output
    assert rows["object store"]["status"] == "ok"
    assert f"{s3_endpoint.endpoint}/{s3_bucket_name}" in rows["object store"]["detail"]
    from storage.s3 import S3ObjectStore

    store = S3ObjectStore(s3_endpoint.endpoint, s3_bucket_name, access_key=s3_endpoint.access_key,
                          secret_key=s3_endpoint.secret_key, secure=s3_endpoint.secure)
    assert list(store.list("doctor/")) == []


def test_refused_database_fails_naming_it(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCMFLOW_DATABASE_URL", f"postgresql+psycopg://nobody@127.0.0.1:{_closed_port()}/none")
    result, rows = doctor()
    assert result.exit_code == 1
    assert rows["database"]["status"] == "fail" and "Connection refused" in rows["database"]["detail"]
    assert "DCMFLOW_DATABASE_URL" in rows["database"]["fix"]
    assert rows["object store"]["status"] == "ok" and rows["services"]["status"] == "skip"
    assert _error_line(result).startswith("Error: failed: database (")


@pytest.fixture
def empty_postgres_database(postgres_url: str) -> Iterator[str]:
    """A PostgreSQL database of its own, never migrated (dropped afterwards)."""
    import psycopg

    base, _, _ = postgres_url.rpartition("/")
    admin_url = base.replace("postgresql+psycopg://", "postgresql://", 1) + "/postgres"
    name = f"dcmflow_doctor_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.postgres
def test_postgres_database_missing_then_unmigrated_then_ready(home: Path, monkeypatch: pytest.MonkeyPatch,
                                                             empty_postgres_database: str) -> None:
    base = empty_postgres_database.rpartition("/")[0]
    monkeypatch.setenv("DCMFLOW_DATABASE_URL", f"{base}/dcmflow_doctor_no_such_database")
    result, rows = doctor()
    assert result.exit_code == 1
    assert rows["database"]["status"] == "fail"
    assert 'database "dcmflow_doctor_no_such_database" does not exist' in rows["database"]["detail"]
    assert "createdb" in rows["database"]["fix"]

    monkeypatch.setenv("DCMFLOW_DATABASE_URL", empty_postgres_database)
    result, rows = doctor()
    assert result.exit_code == 1
    assert rows["database"]["status"] == "fail" and "revision (empty)" in rows["database"]["detail"]
    assert rows["database"]["fix"] == "run `dcmflow db upgrade`"

    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    result, rows = doctor()
    assert result.exit_code == 0, result.output
    assert rows["database"]["status"] == "ok" and rows["services"]["detail"] == "no services installed"


def test_bad_setting_is_one_row_and_the_rest_is_skipped(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCMFLOW_DICOM_PORT", "eleven")
    result, rows = doctor()
    assert result.exit_code == 1
    assert rows["settings"]["status"] == "fail" and rows["settings"]["detail"].startswith("DCMFLOW_DICOM_PORT:")
    assert all(rows[c]["status"] == "skip" for c in CHECKS[1:-1])
    assert rows["dcmtk"]["status"] in {"ok", "warn"}  # needs no settings


def test_dicom_port_taken_by_a_foreign_socket_fails(home: Path) -> None:
    port = int(os.environ["DCMFLOW_DICOM_PORT"])
    with socket.socket() as foreign:
        foreign.bind(("127.0.0.1", port))
        foreign.listen()
        result, rows = doctor()
    assert result.exit_code == 1
    assert rows["dicom port"]["status"] == "fail" and f"port {port} is in use" in rows["dicom port"]["detail"]
    assert "DCMFLOW_DICOM_PORT" in rows["dicom port"]["fix"]
    assert _error_line(result).startswith("Error: failed: dicom port (")


def _up_state(home: Path, dicom_port: int) -> None:
    """``up.json`` as a running ``dcmflow up`` writes it; this test process plays ``up``."""
    write_state(home, StackState(
        pid=os.getpid(), api_url=f"http://127.0.0.1:{_closed_port()}/api", ui_url="http://127.0.0.1", ae_title="DCMFLOW",
        dicom_host="127.0.0.1", dicom_port=dicom_port, home=str(home), database="", objects="",
        started_at=dt.datetime.now(dt.UTC),
    ))


def test_dicom_port_held_by_our_receiver_is_ok(home: Path, tmp_path: Path) -> None:
    from receiver.associations import AssociationTracker, CallerPolicy
    from receiver.scp import ScpConfig, start_scp
    from receiver.spool import Spool

    port = _free_port()
    spool = Spool(tmp_path / "spool", min_free_bytes=0, min_free_fraction=0.0)
    server = start_scp(ScpConfig(ae_title="DCMFLOW", host="127.0.0.1", port=port), spool, AssociationTracker(), CallerPolicy())
    try:
        _up_state(home, port)
        result, rows = doctor()
    finally:
        server.shutdown()
    assert rows["dicom port"]["status"] == "ok", rows["dicom port"]
    assert f"port {port}: our receiver (dcmflow up, pid {os.getpid()}) answers C-ECHO as AE DCMFLOW" in rows["dicom port"]["detail"]
    # the up it believes in has a Prefect API that does not answer: that is a failure, named
    assert result.exit_code == 1 and rows["prefect api"]["status"] == "fail"
    assert "restart dcmflow up" in rows["prefect api"]["fix"]


def test_dicom_port_held_by_a_stranger_while_up_runs_fails(home: Path) -> None:
    port = _free_port()
    with socket.socket() as foreign:  # listens, never speaks DICOM
        foreign.bind(("127.0.0.1", port))
        foreign.listen()
        _up_state(home, port)
        result, rows = doctor()
    assert result.exit_code == 1
    assert rows["dicom port"]["status"] == "fail" and "C-ECHO to AE DCMFLOW failed" in rows["dicom port"]["detail"]
    assert rows["dicom port"]["seconds"] < 4  # the echo gave up before the check's own deadline


def test_installed_service_is_checked_and_a_broken_callback_named(home: Path, tmp_path: Path) -> None:
    source = shutil.copytree(EXAMPLE_SERVICE, tmp_path / "summary")
    installed = runner.invoke(app, ["services", "install", str(source)])
    assert installed.exit_code == 0, installed.output
    result, rows = doctor()
    assert result.exit_code == 0, result.output
    assert rows["services"]["detail"] == "1 installed: summary"
    row = rows["service summary"]
    assert row["status"] == "warn"  # module/requirements.txt: its own venv, built by the first job
    assert "2 job(s); callbacks import, workers resolve" in row["detail"] and "not built yet" in row["detail"]

    (rules,) = (home / "services" / "summary").rglob("registry/series_summary/rules.py")
    rules.write_text(rules.read_text() + "\nimport dcmflow_doctor_no_such_module\n")
    result, rows = doctor()
    assert result.exit_code == 1
    row = rows["service summary"]
    assert row["status"] == "fail" and "callback" in row["detail"] and "dcmflow_doctor_no_such_module" in row["detail"]
    assert "dcmflow services remove summary" in row["fix"]
    assert rows["services"]["status"] == "fail" and rows["services"]["detail"] == "1 of 1 broken: summary"


def test_prefect_api_url_that_does_not_answer_fails(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{_closed_port()}/api")
    result, rows = doctor()
    assert result.exit_code == 1
    assert rows["prefect api"]["status"] == "fail" and "PREFECT_API_URL" in rows["prefect api"]["fix"]
    assert rows["prefect deployments"]["status"] == "skip"


@pytest.fixture(scope="module")
def deployed(prefect_server) -> str:  # type: ignore[no-untyped-def]
    """The declared deployments, their triggers and automations on the session's server, as
    ``dcmflow register-flows`` leaves them (tests/dcmflow/test_stack.py registers them too)."""
    from deployments.loader import apply_automations, runner_deployments
    from tests.flows.conftest import prefect_client_env

    with prefect_client_env(prefect_server):
        for deployment in runner_deployments():
            deployment.apply()
        apply_automations()
    return str(prefect_server.api_url)


def test_prefect_deployments_and_triggers_present(home: Path, monkeypatch: pytest.MonkeyPatch, deployed: str) -> None:
    monkeypatch.setenv("PREFECT_API_URL", deployed)
    result, rows = doctor()
    assert result.exit_code == 0, result.output
    assert rows["prefect api"]["status"] == "ok"
    assert rows["prefect deployments"]["status"] == "ok", rows["prefect deployments"]
    zombie = httpx.post(f"{deployed}/automations/filter", json={}, timeout=10).json()
    (automation,) = [a for a in zombie if a["name"] == "dcmflow-crash-zombie-flow-runs"]
    httpx.patch(f"{deployed}/automations/{automation['id']}", json={"enabled": False}, timeout=10).raise_for_status()
    try:
        result, rows = doctor()
    finally:
        httpx.patch(f"{deployed}/automations/{automation['id']}", json={"enabled": True}, timeout=10).raise_for_status()
    assert result.exit_code == 0  # a warning
    assert rows["prefect deployments"]["status"] == "warn"
    assert "automations disabled: dcmflow-crash-zombie-flow-runs" in rows["prefect deployments"]["detail"]


def test_a_missing_deployment_is_named(home: Path, monkeypatch: pytest.MonkeyPatch, deployed: str, prefect_server) -> None:  # type: ignore[no-untyped-def]
    from deployments.loader import runner_deployments
    from tests.flows.conftest import prefect_client_env

    monkeypatch.setenv("PREFECT_API_URL", deployed)
    run_job = httpx.get(f"{deployed}/deployments/name/run-job/run-job", timeout=10).json()
    httpx.delete(f"{deployed}/deployments/{run_job['id']}", timeout=10).raise_for_status()
    try:
        result, rows = doctor()
    finally:
        with prefect_client_env(prefect_server):
            (again,) = [d for d in runner_deployments() if d.name == "run-job"]
            again.apply()
    assert result.exit_code == 0  # no dcmflow up runs: nobody was meant to serve them yet
    row = rows["prefect deployments"]
    assert row["status"] == "warn" and row["detail"] == f"{deployed}: deployments missing: run-job/run-job (dcmflow up is not running)"
    assert "dcmflow up" in row["fix"]
