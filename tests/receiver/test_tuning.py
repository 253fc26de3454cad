"""The byte-level DIMSE command-set encoder and decoder do exactly what pydicom does."""

from __future__ import annotations

import struct
from io import BytesIO
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import dimse_messages as dm
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_STORE
from pynetdicom.dsutils import decode, encode

from receiver._tuning import (
    decode_command_set,
    encode_command_set,
    fast_command_decoding,
    fast_command_encoding,
    fast_store_response,
)

SOP_CLASS = "1.2.840.10008.5.1.4.1.1.4"
SOP_UID = "1.2.826.0.1.3680043.8.498.12345.678"  # odd length: padded with NUL


def _store_rsp(**kw: Any) -> Dataset:
    prim = C_STORE()
    prim.MessageIDBeingRespondedTo = kw.pop("msg_id", 7)
    prim.AffectedSOPClassUID = SOP_CLASS
    prim.AffectedSOPInstanceUID = kw.pop("sop", SOP_UID)
    prim.Status = kw.pop("status", 0x0000)
    for key, value in kw.items():
        setattr(prim, key, value)
    msg = dm.C_STORE_RSP()
    msg.primitive_to_message(prim)
    return msg.command_set


def _store_rq() -> Dataset:
    prim = C_STORE()
    prim.MessageID = 65535
    prim.AffectedSOPClassUID = SOP_CLASS
    prim.AffectedSOPInstanceUID = SOP_UID + "1"
    prim.Priority = 2
    prim.MoveOriginatorApplicationEntityTitle = "MOVER"
    prim.MoveOriginatorMessageID = 3
    prim.DataSet = BytesIO(b"\x08\x00\x16\x00\x00\x00\x00\x00")
    msg = dm.C_STORE_RQ()
    msg.primitive_to_message(prim)
    return msg.command_set


def _echo_rsp() -> Dataset:
    prim = C_ECHO()
    prim.MessageIDBeingRespondedTo = 1
    prim.AffectedSOPClassUID = "1.2.840.10008.1.1"
    prim.Status = 0
    msg = dm.C_ECHO_RSP()
    msg.primitive_to_message(prim)
    return msg.command_set


def _find_rsp() -> Dataset:
    prim = C_FIND()
    prim.MessageIDBeingRespondedTo = 2
    prim.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.1.1"
    prim.Status = 0xFF00
    prim.Identifier = BytesIO(b"\x08\x00\x16\x00\x00\x00\x00\x00")
    msg = dm.C_FIND_RSP()
    msg.primitive_to_message(prim)
    return msg.command_set


CASES = {
    "store-rsp success": lambda: _store_rsp(),
    "store-rsp even uid": lambda: _store_rsp(sop=SOP_UID + "1", msg_id=0),
    "store-rsp failure with comment": lambda: _store_rsp(status=0xA900, ErrorComment="SOP Instance UID differs"),
    "store-rsp odd comment": lambda: _store_rsp(status=0xC000, ErrorComment="odd"),
    "store-rq with move originator": _store_rq,
    "echo-rsp": _echo_rsp,
    "find-rsp": _find_rsp,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_bytes_as_pydicom(name: str) -> None:
    ds = CASES[name]()
    assert encode_command_set(ds) == encode(ds, True, True)


def test_what_it_does_not_handle_goes_to_pydicom() -> None:
    ds = _store_rsp()
    ds.OffendingElement = [0x00100010, 0x00100020]  # AT: left to pydicom
    assert encode_command_set(ds) is None
    other_group = Dataset()
    other_group.PatientName = "X"
    assert encode_command_set(other_group) is None


def test_switch_is_idempotent_and_reversible() -> None:
    before = dm.encode  # an SCP started by an earlier test may have switched it on already
    try:
        fast_command_encoding(True)
        fast_command_encoding(True)
        assert getattr(dm.encode, "original", None) is encode  # pynetdicom.dsutils.encode
        ds = _store_rsp()
        assert dm.encode(ds, True, True) == encode(ds, True, True)
        fast_command_encoding(False)
        assert dm.encode is encode
    finally:
        dm.encode = before  # type: ignore[attr-defined]


# -- decoder ----------------------------------------------------------------------------------


def _elements(ds: Dataset) -> list[tuple[Any, ...]]:
    # Every element converted, as pynetdicom reads them (Dataset iteration converts raw ones).
    return [
        (e.tag, e.VR, e.value, type(e.value), e.validation_mode, e.is_undefined_length, e.private_creator)
        for e in ds
    ]


def _pydicom_decode(data: bytes) -> Dataset:
    return decode(BytesIO(data), True, True)


def _store_rq_bare() -> Dataset:
    prim = C_STORE()
    prim.MessageID = 1
    prim.AffectedSOPClassUID = SOP_CLASS
    prim.AffectedSOPInstanceUID = SOP_UID
    prim.Priority = 0
    prim.DataSet = BytesIO(b"\x08\x00\x16\x00\x00\x00\x00\x00")
    msg = dm.C_STORE_RQ()
    msg.primitive_to_message(prim)
    return msg.command_set


def _echo_rq() -> Dataset:
    prim = C_ECHO()
    prim.MessageID = 9
    prim.AffectedSOPClassUID = "1.2.840.10008.1.1"
    msg = dm.C_ECHO_RQ()
    msg.primitive_to_message(prim)
    return msg.command_set


def _find_rq() -> Dataset:
    prim = C_FIND()
    prim.MessageID = 3
    prim.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.1.1"
    prim.Priority = 1
    prim.Identifier = BytesIO(b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY ")
    msg = dm.C_FIND_RQ()
    msg.primitive_to_message(prim)
    return msg.command_set


def _dcmtk_store_rq() -> bytes:
    # What DCMTK storescu sends (captured layout): UIDs NUL-padded, AE padded with a space,
    # move originator present; built by hand so that the test does not depend on pynetdicom.
    def el(element: int, value: bytes) -> bytes:
        return struct.pack("<HHI", 0, element, len(value)) + value

    body = b"".join(
        [
            el(0x0002, b"1.2.840.10008.5.1.4.1.1.4\0"),
            el(0x0100, struct.pack("<H", 0x0001)),
            el(0x0110, struct.pack("<H", 42)),
            el(0x0700, struct.pack("<H", 0)),
            el(0x0800, struct.pack("<H", 0x0000)),
            el(0x1000, b"1.2.3.4.5.6\0"),
            el(0x1030, b" MOVER "),
            el(0x1031, struct.pack("<H", 5)),
        ]
    )
    return el(0x0000, struct.pack("<I", len(body))) + body


DECODE_CASES: dict[str, Any] = {
    **{name: (lambda make=make: encode(make(), True, True)) for name, make in CASES.items()},
    "store-rq bare": lambda: encode(_store_rq_bare(), True, True),
    "echo-rq": lambda: encode(_echo_rq(), True, True),
    "find-rq": lambda: encode(_find_rq(), True, True),
    "dcmtk store-rq": _dcmtk_store_rq,
}


@pytest.mark.parametrize("name", sorted(DECODE_CASES))
def test_decoder_gives_pydicoms_dataset(name: str) -> None:
    data = DECODE_CASES[name]()
    ours = decode_command_set(data)
    theirs = _pydicom_decode(data)
    if "comment" in name:  # (0000,0902) Error Comment (LO) is left to pydicom
        assert ours is None
        return
    assert ours is not None
    assert _elements(ours) == _elements(theirs)
    assert ours.original_encoding == theirs.original_encoding
    assert ours.original_character_set == theirs.original_character_set
    assert ours.CommandField == theirs.CommandField
    assert ours.CommandDataSetType == theirs.CommandDataSetType


@pytest.mark.parametrize("name", sorted(DECODE_CASES))
def test_decoded_primitive_is_the_same(name: str) -> None:
    """Through pynetdicom's own decode_msg + message_to_primitive, with and without the decoder."""
    from pynetdicom.pdu_primitives import P_DATA

    data = DECODE_CASES[name]()
    before = dm.decode

    def primitive() -> Any:
        p_data = P_DATA()
        p_data.presentation_data_value_list = [[1, b"\x03" + data]]
        msg = dm.DIMSEMessage()
        msg.decode_msg(p_data)
        if msg.command_set.CommandDataSetType != 0x0101:
            p_data = P_DATA()
            p_data.presentation_data_value_list = [[1, b"\x02" + b"\x08\x00\x16\x00\x00\x00\x00\x00"]]
            assert msg.decode_msg(p_data)
        return msg.message_to_primitive()

    try:
        fast_command_decoding(False)
        plain = primitive()
        fast_command_decoding(True)
        fast = primitive()
    finally:
        dm.decode = before  # type: ignore[attr-defined]
    assert type(fast) is type(plain)
    keys = [k for k in dir(plain) if not k.startswith("__") and not callable(getattr(plain, k))]
    for key in keys:
        a, b = getattr(fast, key), getattr(plain, key)
        if hasattr(a, "getvalue"):
            a, b = a.getvalue(), b.getvalue()
        assert (key, a, type(a)) == (key, b, type(b))


def _raw(*elements: tuple[int, bytes]) -> bytes:
    return b"".join(struct.pack("<HHI", 0, element, len(value)) + value for element, value in elements)


@pytest.mark.parametrize(
    "data",
    [
        _raw((0x0100, b"\x01\x00"), (0x0902, b"comment ")),  # LO: pydicom's
        _raw((0x0100, b"\x01\x00"), (0x0901, b"\x10\x00\x10\x00")),  # AT: pydicom's
        _raw((0x0100, b"\x01\x00\x02\x00")),  # two US values
        _raw((0x0100, b"")),  # empty
        _raw((0x1000, b"1.2.03.4")),  # a UID pydicom warns about
        _raw((0x1000, b"1.2\\3.4")),  # multi-valued UI
        _raw((0x1000, b"1." + b"1" * 70)),  # too long
        _raw((0x1030, b"AB\\CD")),  # multi-valued AE
        _raw((0x1030, b"   ")),  # empty AE
        _raw((0x1030, "ÄE".encode("latin-1"))),  # not ASCII
        _raw((0x0110, b"\x01\x00"), (0x0100, b"\x01\x00")),  # out of order
        _raw((0x0100, b"\x01\x00"), (0x0100, b"\x01\x00")),  # repeated
        _raw((0x0100, b"\x01\x00"))[:-1],  # truncated value
        _raw((0x0100, b"\x01\x00")) + b"\x00\x00",  # truncated header
        struct.pack("<HHI", 8, 0x16, 2) + b"1\0",  # other group
        _raw((0x4000, b"retired")),  # not a tag we decode
    ],
)
def test_decoder_hands_unusual_input_to_pydicom(data: bytes) -> None:
    assert decode_command_set(data) is None


def test_decoding_switch_is_idempotent_and_reversible() -> None:
    before = dm.decode
    try:
        fast_command_decoding(True)
        fast_command_decoding(True)
        assert getattr(dm.decode, "original", None) is decode  # pynetdicom.dsutils.decode
        data = DECODE_CASES["dcmtk store-rq"]()
        assert _elements(dm.decode(BytesIO(data), True, True)) == _elements(_pydicom_decode(data))
        bad = _raw((0x0100, b"\x01\x00"), (0x0902, b"comment "))  # falls back, same result
        assert _elements(dm.decode(BytesIO(bad), True, True)) == _elements(_pydicom_decode(bad))
        fast_command_decoding(False)
        assert dm.decode is decode
    finally:
        dm.decode = before  # type: ignore[attr-defined]


# -- C-STORE-RSP ------------------------------------------------------------------------------


def _store_rsp_message(**kw: Any) -> Any:
    from pynetdicom import dimse

    prim = C_STORE()
    prim.MessageIDBeingRespondedTo = kw.pop("msg_id", 7)
    prim.AffectedSOPClassUID = kw.pop("sop_class", SOP_CLASS)
    prim.AffectedSOPInstanceUID = kw.pop("sop", SOP_UID)
    prim.Status = kw.pop("status", 0x0000)
    for key, value in kw.items():
        setattr(prim, key, value)
    msg = dimse._RSP_TO_MESSAGE[C_STORE]()  # what DIMSEServiceProvider.send_msg does
    msg.primitive_to_message(prim)
    return msg


RSP_CASES: dict[str, dict[str, Any]] = {
    "success": {},
    "even uid, id 0": {"sop": SOP_UID + "1", "msg_id": 0},
    "id 65535": {"msg_id": 65535},
    "warning": {"status": 0xB000},
    "out of resources": {"status": 0xA700},
    "cannot understand": {"status": 0xC000},
    "no sop instance": {"sop": None},
    "no sop class": {"sop_class": None},
    "error comment": {"status": 0xA900, "ErrorComment": "SOP Instance UID differs"},
    "offending element": {"status": 0xA900, "OffendingElement": [0x00100010, 0x00100020]},
}


@pytest.mark.parametrize("name", sorted(RSP_CASES))
def test_store_response_is_pynetdicoms(name: str) -> None:
    from pynetdicom import dimse

    before = dimse._RSP_TO_MESSAGE[C_STORE]

    def build() -> tuple[Any, ...]:
        msg = _store_rsp_message(**dict(RSP_CASES[name]))
        pdata = [p.presentation_data_value_list for p in msg.encode_msg(1, 0)]
        pdata_limited = [p.presentation_data_value_list for p in msg.encode_msg(3, 40)]
        return (
            type(msg).__name__,
            isinstance(msg, dm.C_STORE_RSP),
            _elements(msg.command_set),
            msg.data_set.getvalue(),
            msg.context_id,
            msg._data_set_path,
            msg._data_set_file,
            pdata,
            pdata_limited,
        )

    try:
        fast_store_response(False)
        assert dimse._RSP_TO_MESSAGE[C_STORE] is dm.C_STORE_RSP
        plain = build()
        fast_store_response(True)
        fast_store_response(True)
        assert dimse._RSP_TO_MESSAGE[C_STORE] is not dm.C_STORE_RSP
        fast = build()
    finally:
        dimse._RSP_TO_MESSAGE[C_STORE] = before
    assert fast == plain
