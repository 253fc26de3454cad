"""The byte-level header reader gives ingest exactly what the pydicom path gives, or steps aside.

The decisive check is equivalence: :func:`receiver.ingest.read_instance` (byte-level reader
first) and :func:`receiver.ingest._read_instance_pydicom` (``read_partial`` + ``ds.get``) must
return equal :class:`~storage.repository.InstanceIn` values, or raise the same exception, for
pydicom's own test and character set files, for synthetic files covering the encodings and
oddities the reader handles (and those it must leave to pydicom), for every truncation of
the header and for byte-flipped headers. Each case also says whether the fast path must have
been taken, so a reader that always gave up would fail.
"""

from __future__ import annotations

import copy
import datetime as dt
import io
import os
import random
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import config
from pydicom.data import get_charset_files, get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_partial
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from receiver import header
from receiver.header import LAST_TAG, read_header
from receiver.ingest import _HEADER_TAGS, _LAST_HEADER_TAG, _read_instance_pydicom, read_instance
from receiver.p10 import file_meta
from receiver.spool import SpoolEntry
from tests.factories import MR_IMAGE_STORAGE, make_ct_series, make_small_series, to_p10_bytes

ENTRY = SpoolEntry(
    received_at=dt.datetime(2025, 3, 14, 10, 15, tzinfo=dt.UTC),
    association_id="a1",
    calling_ae="MODALITY",
    sop_uid="",
)
UNCOMPRESSED = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
STUDY, SERIES, SOP = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", "1.2.826.0.1.3680043.8.498.3"


def _outcome(read: Callable[..., Any], raw: bytes) -> Any:
    """What a read_instance variant makes of ``raw``: its result, or (exception type, message)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return read(raw, ENTRY)
        except Exception as exc:  # noqa: BLE001 - the outcome being compared
            return type(exc), str(exc)


def _fast(raw: bytes) -> bool:
    """Whether the byte-level reader answered (the inner function: it must never raise)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = header._read(raw)
        assert values == read_header(raw)
    return values is not None


def _assert_same(raw: bytes, what: str = "") -> bool:
    """read_instance == the pydicom-only path on ``raw``; returns whether the fast path answered."""
    fast = _fast(raw)
    assert _outcome(read_instance, raw) == _outcome(_read_instance_pydicom, raw), what
    return fast


# -- byte builders -----------------------------------------------------------------------------


def _el(tag: int, vr: str, value: bytes, *, implicit: bool = False, undefined: bool = False) -> bytes:
    """One element (PS3.5 §7.1.2/§7.1.3); ``undefined`` writes length 0xFFFFFFFF."""
    group, elem = tag >> 16, tag & 0xFFFF
    length = 0xFFFFFFFF if undefined else len(value)
    if implicit:
        return struct.pack("<HHI", group, elem, length) + value
    if vr.encode() in header._LONG_VRS:
        return struct.pack("<HH2sHI", group, elem, vr.encode(), 0, length) + value
    return struct.pack("<HH2sH", group, elem, vr.encode(), length) + value


def _item(content: bytes, *, undefined: bool = True) -> bytes:
    if undefined:
        return struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + content + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(content)) + content


def _seq_end() -> bytes:
    return struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def _p10(dataset: bytes, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    return file_meta(MR_IMAGE_STORAGE, SOP, transfer_syntax) + dataset


def _elements(overrides: dict[int, tuple[str, bytes] | None] | None = None, *, implicit: bool = False) -> bytes:
    """A typical header (tag order), with some values replaced (or dropped with None)."""
    base: dict[int, tuple[str, bytes] | None] = {
        0x00080016: ("UI", MR_IMAGE_STORAGE.encode() + b"\0"),
        0x00080018: ("UI", SOP.encode() + b"\0"),
        0x00080020: ("DA", b"20250314"),
        0x00080030: ("TM", b"101500"),
        0x00080050: ("SH", b"A0001 "),
        0x00080060: ("CS", b"MR"),
        0x00080090: ("PN", b"Ref^Doctor "),
        0x00081030: ("LO", b"HEAD "),
        0x0008103E: ("LO", b"t1_mprage "),
        0x00100010: ("PN", b"Doe^Jane"),
        0x00100020: ("LO", b"PID-1 "),
        0x00100030: ("DA", b"19700101"),
        0x00100040: ("CS", b"F "),
        0x00180015: ("CS", b"HEAD"),
        0x0020000D: ("UI", STUDY.encode() + b"\0"),
        0x0020000E: ("UI", SERIES.encode() + b"\0"),
        0x00200011: ("IS", b"2 "),
        0x00200013: ("IS", b"7 "),
        0x00200032: ("DS", b"0\\0\\1 "),
        0x00280010: ("US", b"\x40\x00"),
    }
    base.update(overrides or {})
    return b"".join(
        _el(t, vr_value[0], vr_value[1], implicit=implicit) for t, vr_value in sorted(base.items()) if vr_value
    )


def _dataset(**changes: Any) -> Dataset:
    """The synthetic MR header as a pydicom Dataset (for files pydicom writes itself)."""
    (ds,) = make_small_series(1, 8, 8, seed=11)
    del ds.PixelData
    ds.ReferringPhysicianName = "Ref^Doctor"
    ds.AccessionNumber = "A0001"
    ds.StudyDescription = "HEAD"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.BodyPartExamined = "HEAD"
    for keyword, value in changes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def _written(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    ds = copy.deepcopy(ds)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", SOP)
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _code_item(value: str, nested: Sequence | None = None) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "99TEST", f"meaning {value}"
    if nested is not None:
        item.PurposeOfReferenceCodeSequence = nested
    return item


def _undefined_sequences(ds: Dataset) -> Dataset:
    """Procedure Code (0008,1032) and a private sequence, all of undefined length, nested."""
    inner = Sequence([_code_item("inner")])
    inner.is_undefined_length = True
    for item in inner:
        item.is_undefined_length_sequence_item = True
    outer = Sequence([_code_item("a", inner), _code_item("b")])
    for item in outer:
        item.is_undefined_length_sequence_item = True
    ds.ProcedureCodeSequence = outer
    ds["ProcedureCodeSequence"].is_undefined_length = True
    block = ds.private_block(0x0009, "DCMFLOW TEST", create=True)
    block.add_new(0x10, "SQ", Sequence([_code_item("private")]))
    ds[block.get_tag(0x10)].is_undefined_length = True
    ds[block.get_tag(0x10)].value[0].is_undefined_length_sequence_item = True
    block.add_new(0x11, "LO", "private text")
    return ds


# -- the contract ------------------------------------------------------------------------------


def test_reads_the_elements_ingest_reads() -> None:
    assert set(header.FIELD_OF_KEYWORD) | {"SpecificCharacterSet"} == set(_HEADER_TAGS)
    assert LAST_TAG == _LAST_HEADER_TAG


def test_pydicom_test_files_read_the_same_and_mostly_fast() -> None:
    files = [f for f in [*get_testdata_files(), *get_charset_files()] if os.path.isfile(f)]
    fast = uncompressed = uncompressed_fast = 0
    checked = 0
    for path in files:
        raw = Path(path).read_bytes()
        if raw[128:132] != b"DICM":
            continue  # not PS3.10 with a preamble: the receiver only writes such files
        checked += 1
        is_fast = _assert_same(raw, path)
        fast += is_fast
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ts = read_partial(io.BytesIO(raw), stop_when=lambda *a: True).file_meta.get("TransferSyntaxUID")
        if ts in UNCOMPRESSED:
            uncompressed += 1
            uncompressed_fast += is_fast
    assert checked > 150, checked
    assert uncompressed > 100, uncompressed
    # Every explicit/implicit VR LE file pydicom ships is read without pydicom today; allow a
    # little slack for new test files with unusual encodings, never a reader that gives up.
    assert uncompressed_fast >= 0.95 * uncompressed, (uncompressed_fast, uncompressed)
    assert fast >= 0.85 * checked, (fast, checked)


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit])
def test_factory_series_read_fast_and_the_same(transfer_syntax: str) -> None:
    series = make_small_series(3, 16, 16, seed=1) + make_ct_series(2, 16, 16, seed=1)  # CT: GE private groups
    for ds in series:
        if transfer_syntax == ImplicitVRLittleEndian:
            raw = _written(ds, transfer_syntax)
        else:
            raw = to_p10_bytes(ds)
        if transfer_syntax == JPEGBaseline8Bit:  # an encapsulated syntax: the dataset is explicit VR LE
            dataset = raw[_header_start(raw) :]
            raw = file_meta(ds.SOPClassUID, ds.SOPInstanceUID, transfer_syntax) + dataset
        assert _assert_same(raw)
        item, _sha = read_instance(raw, ENTRY)
        assert (item.sop_uid, item.transfer_syntax_uid) == (ds.SOPInstanceUID, transfer_syntax)


OPTIONAL = ["SpecificCharacterSet", "StudyDate", "StudyTime", "Modality", "PatientName", "PatientID", "SeriesNumber"]
OPTIONAL += ["InstanceNumber", "ReferringPhysicianName", "SeriesDescription", "AccessionNumber", "BodyPartExamined"]

# Files pydicom writes: (id, dataset, transfer syntax, fast path expected).
WRITTEN: list[tuple[str, Callable[[], Dataset], str, bool]] = [
    ("explicit", lambda: _dataset(), ExplicitVRLittleEndian, True),
    ("implicit", lambda: _dataset(), ImplicitVRLittleEndian, True),
    (
        "latin1",
        lambda: _dataset(PatientName="Müller^Jürgen", StudyDescription="Schädel ÄÖÜ"),
        ExplicitVRLittleEndian,
        True,
    ),
    (
        "utf8",
        lambda: _dataset(
            SpecificCharacterSet="ISO_IR 192", PatientName="Gómez^José=王^小东", SeriesDescription="Ünïcode"
        ),
        ImplicitVRLittleEndian,
        True,
    ),
    (
        "japanese-iso2022-ir87",
        lambda: _dataset(
            SpecificCharacterSet=["", "ISO 2022 IR 87"], PatientName="Yamada^Tarou=山田^太郎=やまだ^たろう"
        ),
        ExplicitVRLittleEndian,
        True,
    ),
    (
        "korean-iso2022-ir149",
        lambda: _dataset(SpecificCharacterSet=["", "ISO 2022 IR 149"], PatientName="Hong^Gildong=洪^吉洞=홍^길동"),
        ExplicitVRLittleEndian,
        True,
    ),
    (
        "greek",
        lambda: _dataset(SpecificCharacterSet="ISO_IR 126", PatientName="Διονυσιος"),
        ExplicitVRLittleEndian,
        True,
    ),
    (
        "gb18030",
        lambda: _dataset(SpecificCharacterSet="GB18030", PatientName="Wang^XiaoDong=王^小东"),
        ExplicitVRLittleEndian,
        True,
    ),
    (
        "latin1-code-extensions",
        lambda: _dataset(SpecificCharacterSet=["ISO 2022 IR 6", "ISO 2022 IR 100"], PatientName="Buc^Jérôme"),
        ExplicitVRLittleEndian,
        True,
    ),
    (
        "no-charset-latin1",
        lambda: _dataset(SpecificCharacterSet=None, PatientName="Åsa^Öberg"),
        ExplicitVRLittleEndian,
        True,
    ),
    (
        "empty-values",
        lambda: _dataset(PatientName="", StudyDate="", AccessionNumber="", SeriesNumber=None, InstanceNumber=""),
        ExplicitVRLittleEndian,
        True,
    ),
    ("missing-optional", lambda: _dataset(**dict.fromkeys(OPTIONAL)), ImplicitVRLittleEndian, True),
    ("no-sop-class", lambda: _dataset(SOPClassUID=None), ExplicitVRLittleEndian, True),
    ("undefined-sequences-explicit", lambda: _undefined_sequences(_dataset()), ExplicitVRLittleEndian, True),
    ("undefined-sequences-implicit", lambda: _undefined_sequences(_dataset()), ImplicitVRLittleEndian, True),
    (
        "defined-sequence",
        lambda: _dataset(ReferencedStudySequence=Sequence([_code_item("x", Sequence([_code_item("y")]))])),
        ExplicitVRLittleEndian,
        True,
    ),
    ("multi-valued-name", lambda: _dataset(PatientName=["Doe^John", "Roe^Richard"]), ExplicitVRLittleEndian, False),
    ("multi-valued-description", lambda: _dataset(StudyDescription=["HEAD", "NECK"]), ExplicitVRLittleEndian, False),
    ("big-endian", lambda: _dataset(), ExplicitVRBigEndian, False),
    ("deflate", lambda: _dataset(), DeflatedExplicitVRLittleEndian, False),
    ("invalid-sop-uid", lambda: _dataset(SOPInstanceUID="1.2.abc"), ExplicitVRLittleEndian, True),
    ("missing-study-uid", lambda: _dataset(StudyInstanceUID=None), ImplicitVRLittleEndian, True),
]


@pytest.mark.parametrize(("build", "transfer_syntax", "fast"), [c[1:] for c in WRITTEN], ids=[c[0] for c in WRITTEN])
def test_written_files_read_the_same(build: Callable[[], Dataset], transfer_syntax: str, fast: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = _written(build(), transfer_syntax)
    assert _assert_same(raw) is fast


def _un_sequence() -> bytes:
    """Explicit VR dataset with a UN element of undefined length whose items are implicit VR."""
    content = _el(0x00080100, "SH", b"CODE", implicit=True) + _el(0x00080104, "LO", b"meaning ", implicit=True)
    un = _el(0x00081032, "UN", b"", undefined=True) + _item(content) + _item(content, undefined=False) + _seq_end()
    head = _elements()
    cut = head.index(struct.pack("<HH", 0x0010, 0x0010))
    return head[:cut] + un + head[cut:]


def _nested(explicit_inner: bool = True) -> bytes:
    """Undefined-length SQ → undefined item → undefined SQ → defined item, then a private implicit SQ."""
    implicit = not explicit_inner
    leaf = _el(0x00080100, "SH", b"LEAF", implicit=implicit)
    inner = _el(0x0040A043, "SQ", b"", implicit=implicit, undefined=True) + _item(leaf, undefined=False) + _seq_end()
    outer = _el(0x00081032, "SQ", b"", implicit=implicit, undefined=True) + _item(inner) + _item(b"") + _seq_end()
    private = (
        _el(0x00090010, "LO", b"DCMFLOW ", implicit=implicit)
        + _el(0x00091010, "SQ", b"", implicit=implicit, undefined=True)
        + _item(leaf)
        + _seq_end()
    )
    head = _elements(implicit=implicit)
    cut = head.index(struct.pack("<HH", 0x0010, 0x0010))
    return head[:cut] + outer + private + head[cut:]


def _with_item_delimiter_inside_defined_item() -> bytes:
    content = _el(0x00080100, "SH", b"CODE") + struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + _el(0x00080104, "LO", b"xx")
    sq = _el(0x00081032, "SQ", b"", undefined=True) + _item(content, undefined=False) + _seq_end()
    head = _elements()
    cut = head.index(struct.pack("<HH", 0x0010, 0x0010))
    return head[:cut] + sq + head[cut:]


def _with_duplicates() -> bytes:
    head = _elements()
    # (0010,0020) twice and (0010,0010) after it: pydicom keeps the later value, in file
    # order; an element after the stop is never read.
    extra = _el(0x00100020, "LO", b"SECOND ") + _el(0x00100010, "PN", b"Late^Name ")
    end = head.index(struct.pack("<HH", 0x0010, 0x0030))
    return head[:end] + extra + head[end:] + _el(0x00100020, "LO", b"AFTER-STOP ")


def _with_undefined_wanted() -> bytes:
    head = _elements(implicit=True)
    cut = head.index(struct.pack("<HH", 0x0010, 0x0010))
    after = head.index(struct.pack("<HH", 0x0010, 0x0020))
    name = _el(0x00100010, "PN", b"", implicit=True, undefined=True) + b"Doe^J\\" + _seq_end()
    return head[:cut] + name + head[after:]


# Hand-made datasets: (id, dataset bytes, transfer syntax, fast path expected).
CRAFTED: list[tuple[str, bytes, str, bool]] = [
    (
        "odd-length-values",
        _elements({0x00100020: ("LO", b"ABC"), 0x00081030: ("LO", b"  lead and trail \0")}),
        "",
        True,
    ),
    ("odd-uid-no-padding", _elements({0x00080018: ("UI", SOP.encode())}), "", True),
    ("uid-space-padded", _elements({0x0020000E: ("UI", b" " + SERIES.encode() + b" ")}), "", True),
    ("name-trailing-equals", _elements({0x00100010: ("PN", b"Doe^John== "), 0x00080090: ("PN", b"=Ref")}), "", True),
    ("name-blank", _elements({0x00100010: ("PN", b"    "), 0x00080090: ("PN", b"^^^^")}), "", True),
    ("text-with-escape-no-charset", _elements({0x00100020: ("LO", b"\x1b(BPID")}), "", True),
    ("invalid-utf8", _elements({0x00080005: ("CS", b"ISO_IR 192"), 0x00100010: ("PN", b"\xff\xfe^Name")}), "", True),
    ("invalid-utf8-text", _elements({0x00080005: ("CS", b"ISO_IR 192"), 0x00081030: ("LO", b"\xc3(x")}), "", True),
    ("unknown-charset", _elements({0x00080005: ("CS", b"ISO_IR 999"), 0x00100010: ("PN", b"\xc4neas")}), "", True),
    ("empty-charset", _elements({0x00080005: ("CS", b""), 0x00100010: ("PN", b"\xc4neas")}), "", True),
    ("charset-misspelt", _elements({0x00080005: ("CS", b"ISO-IR 100"), 0x00100010: ("PN", b"\xc4neas")}), "", True),
    ("is-spaces", _elements({0x00200013: ("IS", b"  5 "), 0x00200011: ("IS", b" 12")}), "", True),
    ("is-plus", _elements({0x00200013: ("IS", b"+5")}), "", True),
    ("is-negative-zeros", _elements({0x00200013: ("IS", b"-0003 ")}), "", True),
    ("is-empty", _elements({0x00200013: ("IS", b""), 0x00200011: ("IS", b"  ")}), "", True),
    ("is-tab", _elements({0x00200013: ("IS", b"\t ")}), "", True),
    ("is-float-exact", _elements({0x00200013: ("IS", b"1.0 ")}), "", False),
    ("is-float", _elements({0x00200013: ("IS", b"1.5 ")}), "", False),
    ("is-exponent", _elements({0x00200013: ("IS", b"1e3 ")}), "", False),
    ("is-text", _elements({0x00200013: ("IS", b"abc ")}), "", False),
    ("is-multi", _elements({0x00200013: ("IS", b"1\\2 ")}), "", False),
    ("is-huge", _elements({0x00200013: ("IS", b"99999999999999999999")}), "", False),
    ("is-inf", _elements({0x00200013: ("IS", b"inf ")}), "", False),
    ("is-nan", _elements({0x00200013: ("IS", b"nan ")}), "", False),
    ("is-underscore", _elements({0x00200013: ("IS", b"1_0 ")}), "", False),
    ("backslash-modality", _elements({0x00080060: ("CS", b"CT\\MR ")}), "", False),
    ("backslash-uid", _elements({0x00080018: ("UI", b"1.2.3\\1.2.4")}), "", False),
    ("backslash-name", _elements({0x00100010: ("PN", b"A^B\\C^D ")}), "", False),
    ("un-for-wanted-elements", _elements({0x00100010: ("UN", b"Doe^John"), 0x00200013: ("UN", b"9 ")}), "", True),
    ("wrong-vr-for-wanted-element", _elements({0x00100010: ("LO", b"Doe^John")}), "", False),
    ("un-sequence-implicit-items", _un_sequence(), "", True),
    ("nested-undefined-explicit", _nested(), "", True),
    ("nested-undefined-implicit", _nested(False), ImplicitVRLittleEndian, True),
    ("item-delimiter-in-defined-item", _with_item_delimiter_inside_defined_item(), "", False),
    ("duplicate-and-unordered", _with_duplicates(), "", True),
    ("wanted-undefined-length-implicit", _with_undefined_wanted(), ImplicitVRLittleEndian, False),
    ("command-group-first", _el(0x00000000, "UL", b"\4\0\0\0", implicit=True) + _elements(), "", False),
    ("empty-dataset", b"", "", False),
    ("garbage-dataset", b"\x01\x02\x03\x04garbage!", "", False),
]


@pytest.mark.parametrize(("dataset", "transfer_syntax", "fast"), [c[1:] for c in CRAFTED], ids=[c[0] for c in CRAFTED])
def test_crafted_datasets_read_the_same(dataset: bytes, transfer_syntax: str, fast: bool) -> None:
    raw = _p10(dataset, transfer_syntax or ExplicitVRLittleEndian)
    assert _assert_same(raw) is fast


def test_values_are_pydicoms_on_the_fast_path() -> None:
    raw = _p10(_elements({0x00080005: ("CS", b"ISO_IR 100"), 0x00100010: ("PN", b"M\xfcller^J\xfcrgen== ")}))
    item, sha = read_instance(raw, ENTRY, hash_bytes=False)
    assert header._read(raw) is not None
    assert (item.patient_name, item.patient_id, item.instance_number, item.series_number) == (
        "Müller^Jürgen",
        "PID-1",
        7,
        2,
    )
    assert (item.sop_uid, item.study_uid, item.sop_class_uid) == (SOP, STUDY, MR_IMAGE_STORAGE)
    assert (item.transfer_syntax_uid, item.calling_ae, item.size, sha) == (
        ExplicitVRLittleEndian,
        "MODALITY",
        len(raw),
        "",
    )


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_series_size_is_the_expected_count_and_images_in_acquisition_is_not(transfer_syntax: str) -> None:
    stated = _written(_dataset(NumberOfSeriesRelatedInstances=120, ImagesInAcquisition=4), transfer_syntax)
    assert _assert_same(stated)
    assert read_instance(stated, ENTRY)[0].expected_instance_count == 120
    per_acquisition = _written(_dataset(ImagesInAcquisition=4), transfer_syntax)  # an axial CT rotation
    assert _assert_same(per_acquisition)
    assert read_instance(per_acquisition, ENTRY)[0].expected_instance_count is None
    for blank in ["", "0"]:
        raw = _written(_dataset(NumberOfSeriesRelatedInstances=blank), transfer_syntax)
        assert _assert_same(raw)
        assert read_instance(raw, ENTRY)[0].expected_instance_count is None


def test_no_preamble_and_no_meta_are_left_to_pydicom() -> None:
    body = _elements()
    for raw in [body, b"\0" * 128 + b"DICM", b"\0" * 128 + b"DICM" + body, b"", b"\0" * 131]:
        assert not _fast(raw)
        assert _outcome(read_instance, raw) == _outcome(_read_instance_pydicom, raw)


def test_non_default_pydicom_settings_fall_back(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _p10(_elements())
    assert read_header(raw) is not None
    monkeypatch.setattr(config, "datetime_conversion", True)
    assert read_header(raw) is None
    assert _outcome(read_instance, raw) == _outcome(_read_instance_pydicom, raw)
    monkeypatch.setattr(config, "datetime_conversion", False)
    monkeypatch.setattr(config.settings, "reading_validation_mode", config.RAISE)
    assert read_header(raw) is None


# -- damaged bytes -----------------------------------------------------------------------------


def _header_start(raw: bytes) -> int:
    """Offset of the dataset (after the file meta), as pydicom finds it."""
    fp = io.BytesIO(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        read_partial(fp, stop_when=lambda tag, vr, length: True)
    return fp.tell()


def _header_end(raw: bytes) -> int:
    """Offset of the first element pydicom does not read (after (0020,0013)), or the length."""
    fp = io.BytesIO(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        read_partial(fp, stop_when=lambda tag, vr, length: tag > LAST_TAG)
    return fp.tell()


def _samples() -> dict[str, bytes]:
    (mr,) = make_small_series(1, 8, 8, seed=3)
    (ct,) = make_ct_series(1, 8, 8, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "mr-explicit": to_p10_bytes(mr),
            "mr-implicit": _written(mr, ImplicitVRLittleEndian),
            "ct-private-groups": to_p10_bytes(ct),
            "nested-sequences": _p10(_nested()),
            "un-sequence": _p10(_un_sequence()),
            "japanese": Path(next(f for f in get_charset_files() if f.endswith("chrH31.dcm"))).read_bytes(),
        }


@pytest.mark.parametrize("name", list(_samples()))
def test_every_truncation_of_the_header_reads_the_same(name: str) -> None:
    raw = _samples()[name]
    assert _fast(raw)
    end = min(len(raw), _header_end(raw) + 16)
    fast = 0
    for cut in range(end + 1):
        fast += _assert_same(raw[:cut], f"{name} cut at {cut}")
    assert fast  # the cuts after the header at least


@pytest.mark.parametrize("name", ["mr-explicit", "mr-implicit", "nested-sequences", "un-sequence"])
def test_flipped_header_bytes_read_the_same(name: str) -> None:
    raw = _samples()[name]
    end = _header_end(raw)
    rng = random.Random(name)
    for _ in range(300):
        damaged = bytearray(raw)
        for _flip in range(rng.choice([1, 1, 2, 4])):
            damaged[rng.randrange(128, end)] = rng.randrange(256)
        _assert_same(bytes(damaged), f"{name}: {bytes(damaged)[128:end].hex()}")
