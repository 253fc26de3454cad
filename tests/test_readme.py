"""README snippets are real files under tests/examples/ that these tests run (STYLE.md §15)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dcmflow.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
_FILE_BLOCK = re.compile(r"<!-- file: (?P<path>[^ ]+) -->\n```[a-z]*\n(?P<body>.*?)```\n", re.S)

runner = CliRunner()


def test_every_file_snippet_is_the_file() -> None:
    blocks = list(_FILE_BLOCK.finditer(README))
    assert len(blocks) >= 4
    for match in blocks:
        assert (ROOT / match["path"]).read_text() == match["body"], f"README drifted from {match['path']}"


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run extracts the block after <!-- test-command -->; make sure there is one."""
    match = re.search(r"<!-- test-command -->\n```bash\n(?P<cmd>.+?)\n```", README)
    assert match is not None
    assert "pytest" in match["cmd"] and "constraints.txt" in match["cmd"]


def _testdata(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    assert path is not None
    return Path(path)


def test_first_service_installs_and_plans_as_the_readme_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCMFLOW_HOME", str(tmp_path / "home"))
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    for path in ("tests/examples/ct_volume", "tests/examples/ct_volume_py.py"):
        result = runner.invoke(app, ["services", "install", str(ROOT / path)])
        assert result.exit_code == 0, result.output
    dicom = tmp_path / "dicom"
    dicom.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(_testdata(name), dicom / name)
    result = runner.invoke(app, ["services", "plan", "--dir", str(dicom), "--json"])
    assert result.exit_code == 0, result.output
    plans = {p["modality"]: p for p in json.loads(result.stdout)}
    # "higher runs first": the Python job has priority high, the folder job default.
    assert plans["CT"]["order"] == ["ct-volume-py", "ct-volume"]
    ct_job = next(j for j in plans["CT"]["selected"] if j["job"] == "ct-volume")
    assert ct_job["added_params"] == {"series": plans["CT"]["series_uid"]}
    assert plans["MR"]["selected"] == []
    assert {r["job"] for r in plans["MR"]["rejected"]} == {"ct-volume", "ct-volume-py"}


def test_first_service_workers_do_what_they_say(tmp_path: Path) -> None:
    """Call both workers the way dcm-processor does, in a fresh interpreter with DATA set."""
    data = tmp_path / "data"
    series = data / "dicom" / "1.2.3"
    series.mkdir(parents=True)
    for i in range(3):
        shutil.copy(_testdata("CT_small.dcm"), series / f"{i}.dcm")
    headers = {"dcmpath": "dicom/1.2.3", "seriesId": "1.2.3", "Modality": "CT"}
    script = f"""
import sys, json
sys.path[:0] = [{str(ROOT / 'tests/examples/ct_volume/module')!r}, {str(ROOT / 'tests/examples')!r}]
import ct_volume, ct_volume_py
h = json.loads({json.dumps(json.dumps(headers))})
ct_volume.measure(jobName="ct-volume", headers=h, params={{"min_slices": 1}}, added_params={{"ct-volume": {{"series": "1.2.3"}}}})
ct_volume_py.measure(jobName="ct-volume-py", headers=h, params=None, added_params={{}})
"""
    env = {**os.environ, "DATA": str(data), "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=60)
    assert (data / "ct-volume" / "1.2.3.txt").read_text() == "3 slices\n"
    assert (data / "1.2.3.slices.txt").read_text() == "3 slices\n"
