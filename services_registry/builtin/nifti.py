"""NIfTI: convert each volumetric CT or MR series to gzipped NIfTI with a BIDS JSON sidecar.

Enable it with ``dcmflow services enable nifti``; the files land in the job's session as
``nifti/<SeriesInstanceUID>.nii.gz`` and ``.json`` (``-p output=FOLDER`` to change the folder).

The conversion is dcm2niix's (Li et al. 2016), run from its Python wheel as a subprocess on
the series folder itself, so orientation, spacing, rescaling, gantry-tilt correction and the
BIDS sidecar are the maintained converter's, not ours. Before calling it the worker decides
from the headers alone whether the series is a volume at all (PS3.3 C.7.6.2 Image Plane
Module): localizers, series mixing image planes or sizes, and images without patient geometry
(such as secondary captures of dose screens, which carry Modality CT) are skipped with the
reason, never failed. A series dcm2niix cannot read fails with dcm2niix's own error lines.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from services_registry import Service
from services_registry.builtin._series import Slice, data_dir, output_dir, series_folder, series_slices

# dcm2niix and nibabel are imported by the worker: the callback runs in a child process per
# series, which imports this module and should start in milliseconds.

__all__ = ["service", "nifti", "select_volumes", "skip_reason", "is_localizer", "output_name", "DCM2NIIX_TIMEOUT"]

DCM2NIIX_TIMEOUT = 540.0
"""Seconds dcm2niix may run: under the job's 10 minutes, so a hang fails with a clear line
instead of the job being killed without one."""

DEFAULT_OUTPUT = "nifti"

_ORIENTATION_TOLERANCE = 1e-3
"""Direction cosines closer than this belong to one image plane (scanners write ~6 digits)."""

_EXIT_MEANINGS = {
    1: "unspecified error",
    2: "no DICOM images found",
    4: "corrupt DICOM file",
    5: "input folder invalid",
    6: "output folder invalid",
    7: "cannot write to the output folder",
    8: "converted some but not all images",
}
"""dcm2niix exit statuses (its ERRORS.md)."""

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
"""PS3.5 §9.1 UID characters: safe as a file name as they are."""

service = Service("nifti", description="Convert volumetric CT/MR series to NIfTI (dcm2niix) with a BIDS JSON sidecar")


def is_localizer(image_type: Any) -> bool:
    """Whether an Image Type (0008,0008) value marks a localizer (PS3.3 C.8.2.1.1.1: ``LOCALIZER``).

    Accepts the multi-valued list or a backslash-joined string, as headers may hold either.
    """
    if image_type is None:
        return False
    values = image_type.split("\\") if isinstance(image_type, str) else list(image_type)
    return any(str(v).strip().upper() == "LOCALIZER" for v in values)


def _planes(orientations: Sequence[tuple[float, ...]]) -> list[tuple[float, ...]]:
    """The distinct image planes among ``orientations``, within the tolerance."""
    planes: list[tuple[float, ...]] = []
    for orientation in orientations:
        if not any(max(abs(a - b) for a, b in zip(orientation, p)) <= _ORIENTATION_TOLERANCE for p in planes):
            planes.append(orientation)
    return planes


def skip_reason(slices: Sequence[Slice]) -> str | None:
    """Why the series is not a volume to convert, or ``None`` when it is.

    A single slice is a valid one-slice volume. Multi-frame instances keep their geometry
    per frame (PS3.3 C.7.6.16 functional groups), which dcm2niix reads, so only their
    localizer flag is checked here.

    Parameters
    ----------
    slices
        The series' instances, headers only (:func:`~services_registry.builtin._series.read_slices`).

    Returns
    -------
    str or None
        One line a person can act on.
    """
    images = [s for s in slices if s.size is not None]
    if not images:
        return "no image instances (no Rows/Columns): nothing to convert"
    localizers = [s for s in images if is_localizer(s.dataset.get("ImageType"))]
    if localizers:
        image_type = "\\".join(str(v) for v in localizers[0].dataset.get("ImageType"))
        return f"localizer (ImageType {image_type}): not a volume"
    if any(int(s.dataset.get("NumberOfFrames") or 1) > 1 for s in images):
        return None
    orientations = [s.orientation for s in images if s.position is not None and s.orientation is not None]
    if len(orientations) < len(images):
        return (
            f"{len(images) - len(orientations)} of {len(images)} images have no Image Position/Orientation "
            "(Patient) (a secondary capture?): no geometry to build a volume on"
        )
    planes = _planes(orientations)
    if len(planes) > 1:
        return f"mixed orientations: {len(planes)} image planes in one series (e.g. a multi-plane localizer)"
    sizes = sorted({s.size for s in images if s.size is not None})
    if len(sizes) > 1:
        return "mixed image sizes: " + ", ".join(f"{rows}x{cols}" for rows, cols in sizes)
    return None


def output_name(headers: Mapping[str, Any]) -> str:
    """The file name given to dcm2niix (``-f``): the Series Instance UID, else ``<SeriesNumber>_<description>``.

    Deterministic, so a dependent job finds ``<output>/<seriesId>.nii.gz`` without a listing.
    """
    uid = str(headers.get("seriesId") or "")
    if _UID.match(uid):
        return uid
    words = f"{headers.get('SeriesNumber', '')}_{headers.get('SeriesDescription', '')}"
    return re.sub(r"[^A-Za-z0-9.-]+", "_", words).strip("_.") or "series"


def _written(folder: Path, name: str) -> list[Path]:
    """Files dcm2niix wrote for ``name``: ``name.*`` and its split variants ``name_*.*`` (``_Tilt_1``, ``_e2``)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and (p.name.startswith(f"{name}.") or p.name.startswith(f"{name}_")))


def _run(folder: Path, out: Path, name: str) -> subprocess.CompletedProcess[str]:
    """dcm2niix on the series folder, killed after :data:`DCM2NIIX_TIMEOUT`.

    It stays in the job's process group, so the job's own timeout or cancellation kills it too.
    """
    import dcm2niix

    args = [dcm2niix.bin, "-z", "y", "-b", "y", "-ba", "y", "-w", "1", "-f", name, "-o", str(out), str(folder)]
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=DCM2NIIX_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"dcm2niix did not finish within {DCM2NIIX_TIMEOUT:g} s on {folder.name}") from None


def _problems(completed: subprocess.CompletedProcess[str]) -> str:
    """dcm2niix's own error and warning lines (errors first), else its last line."""
    lines = [line.strip() for line in f"{completed.stderr}\n{completed.stdout}".splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    warnings = [line for line in lines if line.lower().startswith("warning") and line not in errors]
    return "; ".join((errors + warnings)[:5] or lines[-1:]) or "no output"


def _relative(path: Path) -> str:
    return path.relative_to(data_dir()).as_posix()


def _volume(path: Path) -> dict[str, Any]:
    """Shape and voxel size (mm; then s for 4D) from the NIfTI header; the voxels are not read."""
    import nibabel

    image: Any = nibabel.load(path)
    return {
        "nifti": _relative(path),
        "shape": [int(v) for v in image.shape],
        "spacing": [round(float(v), 6) for v in image.header.get_zooms()],
    }


@service.job(
    name="nifti",
    timeout="10m",
    sort_position=20,
    params={"modalities": ["CT", "MR"]},
    description="DICOM to NIfTI (dcm2niix) with a BIDS JSON sidecar; localizers and mixed series are skipped",
)
def nifti(jobName: str, headers: dict[str, Any], params: dict[str, Any], added_params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """Convert the series to ``$DATA/<output>/<name>.nii.gz`` + ``.json``; return what was written.

    Returns
    -------
    dict
        ``nifti``, ``sidecar`` and ``other`` (e.g. ``.bval``) paths relative to ``$DATA``;
        ``shape`` and ``spacing`` of the first volume, ``volumes`` for each; or ``skipped``.

    Raises
    ------
    FileNotFoundError
        The series folder is missing or holds no DICOM instance.
    RuntimeError
        dcm2niix failed, timed out or wrote no NIfTI (with its own error lines).
    """
    slices = series_slices(headers)
    folder = series_folder(headers)
    reason = skip_reason(slices)
    if reason is not None:
        print(f"nifti: skipped {headers['dcmpath']}: {reason}")
        return {"skipped": reason}

    out = output_dir(params, DEFAULT_OUTPUT)
    name = output_name(headers)
    for stale in _written(out, name):
        stale.unlink()  # a retry must not report an earlier attempt's split
    completed = _run(folder, out, name)
    print("\n".join(text.rstrip() for text in (completed.stdout, completed.stderr) if text.strip()))
    files = _written(out, name)
    images = [p for p in files if p.name.endswith((".nii.gz", ".nii"))]
    if completed.returncode != 0 or not images:
        meaning = _EXIT_MEANINGS.get(completed.returncode, "wrote no NIfTI" if completed.returncode == 0 else "error")
        raise RuntimeError(f"dcm2niix failed on {headers['dcmpath']} (exit {completed.returncode}, {meaning}): {_problems(completed)}")

    volumes = [_volume(path) for path in images]
    sidecars = [p for p in files if p.suffix == ".json"]
    print(f"nifti: {len(slices)} instances -> " + ", ".join(f"{v['nifti']} {v['shape']}" for v in volumes))
    return {
        "nifti": [v["nifti"] for v in volumes],
        "sidecar": [_relative(p) for p in sidecars],
        "other": [_relative(p) for p in files if p not in images and p not in sidecars],
        "shape": volumes[0]["shape"],
        "spacing": volumes[0]["spacing"],
        "volumes": volumes,
        "artifacts": [],
    }


@nifti.callback
def select_volumes(jobName: str, headers: dict[str, Any], params: dict[str, Any], added_params: dict[str, Any], **kwargs: Any) -> tuple[bool, dict[str, Any]]:
    """Select CT and MR series (``params['modalities']``) that are not localizers, or say why not."""
    wanted = [str(m).upper() for m in (params or {}).get("modalities") or ["CT", "MR"]]
    modality = str(headers.get("Modality") or "").upper()
    if modality not in wanted:
        return False, {"reason": f"modality {modality or 'missing'} is not one of {', '.join(wanted)}"}
    if is_localizer(headers.get("ImageType")):
        return False, {"reason": "localizer (ImageType has LOCALIZER): not a volume"}
    return True, {}
