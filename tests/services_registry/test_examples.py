"""The example services do real work: their workers run in a fresh process, as jobs will."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from services_registry import evaluate_callbacks, load_service
from services_registry.examples import FOLDER_EXAMPLE, PYTHON_EXAMPLE
from services_registry.headers import headers_from_dataset, read_series_folder
from services_registry.runtime import loaded

RUN_WORKER = """
import importlib, json, sys
module_name, function = sys.argv[1].rsplit(".", 1)
kwargs = json.loads(sys.stdin.read())
print(getattr(importlib.import_module(module_name), function)(**kwargs))
"""


def run_worker(modules: Path, dotted: str, kwargs: dict[str, object], data: Path) -> str:
    """dcm-processor's convention: import the dotted worker with $MODULES first on sys.path,
    call it with the four keyword arguments, DATA/MODULES/LOGS in the environment."""
    env = {**os.environ, "DATA": str(data), "MODULES": str(modules), "LOGS": str(data / "logs"),
           "PYTHONPATH": os.pathsep.join([str(modules), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", RUN_WORKER, dotted], input=json.dumps(kwargs), env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_folder_example_summarises_a_real_ct_series(dicom_dir: Path) -> None:
    series = read_series_folder(dicom_dir)
    ct = next(s for s in series.values() if s.representative[1].Modality == "CT")
    headers = headers_from_dataset(ct.representative[1], dcmpath="ct")
    spec = load_service(FOLDER_EXAMPLE, name="series-summary")
    with loaded([spec]) as services:
        evaluation = evaluate_callbacks(services, headers)
    assert evaluation.selected_names == ("series-summary", "series-summary-markdown")
    for selected in evaluation.selected:
        kwargs = {"jobName": selected.job.job_name, "headers": headers, "params": selected.job.params,
                  "added_params": evaluation.added_params}
        run_worker(FOLDER_EXAMPLE / "module", selected.job.worker, kwargs, dicom_dir)
    summary = json.loads((dicom_dir / "summaries" / f"{headers['seriesId']}.json").read_text())
    assert summary["modality"] == "CT" and summary["instances"] == 1
    assert summary["description"] == headers.get("SeriesDescription", "")
    assert "| instances | 1 |" in (dicom_dir / "summaries" / f"{headers['seriesId']}.md").read_text()


def test_python_example_summarises_a_real_mr_series(dicom_dir: Path) -> None:
    series = read_series_folder(dicom_dir)
    mr = next(s for s in series.values() if s.representative[1].Modality == "MR")
    headers = headers_from_dataset(mr.representative[1], dcmpath="mr")
    spec = load_service(PYTHON_EXAMPLE)
    with loaded([spec]) as services:
        evaluation = evaluate_callbacks(services, headers)
    (selected,) = evaluation.selected
    assert selected.added_params == {"modality": "MR"}
    out = run_worker(PYTHON_EXAMPLE.parent, selected.job.worker,
                     {"jobName": selected.job.job_name, "headers": headers, "params": selected.job.params,
                      "added_params": evaluation.added_params}, dicom_dir)
    summary = json.loads(Path(out).read_text())
    assert summary == {"seriesId": headers["seriesId"], "modality": "MR",
                       "description": headers.get("SeriesDescription", ""), "instances": 1}
