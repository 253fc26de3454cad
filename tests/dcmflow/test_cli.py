"""The command line through its public interface (Typer's CliRunner), on real databases."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import typer
from sqlalchemy import inspect
from typer.testing import CliRunner

from dcmflow import __version__
from dcmflow.cli import app
from storage.db import create_engine

runner = CliRunner()


def test_help_lists_the_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("version", "db", "selfcheck"):
        assert command in result.output


def _commands(group: click.Command, path: tuple[str, ...] = ("dcmflow",)) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, sub in getattr(group, "commands", {}).items():
        if not sub.hidden:
            yield from _commands(sub, (*path, name)) if getattr(sub, "commands", None) else [((*path, name), sub)]


def test_every_command_s_help_shows_examples_that_parse() -> None:
    """Each example is a real command line: its path is the command's, its options exist."""
    commands = list(_commands(typer.main.get_command(app)))
    assert len(commands) > 20
    for path, command in commands:
        help_text = runner.invoke(app, [*path[1:], "--help"], env={"COLUMNS": "200"}).output
        assert "Examples:" in help_text, " ".join(path)
        examples = [shlex.split(line) for line in (command.help or "").split("Examples:", 1)[1].splitlines() if line.strip()]
        assert examples, " ".join(path)
        for words in examples:
            while re.fullmatch(r"[A-Z_]+=.*", words[0]):  # VAR=value before the command
                words = words[1:]
            assert tuple(words[: len(path)]) == path, f"{' '.join(words)} is not an example of {' '.join(path)}"
            command.make_context(path[-1], list(words[len(path):]))  # unknown options or missing args raise


def test_version() -> None:
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0
    assert result.output.strip() == __version__


def test_unknown_command_is_a_usage_error() -> None:
    result = runner.invoke(app, ["frobnicate"])
    assert result.exit_code == 2


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_env(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("DCMFLOW_HOME", str(tmp_path / "home"))
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_url")
        monkeypatch.setenv("DCMFLOW_DATABASE_URL", url)
        return url
    return f"sqlite:///{(tmp_path / 'home' / 'dcmflow.db').resolve()}"


def test_db_upgrade_creates_the_schema(database_env: str) -> None:
    result = runner.invoke(app, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    tables = set(inspect(create_engine(database_env)).get_table_names())
    assert {"series", "instance", "job", "session", "service", "peer", "alembic_version"} <= tables
    again = runner.invoke(app, ["db", "upgrade"])  # idempotent
    assert again.exit_code == 0, again.output
    current = runner.invoke(app, ["db", "current"])
    assert current.exit_code == 0 and current.output.strip()


def test_db_upgrade_on_unreachable_server_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCMFLOW_DATABASE_URL", "postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2")
    result = runner.invoke(app, ["db", "upgrade"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert result.output.strip().startswith("Error:")
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("var", "value", "says"),
    [
        ("DCMFLOW_DICOM_PORT", "70000", "DCMFLOW_DICOM_PORT: Input should be less than or equal to 65535"),
        ("DCMFLOW_TLS_CERT", "/etc/cert.pem", "DCMFLOW_TLS_CERT and DCMFLOW_TLS_KEY go together"),  # a rule across two
    ],
)
def test_bad_setting_is_one_line(monkeypatch: pytest.MonkeyPatch, var: str, value: str, says: str) -> None:
    monkeypatch.setenv(var, value)
    result = runner.invoke(app, ["db", "upgrade"])
    assert result.exit_code == 1
    assert says in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def _selfcheck_rows(stdout: str) -> dict[str, dict[str, object]]:
    import json

    return {row["check"]: row for row in json.loads(stdout)}


def test_selfcheck_on_embedded_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the default DCMFLOW_HOME is ./.dcmflow
    result = runner.invoke(app, ["selfcheck", "--json"])
    assert result.exit_code == 0, result.output
    rows = _selfcheck_rows(result.stdout)
    assert [r["result"] for r in rows.values()] == ["ok"] * 5
    assert (tmp_path / ".dcmflow" / "dcmflow.db").is_file()
    objects = tmp_path / ".dcmflow" / "objects"
    assert not [p for p in objects.rglob("*") if p.is_file()], "selfcheck left objects behind"


@pytest.mark.s3
def test_selfcheck_on_s3_and_postgresql(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_endpoint, s3_bucket_name: str, postgres_url: str
) -> None:
    monkeypatch.setenv("DCMFLOW_HOME", str(tmp_path))
    monkeypatch.setenv("DCMFLOW_DATABASE_URL", postgres_url)
    monkeypatch.setenv("DCMFLOW_S3_ENDPOINT", s3_endpoint.endpoint)
    monkeypatch.setenv("DCMFLOW_S3_ACCESS_KEY", s3_endpoint.access_key)
    monkeypatch.setenv("DCMFLOW_S3_SECRET_KEY", s3_endpoint.secret_key)
    monkeypatch.setenv("DCMFLOW_S3_SECURE", str(s3_endpoint.secure))
    monkeypatch.setenv("DCMFLOW_S3_BUCKET", s3_bucket_name)
    result = runner.invoke(app, ["selfcheck", "--json"])
    assert result.exit_code == 0, result.output
    assert all(r["result"] == "ok" for r in _selfcheck_rows(result.stdout).values())
    assert not (tmp_path / "objects").exists(), "with an S3 endpoint nothing goes to the local store"


def test_selfcheck_reports_an_unreachable_object_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("DCMFLOW_HOME", str(tmp_path))
    monkeypatch.setenv("DCMFLOW_S3_ENDPOINT", f"127.0.0.1:{port}")
    monkeypatch.setenv("DCMFLOW_S3_ACCESS_KEY", "x")
    monkeypatch.setenv("DCMFLOW_S3_SECRET_KEY", "y")
    result = runner.invoke(app, ["selfcheck", "--json"])
    assert result.exit_code == 1
    rows = _selfcheck_rows(result.stdout)
    assert rows["database"]["result"] == "ok"
    assert rows["object store"]["result"] == "FAILED"
    assert f"127.0.0.1:{port}" in str(rows["object store"]["detail"])
    # Our own output ends with one error line. (Earlier in-process Prefect runs can leave a
    # logging handler on a closed CliRunner stream whose "--- Logging error ---" noise lands on
    # stderr here; that cannot happen in a real one-command process, so only our line counts.)
    assert result.stderr.strip().splitlines()[-1] == "Error: self-check failed: object store"
