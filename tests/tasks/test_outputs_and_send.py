"""Materialising series, output attribution, storage requests, C-STORE to DCMTK storescp and to a TLS peer."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest

from storage.models import PeerBase
from tasks.errors import SendError
from tasks.materialise import materialise_series
from tasks.outputs import (
    changed_files,
    link_tree,
    merge_outputs,
    session_file_key,
    snapshot,
    storage_requests,
)
from tasks.send import client_tls_context, dicom_files, send_files
from tests.factories import make_small_series
from tests.tasks.helpers import free_port, make_home, storescp


def test_series_is_materialised_read_only_from_a_cache(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    uid = home.receive(make_small_series(3, seed=31))
    series = home.repo.get_series(uid)
    assert series is not None
    instances = home.repo.list_instances(uid)
    target = tmp_path / "data" / "dicom" / series.study_uid / uid
    cache = tmp_path / "cache"
    assert materialise_series(home.store, instances, study_uid=series.study_uid, series_uid=uid, cache_dir=cache, target=target) == 3
    files = sorted(target.iterdir())
    assert [p.name for p in files] == sorted(f"{i.sop_uid}.dcm" for i in instances)
    assert all((p.stat().st_mode & 0o222) == 0 for p in files) and (target.stat().st_mode & 0o222) == 0
    assert files[0].stat().st_nlink == 2  # hard link to the cache: fetched once
    assert pydicom.dcmread(files[0]).SeriesInstanceUID == uid
    # again (e.g. another session): served from the cache, same result
    other = tmp_path / "data2" / "s"
    assert materialise_series(home.store, instances, study_uid=series.study_uid, series_uid=uid, cache_dir=cache, target=other) == 3
    assert files[0].stat().st_nlink == 3


def test_each_job_sees_its_own_outputs_only(tmp_path: Path) -> None:
    shared = tmp_path / "data"
    (shared / "dicom").mkdir(parents=True)
    (shared / "dicom" / "x.dcm").write_text("in")
    (shared / "earlier").mkdir()
    (shared / "earlier" / "a.txt").write_text("a")
    view = tmp_path / "job" / "data"
    link_tree(shared, view, shared=("dicom",))
    assert (view / "dicom").is_symlink() and (view / "dicom" / "x.dcm").read_text() == "in"
    assert (view / "earlier" / "a.txt").stat().st_nlink == 2  # earlier outputs: hard links
    before = snapshot(view)
    assert set(before) == {"earlier/a.txt"}  # received DICOM is not an output
    (view / "new").mkdir()
    (view / "new" / "b.txt").write_text("b")
    (shared / "other-job.txt").write_text("c")  # a concurrent job, in its own view, merged meanwhile
    files = changed_files(before, snapshot(view))
    assert files == ["new/b.txt"]
    merge_outputs(view, shared, files)
    assert (shared / "new" / "b.txt").read_text() == "b"


def test_keys_and_storage_requests() -> None:
    assert session_file_key(7, "my job", "out/ä b.dcm") == "sessions/7/files/my_job/out/__b.dcm"
    added = {"j": {"storage": [{"type": "DICOM", "path": "out/j", "destination": "pacs"}, {"type": "pdf", "path": "r.pdf"}]}}
    reqs = storage_requests("j", added, {"storage": {"path": "more"}})
    assert [(r.type, r.path, r.destination) for r in reqs] == [("dicom", "out/j", "pacs"), ("pdf", "r.pdf", None), ("dicom", "more", None)]
    assert storage_requests("k", added, None) == []


def _peer(port: int) -> PeerBase:
    from storage.models import PeerPublic
    import datetime as dt

    return PeerPublic(id=1, created_at=dt.datetime.now(dt.UTC), name="pacs", ae_title="PACS", host="127.0.0.1", port=port)


def test_send_to_dcmtk_storescp(tmp_path: Path) -> None:
    from tests.factories import to_p10_bytes

    out = tmp_path / "files"
    out.mkdir()
    for ds in make_small_series(3, seed=32):
        (out / f"{ds.SOPInstanceUID}.dcm").write_bytes(to_p10_bytes(ds))
    (out / "notes.txt").write_text("not DICOM")
    files = dicom_files(out)
    assert len(files) == 3
    with storescp(tmp_path / "received") as port:
        report = send_files(_peer(port), files, calling_ae="DCMFLOW")
    assert len(report.sent) == 3 and report.attempts == 1
    assert len(list((tmp_path / "received").iterdir())) == 3


def test_send_to_a_dead_peer_is_retried_then_reported(tmp_path: Path) -> None:
    from tests.factories import to_p10_bytes

    path = tmp_path / "one.dcm"
    path.write_bytes(to_p10_bytes(make_small_series(1, seed=33)[0]))
    with pytest.raises(SendError, match="after 2 attempts"):
        send_files(_peer(free_port()), [path], attempts=2, delay=0.1, timeout=2)



def test_send_retries_until_the_peer_answers(tmp_path: Path) -> None:
    """The first attempt finds no peer; tenacity waits ``delay`` and the second one stores it."""
    import subprocess
    import threading

    from tests.factories import to_p10_bytes
    from tests.tasks.helpers import STORESCP

    path = tmp_path / "one.dcm"
    path.write_bytes(to_p10_bytes(make_small_series(1, seed=34)[0]))
    port, received = free_port(), tmp_path / "received"
    received.mkdir()
    procs: list[subprocess.Popen[bytes]] = []
    later = threading.Timer(0.3, lambda: procs.append(subprocess.Popen(
        [STORESCP, "-aet", "PACS", "-od", str(received), str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    later.start()
    try:
        report = send_files(_peer(port), [path], attempts=3, delay=1.5, timeout=5)
    finally:
        later.join()
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)
    assert report.attempts == 2 and len(report.sent) == 1 and report.error is None
    assert len(list(received.iterdir())) == 1

@contextmanager
def _tls_scp(cert: Path, key: Path) -> Iterator[tuple[int, list[str]]]:
    """A pynetdicom storage SCP that speaks only TLS; yields its port and the SOP UIDs it stored."""
    from pynetdicom import AE, evt
    from pynetdicom.presentation import AllStoragePresentationContexts

    stored: list[str] = []

    def on_store(event: evt.Event) -> int:
        stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(str(cert), str(key))
    ae = AE(ae_title="SECUREPACS")
    ae.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, ssl_context=server_context, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        yield port, stored
    finally:
        server.shutdown()


def test_a_peer_marked_tls_gets_its_results_over_tls_only(tmp_path: Path, tls_certificate: tuple[Path, Path]) -> None:
    from tests.factories import to_p10_bytes

    cert, key = tls_certificate
    files = []
    for ds in make_small_series(2, seed=34):
        files.append(tmp_path / f"{ds.SOPInstanceUID}.dcm")
        files[-1].write_bytes(to_p10_bytes(ds))
    with _tls_scp(cert, key) as (port, stored):
        secure = _peer(port).model_copy(update={"tls": True, "ae_title": "SECUREPACS"})
        report = send_files(secure, files, tls=client_tls_context(ca=cert))
        assert report.sent == stored and len(stored) == 2
        with pytest.raises(SendError, match="not established"):  # the same port in clear: refused
            send_files(_peer(port).model_copy(update={"ae_title": "SECUREPACS"}), files, attempts=1, timeout=5)
        with pytest.raises(SendError, match="over TLS not established"):  # a certificate we do not trust
            send_files(secure, files, attempts=1, timeout=5)  # system CAs only: self-signed fails
    assert len(stored) == 2
    with pytest.raises(SendError, match="TLS settings unusable"):
        client_tls_context(ca=tmp_path / "missing.pem")
