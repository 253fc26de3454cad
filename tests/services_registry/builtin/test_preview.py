"""The preview built-in service on real DICOM: what the PNGs show, checked against the pixels.

Expectations are computed here from the files themselves with numpy (stored value × slope +
intercept, the header's linear window, PS3.3 C.11.2.1.2), independently of the service's
pydicom-based pipeline; the thumbnail and tiles are scaled back to the image grid (they are
enlarged by whole-pixel repetition) and compared value by value, or matched by correlation
when the question is "which slice is this".
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.encaps import encapsulate, generate_fragmented_frames
from pydicom.pixels import apply_color_lut, pixel_array
from pydicom.uid import UID

from dcmflow.synthetic import make_ct_series
from services_registry import headers_from_dataset
from services_registry.builtin._preview_render import UndecodablePixels
from services_registry.builtin.preview import MAX_TILES, TILE_SIZE, preview, select_images, service

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's notes on odd test files


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DATA", str(tmp_path))
    return tmp_path


def sample(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, name
    return Path(str(path))


def write_series(data: Path, datasets: Sequence[Dataset], names: Sequence[str] | None = None, folder: str = "dicom/series") -> dict[str, Any]:
    """Write ``datasets`` under ``data/folder``; return the worker's headers (first dataset)."""
    target = data / folder
    target.mkdir(parents=True)
    for number, ds in enumerate(datasets):
        ds.save_as(target / (names[number] if names else f"{number:04d}.dcm"), enforce_file_format=True)
    return headers_from_dataset(datasets[0], dcmpath=folder)


def copy_file(data: Path, source: Path, folder: str = "dicom/series") -> dict[str, Any]:
    """One real file as a one-instance series, copied byte for byte."""
    target = data / folder
    target.mkdir(parents=True)
    shutil.copy(source, target / "image.dcm")
    return headers_from_dataset(pydicom.dcmread(source, stop_before_pixels=True), dcmpath=folder)


def run(headers: dict[str, Any], **params: Any) -> dict[str, Any]:
    result: dict[str, Any] = preview(jobName="preview", headers=headers, params={"output": "preview", **params}, added_params={})
    return result


def png(data: Path, relative: str) -> np.ndarray:
    return np.asarray(Image.open(data / relative))


def unit_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """The linear window as a person writes it: [c - w/2, c + w/2] → [0, 255]."""
    return np.clip((values - (center - width / 2)) / width, 0, 1) * 255


def shrink(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """An enlarged image back on its pixel grid (nearest: the centre of each enlarged pixel)."""
    return np.asarray(Image.fromarray(image).resize((shape[1], shape[0]), Image.Resampling.NEAREST)).astype(float)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1])


def windowed(image: np.ndarray) -> None:
    """Neither black nor saturated: most pixels strictly inside the grey range, many levels."""
    assert ((image > 0) & (image < 255)).mean() > 0.2
    assert len(np.unique(image)) >= 16


def first(value: Any) -> float:
    """The first value of a possibly multi-valued element (the default window)."""
    return float(value[0] if isinstance(value, MultiValue) else value)


def hu(ds: Dataset) -> np.ndarray:
    return ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def spatial_order(datasets: Sequence[Dataset]) -> list[Dataset]:
    iop = np.array(datasets[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    return sorted(datasets, key=lambda d: float(normal @ np.array(d.ImagePositionPatient, float)))


def test_the_service_declares_one_preview_job() -> None:
    spec = service.to_spec(source="python", origin="builtin", content_hash="x")
    assert [job.job_name for job in spec.jobs] == ["preview"]
    assert spec.jobs[0].params == {"output": "preview"}


def test_ct_series_thumbnail_is_the_spatial_middle_slice_windowed_by_its_header(data: Path) -> None:
    datasets = make_ct_series(n=20, rows=64, cols=64)
    shuffled = list(datasets)
    random.Random(7).shuffle(shuffled)
    numbers = random.Random(8).sample(range(1, 21), 20)
    for ds, number in zip(shuffled, numbers):  # neither file names nor Instance Numbers follow space
        ds.InstanceNumber = number
    names = [f"{chr(97 + i)}.dcm" for i in range(20)]
    headers = write_series(data, shuffled, names)
    result = run(headers)

    ordered = spatial_order(shuffled)
    middle = ordered[len(ordered) // 2]
    assert result["middle"]["file"] == names[shuffled.index(middle)]
    center, width = float(middle.WindowCenter[0]), float(middle.WindowWidth[0])
    assert result["window"] == [center, width] and result["voi"] == "window"

    thumbnail = png(data, result["thumbnail"])
    assert thumbnail.shape == (256, 256) and result["thumbnail"] == f"preview/{headers['seriesId']}.png"
    windowed(thumbnail)
    on_grid = shrink(thumbnail, (64, 64))
    expected = unit_window(hu(middle), center, width)
    assert np.abs(on_grid - expected).max() <= 1.5
    scores = [correlation(on_grid, unit_window(hu(ds), center, width)) for ds in ordered]
    assert int(np.argmax(scores)) == len(ordered) // 2


def test_ct_series_montage_has_sixteen_tiles_in_spatial_order_from_first_to_last(data: Path) -> None:
    datasets = make_ct_series(n=20, rows=64, cols=64)
    shuffled = list(datasets)
    random.Random(3).shuffle(shuffled)
    result = run(write_series(data, shuffled))
    assert (result["tiles"], result["grid"], result["slices"]) == (MAX_TILES, [4, 4], 20)

    montage = png(data, result["montage"])
    assert montage.shape == (4 * TILE_SIZE, 4 * TILE_SIZE)
    ordered = spatial_order(shuffled)
    center, width = result["window"]
    candidates = [unit_window(hu(ds), center, width) for ds in ordered]
    matched = []
    for cell in range(16):
        top, left = (cell // 4) * TILE_SIZE, (cell % 4) * TILE_SIZE
        tile = shrink(montage[top : top + TILE_SIZE, left : left + TILE_SIZE], (64, 64))
        scores = [correlation(tile, c) for c in candidates]
        best = int(np.argmax(scores))
        assert np.abs(tile - candidates[best]).max() <= 1.5  # one window for every tile
        matched.append(best)
    assert matched[0] == 0 and matched[-1] == 19
    assert all(b > a for a, b in zip(matched, matched[1:]))


def test_monochrome1_is_inverted(data: Path) -> None:
    source = sample("77654033/CR1/6154")  # Agfa CR, MONOCHROME1, window 1600/2800
    ds = pydicom.dcmread(source)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    result = run(copy_file(data, source))
    assert result["inverted"] is True and result["window"] == [1600.0, 2800.0]

    thumbnail = png(data, result["thumbnail"])
    on_grid = shrink(thumbnail, (ds.Rows, ds.Columns))
    values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    naive = unit_window(values, 1600.0, 2800.0)
    assert np.abs(on_grid - (255 - naive)).max() <= 1.5
    assert correlation(on_grid, naive) < -0.99
    assert ((thumbnail > 0) & (thumbnail < 255)).all()


@pytest.mark.parametrize(
    "encoded",
    ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_bigendian.dcm"],
)
def test_lossless_encodings_preview_as_the_little_endian_original(data: Path, encoded: str) -> None:
    original = run(copy_file(data, sample("MR_small.dcm"), "dicom/original"), output="original")
    decoded = run(copy_file(data, sample(encoded), "dicom/encoded"), output="encoded")
    reference = png(data, original["thumbnail"])
    windowed(reference)
    assert decoded["transfer_syntax"] != original["transfer_syntax"]
    assert np.array_equal(png(data, decoded["thumbnail"]), reference)


@pytest.mark.parametrize(
    ("name", "vendor"),
    [
        ("CT_small.dcm", "GE MEDICAL SYSTEMS"),
        ("examples_overlay.dcm", "SIEMENS"),
        ("JPGExtended.dcm", "GE Medical Systems"),  # 12-bit JPEG extended (process 2 and 4)
        ("JPEG2000.dcm", "GE Medical Systems"),  # JPEG 2000 NM
        ("693_J2KI.dcm", None),  # lossy JPEG 2000 CT
        ("image_dfl.dcm", None),  # deflated
    ],
)
def test_grey_images_from_several_sources_are_windowed(data: Path, name: str, vendor: str | None) -> None:
    ds = pydicom.dcmread(sample(name))
    assert ds.get("Manufacturer") == vendor or vendor is None
    result = run(copy_file(data, sample(name)))
    thumbnail = png(data, result["thumbnail"])
    assert thumbnail.ndim == 2 and max(thumbnail.shape) == 256
    windowed(thumbnail)
    if "WindowCenter" in ds:
        assert result["voi"] == "window" and result["window"] == [first(ds.WindowCenter), first(ds.WindowWidth)]
    else:
        assert result["voi"] == "percentile"
        values = pixel_array(ds).astype(float) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
        low, high = np.percentile(values, [1, 99])
        assert result["window"] == pytest.approx([(low + high) / 2, high - low], rel=1e-3, abs=1e-3)


def test_ybr_jpeg_baseline_becomes_the_same_rgb_as_the_rgb_original(data: Path) -> None:
    ycbcr = sample("SC_rgb_jpeg_dcmtk.dcm")  # JPEG baseline, YBR_FULL
    assert pydicom.dcmread(ycbcr).PhotometricInterpretation == "YBR_FULL"
    result = run(copy_file(data, ycbcr))
    assert result["voi"] == "color" and result["window"] is None
    thumbnail = png(data, result["thumbnail"])
    assert thumbnail.shape == (256, 256, 3)

    rgb = pydicom.dcmread(sample("SC_rgb_rle.dcm")).pixel_array  # the same bars, RLE RGB
    on_grid = shrink(thumbnail, rgb.shape[:2])
    assert np.abs(on_grid - rgb).mean() < 6  # JPEG loss only
    raw = pixel_array(sample("SC_rgb_jpeg_dcmtk.dcm"), raw=True)
    assert np.abs(on_grid - raw).mean() > 30  # left in YCbCr it would look nothing like it


def test_palette_colour_is_looked_up(data: Path) -> None:
    source = sample("examples_palette.dcm")  # Philips US, PALETTE COLOR
    ds = pydicom.dcmread(source)
    result = run(copy_file(data, source))
    thumbnail = png(data, result["thumbnail"])
    assert thumbnail.ndim == 3 and max(thumbnail.shape[:2]) == 256
    expected = apply_color_lut(ds.pixel_array, ds).astype(float) / 65535 * 255
    small = np.asarray(Image.fromarray(np.rint(expected).astype(np.uint8)).resize(thumbnail.shape[1::-1], Image.Resampling.LANCZOS))
    assert np.abs(thumbnail.astype(float) - small).mean() < 2
    assert np.abs(thumbnail[..., 0].astype(int) - thumbnail[..., 2]).max() > 50  # really colour


def test_multiframe_instance_thumbnail_is_its_middle_frame_and_montage_its_frames(data: Path) -> None:
    source = sample("rtdose.dcm")  # 15 frames
    frames = pydicom.dcmread(source).pixel_array.astype(float)
    result = run(copy_file(data, source))
    assert (result["slices"], result["middle"]["frame"], result["tiles"], result["grid"]) == (15, 7, 15, [4, 4])
    on_grid = shrink(png(data, result["thumbnail"]), frames.shape[1:])
    scores = [correlation(on_grid, frame) for frame in frames]
    assert int(np.argmax(scores)) == 7 and max(scores) > 0.999

    montage = png(data, result["montage"])
    assert montage.shape == (512, 512)
    cells = [montage[(c // 4) * TILE_SIZE : (c // 4 + 1) * TILE_SIZE, (c % 4) * TILE_SIZE : (c % 4 + 1) * TILE_SIZE] for c in range(16)]
    matched = [int(np.argmax([correlation(shrink(cell, frames.shape[1:]), f) for f in frames])) for cell in cells[:15]]
    assert matched == list(range(15))
    assert not cells[15].any()  # the 16th cell is empty


def test_colour_cine_montage_has_sixteen_rgb_tiles(data: Path) -> None:
    source = sample("examples_ybr_color.dcm")  # SonoSite echo: 30 frames, JPEG baseline YBR_FULL_422
    result = run(copy_file(data, source))
    assert (result["slices"], result["tiles"], result["middle"]["frame"]) == (30, 16, 15)
    montage = png(data, result["montage"])
    assert montage.shape == (512, 512, 3)
    frames = [Image.fromarray(f).resize((128, 96), Image.Resampling.LANCZOS) for f in pixel_array(source)]
    top = (TILE_SIZE - 96) // 2  # 320x240 frames fit a cell as 128x96, centred
    matched = []
    for cell in range(16):
        r, c = divmod(cell, 4)
        tile = montage[r * TILE_SIZE + top : r * TILE_SIZE + top + 96, c * TILE_SIZE : (c + 1) * TILE_SIZE]
        errors = [np.abs(tile.astype(float) - np.asarray(f, float)).mean() for f in frames]
        assert min(errors) < 1
        matched.append(int(np.argmin(errors)))
    assert matched[0] == 0 and matched[-1] == 29 and all(b > a for a, b in zip(matched, matched[1:]))
    assert (data / result["thumbnail"]).stat().st_size < 512 * 1024 and (data / result["montage"]).stat().st_size < 512 * 1024


def test_voi_lut_sequence_is_applied_when_there_is_no_window(data: Path) -> None:
    ds = pydicom.dcmread(sample("MR_small.dcm"))
    del ds.WindowCenter, ds.WindowWidth
    lut = np.rint(65535 * np.sqrt(np.arange(4096) / 4095)).astype(np.uint16)  # a gamma curve, 16-bit out
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = lut.tolist()
    item["LUTData"].VR = "US"
    ds.VOILUTSequence = [item]
    result = run(write_series(data, [ds]))
    assert result["voi"] == "lut" and result["window"] is None
    on_grid = shrink(png(data, result["thumbnail"]), (64, 64))
    expected = lut[np.clip(ds.pixel_array, 0, 4095)].astype(float) / 65535 * 255
    assert np.abs(on_grid - expected).max() <= 0.5


def test_a_header_window_that_blanks_the_image_falls_back_to_percentiles(data: Path) -> None:
    ds = pydicom.dcmread(sample("MR_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = 60000, 10  # far above every value: all black
    result = run(write_series(data, [ds]))
    assert result["voi"] == "percentile" and "blank" in result["voi_note"]
    windowed(png(data, result["thumbnail"]))


def test_non_square_pixels_keep_their_physical_shape(data: Path) -> None:
    ds = pydicom.dcmread(sample("MR_small.dcm"))
    ds.PixelSpacing = [0.625, 0.3125]  # rows twice as far apart as columns
    result = run(write_series(data, [ds]))
    assert png(data, result["thumbnail"]).shape == (256, 128)
    assert result["montage"] is None and result["tiles"] == 0


def test_a_retry_with_a_single_image_leaves_no_stale_montage(data: Path) -> None:
    headers = write_series(data, make_ct_series(n=3, rows=32, cols=32))
    first = run(headers)
    assert (data / first["montage"]).is_file() and first["tiles"] == 3 and first["grid"] == [2, 2]
    for path in sorted((data / "dicom/series").iterdir())[1:]:
        path.unlink()
    second = run(headers)
    assert second["montage"] is None and not (data / first["montage"]).exists()
    assert [a["path"] for a in second["artifacts"]] == [second["thumbnail"]]


def test_artifacts_name_the_pngs_for_the_flow_run(data: Path) -> None:
    result = run(write_series(data, make_ct_series(n=5, rows=32, cols=32)), output="thumbs")
    assert [(a["type"], a["path"]) for a in result["artifacts"]] == [("image", result["thumbnail"]), ("image", result["montage"])]
    assert result["thumbnail"].startswith("thumbs/") and result["montage"].endswith("-montage.png")
    assert all((data / a["path"]).is_file() for a in result["artifacts"])


def test_corrupt_compressed_pixels_fail_with_one_clear_line(data: Path) -> None:
    headers = copy_file(data, sample("JPEG-lossy.dcm"))  # a JPEG stream the decoders reject
    assert select_images(jobName="preview", headers=headers, params={}, added_params={}) == (True, {})
    with pytest.raises(UndecodablePixels) as caught:
        run(headers)
    message = str(caught.value)
    assert "\n" not in message and "JPEG Extended" in message and "image.dcm" in message


def test_truncated_pixel_data_fails_with_one_clear_line(data: Path) -> None:
    with pytest.raises(UndecodablePixels, match=r"cannot decode the pixel data of image\.dcm \(Explicit VR Little Endian\)"):
        run(copy_file(data, sample("MR_truncated.dcm")))


def test_a_transfer_syntax_without_decoder_is_skipped_with_the_reason(data: Path) -> None:
    ds = pydicom.dcmread(sample("MR_small_jp2klossless.dcm"))
    ds.PixelData = encapsulate([b"".join(f) for f in generate_fragmented_frames(ds.PixelData)])
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.102")  # MPEG-4 AVC/H.264: no decoder
    headers = write_series(data, [ds])
    reason = run(headers)["skipped"]
    assert "MPEG-4 AVC/H.264" in reason and "no pixel data decoder" in reason
    assert not (data / "preview").exists() or not any((data / "preview").iterdir())
    assert select_images(jobName="preview", headers=headers, params={}, added_params={}) == (False, {"reason": reason})


def test_a_series_without_images_is_skipped(data: Path) -> None:
    result = run(copy_file(data, sample("test-SR.dcm")))
    assert "no image instances" in result["skipped"]


@pytest.mark.parametrize(
    ("name", "sop_class"),
    [("rtstruct.dcm", "RT Structure Set Storage"), ("test-SR.dcm", "Comprehensive SR Storage"), ("waveform_ecg.dcm", "12-lead ECG Waveform Storage")],
)
def test_callback_rejects_non_image_objects_naming_their_class(name: str, sop_class: str) -> None:
    headers = headers_from_dataset(pydicom.dcmread(sample(name), force=True), dcmpath="dicom/x")
    accepted, added = select_images(jobName="preview", headers=headers, params={}, added_params={})
    assert accepted is False and added["reason"].startswith(sop_class) and "no pixel data" in added["reason"]


@pytest.mark.parametrize("name", ["CT_small.dcm", "rtdose.dcm", "examples_ybr_color.dcm", "liver_1frame.dcm", "MR_small_RLE.dcm"])
def test_callback_accepts_images(name: str) -> None:
    headers = headers_from_dataset(pydicom.dcmread(sample(name), stop_before_pixels=True), dcmpath="dicom/x")
    assert select_images(jobName="preview", headers=headers, params={}, added_params={}) == (True, {})


def test_missing_series_folder_is_one_clear_line(data: Path) -> None:
    headers = headers_from_dataset(pydicom.dcmread(sample("CT_small.dcm"), stop_before_pixels=True), dcmpath="dicom/absent")
    with pytest.raises(FileNotFoundError, match="series folder dicom/absent does not exist under"):
        run(headers)
