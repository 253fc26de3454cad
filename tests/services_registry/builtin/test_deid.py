"""The deid built-in service on real DICOM: pydicom's files from several vendors and synthetic CT.

What counts as identifying comes from dicom-anonymizer's own PS3.15 Table E.1-1 table, read
here through the library (not a list typed in this file), and is checked at every nesting
level of the written files.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from dcmflow.synthetic import make_ct_series
from services_registry import headers_from_dataset
from services_registry.builtin._deid_profile import PROFILE_TABLE
from services_registry.builtin.deid import DeidKeyMissing, accept_every_series, deid, service

VENDOR_FILES = [
    "CT_small.dcm",  # GE CT, 179 private elements
    "MR_small.dcm",  # Toshiba MR
    "JPEG2000.dcm",  # GE NM, JPEG 2000, private groups
    "examples_overlay.dcm",  # Siemens MR with an overlay
    "examples_ybr_color.dcm",  # SonoSite US, JPEG baseline
    "liver_1frame.dcm",  # QIICR segmentation: UIDs nested three deep
    "rtplan.dcm",  # RT plan: institution and machine names inside sequences
    "test-SR.dcm",  # structured report: a content tree of names and dates
    "waveform_ecg.dcm",  # Mortara ECG, waveform annotations
]

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
"""PS3.5 §9.1: components of digits without leading zeros, joined by dots."""

_TEXT_VRS = {"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}


class Profile:
    """The library's tables: tag → category, with its repeating-group masks."""

    def __init__(self) -> None:
        self.exact: dict[tuple[int, int], str] = {}
        self.masks: list[tuple[tuple[int, ...], str]] = []
        for category, tags in dicom_anonymization_database_selector(PROFILE_TABLE).items():
            if category == "ALL_TAGS":
                continue
            for tag in tags:
                if len(tag) == 4:
                    self.masks.append((tuple(tag), category))
                else:
                    self.exact[(tag[0], tag[1])] = category
        assert len(self.exact) > 500 and self.masks

    def category(self, elem: DataElement) -> str | None:
        group, element = elem.tag.group, elem.tag.element
        found = self.exact.get((group, element))
        for (g, e, gm, em), category in self.masks:
            if found is None and group & gm == g & gm and element & em == e & em:
                found = category
        return found


PROFILE = Profile()


def walk(ds: Dataset, inside: str | None = None, depth: int = 0) -> Iterator[tuple[DataElement, str | None, int]]:
    """Every element at every depth, with the category of the nearest enclosing profile sequence."""
    for elem in ds:
        yield elem, inside, depth
        if elem.VR == "SQ":
            category = PROFILE.category(elem) or inside
            for item in elem.value:
                yield from walk(item, category, depth + 1)


def text(elem: DataElement) -> set[str]:
    """The non-empty text values of ``elem`` (each value of a multi-valued one)."""
    if elem.VR not in _TEXT_VRS or elem.is_empty:
        return set()
    values = elem.value if elem.VM > 1 else [elem.value]
    return {str(v).strip() for v in values if str(v).strip()}


def identifying(ds: Dataset) -> dict[int, set[str]]:
    """Tag → values the profile must not let through: profile elements, and the values inside
    profile sequences other than those whose only action on contents is replacing UIDs."""
    found: dict[int, set[str]] = defaultdict(set)
    for elem, inside, _ in walk(ds):
        category = PROFILE.category(elem)
        if elem.VR == "SQ":
            continue
        if category is not None or (inside is not None and inside != "X_Z_U_STAR_TAGS" and elem.VR != "UI"):
            found[int(elem.tag)] |= text(elem)
    return found


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DATA", str(tmp_path / "data"))
    monkeypatch.setenv("DCMFLOW_DEID_KEY", "first key: 6f1c9e0b7a")
    return tmp_path / "data"


def put(data: Path, sources: Sequence[Path | Dataset], folder: str = "dicom/series") -> dict[str, Any]:
    """Copy files (or write datasets) to ``data/folder``; return the worker's headers."""
    target = data / folder
    target.mkdir(parents=True)
    for number, source in enumerate(sources):
        if isinstance(source, Dataset):
            source.save_as(target / f"{number:04d}.dcm", enforce_file_format=True)
        else:
            shutil.copy(source, target / f"{number:04d}.dcm")
    first = pydicom.dcmread(next(iter(sorted(target.iterdir()))), stop_before_pixels=True)
    return headers_from_dataset(first, dcmpath=folder)


def run(headers: dict[str, Any], **params: Any) -> dict[str, Any]:
    result: dict[str, Any] = deid(jobName="deid", headers=headers, params={"output": "deid", "forward_to": None, **params}, added_params={})
    return result


def written(data: Path, result: dict[str, Any]) -> list[Path]:
    return sorted(p for folder in result["output"] for p in (data / folder).iterdir())


def vendor_file(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, name
    return Path(path)


@pytest.mark.parametrize("name", VENDOR_FILES)
def test_no_profile_value_survives_and_pixels_are_untouched(data: Path, name: str) -> None:
    source = pydicom.dcmread(vendor_file(name))
    before = identifying(source)
    assert sum(len(v) for v in before.values()) >= 5  # the file has something to remove

    result = run(put(data, [vendor_file(name)]))
    [path] = written(data, result)
    out = pydicom.dcmread(path)

    checked = 0
    for elem, inside, _ in walk(out):
        assert not elem.tag.is_private, f"{name}: private {elem.tag} kept"
        if elem.VR == "SQ" or (PROFILE.category(elem) is None and (inside in (None, "X_Z_U_STAR_TAGS") or elem.VR == "UI")):
            continue
        kept = text(elem) & before.get(int(elem.tag), set())
        assert not kept, f"{name}: {elem.keyword or elem.tag} kept {kept}"
        checked += 1
    assert checked > 0
    if "PixelData" in source:
        assert out.PixelData == source.PixelData
    else:
        assert "PixelData" not in out
    assert out.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
    assert out.PatientIdentityRemoved == "YES"
    [method] = out.DeidentificationMethodCodeSequence
    assert (method.CodeValue, method.CodingSchemeDesignator) == ("113100", "DCM")
    assert result["instances"] == 1 and result["profile"] == "Basic Application Level Confidentiality Profile"
    assert result["actions"]["private"] == sum(1 for e in source.iterall() if e.tag.is_private)


@pytest.mark.parametrize(
    ("name", "nests_uids"),
    [("CT_small.dcm", False), ("JPEG2000.dcm", True), ("liver_1frame.dcm", True), ("test-SR.dcm", True), ("ExplVR_BigEnd.dcm", False)],
)
def test_written_files_are_valid_part10_with_new_uids(data: Path, name: str, nests_uids: bool) -> None:
    source = pydicom.dcmread(vendor_file(name))
    originals = {v for e in source.iterall() if e.VR == "UI" for v in text(e)}
    result = run(put(data, [vendor_file(name)]))
    [path] = written(data, result)
    assert path.read_bytes()[128:132] == b"DICM"
    out = pydicom.dcmread(path)
    assert path.name == f"{out.SOPInstanceUID}.dcm" and path.parent.name == out.SeriesInstanceUID
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.file_meta.MediaStorageSOPClassUID == out.SOPClassUID == source.SOPClassUID
    assert result["series_uids"] == [out.SeriesInstanceUID] and result["study_uids"] == [out.StudyInstanceUID]
    assert out.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID and out.get("PixelData") == source.get("PixelData")
    assert not [tag for tag in out.keys() if tag.element == 0]  # no stale group lengths
    nested = 0
    for elem, _, depth in walk(out):
        if elem.VR != "UI":
            continue
        for uid in text(elem):
            assert _UID.match(uid) and len(uid) <= 64, f"{elem.keyword}: {uid}"
        if PROFILE.category(elem) == "U_TAGS" and not elem.is_empty:
            assert elem.value.startswith("2.25.") and elem.value not in originals, elem.keyword
            nested += depth > 0
    assert (nested > 0) == nests_uids  # UIDs inside sequences are replaced too
    dump = subprocess.run(["/usr/bin/dcmdump", "-q", str(path)], capture_output=True, text=True, errors="replace", check=False)
    assert dump.returncode == 0 and out.SOPInstanceUID in dump.stdout, dump.stderr


def nested_ct(n: int = 5, **kwargs: Any) -> list[Dataset]:
    """A synthetic CT series whose slices carry what scanners nest: references to the previous
    slice, the request and the operator, the institution as a code."""
    slices = make_ct_series(n=n, rows=32, cols=32, **kwargs)
    for previous, ds in zip(slices, slices[1:]):
        ref = Dataset()
        ref.ReferencedSOPClassUID = previous.SOPClassUID
        ref.ReferencedSOPInstanceUID = previous.SOPInstanceUID
        ds.ReferencedImageSequence = [ref]
    for ds in slices:
        request = Dataset()
        request.RequestedProcedureID = "RP-20240117-0042"
        request.ScheduledProcedureStepID = "SPS-7731"
        operator = Dataset()
        operator.InstitutionName = "St. Elsewhere General Hospital"
        operator.PersonIdentificationCodeSequence = [Dataset()]
        operator.PersonIdentificationCodeSequence[0].CodeValue = "OP-118"
        operator.PersonIdentificationCodeSequence[0].CodingSchemeDesignator = "L"
        operator.PersonIdentificationCodeSequence[0].CodeMeaning = "Jane Radiographer"
        ds.RequestAttributesSequence = [request]
        ds.OperatorIdentificationSequence = [operator]
        ds.OperatorsName = "Radiographer^Jane"
    return slices


def test_synthetic_series_keeps_references_and_geometry(data: Path) -> None:
    slices = nested_ct()
    result = run(put(data, slices))
    assert result["instances"] == 5 and len(result["series_uids"]) == 1
    out = {int(ds.InstanceNumber): ds for ds in (pydicom.dcmread(p) for p in written(data, result))}
    originals = {int(ds.InstanceNumber): ds for ds in slices}
    assert len({ds.SOPInstanceUID for ds in out.values()}) == 5
    assert len({ds.FrameOfReferenceUID for ds in out.values()}) == 1
    for number, ds in out.items():
        source = originals[number]
        assert ds.PixelData == source.PixelData
        assert ds.ImagePositionPatient == source.ImagePositionPatient and ds.Rows == source.Rows
        assert ds.FrameOfReferenceUID != source.FrameOfReferenceUID
        assert "RequestAttributesSequence" not in ds  # X
        assert str(ds.OperatorsName) != str(source.OperatorsName)
        for elem in ds.iterall():
            assert "Elsewhere" not in str(elem.value) and "Jane" not in str(elem.value) and "RP-2024" not in str(elem.value)
    for number in range(2, 6):  # each slice still points at its neighbour, under the new UID
        [ref] = out[number].ReferencedImageSequence
        assert ref.ReferencedSOPInstanceUID == out[number - 1].SOPInstanceUID
        assert ref.ReferencedSOPClassUID == originals[number].SOPClassUID


def uids(folder: Path) -> dict[str, list[str]]:
    """File name → every UID-table value in it, in walk order."""
    return {
        p.name: [str(e.value) for e, _, _ in walk(pydicom.dcmread(p)) if PROFILE.category(e) == "U_TAGS" and not e.is_empty]
        for p in sorted(folder.rglob("*.dcm"))
    }


def test_mapping_is_stable_for_a_key_and_differs_with_another(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    headers = put(data, nested_ct(3) + [pydicom.dcmread(vendor_file("liver_1frame.dcm"))])
    first = run(headers, output="run1")
    second = run(headers, output="run2")
    run1, run2 = data / first["output"][0], data / second["output"][0]
    assert first["series_uids"] == second["series_uids"]
    assert [p.read_bytes() for p in sorted(run1.rglob("*.dcm"))] == [p.read_bytes() for p in sorted(run2.rglob("*.dcm"))]

    monkeypatch.setenv("DCMFLOW_DEID_KEY", "second key: 90d2aa13c4")
    third = run(headers, output="run3")
    by_key1, by_key3 = uids(data / "run1"), uids(data / "run3")
    assert len(by_key1) == len(by_key3) == 4
    old = {uid for values in by_key1.values() for uid in values}
    new = {uid for values in by_key3.values() for uid in values}
    assert len(old) >= 10 and not old & new
    assert set(third["study_uids"]).isdisjoint(first["study_uids"])


def test_two_series_of_one_study_share_the_new_study_uid(data: Path) -> None:
    study, frame = "1.2.826.0.1.3680043.8.498.77", "1.2.826.0.1.3680043.8.498.78"
    axial = make_ct_series(n=3, rows=32, cols=32, study_uid=study, frame_uid=frame, series_number=3, seed=1)
    thin = make_ct_series(n=4, rows=32, cols=32, study_uid=study, frame_uid=frame, series_number=4, seed=2)
    first = run(put(data, axial, "dicom/axial"))
    second = run(put(data, thin, "dicom/thin"))
    assert first["study_uids"] == second["study_uids"] and first["study_uids"] != [study]
    assert first["series_uids"] != second["series_uids"]
    frames = {pydicom.dcmread(p).FrameOfReferenceUID for r in (first, second) for p in written(data, r)}
    assert len(frames) == 1 and frame not in frames


def test_missing_key_fails_with_one_line(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    headers = put(data, [vendor_file("CT_small.dcm")])
    for unset in (lambda: monkeypatch.delenv("DCMFLOW_DEID_KEY"), lambda: monkeypatch.setenv("DCMFLOW_DEID_KEY", "")):
        unset()
        with pytest.raises(DeidKeyMissing) as caught:
            run(headers)
        message = str(caught.value)
        assert "DCMFLOW_DEID_KEY" in message and "\n" not in message
    assert not (data / "deid").exists()


def test_forward_to_names_the_deid_folder(data: Path) -> None:
    headers = put(data, make_ct_series(n=2, rows=32, cols=32))
    assert "storage" not in run(headers, output="plain")
    result = run(headers, output="sent", forward_to="RESEARCH")
    [request] = result["storage"]
    assert request == {"type": "dicom", "path": f"sent/{result['series_uids'][0]}", "destination": "RESEARCH"}
    assert len(list((data / request["path"]).glob("*.dcm"))) == 2


def test_instances_with_burned_in_annotation_are_left_out_unless_kept(data: Path) -> None:
    """Text in the pixels is not cleaned by this profile: such instances never leave unasked."""
    series = make_ct_series(n=3, rows=32, cols=32)
    series[1].BurnedInAnnotation = "YES"
    series[2].BurnedInAnnotation = "NO"
    headers = put(data, series)
    result = run(headers, output="safe", forward_to="RESEARCH")
    assert (result["instances"], result["burned_in_excluded"]) == (2, 1)
    kept_numbers = sorted(int(pydicom.dcmread(f).InstanceNumber) for f in written(data, result))
    assert kept_numbers == sorted(int(ds.InstanceNumber) for ds in (series[0], series[2]))
    kept = run(headers, output="all", burned_in="keep")
    assert (kept["instances"], kept["burned_in_excluded"]) == (3, 0)
    with pytest.raises(ValueError, match="burned_in must be 'exclude' or 'keep'"):
        run(headers, output="x", burned_in="clean")


def test_nothing_is_forwarded_when_every_instance_was_left_out(data: Path) -> None:
    series = make_ct_series(n=2, rows=32, cols=32)
    for ds in series:
        ds.BurnedInAnnotation = "YES"
    result = run(put(data, series), output="none", forward_to="RESEARCH")
    assert (result["instances"], result["burned_in_excluded"], result["output"]) == (0, 2, [])
    assert "storage" not in result


def test_output_must_stay_under_data_outside_the_input(data: Path) -> None:
    headers = put(data, make_ct_series(n=1, rows=32, cols=32))
    for output in ("../elsewhere", "dicom/copy", "/tmp/deid"):
        with pytest.raises(ValueError, match="is not a folder under"):
            run(headers, output=output)


def test_registration_and_callback() -> None:
    [job] = service.to_spec(source="python", origin="deid.py", content_hash="-").jobs
    assert (job.job_name, job.timeout) == ("deid", 600.0)
    assert job.params == {"output": "deid", "forward_to": None, "burned_in": "exclude"}
    assert job.callback == "services_registry.builtin.deid.accept_every_series"
    for name in ("CT_small.dcm", "rtplan.dcm", "test-SR.dcm", "waveform_ecg.dcm"):
        ds = pydicom.dcmread(vendor_file(name), stop_before_pixels=True)
        assert accept_every_series(jobName="deid", headers=headers_from_dataset(ds, dcmpath="x"), params={}, added_params={}) is True
