"""Headers from real DICOM files (DESIGN.md contract)."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

from services_registry.headers import headers_from_dataset, read_series_folder

from .conftest import series_uid_of


def test_headers_are_flat_keywords_without_bulk_data() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    headers = headers_from_dataset(ds, dcmpath="dicom/x")
    assert headers["Modality"] == "CT" and headers["seriesId"] == ds.SeriesInstanceUID
    assert headers["studyId"] == ds.StudyInstanceUID and headers["patientId"] == ds.PatientID
    assert headers["dcmpath"] == "dicom/x" and headers["PatientName"] == str(ds.PatientName)
    assert isinstance(headers["ImagePositionPatient"], list) and isinstance(headers["Rows"], int)
    assert headers["TransferSyntaxUID"] == ds.file_meta.TransferSyntaxUID  # file meta included
    assert "PixelData" not in headers
    json.dumps(headers)  # serialisable as is


def test_read_series_folder_groups_by_series_and_skips_non_dicom(dicom_dir: Path) -> None:
    series = read_series_folder(dicom_dir)
    assert set(series) == {series_uid_of("CT_small.dcm"), series_uid_of("MR_small.dcm")}
    assert all(len(s.files) == 1 for s in series.values())
