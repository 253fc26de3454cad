"""The nifti built-in service: dcm2niix on real DICOM, checked against the series' own geometry.

The expected NIfTI affine is computed here from the DICOM headers (PS3.3 C.7.6.2.1.1): the
column index runs along the row direction cosines × column spacing, the row index along the
column cosines × row spacing, the slice index along the step from the first to the last
Image Position (Patient) in slice order, LPS flipped to RAS. dcm2niix stores rows bottom-up
(its default), which the expectation applies as a flip of the row index.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from dcmflow.synthetic import make_ct_series
from services_registry import headers_from_dataset
from services_registry.builtin import nifti as nifti_module
from services_registry.builtin.nifti import nifti, select_volumes, service


def write_series(data: Path, datasets: Sequence[Dataset], folder: str = "dicom/series") -> dict[str, Any]:
    """Write ``datasets`` as files under ``data/folder`` (in list order); return the worker's headers."""
    target = data / folder
    target.mkdir(parents=True)
    for number, ds in enumerate(datasets):
        ds.save_as(target / f"{number:04d}.dcm", enforce_file_format=True)
    return headers_from_dataset(datasets[0], dcmpath=folder)


def run(headers: dict[str, Any], **params: Any) -> dict[str, Any]:
    result: dict[str, Any] = nifti(jobName="nifti", headers=headers, params={"modalities": ["CT", "MR"], **params}, added_params={})
    return result


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DATA", str(tmp_path))
    return tmp_path


def in_slice_order(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Slices sorted along the normal (row cosines × column cosines)."""
    iop = np.array(datasets[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    return sorted(datasets, key=lambda d: float(normal @ np.array(d.ImagePositionPatient, float)))


def expected_affine(datasets: Sequence[Dataset]) -> np.ndarray:
    """The RAS affine of the series in dcm2niix's voxel order, from the headers alone."""
    ordered = in_slice_order(datasets)
    first = ordered[0]
    iop = np.array(first.ImageOrientationPatient, float)
    row_cosines, column_cosines = iop[:3], iop[3:]
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)  # between rows, between columns
    start = np.array(first.ImagePositionPatient, float)
    if len(ordered) > 1:
        step = (np.array(ordered[-1].ImagePositionPatient, float) - start) / (len(ordered) - 1)
    else:  # one slice: its thickness along the normal
        step = np.cross(row_cosines, column_cosines) * float(first.SliceThickness)
    lps = np.eye(4)
    lps[:3, 0] = row_cosines * column_spacing
    lps[:3, 1] = column_cosines * row_spacing
    lps[:3, 2] = step
    lps[:3, 3] = start
    bottom_up = np.eye(4)
    bottom_up[1, 1], bottom_up[1, 3] = -1.0, first.Rows - 1
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps @ bottom_up


def rescaled(ds: Dataset) -> np.ndarray:
    """Stored pixels × Rescale Slope + Rescale Intercept (PS3.3 C.11.1.1.2)."""
    return ds.pixel_array.astype(float) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))


def assert_matches_series(path: Path, datasets: Sequence[Dataset]) -> None:
    """Shape, affine and every voxel of the NIfTI at ``path`` against the DICOM series."""
    image: Any = nibabel.load(path)
    ordered = in_slice_order(datasets)
    assert image.shape == (ordered[0].Columns, ordered[0].Rows, len(ordered))
    np.testing.assert_allclose(image.affine, expected_affine(datasets), atol=1e-3)
    volume = image.get_fdata()
    for k, ds in enumerate(ordered):
        np.testing.assert_allclose(volume[:, ::-1, k].T, rescaled(ds), atol=1e-3)


def rotation(z_degrees: float, x_degrees: float) -> np.ndarray:
    z, x = math.radians(z_degrees), math.radians(x_degrees)
    rz = np.array([[math.cos(z), -math.sin(z), 0], [math.sin(z), math.cos(z), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(x), -math.sin(x)], [0, math.sin(x), math.cos(x)]])
    return rz @ rx


def reorient(datasets: list[Dataset], row: Sequence[float], column: Sequence[float], origin: Sequence[float], step: float) -> list[Dataset]:
    """Put the slices on the plane (row, column), ``step`` mm apart along its normal from ``origin``."""
    normal = np.cross(row, column)
    for i, ds in enumerate(datasets):
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row, *column)]
        ds.ImagePositionPatient = [round(float(v), 4) for v in np.asarray(origin, float) + i * step * normal]
        ds.SliceLocation = round(i * step, 4)
    return datasets


def test_axial_ct_series_converts_with_its_geometry_values_and_sidecar(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    series = make_ct_series(n=12, rows=64, cols=64)
    headers = write_series(data, series)

    result = run(headers)

    name = headers["seriesId"]
    assert result["nifti"] == [f"nifti/{name}.nii.gz"]
    assert result["sidecar"] == [f"nifti/{name}.json"]
    assert result["other"] == [] and result["artifacts"] == []
    assert result["shape"] == [64, 64, 12]
    spacing = float(series[0].PixelSpacing[0])
    assert result["spacing"] == pytest.approx([spacing, spacing, 1.25], abs=1e-5)
    assert_matches_series(data / result["nifti"][0], series)

    sidecar = json.loads((data / result["sidecar"][0]).read_text())
    assert sidecar["Modality"] == "CT"
    assert sidecar["SeriesNumber"] == 3
    assert sidecar["SeriesDescription"] == "AXIAL 1.25mm STND"
    assert sidecar["ImageOrientationPatientDICOM"] == [1, 0, 0, 0, 1, 0]
    assert sidecar["ConversionSoftware"] == "dcm2niix"
    assert "PatientName" not in sidecar and "PatientID" not in sidecar  # -ba y: anonymised BIDS
    assert "Convert 12 DICOM" in capsys.readouterr().out  # dcm2niix's own log is the job log


@pytest.mark.parametrize(
    ("plane", "row", "column", "step"),
    [
        ("sagittal", (0.0, 1.0, 0.0), (0.0, 0.0, -1.0), 2.0),
        ("double oblique, descending", tuple(rotation(20, 15)[:, 0]), tuple(rotation(20, 15)[:, 1]), -1.5),
    ],
)
def test_sagittal_and_oblique_series_keep_their_geometry(
    data: Path, plane: str, row: tuple[float, ...], column: tuple[float, ...], step: float
) -> None:
    series = reorient(make_ct_series(n=8, rows=40, cols=56, seed=7), row, column, origin=(-12.5, 30.0, 41.0), step=step)
    headers = write_series(data, series)

    result = run(headers, output="volumes")

    assert result["nifti"] == [f"volumes/{headers['seriesId']}.nii.gz"]
    assert result["shape"] == [56, 40, 8]
    assert result["spacing"][2] == pytest.approx(abs(step), abs=1e-4)
    assert_matches_series(data / result["nifti"][0], series)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_single_slice_of_pydicoms_files_is_a_one_slice_volume(data: Path, name: str) -> None:
    ds = pydicom.dcmread(get_testdata_file(name))  # type: ignore[arg-type]
    headers = write_series(data, [ds])

    result = run(headers)

    assert result["shape"] == [ds.Columns, ds.Rows, 1]
    assert_matches_series(data / result["nifti"][0], [ds])
    sidecar = json.loads((data / result["sidecar"][0]).read_text())
    assert sidecar["Modality"] == ds.Modality


def test_gantry_tilt_split_reports_every_file_and_a_retry_replaces_them(data: Path) -> None:
    tilt = math.radians(15)
    series = make_ct_series(n=10, rows=48, cols=48, seed=3)
    for i, ds in enumerate(series):
        ds.GantryDetectorTilt = 15
        ds.ImageOrientationPatient = [1, 0, 0, 0, round(math.cos(tilt), 6), round(math.sin(tilt), 6)]
        ds.ImagePositionPatient = [-175, -200, 30 - 2.0 * i]
    headers = write_series(data, series)

    first = run(headers)
    again = run(headers)

    name = headers["seriesId"]
    assert first["nifti"] == [f"nifti/{name}.nii.gz", f"nifti/{name}_Tilt_1.nii.gz"]
    assert [v["shape"][2] for v in first["volumes"]] == [10, 10]
    assert again == first
    assert sorted(p.name for p in (data / "nifti").iterdir()) == sorted([f"{name}.json", f"{name}.nii.gz", f"{name}_Tilt_1.nii.gz"])


def _localizer(series: list[Dataset]) -> list[Dataset]:
    for ds in series:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    return series


def _mixed_planes(series: list[Dataset]) -> list[Dataset]:
    reorient(series[3:], (0.0, 1.0, 0.0), (0.0, 0.0, -1.0), origin=(0.0, -100.0, 50.0), step=5.0)
    return series


def _no_geometry(series: list[Dataset]) -> list[Dataset]:
    for ds in series:
        del ds.ImagePositionPatient, ds.ImageOrientationPatient
    return series


def _mixed_sizes(series: list[Dataset]) -> list[Dataset]:
    small = make_ct_series(n=2, rows=16, cols=16, series_uid=series[0].SeriesInstanceUID, study_uid=series[0].StudyInstanceUID)
    for number, ds in enumerate(small, len(series) + 1):
        ds.InstanceNumber = number
    return series + small


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (_localizer, "localizer (ImageType ORIGINAL\\PRIMARY\\LOCALIZER): not a volume"),
        (_mixed_planes, "mixed orientations: 2 image planes in one series"),
        (_no_geometry, "6 of 6 images have no Image Position/Orientation (Patient)"),
        (_mixed_sizes, "mixed image sizes: 16x16, 32x32"),
    ],
)
def test_series_that_are_not_one_volume_are_skipped_with_the_reason(
    data: Path, capsys: pytest.CaptureFixture[str], edit: Any, reason: str
) -> None:
    headers = write_series(data, edit(make_ct_series(n=6, rows=32, cols=32)))

    result = run(headers)

    assert list(result) == ["skipped"]
    assert result["skipped"].startswith(reason)
    assert not (data / "nifti").exists()
    assert reason in capsys.readouterr().out


def test_a_file_dcm2niix_cannot_read_fails_with_its_own_error_lines(data: Path) -> None:
    truncated = Path(get_testdata_file("MR_truncated.dcm"))  # type: ignore[arg-type]
    (data / "dicom" / "broken").mkdir(parents=True)
    shutil.copy(truncated, data / "dicom" / "broken" / truncated.name)
    headers = headers_from_dataset(pydicom.dcmread(truncated, stop_before_pixels=True), dcmpath="dicom/broken")

    with pytest.raises(RuntimeError, match=r"dcm2niix failed on dicom/broken \(exit 1, .*File not large enough"):
        run(headers)


def test_a_folder_without_dicom_fails_clearly(data: Path) -> None:
    (data / "dicom" / "empty").mkdir(parents=True)
    (data / "dicom" / "empty" / "notes.txt").write_text("not DICOM")

    with pytest.raises(FileNotFoundError, match="no DICOM instances in dicom/empty"):
        run({"dcmpath": "dicom/empty", "seriesId": "1.2.3"})


def test_dcm2niix_past_its_timeout_is_killed_with_a_clear_error(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    headers = write_series(data, make_ct_series(n=4, rows=32, cols=32))
    monkeypatch.setattr(nifti_module, "DCM2NIIX_TIMEOUT", 0.0)

    with pytest.raises(RuntimeError, match="dcm2niix did not finish within 0 s on series"):
        run(headers)


def test_callback_selects_ct_and_mr_volumes_only() -> None:
    ct = headers_from_dataset(make_ct_series(n=1, rows=8, cols=8)[0], dcmpath="dicom/ct")
    mr = headers_from_dataset(pydicom.dcmread(get_testdata_file("MR_small.dcm"), stop_before_pixels=True), dcmpath="dicom/mr")  # type: ignore[arg-type]
    params = service.jobs[0].options["params"]

    def select(headers: dict[str, Any], params: dict[str, Any] = params) -> Any:
        return select_volumes(jobName="nifti", headers=headers, params=params, added_params={})

    assert select(ct) == (True, {})
    assert select(mr) == (True, {})
    for modality in ("US", "SR", "PT", ""):
        accepted, added = select({**ct, "Modality": modality})
        assert not accepted and added["reason"] == f"modality {modality or 'missing'} is not one of CT, MR"
    assert select(ct, {"modalities": ["MR"]}) == (False, {"reason": "modality CT is not one of MR"})
    localizer = {**ct, "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}
    assert select(localizer) == (False, {"reason": "localizer (ImageType has LOCALIZER): not a volume"})


def test_service_declares_one_nifti_job_with_a_ten_minute_timeout() -> None:
    spec = service.to_spec(source="python", origin="builtin:nifti", content_hash="test")

    (job,) = spec.jobs
    assert (spec.name, job.job_name, job.timeout, job.params) == ("nifti", "nifti", 600.0, {"modalities": ["CT", "MR"]})
    assert job.worker == "services_registry.builtin.nifti.nifti"
    assert job.callback == "services_registry.builtin.nifti.select_volumes"
