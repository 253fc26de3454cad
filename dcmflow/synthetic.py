"""Realistic synthetic CT studies: ``dcmflow demo`` sends one, the tests and benchmarks use them.

The CT series starts from the header of pydicom's bundled ``CT_small.dcm`` (a GE HiSpeed CT/i
image: ~250 elements with patient, study, series, equipment, acquisition and GE private
modules) and varies per slice what a scanner varies: SOP Instance UID, Instance Number,
Image Position (Patient), Slice Location, acquisition/content times, window center/width,
tube current, exposure time, data collection diameter and the GE private location tags.
That keeps metadata-compression figures honest: real slices differ in more than their UIDs
(storage_perf.md §3.3 warns that UID-only variation makes series-level zstd look ~260×), and
a demo shows what a scanner would send, not a toy.

Pixel data is int16 (explicit VR little endian): an ellipse of soft tissue with a bone disc
whose radius changes along z, plus per-pixel noise. numpy is not a dependency of dcmflow, so
the images are built with ``bytearray`` slicing and ``random.Random.randbytes`` (both run in
C), seeded for reproducibility.
"""

from __future__ import annotations

import copy
import io
import math
import random
from datetime import datetime, timedelta

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

__all__ = [
    "CT_IMAGE_STORAGE",
    "DEMO_SERIES",
    "UID_ROOT",
    "file_meta",
    "make_ct_series",
    "make_ct_study",
    "to_p10_bytes",
]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
"""CT Image Storage SOP Class UID (PS3.4 Annex B.5)."""

UID_ROOT = "1.2.826.0.1.3680043.8.498."
"""pydicom's UID root, as :func:`pydicom.uid.generate_uid` uses."""


def _ct_template() -> Dataset:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)  # type: ignore[arg-type]
    # Values that depend on the pixel range; we do not compute them, so drop them.
    for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.preamble = None  # our files get the standard all-zero preamble
    return ds


def _pixels(rows: int, cols: int, z: int, n: int, rng: random.Random) -> bytes:
    """int16 little-endian slice: air, a soft-tissue ellipse, a bone disc, plus noise.

    Stored values are HU + 1024 (RescaleIntercept -1024): air ≈ 0–63, tissue ≈ 1024–1087,
    bone ≈ 2048–2111. The high byte carries the region, the low byte the noise, so the image
    is assembled with two strided bytearray assignments instead of a per-pixel loop.
    """
    high = bytearray(rows * cols)
    cy, cx = rows / 2, cols / 2
    ay, ax = rows * 0.38, cols * 0.45
    bone_r = max(1.0, min(rows, cols) * (0.05 + 0.05 * math.sin(math.pi * z / max(n, 1))))
    for y in range(rows):
        dy = (y - cy) / ay
        if abs(dy) < 1:
            half = int(ax * math.sqrt(1 - dy * dy))
            high[y * cols + int(cx) - half : y * cols + int(cx) + half] = b"\x04" * (2 * half)
        by = y - cy * 0.9
        if abs(by) < bone_r:
            half = int(math.sqrt(bone_r * bone_r - by * by))
            start = y * cols + int(cx * 1.1) - half
            high[start : start + 2 * half] = b"\x08" * (2 * half)
    noise = rng.randbytes(rows * cols).translate(bytes(b & 0x3F for b in range(256)))
    out = bytearray(rows * cols * 2)
    out[0::2] = noise
    out[1::2] = high
    return bytes(out)


def file_meta(ds: Dataset) -> FileMetaDataset:
    """PS3.10 §7.1 file meta for ``ds``: its SOP class and instance, explicit VR little endian."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def make_ct_series(
    n: int = 200,
    rows: int = 512,
    cols: int = 512,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_id: str = "DCMFLOW-CT-0001",
    seed: int = 0,
    patient_name: str = "Synthetic^Chest^CT",
    accession_number: str | None = None,
    study_description: str = "CT CHEST W/ CONTRAST",
    series_description: str = "AXIAL 1.25mm STND",
    series_number: int = 3,
    frame_uid: str | None = None,
    count_in_header: bool = False,
) -> list[Dataset]:
    """A helical CT series of ``n`` axial slices with a realistic, per-slice-varying header.

    Parameters
    ----------
    n : int
        Number of slices.
    rows, cols : int
        Image size.
    study_uid, series_uid : str, optional
        UIDs to use; derived from ``seed`` (and ``patient_id``) when omitted.
    patient_id : str
        Patient ID (0010,0020).
    seed : int
        Seed of every random choice (pixels and per-slice acquisition parameters); UIDs are
        derived from it too, so the same seed gives byte-identical files.
    patient_name, study_description, series_description : str
        (0010,0010), (0008,1030), (0008,103E).
    accession_number : str, optional
        (0008,0050); default ``A`` and the seed in six digits.
    series_number : int
        (0020,0011).
    frame_uid : str, optional
        (0020,0052) Frame of Reference UID; derived from the series UID when omitted. Give
        two reconstructions of one acquisition the same one, as a scanner does.
    count_in_header : bool
        Write (0020,1209) Number of Series Related Instances = ``n`` in every slice, as a PACS
        forwarding a whole series does; a receiver may then close the series as soon as all
        arrived (PS3.3 C.6.1.1.4) instead of waiting for a quiet period.

    Returns
    -------
    list of Dataset
        Datasets with file meta (explicit VR little endian), ready for :func:`to_p10_bytes`.
    """
    rng = random.Random(seed)
    study_uid = study_uid or generate_uid(UID_ROOT, [f"study-{seed}-{patient_id}"])
    series_uid = series_uid or generate_uid(UID_ROOT, [f"series-{seed}-{study_uid}"])
    frame_uid = frame_uid or generate_uid(UID_ROOT, [f"frame-{series_uid}"])
    template = _ct_template()
    start = datetime(2025, 3, 14, 9, 26, 53) + timedelta(minutes=rng.randrange(600))
    spacing, thickness = 1.25, 1.25
    pixel_spacing = round(350.0 / cols, 6)
    z0 = round(rng.uniform(-40.0, 40.0), 2)
    table_height = round(rng.uniform(120.0, 180.0), 6)
    out: list[Dataset] = []
    for i in range(n):
        ds = copy.deepcopy(template)  # Dataset.copy() is shallow: elements would be shared
        sop_uid = generate_uid(UID_ROOT, [f"sop-{series_uid}-{i}"])
        acq = start + timedelta(seconds=0.5 * i)
        content = acq + timedelta(seconds=7 + rng.random())
        z = round(z0 - i * spacing, 4)
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19580612"
        ds.PatientSex = "F"
        ds.PatientAge = "066Y"
        ds.PatientWeight = "71.5"
        ds.AccessionNumber = f"A{seed:06d}" if accession_number is None else accession_number
        ds.StudyDescription = study_description
        ds.SeriesDescription = series_description
        ds.BodyPartExamined = "CHEST"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = start.strftime("%Y%m%d")
        ds.InstanceCreationDate = start.strftime("%Y%m%d")
        ds.StudyTime = (start - timedelta(minutes=4)).strftime("%H%M%S")
        ds.SeriesTime = start.strftime("%H%M%S")
        ds.AcquisitionTime = acq.strftime("%H%M%S.%f")
        ds.ContentTime = content.strftime("%H%M%S.%f")
        ds.InstanceCreationTime = content.strftime("%H%M%S")
        ds.SeriesNumber = series_number
        ds.AcquisitionNumber = 1 + i // 64
        ds.InstanceNumber = i + 1
        if count_in_header:
            ds.NumberOfSeriesRelatedInstances = n
        ds.ImagePositionPatient = [round(-cols * pixel_spacing / 2, 4), round(-rows * pixel_spacing / 2, 4), z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = z
        ds.SliceThickness = thickness
        ds.SpacingBetweenSlices = spacing
        ds.TableHeight = table_height
        ds.KVP = 120
        ds.DataCollectionDiameter = round(500.0 + rng.uniform(-0.05, 0.05), 4)
        ds.ReconstructionDiameter = round(cols * pixel_spacing, 4)
        ds.ExposureTime = rng.randrange(480, 560)
        ds.XRayTubeCurrent = rng.randrange(140, 320)
        ds.Exposure = int(ds.XRayTubeCurrent * ds.ExposureTime / 1000)
        ds.CTDIvol = round(rng.uniform(6.0, 14.0), 6)
        ds.WindowCenter = [40 + rng.randrange(-3, 4), -600]
        ds.WindowWidth = [400 + rng.randrange(-10, 11), 1500]
        ds.WindowCenterWidthExplanation = ["MEDIASTINUM", "LUNG"]
        ds.Rows, ds.Columns = rows, cols
        ds.PixelSpacing = [pixel_spacing, pixel_spacing]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        # GE private location tags follow the slice (CT_small has them in group 0027).
        block = ds.private_block(0x0027, "GEMS_IMAG_01")
        for offset in (0x41, 0x44, 0x4A, 0x4D):
            block[offset].value = float(z)
        ds.private_block(0x0019, "GEMS_ACQU_01")[0x24].value = round(0.5 * i + rng.random() * 0.01, 6)
        ds.private_block(0x0043, "GEMS_PARM_01")[0x29].value = rng.randbytes(2068)  # histogram
        ds.PixelData = _pixels(rows, cols, i, n, rng)
        ds["PixelData"].VR = "OW"
        ds.file_meta = file_meta(ds)
        out.append(ds)
    return out



DEMO_SERIES = (("AXIAL 1.25mm STND", 2), ("AXIAL 1.25mm LUNG", 3))
"""Description and number of each series of :func:`make_ct_study`: two reconstructions
(soft-tissue and lung kernels) of one acquisition, as a chest CT usually has."""


def make_ct_study(
    n: int = 20,
    rows: int = 128,
    cols: int = 128,
    *,
    patient_name: str = "DEMO^CT",
    patient_id: str = "DCMFLOW-DEMO",
    study_description: str = "dcmflow demo",
    accession_number: str | None = None,
    seed: int | None = None,
) -> list[list[Dataset]]:
    """A CT study of the two series of :data:`DEMO_SERIES`, with fresh UIDs on every call.

    Fresh UIDs make every call a new study, so a demo run is never a re-send (which the
    receiver would record as a new revision of an old series). Every slice carries (0020,1209)
    Number of Series Related Instances, so a receiver can close each series as soon as it is
    all in.

    Parameters
    ----------
    n : int
        Slices per series.
    rows, cols : int
        Image size (small keeps a demo quick).
    patient_name, patient_id, study_description : str
        (0010,0010), (0010,0020), (0008,1030).
    accession_number : str, optional
        (0008,0050); default ``DEMO`` and the seed in six digits.
    seed : int, optional
        Seed of the pixel noise and acquisition parameters (not of the UIDs, which are always
        fresh); a random one when omitted.

    Returns
    -------
    list of list of Dataset
        One list of slices per series, with file meta, ready for C-STORE or :func:`to_p10_bytes`.
    """
    if seed is None:
        seed = random.SystemRandom().randrange(1_000_000)
    study_uid = generate_uid(UID_ROOT)
    frame_uid = generate_uid(UID_ROOT)
    accession = f"DEMO{seed:06d}" if accession_number is None else accession_number
    return [
        make_ct_series(
            n,
            rows,
            cols,
            study_uid=study_uid,
            series_uid=generate_uid(UID_ROOT),
            patient_id=patient_id,
            seed=seed + index,  # its own noise, so the two series are not byte-for-byte twins
            patient_name=patient_name,
            accession_number=accession,
            study_description=study_description,
            series_description=description,
            series_number=number,
            frame_uid=frame_uid,
            count_in_header=True,
        )
        for index, (description, number) in enumerate(DEMO_SERIES)
    ]


def to_p10_bytes(ds: Dataset) -> bytes:
    """Encode ``ds`` as a DICOM Part 10 file (PS3.10 §7.1: preamble, ``DICM``, file meta).

    Parameters
    ----------
    ds : Dataset
        A dataset with ``file_meta`` (as the generators above return).

    Returns
    -------
    bytes
        The complete file.
    """
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
