"""What a job dispatched to another machine works from: the session from the records, and
outputs that travel through the object store (tasks.context.session_run_of, tasks.outputs).

The whole dispatch (a run-job flow run on a channel worker with its own DCMFLOW_HOME) runs
for real in tests/dcmflow/test_production_e2e.py; these check the parts' edges.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.context import session_run_of
from tasks.errors import SeriesNotFoundError
from tasks.outputs import restore_outputs, store_outputs
from tests.factories import make_small_series
from tests.tasks.helpers import Home, make_home


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return make_home(tmp_path / "home")


def _session(home: Home) -> int:
    uid = home.receive(make_small_series(2, seed=61))
    series = home.repo.get_series(uid)
    assert series is not None
    session = home.repo.create_session(series_uid=uid, study_uid=series.study_uid, trigger="test")
    home.repo.put_session_data(session.id, "headers", {"seriesId": uid, "Modality": "MR"})
    home.repo.put_session_data(session.id, "added_params", {"prep": {"threshold": 3}})
    return session.id


def test_a_recorded_session_is_rebuilt_in_another_folder(home: Home, tmp_path: Path) -> None:
    session_id = _session(home)
    run = session_run_of(home.repo, session_id, work_dir=tmp_path / "elsewhere" / "s")
    assert run.session_id == session_id and run.level == "series" and run.series_uid
    assert run.headers["Modality"] == "MR" and run.added_params == {"prep": {"threshold": 3}}
    assert all(Path(p).is_dir() and Path(p).is_relative_to(tmp_path / "elsewhere") for p in (run.data_dir, run.modules_dir, run.logs_dir))
    with pytest.raises(SeriesNotFoundError, match="no session 999999"):
        session_run_of(home.repo, 999_999, work_dir=tmp_path / "x")


def test_outputs_stored_on_one_machine_are_restored_on_another(home: Home, tmp_path: Path) -> None:
    session_id = _session(home)
    written = tmp_path / "machine-a" / "data"
    (written / "masks" / "deep").mkdir(parents=True)
    (written / "masks" / "deep" / "m.nii").write_bytes(b"\x00mask" * 100)
    (written / "report.txt").write_text("ok")
    store_outputs(home.repo, home.store, session_id=session_id, job_name="seg", data_dir=written,
                  paths=["masks/deep/m.nii", "report.txt"])
    other = tmp_path / "machine-b" / "data"
    files = home.repo.list_session_files(session_id)
    assert sorted(restore_outputs(home.store, files, other)) == ["masks/deep/m.nii", "report.txt"]
    assert (other / "masks" / "deep" / "m.nii").read_bytes() == b"\x00mask" * 100
    assert (other / "report.txt").read_text() == "ok"
    assert not [p for p in other.rglob(".*")]  # no temporary file left behind


def test_a_stored_output_that_changed_is_refused(home: Home, tmp_path: Path) -> None:
    session_id = _session(home)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "out.txt").write_text("v1")
    (record,) = store_outputs(home.repo, home.store, session_id=session_id, job_name="j", data_dir=tmp_path / "a", paths=["out.txt"])
    home.store.put(record.object_key, b"tampered")
    with pytest.raises(OSError, match="does not match its recorded sha256"):
        restore_outputs(home.store, [record], tmp_path / "b")


def test_a_name_that_leaves_data_is_refused(home: Home, tmp_path: Path) -> None:
    session_id = _session(home)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "out.txt").write_text("x")
    (record,) = store_outputs(home.repo, home.store, session_id=session_id, job_name="j", data_dir=tmp_path / "a", paths=["out.txt"])
    escaping = record.model_copy(update={"name": "../../etc/cron.d/x"})
    with pytest.raises(OSError, match="not a path under \\$DATA"):
        restore_outputs(home.store, [escaping], tmp_path / "b" / "data")
    assert not (tmp_path / "etc").exists()
