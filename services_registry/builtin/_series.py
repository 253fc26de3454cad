"""A series as a built-in service's worker sees it: its folder, its slices and their geometry.

Workers run in their own process with ``DATA`` set; the series' files are in
``$DATA/<headers['dcmpath']>`` (reference/dcm_processor.md). The geometry helpers follow
PS3.3 C.7.6.2: Image Position (Patient) is the centre of the first voxel, Image Orientation
(Patient) gives the row and column direction cosines, and their cross product is the slice
normal along which slices are ordered.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["Slice", "data_dir", "series_folder", "output_dir", "read_slices", "series_slices", "orientation_key", "sort_slices"]

Vector = tuple[float, float, float]


@functools.cache
def _job_environment() -> Any:
    """The settings class of what dcmflow (like dcm-processor) gives a job's process: ``DATA``,
    its working folder. Made on first use: a service module is also imported where only its
    callbacks run (a child process per series), which must not pay for pydantic."""
    from pydantic_settings import BaseSettings

    class JobEnvironment(BaseSettings):
        data: Path = Path(".")

    return JobEnvironment


def data_dir() -> Path:
    """``$DATA``: the job's working folder (the current folder when run by hand)."""
    return Path(_job_environment()().data)


def series_folder(headers: Mapping[str, Any]) -> Path:
    """The folder holding the series' files: ``$DATA/<dcmpath>``."""
    return data_dir() / str(headers["dcmpath"])


def output_dir(params: Mapping[str, Any] | None, default: str) -> Path:
    """``$DATA/<params['output'] or default>``, created; outputs under ``$DATA`` become session files."""
    folder = data_dir() / str((params or {}).get("output") or default)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == n and all(math.isfinite(v) for v in numbers) else None


@dataclass(frozen=True)
class Slice:
    """One instance of the series with the geometry read from its header."""

    path: Path
    dataset: Dataset
    instance_number: int | None
    position: Vector | None
    orientation: tuple[float, float, float, float, float, float] | None

    @property
    def normal(self) -> Vector | None:
        """Unit slice normal: row cosines × column cosines (``None`` without orientation)."""
        if self.orientation is None:
            return None
        r, c = self.orientation[:3], self.orientation[3:]
        n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
        length = math.sqrt(sum(v * v for v in n))
        return None if length < 1e-6 else (n[0] / length, n[1] / length, n[2] / length)

    def distance(self, normal: Vector) -> float | None:
        """Position of the slice along ``normal`` (mm), ``None`` without a position."""
        if self.position is None:
            return None
        return sum(p * n for p, n in zip(self.position, normal))

    @property
    def size(self) -> tuple[int, int] | None:
        """(Rows, Columns), ``None`` for an instance without pixels."""
        rows, cols = self.dataset.get("Rows"), self.dataset.get("Columns")
        return (int(rows), int(cols)) if rows and cols else None


def read_slices(folder: Path, *, pixels: bool = False) -> list[Slice]:
    """Every DICOM instance in ``folder`` (not recursive), in file-name order.

    Files that are not DICOM (PS3.10 ``DICM`` preamble) are ignored. ``pixels=False`` reads
    headers only, which is what geometry checks need and much faster on large series.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    slices = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=not pixels)
        except (InvalidDicomError, OSError, ValueError):
            continue
        number = ds.get("InstanceNumber")
        slices.append(
            Slice(
                path=path,
                dataset=ds,
                instance_number=int(number) if number not in (None, "") else None,
                position=_floats(ds.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
                orientation=_floats(ds.get("ImageOrientationPatient"), 6),  # type: ignore[arg-type]
            )
        )
    return slices


def series_slices(headers: Mapping[str, Any]) -> list[Slice]:
    """The slices (headers only) of the series at ``$DATA/<dcmpath>``.

    Raises
    ------
    FileNotFoundError
        The folder is missing or holds no DICOM instance.
    """
    folder = series_folder(headers)
    if not folder.is_dir():
        raise FileNotFoundError(f"series folder {headers['dcmpath']} does not exist under $DATA")
    slices = read_slices(folder)
    if not slices:
        raise FileNotFoundError(f"no DICOM instances in {headers['dcmpath']}")
    return slices


def orientation_key(s: Slice, decimals: int = 3) -> tuple[float, ...] | None:
    """The orientation rounded, to group slices that share a plane."""
    return None if s.orientation is None else tuple(round(v, decimals) for v in s.orientation)


def sort_slices(slices: Sequence[Slice]) -> list[Slice]:
    """Slices in spatial order along the common normal when every slice has one geometry,
    else by Instance Number (then file name): the order a viewer would stack them in."""
    normals = {orientation_key(s) for s in slices}
    if slices and len(normals) == 1 and None not in normals and all(s.position is not None for s in slices):
        normal = slices[0].normal
        if normal is not None:
            return sorted(slices, key=lambda s: (s.distance(normal), s.instance_number or 0))  # type: ignore[arg-type,return-value]
    return sorted(slices, key=lambda s: (s.instance_number is None, s.instance_number or 0, s.path.name))
