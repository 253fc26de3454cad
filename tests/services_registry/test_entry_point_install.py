"""``dcmflow services install --entry-points``: services of installed distributions, recorded."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from dcmflow.cli import services
from services_registry.examples import FOLDER_EXAMPLE
from storage import db

from .conftest import series_uid_of
from .distinfo import PACKAGE, SOURCE, write_distribution

runner = CliRunner()
app = typer.Typer(pretty_exceptions_enable=False)
app.add_typer(services.app, name="services")


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["services", *map(str, args)])


def forget_package() -> None:
    for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
        del sys.modules[name]
    importlib.invalidate_caches()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("DCMFLOW_HOME", str(home))
    home.mkdir()
    db.upgrade(db.create_engine(f"sqlite:///{(home / 'dcmflow.db').resolve()}"))
    return home


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    site = write_distribution(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    yield site
    forget_package()


def test_install_list_plan_and_versions(home: Path, site: Path, dicom_dir: Path) -> None:
    result = invoke("install", "--entry-points", "--json")
    assert result.exit_code == 0, result.output
    [installed] = json.loads(result.stdout)
    assert installed["name"] == "demo-dist" and installed["version"] == 1 and installed["changed"]
    assert installed["source"] == "entry_point" and installed["install_path"] is None
    assert installed["bundle_key"] == "services/demo-dist/1.tar.gz"  # the package files, for the record
    assert not (home / "services" / "demo-dist").exists()  # nothing copied: imported by name

    listed = json.loads(invoke("list", "--json").stdout)
    assert [(s["name"], s["version"], s["source_kind"]) for s in listed] == [("demo-dist", 1, "entrypoint")]
    assert [j["worker"] for j in listed[0]["jobs"]] == [f"{PACKAGE}.services.report"]
    table = invoke("list")
    assert table.exit_code == 0 and "entrypoint" in table.stdout

    plans = json.loads(invoke("plan", "--dir", dicom_dir, "--json").stdout)
    by_uid = {p["series_uid"]: p for p in plans}
    ct, mr = by_uid[series_uid_of("CT_small.dcm")], by_uid[series_uid_of("MR_small.dcm")]
    assert [(j["job"], j["service"]) for j in ct["selected"]] == [("ep-ct-report", "demo-dist")]
    assert ct["added_params"] == {"ep-ct-report": {"tag": "from-entry-point"}}
    assert mr["selected"] == [] and [r["job"] for r in mr["rejected"]] == ["ep-ct-report"]

    again = invoke("install", "--entry-points")
    assert again.exit_code == 0, again.output
    assert "demo-dist unchanged, already recorded as version 1" in again.stderr

    # a new release of the distribution: plan refuses the unrecorded code, install records version 2
    forget_package()
    write_distribution(site, version="1.1")
    stale = invoke("plan", "--dir", dicom_dir)
    assert stale.exit_code == 1 and "install --entry-points" in stale.stderr and "Traceback" not in stale.output
    newer = json.loads(invoke("install", "--entry-points", "--json").stdout)
    assert [(r["name"], r["version"], r["changed"]) for r in newer] == [("demo-dist", 2, True)]
    assert invoke("plan", "--dir", dicom_dir).exit_code == 0

    # the bundle makes backup work as for other services; remove forgets every version
    backed = invoke("backup", "demo-dist", home.parent / "backup")
    assert backed.exit_code == 0, backed.output
    assert (home.parent / "backup" / "demo-dist" / PACKAGE / "services.py").read_text() == (
        site / PACKAGE / "services.py").read_text()
    assert invoke("remove", "demo-dist").exit_code == 0
    assert json.loads(invoke("list", "--json").stdout) == []


def test_entry_point_validation_is_that_of_other_installs(home: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    assert invoke("install", FOLDER_EXAMPLE, "--name", "series-summary").exit_code == 0
    site = write_distribution(tmp_path / "site", source=SOURCE.replace('name="ep-ct-report"', 'name="series-summary"'))
    monkeypatch.syspath_prepend(str(site))
    try:
        result = invoke("install", "--entry-points")
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "duplicate jobName 'series-summary'" in lines[0], result.stderr
        assert [s["name"] for s in json.loads(invoke("list", "--json").stdout)] == ["series-summary"]
    finally:
        forget_package()


def test_install_arguments(home: Path) -> None:
    assert invoke("install", "--entry-points", "--name", "x").exit_code == 1
    assert invoke("install", FOLDER_EXAMPLE, "--entry-points").exit_code == 1
    assert invoke("install").exit_code == 1
