"""Byte-level reader of the header elements ingest records, giving exactly pydicom's values.

:func:`receiver.ingest.read_instance` needs 20 elements at or below (0020,1209) Number of
Series Related Instances from every spooled PS3.10 file. Parsing them with pydicom (``read_partial`` with
``specific_tags``, then ``ds.get(tag).value``) was ~75 % of ingest's CPU on small images
(profiled: element generator, RawDataElement → DataElement conversion, value validation,
``Dataset.__getitem__``), and ingest shares the machine with the C-STORE receiver.
:func:`read_header` walks the same bytes with :mod:`struct` and decodes those values into
what that pydicom path makes of them, or returns ``None`` whenever it is not certain it
would: the caller then parses with pydicom, so an unusual file costs the old price and never
a different result.

What it reads:

* the PS3.10 §7.1 preamble, ``DICM`` prefix and File Meta Information group 0002 (explicit
  VR little endian, PS3.10 §7.1), walked element by element as pydicom does (the group
  length is not trusted) for (0002,0002) Media Storage SOP Class UID and (0002,0010)
  Transfer Syntax UID;
* the dataset in implicit VR little endian (PS3.5 §A.1) or explicit VR little endian
  (§A.2, also every encapsulated transfer syntax, §A.4), top-level elements up to and
  including (0020,1209): the first tag above it ends the walk, as pydicom's ``stop_when``;
* sequences of undefined length on the way (PS3.5 §7.5.1–§7.5.2) are skipped item by item
  with pydicom's reading rules (an implicit-VR item inside an explicit-VR dataset, UN of
  undefined length read as SQ per PS3.5 §6.2.2, the data dictionary deciding in implicit
  VR); values of defined length, sequences included, are skipped by their length;
* text of VR SH, LO and PN is decoded with pydicom's own ``charset.decode_bytes`` and the
  encodings pydicom derives from (0008,0005) Specific Character Set (PS3.3 C.12.1.1.2,
  PS3.5 §6.1); PN is read as ``str(PersonName)``; non-ASCII person names go through
  pydicom's ``convert_PN`` itself.

``None`` (pydicom decides) for: explicit VR big endian, deflate, a missing transfer syntax,
a command group, any element header or value running past the end of the bytes, a VR pydicom
does not know, a VR other than the data dictionary's (or UN) on one of the 20 elements, a
first element whose VR bytes would make pydicom switch between implicit and explicit VR,
undefined lengths on anything but a sequence, a backslash in a value (multi-valued:
pydicom's ``MultiValue.__str__`` applies), an IS that is not a plain integer, and pydicom
settings other than the defaults this module mirrors (see :func:`_pydicom_reads_as_mirrored`).

A module of its own rather than part of :mod:`receiver.p10`: p10 holds the SCP's per-C-STORE
helpers and imports pynetdicom, which ingest processes never need; this reader follows
pydicom's *reading* rules (charsets, IS, PN, its VR heuristics) rather than the wire
format, and is about three times the size of p10.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from typing import Any, NamedTuple

from pydicom import config
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.filereader import ENCODED_VR
from pydicom.hooks import hooks, raw_element_value, raw_element_vr
from pydicom.uid import PrivateTransferSyntaxes
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, TEXT_VR_DELIMS
from pydicom.values import convert_PN, convert_string

__all__ = ["FIELD_OF_KEYWORD", "LAST_TAG", "HeaderValues", "read_header"]

LAST_TAG = 0x00201209
"""(0020,1209) Number of Series Related Instances: the last element read; every element ingest
needs is at or below it (group 0020 ends the walk before the image pixel module)."""

_CHARSET = 0x00080005
_MEDIA_SOP_CLASS = 0x00020002
_TRANSFER_SYNTAX = 0x00020010
_ITEM = 0xFFFEE000  # PS3.5 §7.5: Item, Item Delimitation Item, Sequence Delimitation Item
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_MAX_DEPTH = 16

_IMPLICIT_LE = "1.2.840.10008.1.2"
# Explicit VR big endian and deflated explicit VR little endian: left to pydicom.
_NOT_EXPLICIT_LE = frozenset({"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"})

# The VRs pydicom's element generator knows, and those with a 4-byte length in explicit VR
# (PS3.5 §7.1.2).
_KNOWN_VRS = frozenset(vr for vr in ENCODED_VR if len(vr) == 2)
_LONG_VRS = frozenset(vr.encode("ascii") for vr in EXPLICIT_VR_LENGTH_32)
_SHORT_VRS = _KNOWN_VRS - _LONG_VRS
_SEQUENCE_VRS = frozenset({b"SQ", b"UN"})  # undefined length UN is a sequence (PS3.5 §6.2.2)

_EXPLICIT = struct.Struct("<HH2sH")
_IMPLICIT = struct.Struct("<HHI")
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")

FIELD_OF_KEYWORD = {
    "SOPClassUID": "sop_class_uid",
    "SOPInstanceUID": "sop_uid",
    "StudyDate": "study_date",
    "StudyTime": "study_time",
    "AccessionNumber": "accession_number",
    "Modality": "modality",
    "ReferringPhysicianName": "referring_physician",
    "StudyDescription": "study_description",
    "SeriesDescription": "series_description",
    "PatientName": "patient_name",
    "PatientID": "patient_id",
    "PatientBirthDate": "patient_birth_date",
    "PatientSex": "patient_sex",
    "BodyPartExamined": "body_part",
    "StudyInstanceUID": "study_uid",
    "SeriesInstanceUID": "series_uid",
    "SeriesNumber": "series_number",
    "InstanceNumber": "instance_number",
    "NumberOfSeriesRelatedInstances": "series_related_instances",
}
"""Keyword → :class:`HeaderValues` field: every element ingest reads (with (0008,0005) Specific
Character Set, which only decides how text decodes). The pydicom path reads the same list."""


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return int(tag)


_DEFAULT_ENCODINGS = ["iso8859"]  # pydicom's default_encoding, as convert_value wraps it
_IS = re.compile(r" *[+-]?[0-9]{1,15}")  # int() exact, and float() of it equal (pydicom's IS)
_encodings_cache: dict[bytes, list[str]] = {}


class HeaderValues(NamedTuple):
    """The header values of one file, as :func:`receiver.ingest.read_instance`'s pydicom path gives them.

    Text is ``str(value).strip("\\0 ")`` and ``""`` when the element is absent or empty;
    numbers are ``int(value)`` and ``None`` when absent or empty. ``transfer_syntax_uid``
    and ``media_storage_sop_class_uid`` come from the file meta, ``str(value)`` as pydicom
    gives them; ``sop_class_uid`` is the dataset's (0008,0016). A named tuple because one is
    built per instance: ~2 µs, where a frozen dataclass took ~10 µs of a ~30 µs decode.
    """

    transfer_syntax_uid: str
    media_storage_sop_class_uid: str
    sop_class_uid: str
    sop_uid: str
    study_date: str
    study_time: str
    accession_number: str
    modality: str
    referring_physician: str
    study_description: str
    series_description: str
    patient_name: str
    patient_id: str
    patient_birth_date: str
    patient_sex: str
    body_part: str
    study_uid: str
    series_uid: str
    series_number: int | None
    instance_number: int | None
    series_related_instances: int | None


def read_header(raw: bytes) -> HeaderValues | None:
    """Read the header values ingest records from a PS3.10 file, or ``None`` to let pydicom do it.

    Parameters
    ----------
    raw : bytes
        The whole file (preamble, ``DICM``, file meta, dataset).

    Returns
    -------
    HeaderValues or None
        The values, equal to those of ``read_partial`` + ``ds.get(tag).value`` as
        :func:`receiver.ingest.read_instance` converts them; ``None`` when this reader is not
        certain of that (see the module docstring). UIDs are not validated here.
    """
    if not _pydicom_reads_as_mirrored():
        return None
    try:
        return _read(raw)
    except Exception:  # noqa: BLE001 - a file the walker did not expect is pydicom's to judge
        return None


def _pydicom_reads_as_mirrored() -> bool:
    """True while pydicom's reading settings are the defaults this module mirrors."""
    return (
        config.settings.reading_validation_mode != config.RAISE
        and not config.datetime_conversion
        and not config.use_IS_numpy
        and config.settings.infer_sq_for_un_vr
        and config.replace_un_with_known_vr
        and config.data_element_callback is None
        and hooks.raw_element_vr is raw_element_vr
        and hooks.raw_element_value is raw_element_value
        and not hooks.raw_element_kwargs
        and not PrivateTransferSyntaxes
    )


def _read(raw: bytes) -> HeaderValues | None:
    """:func:`read_header` without the settings check and the catch-all (tests call this)."""
    meta = _file_meta(raw)
    if meta is None:
        return None
    transfer_syntax, media_sop_class, pos = meta
    if transfer_syntax == _IMPLICIT_LE:
        implicit = True
    elif transfer_syntax in _NOT_EXPLICIT_LE:
        return None
    else:
        implicit = False  # explicit VR LE and every encapsulated syntax (PS3.5 §A.4)
    n = len(raw)
    if pos + 8 > n:
        return None  # no dataset, or a fragment of a header: pydicom's call
    if raw[pos] == 0 and raw[pos + 1] == 0:
        return None  # group 0000 (a command set) before the dataset
    # pydicom checks the first element's VR bytes and follows what it finds (with a warning).
    if (not (0x40 < raw[pos + 4] < 0x5B and 0x40 < raw[pos + 5] < 0x5B)) != implicit:
        return None
    found = _walk_implicit(raw, pos) if implicit else _walk_explicit(raw, pos)
    if found is None:
        return None
    return _decode(found, transfer_syntax, media_sop_class)


def _file_meta(raw: bytes) -> tuple[str, str, int] | None:
    """(Transfer Syntax UID, Media Storage SOP Class UID, offset of the dataset), or None."""
    n = len(raw)
    if n < 140 or raw[128:132] != b"DICM":
        return None
    pos = 132
    transfer_syntax: str | None = None
    media_sop_class = ""
    while True:
        if pos + 8 > n:
            return None
        group, elem, vr, _ = _EXPLICIT.unpack_from(raw, pos)
        if group != 0x0002:
            break
        place = _explicit_value(raw, pos)
        if place is None:
            return None  # pydicom's VR heuristics (implicit VR, 2-byte length) would apply
        start, length = place
        end = start + length
        if length == _UNDEFINED or end > n:
            return None
        tag = 0x00020000 | elem
        if tag == _TRANSFER_SYNTAX or tag == _MEDIA_SOP_CLASS:
            if vr != b"UI" or b"\\" in raw[start:end]:
                return None
            # str(UID): ISO 8859-1, trailing NUL and space removed (values.convert_UI), then
            # white space (UID.__new__)
            value = raw[start:end].decode("latin-1").rstrip("\0 ").strip()
            if tag == _TRANSFER_SYNTAX:
                transfer_syntax = value
            else:
                media_sop_class = value
        pos = end
    if transfer_syntax is None:
        return None  # pydicom guesses the encoding
    return transfer_syntax, media_sop_class, pos


def _explicit_value(raw: bytes, pos: int) -> tuple[int, int] | None:
    """(value offset, length) of the explicit VR element at ``pos`` (PS3.5 §7.1.2), or None for
    a VR pydicom does not know or a header past the end. :func:`_walk_explicit`, the hot loop,
    inlines the same rules."""
    vr = raw[pos + 4 : pos + 6]
    if vr in _LONG_VRS:
        if pos + 12 > len(raw):
            return None
        return pos + 12, _U32.unpack_from(raw, pos + 8)[0]
    if vr in _KNOWN_VRS:
        return pos + 8, _U16.unpack_from(raw, pos + 6)[0]
    return None


def _walk_explicit(raw: bytes, pos: int) -> dict[int, bytes] | None:
    """Values of the wanted top-level elements of an explicit VR LE dataset, or None."""
    n = len(raw)
    found: dict[int, bytes] = {}
    unpack = _EXPLICIT.unpack_from
    short_vrs, long_vrs, wanted = _SHORT_VRS, _LONG_VRS, _WANTED_VR
    while pos + 8 <= n:
        group, elem, vr, length = unpack(raw, pos)
        tag = group << 16 | elem
        if tag > LAST_TAG:
            # pydicom stops here whatever the VR, but only after reading a long VR's 4-byte length.
            return None if vr in long_vrs and pos + 12 > n else found
        if vr in short_vrs:  # the common case first: 2-byte length, never undefined
            start = pos + 8
        elif vr in long_vrs:
            if pos + 12 > n:
                return None
            (length,) = _U32.unpack_from(raw, pos + 8)
            start = pos + 12
            if length == _UNDEFINED:
                if vr not in _SEQUENCE_VRS or tag in wanted:
                    return None
                skipped = _skip_sequence(raw, start, False, 0)
                if skipped is None:
                    return None
                pos = skipped
                continue
        else:
            return None  # unknown VR (pydicom: 2-byte length) or a switch to implicit VR
        pos = start + length
        if pos > n:
            return None
        if tag in wanted:
            # pydicom converts by the file's VR; UN shorter than 0xFFFF by the dictionary's
            # (hooks.raw_element_vr, config.replace_un_with_known_vr).
            if vr != wanted[tag] and (vr != b"UN" or length >= 0xFFFF):
                return None
            found[tag] = raw[start:pos]
    return found if pos == n else None


def _walk_implicit(raw: bytes, pos: int) -> dict[int, bytes] | None:
    """Values of the wanted top-level elements of an implicit VR LE dataset, or None."""
    n = len(raw)
    found: dict[int, bytes] = {}
    unpack = _IMPLICIT.unpack_from
    while pos + 8 <= n:
        group, elem, length = unpack(raw, pos)
        tag = group << 16 | elem
        if tag > LAST_TAG:
            return found
        start = pos + 8
        if length == _UNDEFINED:
            if tag in _WANTED_VR or not _implicit_sequence(raw, start, tag):
                return None
            skipped = _skip_sequence(raw, start, True, 0)
            if skipped is None:
                return None
            pos = skipped
            continue
        end = start + length
        if end > n:
            return None
        if tag in _WANTED_VR:
            found[tag] = raw[start:end]
        pos = end
    return found if pos == n else None


def _implicit_sequence(raw: bytes, start: int, tag: int) -> bool:
    """Whether pydicom reads an undefined-length implicit VR element as a sequence."""
    try:
        return bool(dictionary_VR(tag) == "SQ")
    except KeyError:
        # Private or unknown tag: pydicom looks for an Item tag right after the header.
        return raw[start : start + 4] == b"\xfe\xff\x00\xe0"


def _skip_sequence(raw: bytes, pos: int, implicit: bool, depth: int) -> int | None:
    """Offset after an undefined-length sequence whose items start at ``pos``, or None."""
    if depth > _MAX_DEPTH:
        return None
    n = len(raw)
    while True:
        if pos + 8 > n:
            return None
        group, elem, length = _IMPLICIT.unpack_from(raw, pos)
        tag = group << 16 | elem
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            return None
        skipped = _skip_item(raw, pos, None if length == _UNDEFINED else pos + length, implicit, depth)
        if skipped is None:
            return None
        pos = skipped


def _skip_item(raw: bytes, pos: int, end: int | None, implicit: bool, depth: int) -> int | None:
    """Offset after one item's dataset (``end`` None: undefined length), or None."""
    n = len(raw)
    if end is not None and end > n:
        return None
    # pydicom (filereader._is_implicit_vr, in a sequence): an explicit VR item whose first
    # element has no letters for a VR is read as implicit VR (PS3.5 §6.2.2, UN sequences).
    if not implicit and pos + 6 <= n and not (0x40 < raw[pos + 4] < 0x5B and 0x40 < raw[pos + 5] < 0x5B):
        implicit = True
    while end is None or pos < end:
        if pos + 8 > n:
            return None
        if implicit:
            group, elem, length = _IMPLICIT.unpack_from(raw, pos)
            vr = b""
            start = pos + 8
        else:
            group, elem, vr, length = _EXPLICIT.unpack_from(raw, pos)
        tag = group << 16 | elem
        if tag == _ITEM_END:
            if end is not None or raw[pos + 4 : pos + 8] != b"\0\0\0\0":
                return None
            return pos + 8
        if not implicit:
            place = _explicit_value(raw, pos)
            if place is None:
                return None
            start, length = place
        if length == _UNDEFINED:
            if (implicit and not _implicit_sequence(raw, start, tag)) or (not implicit and vr not in _SEQUENCE_VRS):
                return None
            skipped = _skip_sequence(raw, start, implicit, depth + 1)
            if skipped is None:
                return None
            pos = skipped
        else:
            pos = start + length
            if pos > n:
                return None
    return pos if pos == end else None


def _decode(found: dict[int, bytes], transfer_syntax: str, media_sop_class: str) -> HeaderValues | None:
    """Convert the raw values as pydicom + ``_text``/``_int`` of receiver.ingest would, or None."""
    charset = found.get(_CHARSET)
    values = dict(_ABSENT)
    fields = _FIELDS
    try:
        encodings = _DEFAULT_ENCODINGS if charset is None else _encodings(charset)
        for tag, value in found.items():
            if value and tag != _CHARSET:  # empty: "" or None, as absent (values.empty_value_for_VR)
                field, convert = fields[tag]
                values[field] = convert(value, encodings)
    except Exception:  # noqa: BLE001 - _Unsure, or pydicom's decoders raised: its own path decides
        return None
    return HeaderValues(transfer_syntax_uid=transfer_syntax, media_storage_sop_class_uid=media_sop_class, **values)


class _Unsure(Exception):
    """A value whose pydicom result this module does not reproduce (multi-valued, odd IS)."""


def _plain(value: bytes, encodings: list[str]) -> str:
    """CS, DA, TM: ISO 8859-1 whatever (0008,0005) says (values.convert_string), stripped."""
    if b"\\" in value:
        raise _Unsure
    return value.decode("latin-1").strip("\0 ")


def _uid(value: bytes, encodings: list[str]) -> str:
    """UI: as :func:`_plain`, plus the white space ``pydicom.uid.UID`` strips (values.convert_UI)."""
    if b"\\" in value:
        raise _Unsure
    return value.decode("latin-1").rstrip("\0 ").strip().strip("\0 ")


def _text(value: bytes, encodings: list[str]) -> str:
    """SH, LO: decoded with the Specific Character Set (values.convert_text), stripped."""
    text = decode_bytes(value, encodings, TEXT_VR_DELIMS)
    if "\\" in text:
        raise _Unsure
    return text.strip("\0 ")


def _person_name(value: bytes, encodings: list[str]) -> str:
    """PN: ``str(PersonName)`` (values.convert_PN), stripped."""
    text = decode_bytes(value.rstrip(b"\0 "), encodings, TEXT_VR_DELIMS)
    if "\\" in text:
        raise _Unsure
    if text.isascii():
        # PersonName(text): components split on "=", trailing empty ones dropped, joined by "=".
        return text.rstrip("=").strip("\0 ")
    return str(convert_PN(value, encodings)).strip("\0 ")


def _integer(value: bytes, encodings: list[str]) -> int | None:
    """IS: ``int(IS(value))`` for plain integers; None for blanks (pydicom keeps the string)."""
    number = value.decode("latin-1").rstrip(" \0")
    if "\\" in number:
        raise _Unsure
    if not number.strip():
        return None  # IS("\t") is the string itself, and int() of it fails in receiver.ingest._int
    if not _IS.fullmatch(number):
        raise _Unsure  # "1.5", "1e3", "inf", "1_0", ...: IS/ISfloat rules, left to pydicom
    return int(number)


# How pydicom decodes each VR ingest reads (pydicom.values.converters).
_CONVERTERS: dict[str, Callable[[bytes, list[str]], Any]] = {
    "UI": _uid,
    "CS": _plain,
    "DA": _plain,
    "TM": _plain,
    "SH": _text,
    "LO": _text,
    "PN": _person_name,
    "IS": _integer,
}
# tag → (HeaderValues field, converter); tag → the VR an explicit-VR file must give it
# (the data dictionary's); field → its value when the element is absent or empty.
_FIELDS: dict[int, tuple[str, Callable[[bytes, list[str]], Any]]] = {
    _tag(k): (field, _CONVERTERS[dictionary_VR(k)]) for k, field in FIELD_OF_KEYWORD.items()
}
_WANTED_VR: dict[int, bytes] = {
    _tag(k): dictionary_VR(k).encode("ascii") for k in [*FIELD_OF_KEYWORD, "SpecificCharacterSet"]
}
_ABSENT: dict[str, Any] = {field: None if convert is _integer else "" for field, convert in _FIELDS.values()}


def _encodings(charset: bytes) -> list[str]:
    """The Python encodings pydicom reads text with for this (0008,0005) value."""
    cached = _encodings_cache.get(charset)
    if cached is None:
        cached = convert_encodings(convert_string(charset, True) if charset else "")
        if len(_encodings_cache) < 64:
            _encodings_cache[charset] = cached
    return cached
