"""Real traffic against the in-process SCP: pynetdicom SCU and DCMTK storescu."""

from __future__ import annotations

import copy
import os
import random
import subprocess
from pathlib import Path

import pytest
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification  # type: ignore[attr-defined]

from receiver import status
from storage.keys import instance_key
from tests.factories import make_small_series, to_p10_bytes
from tests.receiver.conftest import AE_TITLE, DCMTK_ECHOSCU, DCMTK_STORESCU, Env, RunningScp, write_series


def _meta_end(p10: bytes) -> int:
    """Offset where the dataset starts in a PS3.10 file (after the group 0002 elements)."""
    import struct

    group_length = struct.unpack("<I", p10[140:144])[0]  # (0002,0000) UL, explicit VR LE
    return 144 + group_length


def _assoc(port: int, ae_title: str = "TESTSCU", called: str = AE_TITLE):  # type: ignore[no-untyped-def]
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title=called)


def test_dcmtk_storescu_study_is_stored_and_recorded(env: Env, scp: RunningScp, study: list[Dataset], tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_series(src, study)
    result = subprocess.run(
        [DCMTK_STORESCU, "-aet", "MODALITY", "-aec", AE_TITLE, "127.0.0.1", str(scp.port), "+sd", "+r", str(src)],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert env.spool.count() == len(study)
    assert env.ingester().drain() == len(study)
    assert env.spool.count() == 0
    assert env.instance_count() == len(study)
    for ds in study:
        key = instance_key(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        stored = env.store.get(key)
        assert stored.endswith(to_p10_bytes(ds)[_meta_end(to_p10_bytes(ds)) :])  # dataset bytes as sent
    series = {ds.SeriesInstanceUID for ds in study}
    assert len(series) == 2
    for uid in series:
        assert len(env.repo.list_instances(uid)) == sum(1 for ds in study if ds.SeriesInstanceUID == uid)
    ct = env.repo.list_instances(study[0].SeriesInstanceUID)[0]
    assert ct.calling_ae == "MODALITY"
    assert ct.transfer_syntax_uid == "1.2.840.10008.1.2.1"


def test_c_echo_pynetdicom_and_dcmtk(scp: RunningScp) -> None:
    assoc = _assoc(scp.port)
    assert assoc.is_established
    rsp = assoc.send_c_echo()
    assert rsp.Status == status.SUCCESS
    assoc.release()
    result = subprocess.run(
        [DCMTK_ECHOSCU, "-aec", AE_TITLE, "127.0.0.1", str(scp.port)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr


def _bad(ds: Dataset, **changes: str) -> Dataset:
    bad = copy.deepcopy(ds)
    for keyword, value in changes.items():
        if value is None:
            delattr(bad, keyword)
        else:
            setattr(bad, keyword, value)
    return bad


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"StudyInstanceUID": "1.2.abc"}, status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS),
        ({"SeriesInstanceUID": "../../etc"}, status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS),
        ({"StudyInstanceUID": None}, status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS),
        ({"SeriesInstanceUID": "1." * 40 + "1"}, status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS),
    ],
    ids=["letters", "path", "missing", "too-long"],
)
def test_invalid_uids_fail_and_association_goes_on(
    env: Env, scp: RunningScp, change: dict[str, str], expected: int
) -> None:
    good, other = make_small_series(2, seed=11)
    assoc = _assoc(scp.port)
    assert assoc.is_established
    assert assoc.send_c_store(_bad(good, **change)).Status == expected
    assert assoc.send_c_store(other).Status == status.SUCCESS  # same association goes on
    assoc.release()
    assert env.spool.count() == 1
    assert env.ingester().drain() == 1
    assert not any(p for p in env.objects_dir.rglob("*") if "etc" in p.name)


def _send_raw_store(assoc, sop_class: str, sop_uid: str, dataset: bytes) -> int:  # type: ignore[no-untyped-def]
    """Send a C-STORE whose Data Set is ``dataset`` verbatim (pynetdicom would re-encode a
    Dataset, so this mirrors ``Association.send_c_store`` after its encode step)."""
    from io import BytesIO

    from pynetdicom.dimse_primitives import C_STORE

    context = assoc._get_valid_context(sop_class, "", "scu")
    req = C_STORE()
    req.MessageID = 1
    req.Priority = 2
    req.AffectedSOPClassUID = sop_class
    req.AffectedSOPInstanceUID = sop_uid
    req.DataSet = BytesIO(dataset)
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        pass
    try:
        assoc.dimse.send_msg(req, context.context_id)
        _cx, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    return int(rsp.Status)


def _dataset_bytes(ds: Dataset) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True  # first proposed context: implicit VR LE
    write_dataset(fp, ds)
    return fp.getvalue()


@pytest.mark.parametrize("kind", ["garbage", "truncated", "sop-mismatch", "request-uid-path"])
def test_unusable_datasets_fail_and_association_goes_on(env: Env, scp: RunningScp, kind: str) -> None:
    good, other = make_small_series(2, seed=12)
    sop_class, sop_uid = str(good.SOPClassUID), str(good.SOPInstanceUID)
    raw = _dataset_bytes(good)
    if kind == "garbage":
        # Noise: whether pydicom fails to parse it (0xC000) or finds no UIDs in it (0xA900)
        # depends on the bytes; both must be failures.
        payload = b"\x08\x00\x18\x00\xff\xff\xff\x7f" + random.Random(1).randbytes(200)
        expected = (status.CANNOT_UNDERSTAND, status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS)
    elif kind == "truncated":
        # Cut inside the header: pydicom stops at the end of the bytes, the UIDs are missing.
        payload, expected = raw[:37], (status.CANNOT_UNDERSTAND, status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS)
    elif kind == "sop-mismatch":
        payload, expected, sop_uid = raw, status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "1.2.3.4.5"
    else:
        payload, expected, sop_uid = raw, status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "../../etc/passwd"
    assoc = _assoc(scp.port)
    assert assoc.is_established
    answer = _send_raw_store(assoc, sop_class, sop_uid, payload)
    assert answer in expected if isinstance(expected, tuple) else answer == expected
    assert status.is_failure(answer)
    assert assoc.send_c_store(other).Status == status.SUCCESS  # the association goes on
    assoc.release()
    assert env.spool.count() == 1
    assert env.ingester().drain() == 1
    assert not list(env.spool.rejected_dir.iterdir())
    # and the receiver goes on too
    assoc = _assoc(scp.port)
    assert assoc.send_c_echo().Status == status.SUCCESS
    assoc.release()


def test_duplicate_is_noop_and_changed_content_is_new_version(env: Env, scp: RunningScp) -> None:
    (ds,) = make_small_series(1, seed=21)
    assoc = _assoc(scp.port)
    assert assoc.send_c_store(ds).Status == status.SUCCESS
    assoc.release()
    env.ingester().drain()
    assert env.instance_count() == 1

    assoc = _assoc(scp.port)
    assert assoc.send_c_store(ds).Status == status.SUCCESS  # identical re-send
    changed = copy.deepcopy(ds)
    changed.SeriesDescription = "corrected"
    assert assoc.send_c_store(changed).Status == status.SUCCESS
    assoc.release()
    ing = env.ingester()
    ing.drain()
    outcomes = ing.reports
    assert sum(r.duplicate for r in outcomes) == 1
    assert sum(r.new_version for r in outcomes) == 1
    versions = env.repo.get_instance_versions(ds.SOPInstanceUID)
    assert [v.version for v in versions] == [1, 2]
    key1 = instance_key(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert versions[0].object_key == key1
    assert versions[1].object_key != key1
    first = dcmread(BytesIO(env.store.get(key1)))
    second = dcmread(BytesIO(env.store.get(versions[1].object_key)))
    assert first.SeriesDescription == ds.SeriesDescription  # never overwritten
    assert second.SeriesDescription == "corrected"
    assert versions[1].sha256 != versions[0].sha256


@pytest.mark.parametrize(
    ("sop_class", "transfer_syntax"),
    [
        ("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.4.50"),  # MR, JPEG Baseline: stored as sent
        ("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.4.201"),  # MR, HTJ2K lossless
        ("1.2.826.0.1.3680043.8.498.999.1", "1.2.840.10008.1.2.1"),  # a private SOP class
    ],
    ids=["jpeg-baseline", "htj2k", "private-sop-class"],
)
def test_any_storage_class_and_transfer_syntax_is_stored_as_received(
    env: Env, scp: RunningScp, sop_class: str, transfer_syntax: str
) -> None:
    from pydicom.encaps import encapsulate

    (ds,) = make_small_series(1, seed=71)
    ds.SOPClassUID = sop_class
    ds.PixelData = encapsulate([b"\xff\xd8 not really a jpeg \xff\xd9"])
    ds["PixelData"].VR = "OB"
    payload = _dataset_bytes_explicit(ds)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(sop_class, transfer_syntax)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title=AE_TITLE)
    assert assoc.is_established
    assert assoc.accepted_contexts[0].transfer_syntax[0] == transfer_syntax
    assert _send_raw_store(assoc, sop_class, ds.SOPInstanceUID, payload) == status.SUCCESS
    assoc.release()
    assert env.ingester().drain() == 1
    (inst,) = env.repo.list_instances(ds.SeriesInstanceUID)
    assert inst.transfer_syntax_uid == transfer_syntax
    assert inst.sop_class_uid == sop_class
    assert env.store.get(inst.object_key).endswith(payload)  # the dataset bytes exactly as sent


def _dataset_bytes_explicit(ds: Dataset) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()
