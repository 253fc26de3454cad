"""Session-wide real servers for the tests.

* An S3 endpoint: moto's threaded server on loopback (a real HTTP S3 API, spoken to through
  the same ``minio`` client code as production), or a real MinIO when
  ``DCMFLOW_TEST_S3_ENDPOINT`` (plus ``_ACCESS_KEY``, ``_SECRET_KEY``, ``_SECURE``) is set.
* PostgreSQL on 127.0.0.1:5432 (``DCMFLOW_TEST_POSTGRES_URL`` to point elsewhere): every
  test session gets a fresh database that is dropped at the end. When the server is not
  reachable the PostgreSQL tests are skipped, unless ``DCMFLOW_TEST_REQUIRE_POSTGRES=1``
  (set by CI), which turns that into a failure.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from storage.repository import Repository

# Read the test configuration once, before the autouse fixture strips DCMFLOW_* variables.
_ENV = {k: v for k, v in os.environ.items() if k.startswith("DCMFLOW_TEST_")}
_PG_ADMIN_URL = _ENV.get("DCMFLOW_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
_REQUIRE_PG = _ENV.get("DCMFLOW_TEST_REQUIRE_POSTGRES", "") == "1"

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Tests talk to the session's real server (prefect_server) or to none. Without this, Prefect's
# exit-time flush of a flow test's leftover logs/events found no API URL, started a temporary
# server to deliver them, and left its uvicorn process running after pytest had closed stderr.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_ENABLED", "false")


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Start mypy in the background when its test is selected (see tests/test_types.py)."""
    if any(item.name == "test_mypy_is_clean" and item.path.name == "test_types.py" for item in items):
        from tests.test_types import start_mypy

        start_mypy()


def pytest_sessionfinish() -> None:
    from tests.test_types import stop_mypy

    stop_mypy()


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts with no DCMFLOW_* variable set (as httpx's ``clean_environ``)."""
    for key in list(os.environ):
        if key.startswith("DCMFLOW_"):
            monkeypatch.delenv(key)


@dataclass(frozen=True)
class S3Endpoint:
    """Where the test S3 endpoint listens and how to log in."""

    endpoint: str
    access_key: str
    secret_key: str
    secure: bool
    kind: str  # "moto" or "external"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[S3Endpoint]:
    """A real S3 API on loopback for the whole session."""
    if "DCMFLOW_TEST_S3_ENDPOINT" in _ENV:
        yield S3Endpoint(
            endpoint=_ENV["DCMFLOW_TEST_S3_ENDPOINT"],
            access_key=_ENV.get("DCMFLOW_TEST_S3_ACCESS_KEY", "minioadmin"),
            secret_key=_ENV.get("DCMFLOW_TEST_S3_SECRET_KEY", "minioadmin"),
            secure=_ENV.get("DCMFLOW_TEST_S3_SECURE", "") in {"1", "true", "yes"},
            kind="external",
        )
        return
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Endpoint(f"{host}:{port}", "testing", "testing", False, "moto")
    finally:
        server.stop()


@pytest.fixture
def s3_bucket_name() -> str:
    """A fresh bucket name per test, so tests never see each other's objects."""
    return f"dcmflow-test-{uuid.uuid4().hex[:12]}"


def _pg_admin_connect():  # type: ignore[no-untyped-def]
    import psycopg

    return psycopg.connect(_PG_ADMIN_URL, autocommit=True, connect_timeout=3)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """SQLAlchemy URL of a fresh PostgreSQL database for this session (dropped afterwards)."""
    import psycopg

    try:
        admin = _pg_admin_connect()
    except psycopg.OperationalError as exc:
        if _REQUIRE_PG:
            pytest.fail(f"PostgreSQL is required (DCMFLOW_TEST_REQUIRE_POSTGRES=1) but unreachable: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {_PG_ADMIN_URL}: {exc}")
    name = f"dcmflow_test_{uuid.uuid4().hex[:10]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = _PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        with _pg_admin_connect() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A real Prefect server (subprocess, own SQLite database) shared by the session."""
    from tests.prefect_server import snapshot_database, start_prefect_server

    server = start_prefect_server(tmp_path_factory.mktemp("prefect-home"))
    try:
        # before any test writes to it: the migrated, empty database (migrated_prefect_db)
        server.empty_db = snapshot_database(server, tmp_path_factory.mktemp("prefect-template") / "prefect.db")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def migrated_prefect_db(prefect_server) -> Path:  # type: ignore[no-untyped-def]
    """A migrated Prefect SQLite database no test has written to (a copy of the session server's,
    taken at its start), to seed a ``dcmflow up`` home whose test is not about a fresh home."""
    assert prefect_server.empty_db is not None
    return Path(prefect_server.empty_db)


@pytest.fixture
def prefect_env(prefect_server, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Point this test (and subprocesses it starts) at the session's Prefect server."""
    for key, value in prefect_server.env().items():
        monkeypatch.setenv(key, value)
    return prefect_server


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of an empty (unmigrated) record database, SQLite or PostgreSQL.

    SQLite gets a file in ``tmp_path``; PostgreSQL gets a fresh schema in the session's
    database (``postgres_url``), selected through ``search_path`` in the URL and dropped
    afterwards, so every test starts empty and a schema costs milliseconds, not a
    ``CREATE DATABASE``.
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'records' / 'dcmflow.db'}"
        return
    import sqlalchemy as sa

    base: str = request.getfixturevalue("postgres_url")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        yield sa.engine.make_url(base).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False
        )
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        admin.dispose()


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on the migrated ``db_url`` database."""
    from storage.db import create_engine, upgrade

    eng = create_engine(db_url)
    upgrade(eng)
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def repo(engine: Engine) -> Repository:
    """A repository on the migrated ``db_url`` database."""
    from storage.repository import Repository

    return Repository(engine)


@pytest.fixture
def tls_certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (PEM files), made with openssl."""
    import shutil
    import subprocess

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key

