"""The data-phase loop (receiver/transfer.py) answers exactly as pynetdicom's own data phase does.

Real associations on loopback: a pynetdicom SCU records every byte it receives (EVT_DATA_RECV)
while it sends the same requests to an SCP with ``fast_transfer`` on and to one with it off;
the bytes after the A-ASSOCIATE-AC must be identical. Protocol errors are sent as raw PDUs on
an established association's socket.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom import dimse_messages as dm
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from receiver import status
from receiver.associations import AssociationTracker, CallerPolicy
from receiver.handlers import HEADER_PREFIX
from receiver.scp import ScpConfig, start_scp
from receiver.transfer import decode_command, echo_response, p_data_pdus, store_response
from tests.factories import make_small_series
from tests.receiver.conftest import AE_TITLE, Env, free_port, spooled

MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _pynetdicom_command(msg: Any, prim: Any) -> bytes:
    msg.primitive_to_message(prim)
    return bytes(encode(msg.command_set, True, True) or b"")


@pytest.mark.parametrize("code", [0x0000, 0xA700, 0xA900, 0xC000, 0xB000])
@pytest.mark.parametrize("sop", ["1.2.3.4", "1.2.826.0.1.3680043.8.498.12345.678"])  # even and odd length
def test_store_response_is_pynetdicoms_command_set(code: int, sop: str) -> None:
    request = C_STORE()
    request.MessageID = 513
    request.AffectedSOPClassUID = MR
    request.AffectedSOPInstanceUID = sop
    request.Priority = 0
    request.DataSet = BytesIO(b"")
    rq_bytes = _pynetdicom_command(dm.C_STORE_RQ(), request)

    response = C_STORE()
    response.MessageIDBeingRespondedTo = 513
    response.AffectedSOPClassUID = MR
    response.AffectedSOPInstanceUID = sop
    response.Status = code
    expected = _pynetdicom_command(dm.C_STORE_RSP(), response)

    decoded = decode_command(rq_bytes)
    assert (decoded.field, decoded.message_id, decoded.has_data_set) == (0x0001, 513, True)
    assert decoded.sop_instance_uid == sop
    assert store_response(decoded, code) == expected


def test_echo_response_is_pynetdicoms_command_set() -> None:
    request = C_ECHO()
    request.MessageID = 9
    request.AffectedSOPClassUID = Verification
    decoded = decode_command(_pynetdicom_command(dm.C_ECHO_RQ(), request))
    assert not decoded.has_data_set
    response = C_ECHO()
    response.MessageIDBeingRespondedTo = 9
    response.AffectedSOPClassUID = Verification
    response.Status = 0
    assert echo_response(decoded) == _pynetdicom_command(dm.C_ECHO_RSP(), response)


@pytest.mark.parametrize("max_pdu", [0, 16, 64, 4096])
def test_p_data_fragments_as_pynetdicom(max_pdu: int) -> None:
    response = C_STORE()
    response.MessageIDBeingRespondedTo = 1
    response.AffectedSOPClassUID = MR
    response.AffectedSOPInstanceUID = "1.2.3.4.5"
    response.Status = 0
    msg = dm.C_STORE_RSP()
    msg.primitive_to_message(response)
    theirs = [b"".join(_pdu_bytes(p) for p in [pdata]) for pdata in msg.encode_msg(3, max_pdu)]
    command = bytes(encode(msg.command_set, True, True) or b"")
    assert p_data_pdus(3, command, max_pdu) == theirs


def _pdu_bytes(pdata: Any) -> bytes:
    from pynetdicom.pdu import P_DATA_TF

    pdu = P_DATA_TF()
    pdu.from_primitive(pdata)
    return bytes(pdu.encode())


@pytest.mark.parametrize("bad", [b"", b"\x00\x00\x00\x01\x02\x00\x00\x00\x01\x00", b"\x00\x00\x10\x01\xff\xff\xff\xff"])
def test_decode_command_refuses_malformed_sets(bad: bytes) -> None:
    with pytest.raises(ValueError):
        decode_command(bad)


# -- whole conversations ------------------------------------------------------------------------


@contextmanager
def _scp(env: Env, *, fast: bool) -> Iterator[tuple[int, AssociationTracker]]:
    tracker = AssociationTracker()
    port = free_port()
    config = ScpConfig(ae_title=AE_TITLE, host="127.0.0.1", port=port, fast_transfer=fast)
    server = start_scp(config, env.spool, tracker, CallerPolicy())
    try:
        yield port, tracker
    finally:
        server.shutdown()


def _conversation(port: int, datasets: list[Dataset], *, max_pdu: int) -> tuple[list[bytes], list[int]]:
    """Everything the SCP sent after its A-ASSOCIATE-AC, and the statuses the SCU saw."""
    received: list[bytes] = []
    ae = AE(ae_title="TESTSCU")
    ae.maximum_pdu_size = max_pdu
    ae.add_requested_context(Verification)
    ae.add_requested_context(MR, EXPLICIT_LE)
    handlers = [(evt.EVT_DATA_RECV, lambda event: received.append(bytes(event.data)))]
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE, evt_handlers=handlers)  # type: ignore[arg-type]
    assert assoc.is_established
    statuses = [int(assoc.send_c_echo(msg_id=1).Status)]
    for index, ds in enumerate(datasets):
        statuses.append(int(assoc.send_c_store(ds, msg_id=100 + index).Status))
    assoc.release()
    assert assoc.is_released
    assert received[0][0] == 0x02  # the A-ASSOCIATE-AC: differs in nothing but is not ours to compare
    return received[1:], statuses


def _requests() -> list[Dataset]:
    good = make_small_series(3, 16, 16, seed=3)
    wrong_uid = make_small_series(1, 16, 16, seed=4)[0]
    wrong_uid.SeriesInstanceUID = "1.2.3.abc"  # not a UID: 0xA900
    missing = make_small_series(1, 16, 16, seed=5)[0]
    del missing.StudyInstanceUID
    return [*good, wrong_uid, missing, good[0]]  # the last one again: a duplicate, still Success


@pytest.mark.parametrize("max_pdu", [0, 64])
def test_same_bytes_on_the_wire_with_and_without_the_fast_loop(env: Env, max_pdu: int) -> None:
    requests = _requests()
    with _scp(env, fast=True) as (port, _tracker):
        fast_bytes, fast_statuses = _conversation(port, requests, max_pdu=max_pdu)
    with _scp(env, fast=False) as (port, _tracker):
        slow_bytes, slow_statuses = _conversation(port, requests, max_pdu=max_pdu)
    assert fast_statuses == [0, 0, 0, 0, status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, 0]
    assert slow_statuses == fast_statuses
    assert b"".join(fast_bytes) == b"".join(slow_bytes)
    assert fast_bytes[-1] == bytes([0x06, 0, 0, 0, 0, 4, 0, 0, 0, 0])  # A-RELEASE-RP
    assert env.spool.count() == 2 * 4  # both runs spooled the 4 good stores


def test_closed_events_and_counts_reach_the_tracker(env: Env) -> None:
    closed: list[str] = []
    with _scp(env, fast=True) as (port, tracker):
        original = tracker.closed

        def spy(assoc: Any, how: str) -> None:
            closed.append(how)
            original(assoc, how)

        tracker.closed = spy  # type: ignore[method-assign]
        _conversation(port, make_small_series(2, 16, 16, seed=8), max_pdu=0)
        deadline = time.monotonic() + 5
        while not closed and time.monotonic() < deadline:
            time.sleep(0.01)
    assert closed and closed[0] == "EVT_RELEASED"
    assert sum(info.stored for info in tracker._infos.values()) == 2


def _established(port: int) -> Any:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(MR, EXPLICIT_LE)
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
    assert assoc.is_established
    return assoc


def _wait_aborted(assoc: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if assoc.is_aborted:
            return True
        time.sleep(0.01)
    return False


def _pdv_pdu(context_id: int, control: int, value: bytes) -> bytes:
    pdv = struct.pack(">IBB", len(value) + 2, context_id, control) + value
    return struct.pack(">BBI", 4, 0, len(pdv)) + pdv


def _command(field: int, *, data_set: bool) -> bytes:
    body = struct.pack("<HHIH", 0, 0x0100, 2, field) + struct.pack("<HHIH", 0, 0x0110, 2, 1)
    body += struct.pack("<HHIH", 0, 0x0800, 2, 0x0000 if data_set else 0x0101)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(lambda cx: _pdv_pdu(99, 0x03, _command(0x0030, data_set=False)), id="unaccepted-context"),
        pytest.param(lambda cx: _pdv_pdu(cx, 0x03, _command(0x0020, data_set=False)), id="c-find-on-storage"),
        pytest.param(lambda cx: _pdv_pdu(cx, 0x03, b"\x00\x00\x00\x01"), id="undecodable-command"),
        pytest.param(lambda cx: _pdv_pdu(cx, 0x03, _command(0x0001, data_set=False)), id="c-store-without-data-set"),
        pytest.param(lambda cx: _pdv_pdu(cx, 0x02, b"\x08\x00"), id="data-set-without-command"),
        pytest.param(lambda cx: bytes([0x09, 0, 0, 0, 0, 0]), id="unknown-pdu-type"),
        pytest.param(lambda cx: bytes([0x04, 0, 0, 0, 0, 3, 0, 0, 0]), id="truncated-pdv"),
    ],
)
def test_protocol_errors_abort_and_the_receiver_goes_on(env: Env, raw: Any) -> None:
    with _scp(env, fast=True) as (port, _tracker):
        assoc = _established(port)
        context_id = next(cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == MR)
        assoc.dul.socket.send(raw(context_id))
        assert _wait_aborted(assoc), "the SCP did not send A-ABORT"
        again = _established(port)
        assert again.send_c_echo().Status == 0
        again.release()
    assert env.spool.count() == 0


def test_peer_vanishing_mid_message_spools_nothing_and_receiver_goes_on(env: Env) -> None:
    with _scp(env, fast=True) as (port, _tracker):
        assoc = _established(port)
        context_id = next(cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == MR)
        command = _command(0x0001, data_set=True)
        # a C-STORE command, then half of a data-set PDU, then the connection drops
        assoc.dul.socket.send(_pdv_pdu(context_id, 0x03, command) + _pdv_pdu(context_id, 0x02, b"\x08\x00" * 50)[:40])
        assoc.dul.socket.socket.close()
        assoc.kill()
        again = _established(port)
        assert again.send_c_echo().Status == 0
        again.release()
    assert env.spool.count() == 0  # the half-received data set never became a record
    assert list(env.spool.tmp_dir.iterdir()) == []


def _with_big_private_element(uid_ok: bool) -> Dataset:
    """An instance whose Study/Series UIDs lie beyond the bytes kept in memory (HEADER_PREFIX)."""
    ds = make_small_series(1, 16, 16, seed=21)[0]
    ds.add_new(0x00090010, "LO", "DCMFLOW TEST")
    ds.add_new(0x00091000, "OB", b"\x01" * (HEADER_PREFIX + 10_000))
    if not uid_ok:
        ds.SeriesInstanceUID = "1.2.bad"
    return ds


@pytest.mark.parametrize("uid_ok", [True, False])
def test_uids_beyond_the_in_memory_prefix_are_still_checked(env: Env, uid_ok: bool) -> None:
    ds = _with_big_private_element(uid_ok)
    with _scp(env, fast=True) as (port, _tracker):
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(MR, EXPLICIT_LE)
        assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
        code = int(assoc.send_c_store(ds).Status)
        assoc.release()
    stored = spooled(env.spool)
    if uid_ok:
        assert code == 0 and len(stored) == 1
        assert stored[0][1].endswith(ds.PixelData)
    else:
        assert code == status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS and stored == []
    assert list(env.spool.tmp_dir.iterdir()) == []
