"""The newcomer's path of the README's "First five minutes", end to end.

``dcmflow up --demo`` on a fresh home with the embedded defaults (no service installed, no
setting): the demo enables the built-in preview and QC, sends its CT study over DICOM, the
triggers run the flows, and the demo prints a Prefect UI link to each preview. The test then
reads those artifacts back from the Prefect server and checks the images are real, windowed
PNGs, and that ``dcmflow doctor`` passes against the running stack.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcmflow.prefect_api import api_client
from tests.dcmflow.test_up_e2e import STORESCU, Up, make_up, wait_for

pytestmark = pytest.mark.skipif(not Path(STORESCU).exists(), reason="DCMTK storescu is not installed")

_LINK = re.compile(r"^\s*(preview|qc)\s+series \d+ \(([^)]*)\)\s+(http://\S+/artifacts/key/(\S+))$", re.MULTILINE)
_PNG = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")


def _failed_run_logs(up: Up) -> str:
    """The Prefect logs of the failed flow runs: what went wrong is there, not in up's log."""
    with api_client(up.api) as api:
        runs = api.post("/flow_runs/filter", json={"flow_runs": {"state": {"type": {"any_": ["FAILED", "CRASHED"]}}}}).json()
        logs = api.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [r["id"] for r in runs]}}, "limit": 200}).json()
    return "\n".join(f"{log['level']} {log['message']}" for log in logs)


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    up = make_up(tmp_path_factory.mktemp("newcomer"), "home", install=False)
    up.up_args = ("--demo",)
    up.start()
    try:
        wait_for("the demo to finish", lambda: re.search("the demo (study was processed|failed)", up.log.read_text()), timeout=300)
        if "the demo study was processed" not in up.log.read_text():
            pytest.fail(up.log.read_text()[-3000:] + _failed_run_logs(up))
        yield up
    finally:
        up.stop()


def test_up_demo_processes_the_study_and_links_its_previews(newcomer: Up) -> None:
    log = newcomer.log.read_text()
    assert "enabled the built-in service preview" in log and "enabled the built-in service qc" in log
    links = _LINK.findall(log)
    assert sorted((job, description) for job, description, _, _ in links) == [
        ("preview", "AXIAL 1.25mm LUNG"), ("preview", "AXIAL 1.25mm STND"),
        ("qc", "AXIAL 1.25mm LUNG"), ("qc", "AXIAL 1.25mm STND"),
    ]
    state = json.loads(newcomer.dcmflow("status", "--json").stdout)["stack"]
    assert all(url.startswith(state["ui_url"].rstrip("/") + "/artifacts/key/") for _, _, url, _ in links)
    with api_client(newcomer.api) as api:
        for job, _, _, key in links:
            (artifact,) = api.post("/artifacts/filter", json={"artifacts": {"key": {"any_": [key]}}}).raise_for_status().json()
            assert artifact["type"] == "markdown" and artifact["flow_run_id"]
            if job == "qc":
                assert "instances" in artifact["data"].lower()
                continue
            images = [Image.open(io.BytesIO(base64.b64decode(data))) for data in _PNG.findall(artifact["data"])]
            assert len(images) == 2  # the middle slice and the montage
            for image in images:
                pixels = np.asarray(image.convert("L"), dtype=float)
                # Windowed: neither black nor saturated, with real contrast.
                assert 0.02 < (pixels > 0).mean() and (pixels >= 255).mean() < 0.5 and pixels.std() > 10


def test_doctor_passes_on_the_embedded_defaults_while_up_runs(newcomer: Up) -> None:
    done = newcomer.dcmflow("doctor", "--json", check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {row["check"]: row for row in json.loads(done.stdout)}
    assert {row["status"] for row in rows.values()} <= {"ok", "warn", "skip"}, rows
    for check in ("database", "object store", "prefect api", "prefect deployments", "services"):
        assert rows[check]["status"] == "ok", rows[check]
    assert "preview" in rows["services"]["detail"] and "qc" in rows["services"]["detail"]
