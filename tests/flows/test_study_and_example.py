"""A received multi-series study runs its services: the dcm-processor example folder (unchanged,
in its own venv because module/requirements.txt exists) per series, and a study-level job."""

from __future__ import annotations

import json

import pytest

from flows import process_series, process_study
from services_registry.examples import FOLDER_EXAMPLE
from tasks.venvs import READY_MARKER
from tests.factories import make_ct_series, make_small_series
from tests.flows.conftest import prefect_client_env
from tests.tasks.helpers import job, make_home, write_service


@pytest.fixture(scope="module")
def study(prefect_server, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("study")
    home = make_home(root / "home")
    home.install(FOLDER_EXAMPLE, name="series-summary")
    home.install(write_service(root / "src", "study-svc", [
        job("count-series", "study_count", callback="study_level", level="study"),
    ]))
    ct = make_ct_series(4, rows=32, cols=32, seed=5)
    study_uid = str(ct[0].StudyInstanceUID)
    mr = make_small_series(3, study_uid=study_uid, seed=6)
    ct_uid, mr_uid = home.receive(ct), home.receive(mr)
    with home.environ(), prefect_client_env(prefect_server):
        states = {uid: process_series(uid, return_state=True) for uid in (ct_uid, mr_uid)}
        study_state = process_study(study_uid, return_state=True)
    return home, study_uid, {"CT": ct_uid, "MR": mr_uid}, states, study_state


def test_example_folder_service_runs_on_every_series_of_the_study(study) -> None:  # type: ignore[no-untyped-def]
    home, _study_uid, uids, states, _ = study
    for modality, uid in uids.items():
        assert states[uid].is_completed(), states[uid].message
        jobs = {j.job_name: j for j in home.repo.list_jobs(uid)}
        assert {n: j.state for n, j in jobs.items()} == {"series-summary": "succeeded", "series-summary-markdown": "succeeded"}
        files = {f.name: f for f in home.repo.list_session_files(jobs["series-summary"].session_id)}
        summary = json.loads(home.store.get(files[f"summaries/{uid}.json"].object_key))
        # the worker counted the DICOM files at $DATA/<dcmpath>: the series was materialised there
        assert summary["modality"] == modality and summary["instances"] == (4 if modality == "CT" else 3)
        markdown = home.store.get(files[f"summaries/{uid}.md"].object_key).decode()
        assert f"| instances | {summary['instances']} |" in markdown
        assert files[f"summaries/{uid}.md"].job_name == "series-summary-markdown"


def test_service_with_requirements_runs_in_its_own_cached_venv(study) -> None:  # type: ignore[no-untyped-def]
    home = study[0]
    venvs = list((home.root / "venvs" / "series-summary").iterdir())
    ready = [v for v in venvs if (v / READY_MARKER).is_file()]
    assert len(ready) == 1  # built once, used by both series and both jobs
    assert (ready[0] / "bin" / "python").exists()


def test_study_level_job_sees_the_whole_study(study) -> None:  # type: ignore[no-untyped-def]
    home, study_uid, uids, _, study_state = study
    assert study_state.is_completed(), study_state.message
    (job_record,) = [j for j in home.repo.list_jobs() if j.study_uid == study_uid and j.series_uid is None]
    assert job_record.job_name == "count-series" and job_record.state == "succeeded"
    files = {f.name: f for f in home.repo.list_session_files(job_record.session_id)}
    counts = json.loads(home.store.get(files["study/counts.json"].object_key))
    assert counts["counts"] == {uids["CT"]: 4, uids["MR"]: 3}
    assert sorted(counts["seriesIds"]) == sorted(uids.values())
    # series-level jobs were not run at study level, and the study job not per series
    assert all(j.job_name != "count-series" for uid in uids.values() for j in home.repo.list_jobs(uid))
