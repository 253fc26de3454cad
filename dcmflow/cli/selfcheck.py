"""``dcmflow selfcheck``: prove the configured database and object store work, end to end.

It migrates the database, round-trips a setting, writes a real DICOM file with a conditional
write, reads it back whole and by range, packs it into a series archive and reads it back
from there, then deletes everything it wrote. Each step is timed; any failure exits 1.
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import typer

from dcmflow.cli._common import load_settings
from dcmflow.cli._output import emit, fail, info


@dataclass
class _Check:
    name: str
    ok: bool
    detail: str
    ms: float


def _synthetic_instance() -> tuple[str, str, str, bytes]:
    """pydicom's bundled CT_small.dcm under fresh UIDs, so nothing real is touched."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    path = get_testdata_file("CT_small.dcm")
    assert path is not None, "pydicom's bundled test data is missing"
    ds = dcmread(path)
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return study, series, sop, buf.getvalue()


def selfcheck(
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    keep: bool = typer.Option(False, "--keep", help="Keep the test objects (for inspection)."),
) -> None:
    """Check the configured database and object store end to end (writes, then cleans up).

    Examples:

        dcmflow selfcheck

        dcmflow selfcheck --json
    """
    from storage import archive, db
    from storage.errors import ObjectExistsError
    from storage.keys import instance_key
    from storage.objects import ObjectStore
    from storage.repository import Repository

    from dcmflow.wiring import describe_database, describe_object_store, object_store_from

    settings = load_settings()
    info(f"database:     {describe_database(settings)}")
    info(f"object store: {describe_object_store(settings)}")
    results: list[_Check] = []
    study, series, sop, data = _synthetic_instance()
    key = instance_key(study, series, sop)
    repo: Repository | None = None
    store: ObjectStore | None = None

    def run(name: str, step: Callable[[], str]) -> bool:
        start = time.perf_counter()
        try:
            detail, ok = step(), True
        except Exception as exc:  # every failure becomes one row of the report
            text = str(exc).strip()
            detail, ok = f"{exc.__class__.__name__}: {text.splitlines()[0] if text else ''}", False
        results.append(_Check(name, ok, detail, round((time.perf_counter() - start) * 1000, 1)))
        return ok

    def database() -> str:
        nonlocal repo
        engine = db.create_engine(settings.effective_database_url)
        db.upgrade(engine)
        repo = Repository(engine)
        return f"schema at revision {db.current_revision(engine)}"

    def records() -> str:
        assert repo is not None
        stamp = f"{time.time():.3f}/{uuid.uuid4().hex[:8]}"
        repo.set_setting("selfcheck.last_run", stamp)
        got = repo.get_setting("selfcheck.last_run")
        if got != stamp:
            raise RuntimeError(f"read back {got!r}, wrote {stamp!r}")
        return "setting written and read back"

    def objects() -> str:
        nonlocal store
        store = object_store_from(settings)
        store.check()
        put = store.put_if_absent(key, data)
        try:
            store.put_if_absent(key, data)
        except ObjectExistsError:
            pass
        else:
            raise RuntimeError("a second conditional write of the same key was accepted")
        if store.get(key) != data:
            raise RuntimeError("full read differs from what was written")
        if store.get_range(key, 128, 4) != b"DICM" or store.get_range(key, 1000, 500) != data[1000:1500]:
            raise RuntimeError("ranged read differs from what was written")
        return f"{put.size} B written once (second writer refused), read whole and by range"

    def series_archive() -> str:
        assert store is not None
        index = archive.pack_series(store, study, series, [data])
        if archive.read_instance(store, index, sop) != data:
            raise RuntimeError("instance read from the archive differs")
        meta = archive.list_metadata(store, (study, series))
        if len(meta) != 1:
            raise RuntimeError(f"index lists {len(meta)} instances, expected 1")
        return "packed, instance read by one ranged GET, metadata read from the index"

    def cleanup() -> str:
        assert store is not None
        keys = [key, *(o.key for o in store.list(archive.archive_prefix(study, series)))]
        if keep:
            return "kept: " + ", ".join(keys)
        for k in keys:
            store.delete(k)
        return f"{len(keys)} test objects deleted"

    if run("database", database):
        run("records", records)
    if run("object store", objects):
        run("series archive", series_archive)
        run("cleanup", cleanup)

    emit(
        [{"check": r.name, "result": "ok" if r.ok else "FAILED", "ms": r.ms, "detail": r.detail} for r in results],
        as_json,
        columns=["check", "result", "ms", "detail"],
        title=None if as_json else "dcmflow selfcheck",
    )
    failed = [r.name for r in results if not r.ok]
    if failed:
        fail(f"self-check failed: {', '.join(failed)}")
    info("all checks passed")
