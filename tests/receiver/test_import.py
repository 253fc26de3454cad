"""Folder import and watch on a real SQLite database and local object store (``env`` fixture)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from receiver.importer import Importer, Skipped, import_paths, iter_files
from receiver.watch import FolderWatcher, is_in_progress, ledger_path_for
from storage.keys import instance_key
from tests.factories import make_small_series, to_p10_bytes
from tests.receiver.conftest import Env, write_series


def _drop(root: Path, study: list[Dataset]) -> Path:
    """A folder like a CD export: one sub-folder per series, a nested level, and a junk file."""
    ct = [d for d in study if d.Modality == "CT"]
    mr = [d for d in study if d.Modality != "CT"]
    write_series(root / "ct", ct)
    write_series(root / "mr" / "deeper", mr)
    (root / "README.txt").write_text("not a DICOM file\n")
    return root


def test_import_folder_records_everything_and_reports_junk(env: Env, study: list[Dataset], tmp_path: Path) -> None:
    root = _drop(tmp_path / "drop", study)
    seen: list[tuple[Path, Skipped | None]] = []
    report = import_paths([root], store=env.store, repository=env.repo, on_file=lambda p, s: seen.append((p, s)))

    assert report.files == len(study) + 1 == len(seen)
    assert (report.new, report.duplicates, report.new_versions) == (len(study), 0, 0)
    assert [s.path.name for s in report.skipped] == ["README.txt"]
    assert report.skipped[0].line().startswith(f"not DICOM: {root / 'README.txt'}: ")
    assert report.line().endswith("in 2 series; 1 not DICOM")
    assert env.instance_count() == len(study)

    series = env.repo.list_series()
    assert {s.series_uid for s in series} == {d.SeriesInstanceUID for d in study} == report.series_uids
    assert {s.calling_ae for s in series} == {"IMPORT"}
    ds = study[0]
    key = instance_key(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert env.store.get(key) == to_p10_bytes(ds)
    # the import's batch is closed: nothing blocks stability once the quiet period is over
    claims = env.repo.claim_due_series(
        now=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=61), default_stable_age=60, claimer="t"
    )
    assert len(claims) == 2


def test_reimport_is_duplicates_and_changed_file_is_a_new_version(
    env: Env, study: list[Dataset], tmp_path: Path
) -> None:
    root = _drop(tmp_path / "drop", study)
    import_paths([root], store=env.store, repository=env.repo)
    again = import_paths([root], store=env.store, repository=env.repo)
    assert (again.new, again.duplicates, again.new_versions, again.not_dicom) == (0, len(study), 0, 1)

    changed = study[0].copy()
    changed.SeriesDescription = "re-sent with other content"
    (tmp_path / "one.dcm").write_bytes(to_p10_bytes(changed))
    third = import_paths([tmp_path / "one.dcm"], store=env.store, repository=env.repo, source="PACS-EXPORT")
    assert (third.new, third.duplicates, third.new_versions) == (0, 0, 1)
    versions = env.repo.get_instance_versions(changed.SOPInstanceUID)
    assert [v.version for v in versions] == [1, 2]
    assert versions[1].calling_ae == "PACS-EXPORT"
    assert versions[0].object_key != versions[1].object_key  # never overwritten
    assert env.instance_count() == len(study) + 1


def test_series_being_imported_is_never_declared_stable(env: Env, tmp_path: Path) -> None:
    series = make_small_series(12, seed=3)
    write_series(tmp_path / "s", series)
    far_future = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)  # < association timeout
    claimed_during: list[int] = []

    def during(path: Path, skipped: Skipped | None) -> None:
        claims = env.repo.claim_due_series(now=far_future, default_stable_age=60, claimer="t")
        claimed_during.append(len(claims))

    Importer(env.store, env.repo, batch_size=5).import_paths([tmp_path / "s"], on_file=during)
    assert env.instance_count() == 12  # batches were recorded while the callback ran …
    assert set(claimed_during) == {0}  # … yet the open import batch kept the series receiving
    assert len(env.repo.claim_due_series(now=far_future, default_stable_age=60, claimer="t")) == 1


def test_missing_path_is_an_error_before_anything_is_imported(env: Env, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        import_paths([tmp_path / "nope"], store=env.store, repository=env.repo)
    assert env.instance_count() == 0


def test_iter_files_is_recursive_sorted_and_skips_hidden(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2").write_text("x")
    (tmp_path / "a.dcm").write_text("x")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x").write_text("x")
    (tmp_path / "b" / ".DS_Store").write_text("x")
    assert [p.relative_to(tmp_path).as_posix() for p in iter_files([tmp_path])] == ["a.dcm", "b/2"]


def test_tmp_extension_rule() -> None:
    assert is_in_progress("study1.tmp") and is_in_progress("x.tmp2") and is_in_progress("A.TMP")
    assert not is_in_progress("study1") and not is_in_progress("tmp") and not is_in_progress("x.dcm")


def test_watch_ignores_tmp_until_renamed_then_imports_once(env: Env, tmp_path: Path) -> None:
    watched = tmp_path / "incoming"
    watched.mkdir()
    first = make_small_series(6, seed=11)
    second = make_small_series(4, seed=12)
    write_series(watched / "x.tmp", first)
    write_series(watched / "y.tmp2", second)
    ledger = ledger_path_for(tmp_path / "home", watched)
    batches: list[str] = []
    watcher = FolderWatcher(watched, Importer(env.store, env.repo), ledger, on_batch=lambda n, r: batches.append(n))

    assert watcher.scan_once() == []
    assert env.instance_count() == 0

    (watched / "x.tmp").rename(watched / "x")
    done = watcher.scan_once()
    assert [(name, r.new) for name, r in done] == [("x", 6)]
    assert env.instance_count() == 6
    assert watcher.scan_once() == []  # not twice

    restarted = FolderWatcher(watched, Importer(env.store, env.repo), ledger)
    assert restarted.scan_once() == []  # the ledger survives a restart
    assert env.instance_count() == 6

    (watched / "y.tmp2").rename(watched / "y")
    assert [(n, r.new) for n, r in restarted.scan_once()] == [("y", 4)]
    assert batches == ["x"]
    assert restarted.total.new == 4 and env.instance_count() == 10


def test_watch_imports_a_loose_file_once_it_stopped_changing(env: Env, tmp_path: Path) -> None:
    watched = tmp_path / "incoming"
    watched.mkdir()
    ds = make_small_series(1, seed=21)[0]
    (watched / "one.dcm").write_bytes(to_p10_bytes(ds))
    (watched / "junk.bin").write_bytes(b"\x00" * 10)
    watcher = FolderWatcher(watched, Importer(env.store, env.repo), tmp_path / "ledger.jsonl")
    assert watcher.scan_once() == []  # first sight: size and time recorded
    done = {name: r for name, r in watcher.scan_once()}
    assert done["one.dcm"].new == 1 and done["junk.bin"].not_dicom == 1
    assert watcher.scan_once() == []
    assert env.instance_count() == 1
