"""End to end through the receiver's importer: import_folder flow → records → process_series."""

from __future__ import annotations

import json
from pathlib import Path

from flows import import_folder, process_series
from services_registry.examples import FOLDER_EXAMPLE
from tests.factories import make_small_series, to_p10_bytes
from tests.flows.conftest import prefect_client_env
from tests.tasks.helpers import make_home


def test_imported_folder_is_processed(tmp_path: Path, prefect_server) -> None:  # type: ignore[no-untyped-def]
    home = make_home(tmp_path / "home")
    home.install(FOLDER_EXAMPLE, name="series-summary")
    incoming = tmp_path / "incoming" / "exam"
    incoming.mkdir(parents=True)
    series = make_small_series(3, seed=41)
    for i, ds in enumerate(series):
        (incoming / f"IM{i:04d}").write_bytes(to_p10_bytes(ds))
    uid = str(series[0].SeriesInstanceUID)
    with home.environ(), prefect_client_env(prefect_server):
        imported = import_folder(str(incoming.parent), return_state=True)
        assert imported.is_completed(), imported.message
        assert len(home.repo.list_instances(uid)) == 3
        state = process_series(uid, return_state=True)
    assert state.is_completed(), state.message
    (summary_job,) = [j for j in home.repo.list_jobs(uid) if j.job_name == "series-summary"]
    files = {f.name: f for f in home.repo.list_session_files(summary_job.session_id)}
    summary = json.loads(home.store.get(files[f"summaries/{uid}.json"].object_key))
    assert summary["instances"] == 3 and summary["modality"] == "MR"


def test_import_folder_fails_on_a_missing_path(tmp_path: Path, prefect_server) -> None:  # type: ignore[no-untyped-def]
    home = make_home(tmp_path / "home")
    with home.environ(), prefect_client_env(prefect_server):
        state = import_folder(str(tmp_path / "nope"), return_state=True)
    assert state.is_failed() and "dcmflow import" in (state.message or "")
