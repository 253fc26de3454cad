"""The headers given to callbacks and workers (DESIGN.md "Headers").

The representative instance of a series as a flat dict of DICOM keywords, JSON-ready, without
bulk data, plus ``dcmpath`` (series folder relative to ``$DATA``), ``seriesId``, ``studyId``,
``patientId`` and ``callingAE`` (the AE title that sent the series, ``""`` when imported or
unknown: routing rules need it, and the seed's Orthanc gave it as ``RemoteAET``). It mirrors what the seed's services read: Orthanc's *simplified tags*
(keyword → value, sequences as lists of such dicts) of the first instance (reference §2.1).
``seriesId``/``studyId`` are DICOM UIDs here, not Orthanc ids.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

__all__ = ["BULK_VRS", "dataset_to_json", "headers_from_dataset", "read_series_folder", "SeriesFiles"]

BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
"""Value representations left out of headers: binary data (PS3.5 §6.2), never a keyword value."""

_MAX_SEQUENCE_DEPTH = 4


def _value(value: Any) -> Any:
    if isinstance(value, PersonName):
        return str(value)
    if isinstance(value, (MultiValue, list, tuple)):
        return [_value(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, bytes):
        return None
    return str(value)


def dataset_to_json(ds: Dataset, depth: int = 0) -> dict[str, Any]:
    """Keyword → JSON value of every public, non-bulk element of ``ds``.

    Private elements (no keyword), group lengths and binary VRs are left out; sequences
    become lists of dicts up to a small depth, so headers stay small and serialisable.
    """
    out: dict[str, Any] = {}
    for elem in ds:
        keyword = elem.keyword
        if not keyword or elem.tag.element == 0 or elem.VR in BULK_VRS:
            continue
        if elem.VR == "SQ":
            if depth < _MAX_SEQUENCE_DEPTH:
                out[keyword] = [dataset_to_json(item, depth + 1) for item in elem.value]
            continue
        out[keyword] = _value(elem.value)
    return out


def headers_from_dataset(ds: Dataset, *, dcmpath: str, calling_ae: str = "") -> dict[str, Any]:
    """Headers of a series from its representative instance.

    Parameters
    ----------
    ds
        The representative instance (read with ``stop_before_pixels=True``).
    dcmpath
        The series folder relative to ``$DATA``, as workers expect it.
    calling_ae
        The AE title of the association that sent the series (``""`` if unknown).
    """
    headers = dataset_to_json(ds)
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        for key, value in dataset_to_json(meta).items():
            headers.setdefault(key, value)
    headers["dcmpath"] = dcmpath
    headers["seriesId"] = str(ds.get("SeriesInstanceUID", ""))
    headers["studyId"] = str(ds.get("StudyInstanceUID", ""))
    headers["patientId"] = str(ds.get("PatientID", ""))
    headers["callingAE"] = calling_ae
    return headers


class SeriesFiles:
    """The files of one series found in a folder, and its representative instance."""

    def __init__(self, series_uid: str) -> None:
        self.series_uid = series_uid
        self.files: list[tuple[Path, Dataset]] = []

    @property
    def representative(self) -> tuple[Path, Dataset]:
        """The instance with the lowest InstanceNumber (then file name): the seed's "first"."""
        def key(item: tuple[Path, Dataset]) -> tuple[int, str]:
            number = item[1].get("InstanceNumber")
            try:
                return (int(number), item[0].name)
            except (TypeError, ValueError):
                return (2**31, item[0].name)

        return min(self.files, key=key)


def read_series_folder(folder: Path, files: Iterable[Path] | None = None) -> dict[str, SeriesFiles]:
    """Group the DICOM files under ``folder`` by SeriesInstanceUID (headers only).

    Files that are not DICOM, or have no SeriesInstanceUID, are skipped.
    """
    series: dict[str, SeriesFiles] = {}
    candidates = files if files is not None else sorted(p for p in folder.rglob("*") if p.is_file())
    for path in candidates:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        if not uid:
            continue
        series.setdefault(uid, SeriesFiles(uid)).files.append((path, ds))
    return series
