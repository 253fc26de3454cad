"""The byte-level PS3.10 helpers agree with pydicom/pynetdicom."""

from __future__ import annotations

import io

import pytest
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dsutils import encode_file_meta

from receiver.handlers import check_dataset
from receiver.p10 import SERIES_UID, SOP_UID, STUDY_UID, file_meta, scan_uids
from tests.factories import make_ct_series, make_small_series


def _encode(ds, implicit: bool) -> bytes:  # type: ignore[no-untyped-def]
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def test_file_meta_matches_pynetdicom_encoding() -> None:
    sop_class, sop, ts = "1.2.840.10008.5.1.4.1.1.2", "1.2.3.44", ExplicitVRLittleEndian
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = PYNETDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = PYNETDICOM_IMPLEMENTATION_VERSION
    assert file_meta(sop_class, sop, ts) == b"\0" * 128 + b"DICM" + encode_file_meta(meta)


def test_file_meta_with_source_ae_reads_back() -> None:
    (ds,) = make_small_series(1, seed=3)
    raw = file_meta(ds.SOPClassUID, ds.SOPInstanceUID, ImplicitVRLittleEndian, "CT\\1 odd") + _encode(ds, True)
    back = dcmread(io.BytesIO(raw))
    assert back.file_meta.SourceApplicationEntityTitle == "CT1 odd"
    assert back.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert back.SOPInstanceUID == ds.SOPInstanceUID


@pytest.mark.parametrize("implicit", [True, False])
def test_scan_uids_reads_the_three_uids(implicit: bool) -> None:
    (ds,) = make_ct_series(1, 32, 32, seed=4)  # GE private groups before (0020,000D)
    ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    found = scan_uids(_encode(ds, implicit), ts)
    assert found == {STUDY_UID: ds.StudyInstanceUID, SERIES_UID: ds.SeriesInstanceUID, SOP_UID: ds.SOPInstanceUID}
    # encapsulated transfer syntaxes use explicit VR LE for the dataset
    assert scan_uids(_encode(ds, False), JPEGBaseline8Bit) == found if not implicit else True


def test_scan_uids_defers_to_pydicom_when_unsure() -> None:
    (ds,) = make_small_series(1, seed=5)
    raw = _encode(ds, False)
    assert scan_uids(raw, ExplicitVRBigEndian) is None
    assert scan_uids(raw, DeflatedExplicitVRLittleEndian) is None
    assert scan_uids(raw[:-3] if len(raw) < 60 else raw[:50], ExplicitVRLittleEndian) in (None, {})
    assert scan_uids(b"\x08\x00\x18\x00zz\x02\x00ab", ExplicitVRLittleEndian) is None  # VR not letters


def test_check_dataset_deflated_falls_back_to_pydicom() -> None:
    import zlib

    (ds,) = make_small_series(1, seed=6)
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    deflated = c.compress(_encode(ds, False)) + c.flush()
    assert check_dataset(deflated, DeflatedExplicitVRLittleEndian, ds.SOPInstanceUID)[2] == ds.SOPInstanceUID
