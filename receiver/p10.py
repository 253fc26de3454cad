"""Byte-level PS3.10 helpers for the C-STORE fast path (no pydicom Dataset built).

Two small, exact pieces the handler needs per instance, written with :mod:`struct` because
pydicom's general machinery costs more than the rest of the handler (profiled: building the
file meta through ``FileMetaDataset`` + ``write_file_meta_info`` and walking the header with
``read_dataset`` were ~20 % of the SCP's CPU on 512×512 CT):

* :func:`file_meta` encodes the File Meta Information (PS3.10 §7.1) that turns the dataset
  bytes received on the wire into a Part 10 file: 128-byte zero preamble, ``DICM``, group 0002
  in explicit VR little endian (PS3.5 §7.1.2 and PS3.10 §7.1: group 0002 is always explicit
  VR little endian, whatever the dataset's transfer syntax);
* :func:`scan_uids` walks the top-level elements of a dataset up to (0020,000E) and returns
  the three identifying UIDs, or ``None`` when it meets something it does not handle (undefined
  lengths, big endian, deflate): callers then use pydicom (:func:`receiver.handlers.check_dataset`).
"""

from __future__ import annotations

import struct

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

__all__ = ["file_meta", "scan_uids", "STUDY_UID", "SERIES_UID", "SOP_UID"]

STUDY_UID = 0x0020000D
SERIES_UID = 0x0020000E
SOP_UID = 0x00080018

_PREAMBLE = b"\0" * 128 + b"DICM"
# PS3.5 §7.1.2: these VRs have a 2-byte reserved field and a 4-byte length in explicit VR.
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"})
_EXPLICIT_LE = {"1.2.840.10008.1.2.1"}
_IMPLICIT_LE = "1.2.840.10008.1.2"
# Transfer syntaxes whose dataset is explicit VR little endian (all encapsulated ones too),
# i.e. everything except implicit LE, explicit BE (1.2.840.10008.1.2.2) and deflate (…1.2.1.99).
_NOT_EXPLICIT_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}
_WANTED = (STUDY_UID, SERIES_UID, SOP_UID)
_HDR = struct.Struct("<HH2sH")
_U32 = struct.Struct("<I")
_TAG_LEN = struct.Struct("<HHI")


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", group, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw  # PS3.5 §6.2: UI padded with NUL


def _text(value: str, max_len: int) -> bytes:
    raw = "".join(c for c in value if " " <= c <= "~" and c != "\\")[:max_len].encode("ascii")
    return raw + b" " if len(raw) % 2 else raw  # PS3.5 §6.2: pad with space


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae: str = "") -> bytes:
    """Preamble, prefix and File Meta Information group for one received dataset.

    Parameters
    ----------
    sop_class_uid, sop_instance_uid : str
        From the C-STORE request (Media Storage SOP Class/Instance UID, (0002,0002)/(0002,0003)).
    transfer_syntax_uid : str
        Of the presentation context the dataset arrived on (0002,0010).
    source_ae : str
        Calling AE title, written as (0002,0016) Source Application Entity Title as DCMTK's
        storescp does; omitted when empty.

    Returns
    -------
    bytes
        ``b"\\0" * 128 + b"DICM" + group 0002``; append the dataset bytes to get the file.
    """
    body = b"".join(
        [
            _element(0x0002, 0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, 0x0002, b"UI", _ui(sop_class_uid)),
            _element(0x0002, 0x0003, b"UI", _ui(sop_instance_uid)),
            _element(0x0002, 0x0010, b"UI", _ui(transfer_syntax_uid)),
            _element(0x0002, 0x0012, b"UI", _ui(PYNETDICOM_IMPLEMENTATION_UID)),
            _element(0x0002, 0x0013, b"SH", _text(PYNETDICOM_IMPLEMENTATION_VERSION, 16)),
        ]
        + ([_element(0x0002, 0x0016, b"AE", _text(source_ae, 16))] if source_ae.strip() else [])
    )
    return _PREAMBLE + _element(0x0002, 0x0000, b"UL", _U32.pack(len(body))) + body


def scan_uids(dataset: bytes | memoryview, transfer_syntax_uid: str) -> dict[int, str] | None:
    """Read the Study, Series and SOP Instance UIDs from the start of an encoded dataset.

    Walks top-level elements (PS3.5 §7.1: tag, [VR], length, value; ascending tag order) and
    stops after (0020,000E). Values of other elements are skipped, never decoded.

    Parameters
    ----------
    dataset : bytes or memoryview
        The dataset as received (no file meta).
    transfer_syntax_uid : str
        Its transfer syntax.

    Returns
    -------
    dict or None
        ``{tag: value}`` for the UIDs found (missing ones absent, values stripped of NUL and
        space padding), or ``None`` when the walker cannot decide (big endian, deflate, an
        undefined length, a malformed VR or a value running past the end): use pydicom then.
    """
    if transfer_syntax_uid == _IMPLICIT_LE:
        implicit = True
    elif transfer_syntax_uid not in _NOT_EXPLICIT_LE:
        implicit = False
    else:
        return None
    buf = memoryview(dataset)
    n = len(buf)
    pos = 0
    found: dict[int, str] = {}
    while pos + 8 <= n:
        if implicit:
            group, elem, length = _TAG_LEN.unpack_from(buf, pos)
            start = pos + 8
        else:
            group, elem, vr, length = _HDR.unpack_from(buf, pos)
            if vr in _LONG_VRS:
                if pos + 12 > n:
                    return None
                (length,) = _U32.unpack_from(buf, pos + 8)
                start = pos + 12
            elif len(vr) == 2 and vr.isalpha() and vr.isupper():
                start = pos + 8
            else:
                return None
        tag = (group << 16) | elem
        if tag > SERIES_UID:
            break
        if length == 0xFFFFFFFF:
            return None
        end = start + length
        if end > n:
            return None
        if tag in _WANTED:
            found[tag] = bytes(buf[start:end]).decode("ascii", "replace").strip("\0 ")
        pos = end
    return found
