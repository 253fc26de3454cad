"""The byte-level DIMSE command-set encoder writes exactly what pydicom writes."""

from __future__ import annotations

from io import BytesIO
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import dimse_messages as dm
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_STORE
from pynetdicom.dsutils import encode

from receiver._tuning import encode_command_set, fast_command_encoding

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
