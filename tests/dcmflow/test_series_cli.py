"""``dcmflow import`` and ``dcmflow series list/show`` through Typer's CliRunner, on real databases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from pydicom.dataset import Dataset
from typer.testing import CliRunner

from dcmflow.cli import importer, series
from storage.db import create_engine, upgrade
from tests.factories import make_ct_series, make_small_series, to_p10_bytes

runner = CliRunner()


def make_app() -> typer.Typer:
    """The two command modules joined the way dcmflow/cli/__init__.py joins them."""
    app = typer.Typer(pretty_exceptions_enable=False)

    @app.callback()
    def _root() -> None:
        """test root"""

    app.add_typer(series.app, name="series")
    app.command(name="import")(importer.import_command)
    return app


@pytest.fixture
def home(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DCMFLOW_HOME", str(tmp_path / "home"))
    if db_url.startswith("postgresql"):
        upgrade(create_engine(db_url))  # PostgreSQL is migrated by `dcmflow db upgrade`, not implicitly
        monkeypatch.setenv("DCMFLOW_DATABASE_URL", db_url)
    return tmp_path


@pytest.fixture(scope="module")
def datasets() -> list[Dataset]:
    ct = make_ct_series(5, 64, 64, seed=5)
    mr = make_small_series(7, study_uid=ct[0].StudyInstanceUID, seed=5)
    return ct + mr


def _folder(root: Path, datasets: list[Dataset]) -> Path:
    for i, ds in enumerate(datasets):
        sub = root / ds.Modality
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:03d}.dcm").write_bytes(to_p10_bytes(ds))
    (root / "notes.txt").write_text("hello")
    return root


def test_import_then_list_and_show(home: Path, datasets: list[Dataset]) -> None:
    app = make_app()
    folder = _folder(home / "drop", datasets)

    result = runner.invoke(app, ["import", str(folder), "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "imported 12 instances (12 new, 0 duplicates, 0 new versions) in 2 series; 1 not DICOM"
    assert f"not DICOM: {folder / 'notes.txt'}" in result.stderr

    again = runner.invoke(app, ["import", str(folder), "--json"])
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout)
    assert (summary["new"], summary["duplicates"], summary["not_dicom"]) == (0, 12, 1)

    listed = runner.invoke(app, ["series", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    assert {r["series_uid"] for r in rows} == {d.SeriesInstanceUID for d in datasets}
    by_modality = {r["modality"]: r for r in rows}
    assert by_modality["CT"]["instance_count"] == 5 and by_modality["MR"]["instance_count"] == 7
    ct = datasets[0]
    assert by_modality["CT"]["patient_id"] == str(ct.PatientID)
    assert by_modality["CT"]["study_uid"] == ct.StudyInstanceUID
    assert by_modality["CT"]["description"] == str(ct.get("SeriesDescription", ""))
    assert {r["state"] for r in rows} == {"receiving"} and {r["revision"] for r in rows} == {1}
    assert all(r["last_received_at"] and r["calling_ae"] == "IMPORT" for r in rows)

    assert json.loads(runner.invoke(app, ["series", "list", "--json", "--state", "stable"]).stdout) == []
    assert len(json.loads(runner.invoke(app, ["series", "list", "--json", "--limit", "1"]).stdout)) == 1

    shown = runner.invoke(app, ["series", "show", ct.SeriesInstanceUID, "--json"])
    assert shown.exit_code == 0, shown.output
    one = json.loads(shown.stdout)
    assert one["series_uid"] == ct.SeriesInstanceUID and one["instance_count"] == 5 and one["modality"] == "CT"

    table = runner.invoke(app, ["series", "list"])
    assert table.exit_code == 0 and "CT" in table.stdout and "MR" in table.stdout
    shown_table = runner.invoke(app, ["series", "show", ct.SeriesInstanceUID])
    assert shown_table.exit_code == 0 and "instance_count" in shown_table.stdout and "receiving" in shown_table.stdout


def test_user_mistakes_are_one_line(home: Path) -> None:
    app = make_app()
    unknown = runner.invoke(app, ["series", "show", "1.2.3.4"])
    assert unknown.exit_code == 1
    assert unknown.stderr.strip() == "Error: no series 1.2.3.4"
    bad = runner.invoke(app, ["series", "show", "../etc/passwd"])
    assert bad.exit_code == 1 and len(bad.stderr.strip().splitlines()) == 1 and "not a DICOM UID" in bad.stderr
    missing = runner.invoke(app, ["import", str(home / "nope")])
    assert missing.exit_code == 1 and missing.stderr.strip() == f"Error: no such file or folder: {home / 'nope'}"
    (home / "f.dcm").write_text("x")
    watch_file = runner.invoke(app, ["import", str(home / "f.dcm"), "--watch"])
    assert watch_file.exit_code == 1 and "--watch follows folders" in watch_file.stderr
    state = runner.invoke(app, ["series", "list", "--state", "done"])
    assert state.exit_code == 2  # a usage error, from Typer


def test_unmigrated_postgres_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCMFLOW_DATABASE_URL", "postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2")
    result = runner.invoke(make_app(), ["series", "list"])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: cannot open ") and len(result.stderr.strip().splitlines()) == 1
