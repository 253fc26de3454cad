"""A service recorded from an installed distribution, planned and run the way the flow does.

The distribution is a real ``*.dist-info`` folder on ``sys.path`` and ``PYTHONPATH`` (see
tests/services_registry/distinfo.py): the job's own process imports the worker by its module
name from the environment, with no services folder on its path.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from services_registry.install import install_entry_points, installed_specs
from tasks.context import load_series_target, plan_target
from tasks.execution import JobProcess, run_job_process
from tasks.jobs import _import_paths
from tests.services_registry.distinfo import PACKAGE, write_distribution

from .helpers import make_home


def test_entry_point_worker_runs_in_its_own_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = write_distribution(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p))
    try:
        home = make_home(tmp_path / "home")
        series_uid = home.receive([pydicom.dcmread(get_testdata_file("CT_small.dcm"))])
        [result] = install_entry_points(services_dir=home.settings.services_dir, repository=home.repo, store=home.store)
        assert (result.name, result.version) == ("demo-dist", 1)

        specs = installed_specs(home.repo, home.settings.services_dir, home.store)  # what tasks.jobs.plan_jobs uses
        assert [(s.name, s.source, s.version) for s in specs] == [("demo-dist", "entry_point", "1")]
        target = load_series_target(home.repo, home.store, series_uid)
        planned = plan_target(specs, target)
        [job] = planned.jobs
        assert (job.name, job.service, job.service_version) == ("ep-ct-report", "demo-dist", 1)
        assert job.worker == f"{PACKAGE}.services.report" and job.module_dir is None
        assert _import_paths(job, None) == []  # type: ignore[arg-type]  # nothing but the environment

        data, work = tmp_path / "data", tmp_path / "work"
        for folder in (data, work, tmp_path / "modules", tmp_path / "logs"):
            folder.mkdir()
        outcome = run_job_process(JobProcess(
            python=sys.executable,
            worker=job.worker,
            import_paths=_import_paths(job, None),  # type: ignore[arg-type]
            kwargs={"jobName": job.name, "headers": target.headers, "params": job.params,
                    "added_params": planned.added_params},
            env={"DATA": str(data), "MODULES": str(tmp_path / "modules"), "LOGS": str(tmp_path / "logs")},
            work_dir=work,
            log_path=tmp_path / "job.log",
            timeout=job.timeout,
        ))
        assert outcome.status == "succeeded", (tmp_path / "job.log").read_text()
        assert outcome.result == {"written": f"ep-reports/{series_uid}.json", "added": {"tag": "from-entry-point"}}
        written = json.loads((data / "ep-reports" / f"{series_uid}.json").read_text())
        assert written == {"job": "ep-ct-report", "modality": "CT"}
    finally:
        for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
            del sys.modules[name]
        importlib.invalidate_caches()
