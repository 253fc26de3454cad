"""The qc built-in service on real DICOM: synthetic CT series with deliberate defects and
pydicom's bundled files from several vendors, called as dcmflow calls a worker (``DATA`` set,
series under ``$DATA/dicom/...``), checking what the report found."""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dcmflow.synthetic import UID_ROOT, make_ct_series, to_p10_bytes
from services_registry import headers_from_dataset
from services_registry.builtin._series import read_slices
from services_registry.builtin.qc import (
    FAIL_ON_DEFAULTS,
    QcFailed,
    accept_every_series,
    apply_thresholds,
    check_series,
    parse_fail_on,
    qc,
    service,
)

DCMPATH = "dicom/series"


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``$DATA`` of the job: a fresh folder."""
    monkeypatch.setenv("DATA", str(tmp_path))
    return tmp_path


def ct(n: int = 20, **kwargs: Any) -> list[Dataset]:
    return make_ct_series(n=n, rows=32, cols=32, **kwargs)


def write_series(data: Path, datasets: Sequence[Dataset], names: Sequence[str] | None = None) -> dict[str, Any]:
    """Write the series as PS3.10 files under ``$DATA/dicom/series``; return its headers."""
    folder = data / DCMPATH
    folder.mkdir(parents=True, exist_ok=True)
    for ds, name in zip(datasets, names or [f"{i:04d}.dcm" for i in range(len(datasets))]):
        (folder / name).write_bytes(to_p10_bytes(ds))
    first = min(datasets, key=lambda ds: int(ds.InstanceNumber))
    return headers_from_dataset(first, dcmpath=DCMPATH)


def copy_files(data: Path, names: Sequence[str]) -> dict[str, Any]:
    """pydicom's bundled files, byte for byte, as one series folder; return its headers."""
    folder = data / DCMPATH
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(get_testdata_file(name), folder / name)  # type: ignore[arg-type]
    return headers_from_dataset(pydicom.dcmread(folder / names[0], stop_before_pixels=True), dcmpath=DCMPATH)


def run(headers: dict[str, Any], **params: Any) -> dict[str, Any]:
    result: dict[str, Any] = qc(jobName="qc", headers=headers, params=params, added_params={})
    return result


def stored(data: Path, headers: dict[str, Any], output: str = "qc") -> tuple[dict[str, Any], str]:
    """The JSON and markdown reports the worker wrote."""
    folder, uid = data / output, headers["seriesId"]
    return json.loads((folder / f"{uid}.json").read_text()), (folder / f"{uid}.md").read_text(encoding="utf-8")


def z(ds: Dataset) -> float:
    return float(ds.ImagePositionPatient[2])


def checks(report: dict[str, Any], severity: str = "warning") -> set[str]:
    return {f["check"] for f in report["findings"] if f["severity"] == severity}


# --- the synthetic CT series with deliberate defects ------------------------------------------


def test_a_complete_series_passes_clean(data: Path) -> None:
    series = ct()
    headers = write_series(data, series)
    result = run(headers)
    report, markdown = stored(data, headers)
    assert result["passed"] is True and result["findings"] == 0
    assert report["instances"] == report["expected"] == len(series)
    assert report["expected_source"] == "Instance Number range"
    assert report["missing_instance_numbers"] == [] and report["gaps"] == [] and report["outliers"] == []
    assert report["spacing"]["median"] == pytest.approx(float(series[0].SpacingBetweenSlices))
    assert report["spacing"]["positions"] == len(series)
    assert [g["plane"] for g in report["orientation_groups"]] == ["axial"]
    assert [(g["rows"], g["columns"], g["count"]) for g in report["size_groups"]] == [(32, 32, 20)]
    assert "no problems found" in markdown
    assert result["artifacts"] == [{"type": "markdown", "path": f"qc/{headers['seriesId']}.md", "title": "QC"}]
    assert result["report"] == f"qc/{headers['seriesId']}.json"


@pytest.mark.parametrize(("runs", "shown"), [([[9]], "missing 10"), ([[9], [12, 13]], "missing 10, 13–14")])
def test_deliberately_removed_slices_are_found(data: Path, runs: list[list[int]], shown: str) -> None:
    series = ct()
    removed = [i for run_ in runs for i in run_]
    headers = write_series(data, [ds for i, ds in enumerate(series) if i not in removed])
    result = run(headers)
    report, markdown = stored(data, headers)

    assert report["missing_instance_numbers"] == [int(series[i].InstanceNumber) for i in removed]
    assert result["missing_instances"] == len(removed) and result["passed"] is True
    # One gap per run of removed slices, between the slices on either side, by their positions.
    assert len(report["gaps"]) == len(runs) == result["gaps"]
    spacing = float(series[0].SpacingBetweenSlices)
    for gap, run_ in zip(sorted(report["gaps"], key=lambda g: -g["end"]["distance"]), runs):
        above, below = series[run_[0] - 1], series[run_[-1] + 1]  # z falls as Instance Number rises
        assert gap["end"]["instance_numbers"] == [int(above.InstanceNumber)]
        assert gap["start"]["instance_numbers"] == [int(below.InstanceNumber)]
        assert gap["end"]["distance"] == pytest.approx(z(above), abs=1e-3)
        assert gap["start"]["distance"] == pytest.approx(z(below), abs=1e-3)
        assert gap["spacing"] == pytest.approx(spacing * (len(run_) + 1), abs=1e-3)
        assert gap["missing_estimate"] == len(run_)
        assert f"between instance {int(below.InstanceNumber)} at {gap['start']['distance']:g} mm" in markdown
    assert report["spacing"]["median"] == pytest.approx(spacing)
    assert report["spacing"]["max"] == pytest.approx(spacing * (1 + max(len(r) for r in runs)))
    assert checks(report) == {"missing_instances", "gaps"}
    assert f"| Instance Numbers | 1–20, {shown} |" in markdown


def test_a_removed_last_slice_needs_the_announced_count(data: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    # Without a count in the headers the Instance Number range hides a missing last slice…
    plain = check_series(read_slices(_folder(tmp_path_factory, ct()[:-1])))
    assert plain.missing_instances == 0 and plain.problems == 0
    # …with (0020,1209) in every slice, as a PACS forwarding a whole series sends it, it shows.
    series = ct(count_in_header=True)
    headers = write_series(data, series[:-1])
    result = run(headers)
    report, _ = stored(data, headers)
    assert (report["instances"], report["expected"]) == (19, 20)
    assert report["expected_source"] == "NumberOfSeriesRelatedInstances (0020,1209)"
    assert report["gaps"] == [] and report["missing_instance_numbers"] == []
    assert result["missing_instances"] == 1
    assert any(f["message"] == "19 instances, 20 expected by NumberOfSeriesRelatedInstances (0020,1209)" for f in report["findings"])


def _folder(factory: pytest.TempPathFactory, datasets: Sequence[Dataset], names: Sequence[str] | None = None) -> Path:
    folder = factory.mktemp("series")
    for ds, name in zip(datasets, names or [f"{i:04d}.dcm" for i in range(len(datasets))]):
        (folder / name).write_bytes(to_p10_bytes(ds))
    return folder


def test_shuffled_file_names_give_the_same_report(tmp_path_factory: pytest.TempPathFactory) -> None:
    series = ct()
    del series[6]
    ordered = check_series(read_slices(_folder(tmp_path_factory, series)))
    names = [f"{random.Random(i).getrandbits(64):016x}.dcm" for i in range(len(series))]
    shuffled_series = list(series)
    random.Random(7).shuffle(shuffled_series)
    shuffled = check_series(read_slices(_folder(tmp_path_factory, shuffled_series, names)))
    assert shuffled.to_json() == ordered.to_json()
    assert ordered.missing_instance_numbers == [7] and len(ordered.gaps) == 1


def test_a_duplicated_position_is_reported_and_does_not_skew_spacing(data: Path) -> None:
    series = ct()
    again = copy.deepcopy(series[5])  # the same slice sent again as a new instance
    again.SOPInstanceUID = generate_uid(UID_ROOT)
    again.file_meta.MediaStorageSOPInstanceUID = again.SOPInstanceUID
    again.InstanceNumber = 21
    headers = write_series(data, [*series, again])
    result = run(headers)
    report, markdown = stored(data, headers)
    assert result["duplicate_positions"] == 1
    [duplicate] = report["duplicate_positions"]
    assert duplicate["point"]["instance_numbers"] == [6, 21] and duplicate["explained"] is False
    assert duplicate["point"]["distance"] == pytest.approx(z(series[5]), abs=1e-3)
    assert report["gaps"] == [] and report["outliers"] == []
    assert report["spacing"]["min"] == pytest.approx(float(series[0].SpacingBetweenSlices))
    assert checks(report) == {"duplicate_positions"}
    assert "| Duplicate positions | 1 |" in markdown


def test_several_echoes_at_each_position_are_not_duplicates(data: Path) -> None:
    first = ct(10)
    second = copy.deepcopy(first)
    for ds in first:
        ds.EchoNumbers = 1
    for ds in second:
        ds.EchoNumbers = 2
        ds.InstanceNumber = int(ds.InstanceNumber) + 10
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(UID_ROOT)
    headers = write_series(data, [*first, *second])
    result = run(headers, fail_on={"duplicate_positions": 0})
    report, _ = stored(data, headers)
    assert result["passed"] is True and result["duplicate_positions"] == 0
    assert len(report["duplicate_positions"]) == 10 and all(d["explained"] for d in report["duplicate_positions"])
    assert report["spacing"]["positions"] == 10 and report["spacing"]["images"] == 20
    assert checks(report) == set() and checks(report, "info") == {"duplicate_positions"}


def test_a_slice_in_another_orientation(data: Path) -> None:
    series = ct()
    series[7].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal
    headers = write_series(data, series)
    result = run(headers)
    report, _ = stored(data, headers)
    groups = [(g["plane"], g["count"], g["instance_numbers"]) for g in report["orientation_groups"]]
    assert groups == [("axial", 19, [n for n in range(1, 21) if n != 8]), ("coronal", 1, [8])]
    assert result["orientations"] == 2 and "mixed_orientations" in checks(report)
    # The axial stack lacks that slice: a gap where it was.
    [gap] = report["gaps"]
    assert {*gap["start"]["instance_numbers"], *gap["end"]["instance_numbers"]} == {7, 9}
    with pytest.raises(QcFailed, match=r"^QC failed thresholds: mixed_orientations: 2 orientations \(report qc/"):
        run(headers, fail_on={"mixed_orientations": True})


def test_a_slice_of_another_size(data: Path) -> None:
    study, uid, frame = (str(generate_uid(UID_ROOT)) for _ in range(3))
    series = make_ct_series(20, 32, 32, seed=3, study_uid=study, series_uid=uid, frame_uid=frame)
    # The same place in a 64×64 reconstruction of the same acquisition.
    series[7] = make_ct_series(20, 64, 64, seed=3, study_uid=study, series_uid=uid, frame_uid=frame)[7]
    headers = write_series(data, series)
    result = run(headers)
    report, markdown = stored(data, headers)
    sizes = [(g["rows"], g["columns"], g["count"], g["instance_numbers"]) for g in report["size_groups"]]
    assert sizes == [(32, 32, 19, [n for n in range(1, 21) if n != 8]), (64, 64, 1, [8])]
    assert result["sizes"] == 2 and checks(report) == {"mixed_sizes"}
    assert report["gaps"] == [] and report["duplicate_positions"] == []
    assert "32×32 ×19, 64×64 ×1" in markdown


def test_a_shifted_slice_is_a_spacing_outlier(data: Path) -> None:
    series = ct()
    moved = series[10]
    moved.ImagePositionPatient = [*moved.ImagePositionPatient[:2], z(moved) + 0.4]
    headers = write_series(data, series)
    result = run(headers)
    report, _ = stored(data, headers)
    assert result["gaps"] == 0 and result["spacing_outliers"] == 2
    steps = sorted(o["spacing"] for o in report["outliers"])
    assert steps == pytest.approx([1.25 - 0.4, 1.25 + 0.4], abs=1e-3)
    assert all(11 in o["start"]["instance_numbers"] + o["end"]["instance_numbers"] for o in report["outliers"])


def test_an_oblique_stack_is_measured_along_its_normal(data: Path) -> None:
    series = ct()
    angle = math.radians(30)
    normal = (0.0, -math.sin(angle), math.cos(angle))  # row (1,0,0) × column (0,cos,sin)
    origin = [float(v) for v in series[0].ImagePositionPatient]
    for i, ds in enumerate(series):
        ds.ImageOrientationPatient = [1, 0, 0, 0, round(math.cos(angle), 8), round(math.sin(angle), 8)]
        ds.ImagePositionPatient = [round(o + 2.0 * i * n, 5) for o, n in zip(origin, normal)]
    del series[4]
    headers = write_series(data, series)
    run(headers)
    report, _ = stored(data, headers)
    assert report["orientation_groups"][0]["plane"] == "oblique axial"
    assert report["spacing"]["normal"] == pytest.approx(list(normal), abs=1e-6)
    assert report["spacing"]["median"] == pytest.approx(2.0, abs=1e-3)  # not 2·cos 30° in z
    [gap] = report["gaps"]
    assert gap["spacing"] == pytest.approx(4.0, abs=1e-3)
    assert (gap["start"]["instance_numbers"], gap["end"]["instance_numbers"]) == ([4], [6])


def test_a_localizer_in_three_planes_is_not_a_mixed_series(data: Path) -> None:
    series = ct(3)
    planes = ([1, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0, -1], [0, 1, 0, 0, 0, -1])
    for ds, orientation in zip(series, planes):
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImageOrientationPatient = orientation
    headers = write_series(data, series)
    result = run(headers, fail_on={"mixed_orientations": True})
    report, _ = stored(data, headers)
    assert result["passed"] is True and result["orientations"] == 3
    assert sorted(g["plane"] for g in report["orientation_groups"]) == ["axial", "coronal", "sagittal"]
    assert report["spacing"] is None and any("localizer" in n for n in report["not_checked"])
    assert checks(report) == set() and checks(report, "info") == {"mixed_orientations"}


# --- thresholds --------------------------------------------------------------------------------


def test_thresholds_fail_the_job_after_writing_the_report(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    series = ct()
    del series[9]
    headers = write_series(data, series)
    with pytest.raises(QcFailed) as failed:
        run(headers, fail_on={"missing_instances": 0, "gaps": 1})
    message = str(failed.value)
    assert "\n" not in message
    assert message == f"QC failed thresholds: missing_instances 1 > 0 (report qc/{headers['seriesId']}.md)"
    report, markdown = stored(data, headers)
    assert report["passed"] is False and report["failed"] == ["missing_instances 1 > 0"]
    assert {f["check"] for f in report["findings"] if f["severity"] == "error"} == {"missing_instances"}
    assert checks(report) == {"gaps"}  # 1 gap is within its threshold of 1
    assert "**Failed**: missing_instances 1 > 0" in markdown and "❌ **missing_instances**" in markdown
    assert "FAILED" in capsys.readouterr().out
    # The same series passes with a looser threshold and with the defaults.
    assert run(headers, fail_on={"missing_instances": 1})["passed"] is True
    assert run(headers)["passed"] is True


def test_defaults_never_fail_even_a_badly_broken_series(data: Path) -> None:
    series = ct()
    series[3].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    series[5].Rows = 16
    series[5].PixelData = series[5].PixelData[: 16 * 32 * 2]
    del series[12]
    headers = write_series(data, [*series, series[0]])
    result = run(headers, fail_on=dict(FAIL_ON_DEFAULTS))
    assert result["passed"] is True and result["findings"] >= 4


@pytest.mark.parametrize(
    ("fail_on", "error"),
    [
        ({"gap": 0}, "qc: unknown fail_on threshold(s) 'gap'; known: missing_instances, gaps, spacing_outliers"),
        ({"gaps": "yes"}, "qc: fail_on.gaps must be a count ≥ 0"),
        ({"gaps": -1}, "qc: fail_on.gaps must be a count ≥ 0"),
        ({"gaps": True}, "qc: fail_on.gaps must be a count ≥ 0"),
        ({"mixed_sizes": 1}, "qc: fail_on.mixed_sizes must be true or false"),
        ([0], "qc: fail_on must be a mapping"),
    ],
)
def test_bad_thresholds_are_one_clear_line_before_any_work(data: Path, fail_on: Any, error: str) -> None:
    headers = write_series(data, ct(3))
    with pytest.raises(ValueError) as raised:
        run(headers, fail_on=fail_on)
    assert str(raised.value).startswith(error) and "\n" not in str(raised.value)
    assert not (data / "qc").exists()


def test_apply_thresholds_is_pure(tmp_path_factory: pytest.TempPathFactory) -> None:
    series = ct()
    del series[2]
    report = check_series(read_slices(_folder(tmp_path_factory, series)))
    judged = apply_thresholds(report, parse_fail_on({"gaps": 0}))
    assert judged.failed == ["gaps 1 > 0"] and not judged.passed
    assert report.failed == [] and report.passed  # the original is unchanged


# --- pydicom's bundled files from several vendors ----------------------------------------------


@pytest.mark.parametrize(
    ("name", "vendor"),
    [("CT_small.dcm", "GE MEDICAL SYSTEMS"), ("MR_small.dcm", "TOSHIBA_MEC"), ("examples_overlay.dcm", "SIEMENS")],
)
def test_a_single_vendor_image_is_reported_as_not_spaced(data: Path, name: str, vendor: str) -> None:
    headers = copy_files(data, [name])
    assert headers["Manufacturer"] == vendor
    result = run(headers)
    report, markdown = stored(data, headers)
    ds = pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)  # type: ignore[arg-type]
    assert result["passed"] is True and result["findings"] == 0
    assert report["instances"] == 1 and report["spacing"] is None
    assert report["not_checked"] == ["slice spacing: a single image"]
    assert [(g["rows"], g["columns"]) for g in report["size_groups"]] == [(ds.Rows, ds.Columns)]
    assert report["modality"] == ds.Modality and "| Slice spacing | not checked |" in markdown


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "examples_overlay.dcm"])
def test_a_gap_in_a_stack_of_vendor_slices(data: Path, name: str) -> None:
    """Each vendor's real header, stacked along its own normal with one slice left out."""
    template = pydicom.dcmread(get_testdata_file(name))  # type: ignore[arg-type]
    row, col = [float(v) for v in template.ImageOrientationPatient[:3]], [float(v) for v in template.ImageOrientationPatient[3:]]
    normal = (row[1] * col[2] - row[2] * col[1], row[2] * col[0] - row[0] * col[2], row[0] * col[1] - row[1] * col[0])
    step = float(template.get("SliceThickness") or 1.0)
    origin = [float(v) for v in template.ImagePositionPatient]
    folder = data / DCMPATH
    folder.mkdir(parents=True)
    for i in range(6):
        if i == 2:
            continue
        ds = copy.deepcopy(template)
        ds.InstanceNumber = i + 1
        ds.SOPInstanceUID = generate_uid(UID_ROOT)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = [round(o + i * step * n, 4) for o, n in zip(origin, normal)]
        ds.save_as(folder / f"IM{i:04d}")
    headers = headers_from_dataset(template, dcmpath=DCMPATH)
    result = run(headers)
    report, _ = stored(data, headers)
    assert report["missing_instance_numbers"] == [3] and result["missing_instances"] == 1
    [gap] = report["gaps"]
    assert gap["spacing"] == pytest.approx(2 * step, abs=1e-3)
    assert (gap["start"]["instance_numbers"], gap["end"]["instance_numbers"]) == ([2], [4])
    assert report["spacing"]["median"] == pytest.approx(step, abs=1e-3)


def test_two_vendors_in_one_folder(data: Path) -> None:
    headers = copy_files(data, ["CT_small.dcm", "MR_small.dcm"])
    result = run(headers, fail_on={"mixed_sizes": False})
    report, _ = stored(data, headers)
    assert sorted((g["rows"], g["columns"]) for g in report["size_groups"]) == [(64, 64), (128, 128)]
    assert report["duplicate_instance_numbers"] == [1]  # both are instance 1
    assert checks(report) == {"mixed_sizes", "duplicate_instance_numbers"} and result["passed"] is True


@pytest.mark.parametrize(
    ("name", "frames"),
    [("rtdose.dcm", 15), ("examples_ybr_color.dcm", 30), ("SC_rgb_rle_2frame.dcm", 2)],
)
def test_multi_frame_instances_are_counted_in_frames(data: Path, name: str, frames: int) -> None:
    headers = copy_files(data, [name])
    result = run(headers)
    report, markdown = stored(data, headers)
    assert report["instances"] == 1 and report["frames"] == frames
    assert report["spacing"] is None and any("multi-frame" in n and f"({frames} frames)" in n for n in report["not_checked"])
    assert result["passed"] is True and f"| Frames | {frames} in 1 image instance(s) |" in markdown


@pytest.mark.parametrize("names", [["rtplan.dcm"], ["reportsi.dcm"], ["rtplan.dcm", "reportsi.dcm"]])
def test_instances_without_pixels_get_a_report(data: Path, names: list[str]) -> None:
    headers = copy_files(data, names)
    result = run(headers)
    report, markdown = stored(data, headers)
    assert report["instances"] == len(names) and report["image_instances"] == 0
    assert report["size_groups"] == [] and report["orientation_groups"] == [] and report["spacing"] is None
    assert "geometry: no image instances (no Rows/Columns)" in report["not_checked"]
    assert result["passed"] is True and "## Not checked" in markdown


def test_images_without_patient_geometry(data: Path) -> None:
    headers = copy_files(data, ["SC_rgb_rle.dcm", "examples_palette.dcm"])
    run(headers)
    report, _ = stored(data, headers)
    assert report["spacing"] is None
    assert any("2 image(s) without Image Position/Orientation (Patient)" in n for n in report["not_checked"])


# --- the folder and the registration -----------------------------------------------------------


def test_files_that_are_not_dicom_are_named_not_fatal(data: Path) -> None:
    headers = write_series(data, ct(5))
    (data / DCMPATH / "README.txt").write_text("scanner notes")
    result = run(headers)
    report, _ = stored(data, headers)
    assert report["instances"] == 5 and result["findings"] == 0
    assert [f["message"] for f in report["findings"]] == ["1 file(s) in the series folder are not DICOM and were ignored"]


def test_a_folder_without_dicom_fails_in_one_line(data: Path) -> None:
    (data / DCMPATH).mkdir(parents=True)
    (data / DCMPATH / "notes.txt").write_text("no images")
    with pytest.raises(ValueError, match=r"^qc: no DICOM instance in dicom/series \(1 other file\(s\)\)$"):
        run({"dcmpath": DCMPATH, "seriesId": "1.2.3"})
    with pytest.raises(FileNotFoundError, match="^qc: series folder dicom/absent does not exist under"):
        run({"dcmpath": "dicom/absent", "seriesId": "1.2.3"})


def test_output_folder_from_params(data: Path) -> None:
    headers = write_series(data, ct(4))
    result = run(headers, output="reports/qc")
    assert result["artifacts"][0]["path"] == f"reports/qc/{headers['seriesId']}.md"
    report, _ = stored(data, headers, "reports/qc")
    assert report["instances"] == 4
    with pytest.raises(ValueError, match="is not a folder under"):
        run(headers, output="../elsewhere")


def test_registration_and_callback() -> None:
    [job] = service.to_spec(source="python", origin="qc.py", content_hash="-").jobs
    assert (job.job_name, job.timeout) == ("qc", 300.0)
    assert job.callback == "services_registry.builtin.qc.accept_every_series"
    assert job.params is not None and job.params["fail_on"] == FAIL_ON_DEFAULTS
    for name in ("CT_small.dcm", "rtplan.dcm", "reportsi.dcm"):
        ds = pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)  # type: ignore[arg-type]
        assert accept_every_series(jobName="qc", headers=headers_from_dataset(ds, dcmpath="x"), params={}, added_params={}) is True
