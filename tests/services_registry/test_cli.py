"""``dcmflow services`` through Typer's CliRunner, on a real SQLite database and object dir."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
from pathlib import Path

import pydicom
import pytest
import typer
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from dcmflow.cli import services
from services_registry.examples import FOLDER_EXAMPLE, PYTHON_EXAMPLE
from storage import db
from storage.keys import instance_key
from storage.objects import open_object_store
from storage.repository import InstanceIn, Repository

from .conftest import series_uid_of

runner = CliRunner()
app = typer.Typer(pretty_exceptions_enable=False)
app.add_typer(services.app, name="services")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("DCMFLOW_HOME", str(home))
    home.mkdir()
    db.upgrade(db.create_engine(f"sqlite:///{(home / 'dcmflow.db').resolve()}"))
    return home


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["services", *map(str, args)])


def one_line_error(result) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_install_list_show(home: Path) -> None:
    result = invoke("install", FOLDER_EXAMPLE, "--name", "series-summary", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["version"] == 1
    again = invoke("install", FOLDER_EXAMPLE, "--name", "series-summary")
    assert again.exit_code == 0 and "unchanged, already installed as version 1" in again.stderr
    assert invoke("install", PYTHON_EXAMPLE).exit_code == 0

    listed = json.loads(invoke("list", "--json").stdout)
    assert [(s["name"], s["version"], s["source_kind"]) for s in listed] == [
        ("series-summary", 1, "folder"), ("series-summary-py", 1, "python")]
    table = invoke("list")
    assert table.exit_code == 0 and "series-summary-py" in table.stdout

    shown = json.loads(invoke("show", "series-summary", "--json").stdout)
    assert [j["job_name"] for j in shown["jobs"]] == ["series-summary", "series-summary-markdown"]
    assert invoke("show", "series-summary").exit_code == 0
    assert one_line_error(invoke("show", "nope")) == "Error: no installed service named 'nope'"


def test_validation_errors_are_one_line_on_stderr(home: Path, make_service, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    bad = make_service("bad", [{"jobName": "a", "worker": "b.w", "callback": "b.c", "timeout": "1x"}])
    line = one_line_error(invoke("install", bad))
    assert line.startswith("Error: src/bad/registry/settings.json: jobs[0].timeout: bad duration '1x'")
    cyc = make_service("cyc", [{"jobName": "a", "worker": "b.w", "callback": "b.c", "dependsOn": "a"}],
                       {"b/__init__.py": "def c(**kw):\n    return True\n"}, {"b/__init__.py": "def w(**kw):\n    pass\n"})
    assert one_line_error(invoke("install", cyc)).endswith("jobs[0].dependsOn: dependency cycle a -> a")
    assert one_line_error(invoke("install", "missing-dir")) == "Error: missing-dir: no such file or folder"
    assert one_line_error(invoke("remove", "ghost")) == "Error: no installed service named 'ghost'"
    assert one_line_error(invoke("plan")) == "Error: give either SERIES_UID or --dir PATH"


def test_embedded_database_migrates_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCMFLOW_HOME", str(tmp_path / "fresh"))
    result = invoke("list", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == []
    assert (tmp_path / "fresh" / "dcmflow.db").is_file()


@pytest.mark.postgres
def test_unmigrated_postgresql_is_one_line(monkeypatch: pytest.MonkeyPatch, postgres_url: str) -> None:
    """PostgreSQL is migrated by `dcmflow db upgrade`, never implicitly: a fresh database says so."""
    import uuid

    import psycopg

    name = f"dcmflow_empty_{uuid.uuid4().hex[:8]}"
    admin_url = postgres_url.replace("postgresql+psycopg://", "postgresql://").rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        monkeypatch.setenv("DCMFLOW_DATABASE_URL", postgres_url.rsplit("/", 1)[0] + f"/{name}")
        assert one_line_error(invoke("list")).endswith("is not migrated: run `dcmflow db upgrade`")
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_backup_and_remove(home: Path, tmp_path: Path) -> None:
    assert invoke("install", FOLDER_EXAMPLE, "--name", "series-summary").exit_code == 0
    assert invoke("backup", "series-summary", tmp_path / "bk").exit_code == 0
    assert (tmp_path / "bk" / "series-summary" / "registry" / "settings.json").is_file()
    result = invoke("remove", "series-summary", "--backup", tmp_path / "bk2")
    assert result.exit_code == 0 and "removed series-summary (1 version)" in result.stderr
    assert (tmp_path / "bk2" / "series-summary" / "module").is_dir()
    assert json.loads(invoke("list", "--json").stdout) == []


def test_plan_dir_on_real_dicom(home: Path, dicom_dir: Path) -> None:
    assert invoke("install", FOLDER_EXAMPLE, "--name", "series-summary").exit_code == 0
    assert invoke("install", PYTHON_EXAMPLE).exit_code == 0
    result = invoke("plan", "--dir", dicom_dir, "--json")
    assert result.exit_code == 0, result.output
    plans = {p["modality"]: p for p in json.loads(result.stdout)}
    ct, mr = plans["CT"], plans["MR"]
    assert ct["series_uid"] == series_uid_of("CT_small.dcm") and ct["dcmpath"] == "ct" and ct["instances"] == 1
    assert ct["order"] == ["py-series-summary", "series-summary", "series-summary-markdown"]
    assert ct["levels"] == [["py-series-summary", "series-summary"], ["series-summary-markdown"]]
    assert ct["rejected"] == []
    assert ct["added_params"]["series-summary"] == {"modality": "CT", "file": f"{ct['series_uid']}.json"}
    assert mr["order"] == ct["order"]

    # a modality the callbacks refuse: every job is listed with its reason
    us_dir = dicom_dir.parent / "us"
    us_dir.mkdir()
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Modality = "US"
    ds.save_as(us_dir / "us.dcm")
    us = json.loads(invoke("plan", "--dir", us_dir, "--json").stdout)[0]
    assert us["order"] == []
    assert {r["job"]: r["reason"] for r in us["rejected"]} == {
        "py-series-summary": "callback returned False",
        "series-summary": "callback returned False",
        "series-summary-markdown": "dependency 'series-summary' not scheduled (series-summary: callback returned False)",
    }
    text = invoke("plan", "--dir", us_dir)
    assert text.exit_code == 0 and "will not run (3)" in text.stdout and "callback returned False" in text.stdout
    tree = invoke("plan", "--dir", dicom_dir)
    assert "will run (3, ready order)" in tree.stdout and "level 1: series-summary-markdown" in tree.stdout
    assert one_line_error(invoke("plan", "--dir", home)).endswith("no DICOM files with a SeriesInstanceUID")


def test_plan_received_series_from_the_object_store(home: Path) -> None:
    """A series as the receiver stores it: bytes in the object store, records in the database."""
    assert invoke("install", FOLDER_EXAMPLE, "--name", "series-summary").exit_code == 0
    repository = Repository(db.create_engine(f"sqlite:///{(home / 'dcmflow.db').resolve()}"))
    store = open_object_store(local_root=home / "objects")
    raw = Path(get_testdata_file("MR_small.dcm")).read_bytes()
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"), stop_before_pixels=True)
    key = instance_key(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    store.put(key, raw)
    repository.record_instances([InstanceIn(
        study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID, sop_uid=ds.SOPInstanceUID,
        sha256=hashlib.sha256(raw).hexdigest(), size=len(raw), object_key=key,
        received_at=dt.datetime.now(dt.timezone.utc), modality="MR", instance_number=1, patient_id=ds.PatientID,
    )])
    result = invoke("plan", ds.SeriesInstanceUID, "--json")
    assert result.exit_code == 0, result.output
    (plan,) = json.loads(result.stdout)
    assert plan["series_uid"] == ds.SeriesInstanceUID and plan["modality"] == "MR"
    assert plan["dcmpath"] == f"dicom/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}"
    assert plan["order"] == ["series-summary", "series-summary-markdown"]
    assert one_line_error(invoke("plan", "1.2.3.4")) == "Error: no received series 1.2.3.4"
    assert one_line_error(invoke("plan", "../etc")).startswith("Error: invalid Series Instance UID: '../etc'")


def test_plan_uses_bundles_when_files_are_missing(home: Path, dicom_dir: Path) -> None:
    assert invoke("install", FOLDER_EXAMPLE, "--name", "series-summary").exit_code == 0
    shutil.rmtree(home / "services")
    result = invoke("plan", "--dir", dicom_dir, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["order"] == ["series-summary", "series-summary-markdown"]


# --------------------------------------------------------------------------- built-in services


def _listed(*args: str) -> dict[str, dict]:  # type: ignore[type-arg]
    result = invoke("list", "--all", "--json", *args)
    assert result.exit_code == 0, result.output
    return {row["name"]: row for row in json.loads(result.stdout)}


def test_built_in_services_are_listed_but_off_until_enabled(home: Path) -> None:
    listed = _listed()
    assert listed["forward"]["state"] == "available" and listed["forward"]["source"] == "built-in"
    assert json.loads(invoke("list", "--json").stdout) == []  # nothing runs until enabled
    # recording the installed distributions' services leaves dcmflow's own ones off
    assert "forward" not in {r["name"] for r in json.loads(invoke("install", "--entry-points", "--json").stdout or "[]")}
    assert _listed()["forward"]["state"] == "available"


def test_enable_with_params_then_disable_and_enable_again_keeps_them(home: Path) -> None:
    rules = [{"peer": "pacs", "modality": "CT"}]
    result = invoke("enable", "forward", "--param", f"rules={json.dumps(rules)}", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["version"] == 1
    shown = json.loads(invoke("show", "forward", "--json").stdout)
    assert shown["jobs"][0]["params"] == {"rules": rules}

    assert invoke("disable", "forward").exit_code == 0
    assert _listed()["forward"]["state"] == "disabled"
    assert json.loads(invoke("list", "--json").stdout) == []
    again = invoke("enable", "forward", "--json")  # no --param: the rules set before stay
    assert json.loads(again.stdout)["version"] == 1 and json.loads(again.stdout)["changed"] is False
    assert json.loads(invoke("show", "forward", "--json").stdout)["jobs"][0]["params"] == {"rules": rules}

    rules_file = home / "rules.json"
    rules_file.write_text(json.dumps([{"peer": "archive"}]))
    newer = invoke("enable", "forward", "-p", f"rules=@{rules_file}", "--json")
    assert json.loads(newer.stdout)["version"] == 2  # new params, new version
    assert json.loads(invoke("show", "forward", "--json").stdout)["jobs"][0]["params"] == {"rules": [{"peer": "archive"}]}


def test_enable_mistakes_are_one_line(home: Path) -> None:
    assert "no such param; it has: rules" in one_line_error(invoke("enable", "forward", "-p", "rulez=[]"))
    assert "expected KEY=VALUE" in one_line_error(invoke("enable", "forward", "-p", "rules"))
    assert "nosuch" in one_line_error(invoke("enable", "nosuch"))
    assert "nosuch" in one_line_error(invoke("disable", "nosuch"))
    assert json.loads(invoke("list", "--json").stdout) == []  # nothing was recorded by a mistake
