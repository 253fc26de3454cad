"""Preview: a PNG thumbnail of the middle slice and a montage of the series, shown on the flow run.

Enable it with ``dcmflow services enable preview``; the files land in the job's session as
``preview/<SeriesInstanceUID>.png`` and ``preview/<SeriesInstanceUID>-montage.png``
(``-p output=FOLDER`` to change the folder), and the flow embeds both in a markdown artifact.

The series is stacked the way a viewer stacks it (spatially along the slice normal, else by
Instance Number; :func:`~services_registry.builtin._series.sort_slices`); a series of one
multi-frame instance is stacked by frame. The thumbnail is the middle of the stack (index
``n // 2``), the montage up to :data:`MAX_TILES` evenly spaced entries in a square grid. Only
those frames are decoded. Grey values go through the Modality LUT and the middle slice's VOI
(window, VOI LUT, or a percentile window), MONOCHROME1 is inverted, colour is converted to RGB
(:mod:`~services_registry.builtin._preview_render`). Pixel spacing is honoured, so non-square
pixels are not shown stretched.

A transfer syntax this machine has no decoder for is skipped with the reason (the data is
fine, a plugin is missing); pixel data the decoders reject fails with their messages.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services_registry import Service
from services_registry.builtin._series import Slice, data_dir, output_dir, series_slices, sort_slices

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image
    from pydicom.dataset import Dataset

    from services_registry.builtin._preview_render import Voi

# numpy, Pillow and pydicom's pixel handlers are imported where pixels are handled: the callback
# runs in a child process per series, which imports this module and should start in milliseconds.

__all__ = [
    "service",
    "preview",
    "select_images",
    "Entry",
    "stack",
    "montage_indices",
    "grid_shape",
    "THUMBNAIL_SIZE",
    "TILE_SIZE",
    "MAX_TILES",
]

THUMBNAIL_SIZE = 256
"""Longest side of the thumbnail (px): small enough to embed in a markdown artifact."""

TILE_SIZE = 128
"""Side of one montage cell (px)."""

MAX_TILES = 16
"""Most tiles in a montage: a 4x4 grid of :data:`TILE_SIZE`, 512 px square."""

DEFAULT_OUTPUT = "preview"

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
"""PS3.5 §9.1 UID characters: safe as a file name as they are."""

_NATIVE_SYNTAXES = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"})
"""Implicit and explicit VR little endian, deflated, big endian: pixels pydicom reads itself."""

_MAX_ASPECT = 5.0
"""Pixel aspect ratios beyond this (either way) are taken as header errors and ignored."""

service = Service("preview", description="PNG thumbnail of the middle slice and a montage of every image series")


@dataclass(frozen=True)
class Entry:
    """One image of the stack: a frame of an instance."""

    slice: Slice
    frame: int


def stack(slices: Sequence[Slice]) -> list[Entry]:
    """The series' images in viewing order: the frames of a lone multi-frame instance, else each
    instance (its middle frame when it has several) in :func:`sort_slices` order."""
    from services_registry.builtin._preview_render import frame_count

    images = [s for s in slices if s.size is not None]
    if len(images) == 1:
        return [Entry(images[0], frame) for frame in range(frame_count(images[0].dataset))]
    return [Entry(s, frame_count(s.dataset) // 2) for s in sort_slices(images)]


def montage_indices(n: int, tiles: int = MAX_TILES) -> list[int]:
    """Indices of the stack shown in the montage: all of them, or ``tiles`` evenly spaced from
    first to last."""
    if n <= tiles:
        return list(range(n))
    return sorted({round(i * (n - 1) / (tiles - 1)) for i in range(tiles)})


def grid_shape(tiles: int) -> tuple[int, int]:
    """``(rows, columns)`` of the montage: the squarest grid with room for ``tiles``."""
    columns = max(1, math.ceil(math.sqrt(tiles)))
    return max(1, math.ceil(tiles / columns)), columns


def _row_over_column(ds: Dataset) -> float:
    """Physical height / width of one pixel (PS3.3 10.7.1.3 Pixel Spacing; C.7.6.3.1.7 Pixel Aspect Ratio)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        try:
            row, column = float(value[0]), float(value[1])  # type: ignore[index]
        except (TypeError, ValueError, IndexError):
            continue
        if row > 0 and column > 0:
            ratio = row / column
            return ratio if 1 / _MAX_ASPECT <= ratio <= _MAX_ASPECT else 1.0
    value = ds.get("PixelAspectRatio")
    try:
        ratio = float(value[0]) / float(value[1])  # type: ignore[index]
    except (TypeError, ValueError, IndexError, ZeroDivisionError):
        return 1.0
    return ratio if 1 / _MAX_ASPECT <= ratio <= _MAX_ASPECT else 1.0


def _fit(image: np.ndarray, ds: Dataset, box: int) -> Image.Image:
    """``image`` scaled so its longer physical side is ``box`` px: Lanczos down, nearest up
    (a small image keeps visible pixels rather than invented detail)."""
    from PIL import Image

    rows, columns = image.shape[:2]
    height, width = rows * _row_over_column(ds), float(columns)
    scale = box / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    picture = Image.fromarray(image)
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.NEAREST
    return picture.resize(size, resample) if size != picture.size else picture


def _montage(tiles: Sequence[Image.Image]) -> Image.Image:
    """Tiles row by row in a :func:`grid_shape` grid of :data:`TILE_SIZE` cells, each centred."""
    from PIL import Image

    rows, columns = grid_shape(len(tiles))
    mode = "RGB" if any(t.mode == "RGB" for t in tiles) else "L"
    sheet = Image.new(mode, (columns * TILE_SIZE, rows * TILE_SIZE))
    for i, tile in enumerate(tiles):
        top, left = (i // columns) * TILE_SIZE, (i % columns) * TILE_SIZE
        sheet.paste(tile.convert(mode), (left + (TILE_SIZE - tile.width) // 2, top + (TILE_SIZE - tile.height) // 2))
    return sheet


def _stem(headers: Mapping[str, Any]) -> str:
    """File name stem: the Series Instance UID, else ``<SeriesNumber>_<description>``."""
    uid = str(headers.get("seriesId") or "")
    if _UID.match(uid):
        return uid
    words = f"{headers.get('SeriesNumber', '')}_{headers.get('SeriesDescription', '')}"
    return re.sub(r"[^A-Za-z0-9.-]+", "_", words).strip("_.") or "series"


def _relative(path: Path) -> str:
    return path.relative_to(data_dir()).as_posix()


def _undecodable(entries: Sequence[Entry]) -> str | None:
    """Why some of ``entries`` cannot be decoded here (a transfer syntax without a decoder)."""
    from services_registry.builtin._preview_render import decoder_problem, transfer_syntax

    for syntax in dict.fromkeys(transfer_syntax(e.slice.dataset) for e in entries):
        problem = decoder_problem(syntax)
        if problem is not None:
            return problem
    return None


@service.job(
    name="preview",
    timeout="3m",
    sort_position=5,
    params={"output": DEFAULT_OUTPUT},
    description="PNG thumbnail of the middle slice and a montage (windowed, MONOCHROME1 inverted), shown on the flow run",
)
def preview(jobName: str, headers: dict[str, Any], params: dict[str, Any], added_params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """Write ``$DATA/<output>/<seriesId>.png`` (and ``-montage.png`` for several images); return them.

    Returns
    -------
    dict
        ``thumbnail`` and ``montage`` paths relative to ``$DATA`` (``montage`` is ``None`` for a
        single image), ``slices`` (images in the stack), ``middle`` (file, frame, instance number),
        ``tiles`` and ``grid``, ``window`` ``[center, width]`` (``None`` for a VOI LUT or colour),
        ``voi`` and ``voi_note``, ``inverted`` (MONOCHROME1), ``artifacts`` for the flow run; or
        ``skipped`` with the reason.

    Raises
    ------
    FileNotFoundError
        The series folder is missing or holds no DICOM instance.
    UndecodablePixels
        The decoders rejected the pixel data (their messages on one line).
    """
    from services_registry.builtin._preview_render import choose_voi, decode_frame, render, transfer_syntax

    slices = series_slices(headers)
    entries = stack(slices)
    if not entries:
        return _skip(headers, "no image instances (no Rows/Columns): nothing to preview")
    middle = len(entries) // 2
    shown = montage_indices(len(entries)) if len(entries) > 1 else []
    reason = _undecodable([entries[i] for i in {middle, *shown}])
    if reason is not None:
        return _skip(headers, reason)

    decoded = {i: decode_frame(entries[i].slice.path, entries[i].slice.dataset, entries[i].frame) for i in sorted({middle, *shown})}
    reference = entries[middle].slice.dataset
    voi: Voi = choose_voi(decoded[middle], reference)
    images = {i: render(pixels, entries[i].slice.dataset, voi) for i, pixels in decoded.items()}

    out = output_dir(params, DEFAULT_OUTPUT)
    stem = _stem(headers)
    thumbnail = out / f"{stem}.png"
    _fit(images[middle], reference, THUMBNAIL_SIZE).save(thumbnail, optimize=True)
    artifacts = [{"type": "image", "path": _relative(thumbnail), "title": f"Middle image ({middle + 1} of {len(entries)})"}]
    montage: Path | None = None
    if shown:
        montage = out / f"{stem}-montage.png"
        _montage([_fit(images[i], entries[i].slice.dataset, TILE_SIZE) for i in shown]).save(montage, optimize=True)
        artifacts.append({"type": "image", "path": _relative(montage), "title": f"Montage ({len(shown)} of {len(entries)} images)"})
    else:
        (out / f"{stem}-montage.png").unlink(missing_ok=True)  # a retry must not report an earlier attempt's montage

    photometric = str(reference.get("PhotometricInterpretation") or "")
    syntax = transfer_syntax(reference)
    result: dict[str, Any] = {
        "thumbnail": _relative(thumbnail),
        "montage": _relative(montage) if montage else None,
        "slices": len(entries),
        "middle": {
            "file": entries[middle].slice.path.name,
            "frame": entries[middle].frame,
            "instance_number": entries[middle].slice.instance_number,
        },
        "tiles": len(shown),
        "grid": list(grid_shape(len(shown))) if shown else None,
        "window": voi.window,
        "voi": voi.kind,
        "voi_note": voi.note,
        "photometric": photometric,
        "inverted": photometric.strip().upper() == "MONOCHROME1",
        "transfer_syntax": syntax.name if syntax else None,
        "artifacts": artifacts,
    }
    print(
        f"preview: {len(entries)} images, middle {entries[middle].slice.path.name} frame {entries[middle].frame}, "
        f"{voi.note}{' [' + ', '.join(f'{v:g}' for v in voi.window) + ']' if voi.window else ''}, "
        f"{len(shown)} tiles -> {result['thumbnail']}"
    )
    return result


def _skip(headers: Mapping[str, Any], reason: str) -> dict[str, Any]:
    print(f"preview: skipped {headers['dcmpath']}: {reason}")
    return {"skipped": reason}


@preview.callback
def select_images(jobName: str, headers: dict[str, Any], params: dict[str, Any], added_params: dict[str, Any], **kwargs: Any) -> tuple[bool, dict[str, Any]]:
    """Select series whose instances have pixels (an Image Pixel Module: Rows and Columns,
    PS3.3 C.7.6.3) in a transfer syntax this machine decodes; else say why not."""
    if not headers.get("Rows") or not headers.get("Columns"):
        from pydicom.uid import UID

        sop = str(headers.get("SOPClassUID") or "")
        what = f"{UID(sop).name}" if sop else "an instance without SOP Class UID"
        return False, {"reason": f"{what} has no pixel data (no Rows/Columns): nothing to preview"}
    syntax = str(headers.get("TransferSyntaxUID") or "")
    if not syntax or syntax in _NATIVE_SYNTAXES:
        return True, {}
    from services_registry.builtin._preview_render import decoder_problem

    problem = decoder_problem(syntax)
    if problem is not None:
        return False, {"reason": problem}
    return True, {}
