"""Synthetic DICOM for tests and benchmarks.

The realistic CT generator lives in :mod:`dcmflow.synthetic` (``dcmflow demo`` sends its
studies) and is re-exported here, so tests keep one import; this module adds what only tests
need: a small MR series for fast tests and the raw bytes of pydicom's ``CT_small.dcm``.
"""

from __future__ import annotations

import random

from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dcmflow.synthetic import CT_IMAGE_STORAGE, UID_ROOT, file_meta, make_ct_series, make_ct_study, to_p10_bytes

__all__ = [
    "CT_IMAGE_STORAGE",
    "MR_IMAGE_STORAGE",
    "make_ct_series",
    "make_ct_study",
    "make_small_series",
    "to_p10_bytes",
    "ct_small_bytes",
]

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def ct_small_bytes() -> bytes:
    """The bytes of pydicom's ``CT_small.dcm`` (note: a non-zero 128-byte preamble)."""
    with open(get_testdata_file("CT_small.dcm"), "rb") as f:  # type: ignore[arg-type]
        return f.read()


def make_small_series(
    n: int = 20,
    rows: int = 64,
    cols: int = 64,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_id: str = "DCMFLOW-MR-0001",
    seed: int = 0,
) -> list[Dataset]:
    """A small MR series (64×64 by default) for fast tests; same conventions as CT.

    Parameters
    ----------
    n, rows, cols, study_uid, series_uid, patient_id, seed
        As for :func:`make_ct_series`.

    Returns
    -------
    list of Dataset
        MR Image Storage datasets with file meta.
    """
    rng = random.Random(seed)
    study_uid = study_uid or generate_uid(UID_ROOT, [f"mr-study-{seed}-{patient_id}"])
    series_uid = series_uid or generate_uid(UID_ROOT, [f"mr-series-{seed}-{study_uid}"])
    out: list[Dataset] = []
    for i in range(n):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.SOPClassUID = MR_IMAGE_STORAGE
        ds.SOPInstanceUID = generate_uid(UID_ROOT, [f"mr-sop-{series_uid}-{i}"])
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20250314"
        ds.StudyTime, ds.ContentTime = "101500", f"1016{i % 60:02d}"
        ds.Modality = "MR"
        ds.Manufacturer = "SIEMENS"
        ds.ManufacturerModelName = "Skyra"
        ds.PatientName = "Synthetic^Head^MR"
        ds.PatientID = patient_id
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.InstanceNumber = i + 1
        ds.SeriesDescription = "t1_mprage_sag"
        ds.ScanningSequence, ds.SequenceVariant = "GR", "SP"
        ds.MagneticFieldStrength = 3
        ds.RepetitionTime, ds.EchoTime = 2300, round(2.98 + rng.random() * 0.01, 4)
        ds.SliceThickness = 1
        ds.ImagePositionPatient = [-32, -32, float(i)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = float(i)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.PixelSpacing = [1, 1]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = rng.randbytes(rows * cols * 2).translate(bytes(b & 0x0F for b in range(256)))
        ds["PixelData"].VR = "OW"
        ds.file_meta = file_meta(ds)
        out.append(ds)
    return out
