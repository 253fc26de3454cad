"""From stored pixel values to display values: the preview service's decoding and windowing.

The grey-scale pipeline is the standard's (PS3.3 C.11, PS3.4 N.2.1.1): stored values →
Modality LUT (rescale slope/intercept or Modality LUT Sequence, PS3.3 C.11.1) → VOI (window
center/width, PS3.3 C.11.2.1.2, or a VOI LUT Sequence, C.11.2.1.1) → display, with
MONOCHROME1 shown inverted (its minimum is white, PS3.3 C.7.6.3.1.2). Every step is pydicom's
(``pydicom.pixels``): this module only chooses which VOI applies and scales the result to
8 bits. When the header has neither window nor VOI LUT, or its window would leave the image
blank, a robust window from the 1st to the 99th percentile of the image is used instead.

Colour images (RGB, YBR_*, PALETTE COLOR) are not windowed: :func:`pydicom.pixels.pixel_array`
already returns YBR_FULL and YBR_FULL_422 as RGB (it calls ``convert_color_space``), JPEG 2000
decoders undo YBR_RCT/YBR_ICT themselves, and palette colour goes through
:func:`pydicom.pixels.apply_color_lut`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, apply_windowing, get_decoder, pixel_array
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

__all__ = [
    "PERCENTILES",
    "UndecodablePixels",
    "Voi",
    "choose_voi",
    "decode_frame",
    "decoder_problem",
    "frame_count",
    "is_color",
    "render",
    "transfer_syntax",
]

PERCENTILES = (1.0, 99.0)
"""The robust window used when the header gives none: these percentiles of the image's values."""

_MONOCHROME = {"MONOCHROME1", "MONOCHROME2"}


class UndecodablePixels(RuntimeError):
    """The pixel data of an instance could not be decoded (corrupt data or a decoder's failure)."""


@dataclass(frozen=True)
class Voi:
    """How the values of a grey-scale image become display values.

    ``source`` is the dataset whose VOI LUT Module is applied (``window``, ``lut``);
    ``low``/``high`` bound the percentile window in Modality LUT output units.
    """

    kind: Literal["window", "lut", "percentile", "color"]
    center: float | None = None
    width: float | None = None
    source: Dataset | None = None
    note: str = ""

    @property
    def window(self) -> list[float] | None:
        """``[center, width]`` in Modality LUT output units (e.g. HU), ``None`` without one."""
        if self.center is None or self.width is None:
            return None
        return [round(self.center, 4), round(self.width, 4)]


def transfer_syntax(ds: Dataset) -> UID | None:
    """The Transfer Syntax UID of an instance read from a file, ``None`` when it has no file meta."""
    meta = getattr(ds, "file_meta", None)
    value = meta.get("TransferSyntaxUID") if meta is not None else None
    return UID(str(value)) if value else None


def decoder_problem(syntax: str | None) -> str | None:
    """Why this machine cannot decode pixel data in ``syntax``, or ``None`` when it can.

    Uses pydicom's decoder registry: a syntax with no decoder at all (e.g. MPEG video), or one
    whose plugins all miss a package (named, so a person knows what to install).
    """
    if not syntax:
        return None
    uid = UID(syntax)
    try:
        decoder = get_decoder(uid)
    except (NotImplementedError, ValueError):
        return f"no pixel data decoder for transfer syntax {uid.name} ({uid})"
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin available"
        return f"cannot decode {uid.name} on this machine: {missing}"
    return None


def frame_count(ds: Dataset) -> int:
    """(0028,0008) Number of Frames, 1 when absent or unreadable."""
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def is_color(ds: Dataset) -> bool:
    """Whether the instance is shown in colour (anything but MONOCHROME1/2, PS3.3 C.7.6.3.1.2)."""
    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    if photometric:
        return photometric not in _MONOCHROME
    return int(ds.get("SamplesPerPixel") or 1) > 1


def decode_frame(path: Path, ds: Dataset, index: int) -> np.ndarray:
    """Frame ``index`` of the instance at ``path`` (``ds`` is its header), decoded by pydicom.

    Only that frame is decoded; YBR_FULL and YBR_FULL_422 come back as RGB.

    Raises
    ------
    UndecodablePixels
        The data is corrupt or every decoding plugin failed (their messages, on one line).
    """
    syntax = transfer_syntax(ds)
    try:
        if syntax == DeflatedExplicitVRLittleEndian:  # the whole file is deflated: no reading in place
            return pixel_array(pydicom.dcmread(path), index=index)
        return pixel_array(path, index=index)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # any decoder failure becomes one clear line
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        name = syntax.name if syntax else "unknown transfer syntax"
        raise UndecodablePixels(f"cannot decode the pixel data of {path.name} ({name}): {message}") from None


def _first(value: Any) -> float:
    """The first value of a possibly multi-valued DS element (the default view, PS3.3 C.11.2.1.2)."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = value[0]
    return float(value)


def _valid(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Mask of pixels that are not padding (PS3.3 C.7.5.1.1.2 Pixel Padding Value and Range Limit)."""
    padding = ds.get("PixelPaddingValue")
    if padding is None or stored.ndim != 2:
        return np.ones(stored.shape, dtype=bool)
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is None:
        return stored != padding
    low, high = sorted((int(padding), int(limit)))
    return (stored < low) | (stored > high)


def _percentile_voi(values: np.ndarray, mask: np.ndarray, note: str) -> Voi:
    """The robust window: :data:`PERCENTILES` of the non-padding values (min/max if they coincide)."""
    sample = values[mask] if mask.any() else values.ravel()
    low, high = (float(v) for v in np.percentile(sample, PERCENTILES))
    if high <= low:
        low, high = float(sample.min()), float(sample.max())
    return Voi("percentile", center=(low + high) / 2, width=high - low, note=note)


def _window_range(source: Dataset) -> tuple[float, float]:
    """The output range pydicom's windowing maps onto, asked of pydicom itself (−∞ → min, +∞ → max)."""
    low, high = apply_windowing(np.array([-np.inf, np.inf]), source)
    return float(low), float(high)


def choose_voi(stored: np.ndarray, ds: Dataset) -> Voi:
    """The VOI to show ``stored`` (one decoded frame of ``ds``) with, and why.

    A header window (the first one, as viewers open with) wins over a VOI LUT Sequence; a window
    pydicom rejects (e.g. width < 1) or one that turns a non-constant image into a single value
    falls back to the percentile window, as does an image without either.
    """
    if is_color(ds):
        return Voi("color", note="colour: not windowed")
    values = apply_modality_lut(stored, ds)
    mask = _valid(stored, ds)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
            windowed = apply_windowing(values, ds)
            _window_range(ds)
        except (ValueError, TypeError, IndexError) as exc:
            return _percentile_voi(values, mask, f"header window unusable ({exc})")
        shown, seen = (windowed[mask], values[mask]) if mask.any() else (windowed, values)
        if shown.min() == shown.max() and seen.min() != seen.max():
            return _percentile_voi(values, mask, f"header window {center:g}/{width:g} leaves the image blank")
        explanation = ds.get("WindowCenterWidthExplanation")
        note = f"header window ({_text(explanation)})" if explanation else "header window"
        return Voi("window", center=center, width=width, source=ds, note=note)
    if ds.get("VOILUTSequence"):
        return Voi("lut", source=ds, note="VOI LUT Sequence")
    return _percentile_voi(values, mask, f"no window in the header: {PERCENTILES[0]:g}-{PERCENTILES[1]:g} percentile window")


def _text(value: Any) -> str:
    """The first value of a possibly multi-valued text element."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return str(value[0]) if len(value) else ""
    return str(value)


def _unit(values: np.ndarray, voi: Voi) -> np.ndarray:
    """Modality LUT output → [0, 1] through ``voi``."""
    if voi.kind == "window" and voi.source is not None:
        low, high = _window_range(voi.source)
        out = (apply_windowing(values, voi.source) - low) / (high - low)
    elif voi.kind == "lut" and voi.source is not None:
        bits = int(voi.source.VOILUTSequence[0].LUTDescriptor[2])
        out = apply_voi(values, voi.source).astype(np.float64) / (2**bits - 1)
    else:
        low = (voi.center or 0.0) - (voi.width or 0.0) / 2
        width = voi.width or 0.0
        out = (values - low) / width if width > 0 else np.zeros(values.shape)
    return np.clip(out, 0.0, 1.0)


def _color(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """RGB uint8 of a colour frame: palette looked up, more than 8 bits scaled down."""
    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(stored, ds)
        top = float(np.iinfo(rgb.dtype).max) if rgb.dtype.kind in "ui" else 1.0
    else:
        rgb = stored
        top = float(2 ** int(ds.get("BitsStored") or 8 * rgb.dtype.itemsize) - 1)
    if rgb.ndim == 2:  # one sample per pixel despite the name: show it grey
        rgb = np.repeat(rgb[:, :, None], 3, axis=2)
    if rgb.dtype == np.uint8 and top == 255:
        return np.ascontiguousarray(rgb[:, :, :3])
    return np.rint(np.clip(rgb[:, :, :3].astype(np.float64) / top, 0, 1) * 255).astype(np.uint8)


def render(stored: np.ndarray, ds: Dataset, voi: Voi) -> np.ndarray:
    """8-bit display image of one decoded frame: ``(rows, cols)`` grey or ``(rows, cols, 3)`` RGB.

    Grey frames go through their own Modality LUT and then ``voi`` (chosen once per series, so
    the tiles of a montage share one window); MONOCHROME1 is inverted.
    """
    if is_color(ds):
        return _color(stored, ds)
    if voi.kind == "color":  # a grey frame in a series shown in colour: its own window
        voi = choose_voi(stored, ds)
    unit = _unit(apply_modality_lut(stored, ds).astype(np.float64), voi)
    if str(ds.get("PhotometricInterpretation") or "").strip().upper() == "MONOCHROME1":
        unit = 1.0 - unit
    return np.rint(unit * 255).astype(np.uint8)
