"""The data-transfer phase of an inbound association, without pynetdicom's per-PDU machinery.

pynetdicom negotiates every association (A-ASSOCIATE-RQ/AC/RJ, the caller policy, presentation
contexts, TLS) and fires the usual events; this module only takes over once the association is
established. From there pynetdicom 3.0 runs two polling threads per association and turns every
PDU into several Python objects (PDU, P-DATA primitive, FSM event, DIMSE message, C-STORE
primitive, service-class call, event, response primitive, response message, P-DATA again):
measured on a 2-core machine here, ~2.5 ms of CPU and ~7 ms of wall time per 64×64 C-STORE,
four times what DCMTK ``storescp`` needs for the whole round trip. What a storage SCP does in
this phase is small and fully specified, so one loop in the association's own thread does it:

* read a PDU (PS3.8 §9.3.1: type, reserved, 4-byte big-endian length);
* P-DATA-TF (PS3.8 §9.3.5): collect the PDVs of one DIMSE message, command fragments then data
  set fragments (message control header bits 0 and 1, PS3.8 Annex E.2), on one accepted
  presentation context;
* decode the command set (group 0000, implicit VR little endian, PS3.7 §6.3.1) and serve
  C-STORE-RQ through :class:`receiver.handlers.InstanceStore` (what pynetdicom's EVT_C_STORE
  handler uses too), fragment by fragment: each data-set fragment goes to the spool as it
  arrives (straight into a slot of the log for large data sets, so the disk works while the rest
  is on the wire); and C-ECHO-RQ; answer with the
  response command set pynetdicom would send, byte for byte (PS3.7 §9.3.1.2, §9.3.5.2; tests
  compare them);
* A-RELEASE-RQ → A-RELEASE-RP (PS3.8 §7.2), then wait for the peer to close;
  A-ABORT → end; anything unexpected (another PDU type, a PDV on a context that was not
  accepted, a command other than C-STORE/C-ECHO, an undecodable command set) → A-ABORT from the
  service provider (PS3.8 §7.3.1, Table 9-26) and a log line; the network timeout → A-ABORT.

The same pynetdicom events fire at the end as before (``EVT_RELEASED``, ``EVT_ABORTED``,
``EVT_CONN_CLOSE``), so the association tracker, the completeness facts and the log lines do
not know which path ran.

Hand-over (:func:`attach`, bound to EVT_REQUESTED): the DUL thread is told to stop right
after it has sent the A-ASSOCIATE-AC (state Sta6, checked after each state-machine action), so
it never reads a PDU of the data phase; the association thread then waits for it to exit and
owns the socket alone. If the DUL ended for another reason, pynetdicom's own reactor runs.
``ScpConfig.fast_transfer=False`` keeps pynetdicom's data phase entirely.
"""

from __future__ import annotations

import logging
import socket
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pynetdicom import evt

from receiver import status
from receiver.handlers import InstanceStore

if TYPE_CHECKING:
    from pynetdicom.events import Event

    from receiver.associations import AssociationTracker
    from receiver.spool import Spool

__all__ = [
    "DUL_EXIT_TIMEOUT",
    "RELEASE_CLOSE_TIMEOUT",
    "attach",
    "decode_command",
    "echo_response",
    "p_data_pdus",
    "store_response",
]

log = logging.getLogger("receiver")

DUL_EXIT_TIMEOUT = 10.0
"""Seconds the association thread waits for pynetdicom's DUL thread to hand the socket over."""

RELEASE_CLOSE_TIMEOUT = 5.0
"""Seconds to wait, after A-RELEASE-RP, for the requestor to close (PS3.8 §9.1.6 ARTIM)."""

# PS3.8 §9.3.1 PDU types
_P_DATA_TF = 0x04
_A_RELEASE_RQ = 0x05
_A_ABORT = 0x07

_PDU_HEAD = struct.Struct(">BBI")
_PDV_HEAD = struct.Struct(">IBB")
_ELEMENT = struct.Struct("<HHI")  # implicit VR LE: group, element, 4-byte length (PS3.5 §7.1.3)
_US = struct.Struct("<H")
_UL = struct.Struct("<I")

_A_RELEASE_RP = bytes([0x06, 0, 0, 0, 0, 4, 0, 0, 0, 0])
# A-ABORT-RQ (PS3.8 §9.3.8): source 2 = service provider; reason 0 = not specified,
# 1 = unrecognized PDU, 2 = unexpected PDU, 6 = invalid PDU parameter value (Table 9-26).
_ABORT_NOT_SPECIFIED, _ABORT_UNRECOGNIZED_PDU, _ABORT_UNEXPECTED_PDU, _ABORT_INVALID_PARAMETER = 0, 1, 2, 6

# PS3.7 Table E.1-1 command fields
_C_STORE_RQ, _C_STORE_RSP = 0x0001, 0x8001
_C_ECHO_RQ, _C_ECHO_RSP = 0x0030, 0x8030
_NO_DATA_SET = 0x0101  # (0000,0800) Command Data Set Type: no data set follows


@dataclass(frozen=True)
class Command:
    """The group 0000 elements of a request that this SCP uses (PS3.7 §9.3.1.1, §9.3.5.1)."""

    field: int
    message_id: int
    has_data_set: bool
    affected_sop_class: bytes
    affected_sop_instance: bytes

    @property
    def sop_class_uid(self) -> str:
        return self.affected_sop_class.decode("ascii", "replace").strip("\0 ")

    @property
    def sop_instance_uid(self) -> str:
        return self.affected_sop_instance.decode("ascii", "replace").strip("\0 ")


class _Abort(Exception):
    """End the association with an A-ABORT (reason per PS3.8 Table 9-26)."""

    def __init__(self, message: str, reason: int = _ABORT_NOT_SPECIFIED) -> None:
        super().__init__(message)
        self.reason = reason


class _Closed(Exception):
    """The peer closed the connection (or it broke)."""


def decode_command(data: bytes) -> Command:
    """Decode a request command set (group 0000, implicit VR little endian).

    Raises
    ------
    ValueError
        If the bytes are not a well-formed command set with a Command Field and Message ID.
    """
    values: dict[int, bytes] = {}
    offset, end = 0, len(data)
    try:
        while offset < end:
            group, element, length = _ELEMENT.unpack_from(data, offset)
            offset += 8
            if group != 0 or length == 0xFFFFFFFF or offset + length > end:
                raise ValueError(f"bad element ({group:04X},{element:04X}) in the command set")
            values[element] = data[offset : offset + length]
            offset += length
        field = _US.unpack(values[0x0100])[0]
        message_id = _US.unpack(values[0x0110])[0]
        data_set_type = _US.unpack(values.get(0x0800, b"\x01\x01"))[0]
    except (struct.error, KeyError) as exc:
        raise ValueError(f"command set does not decode: {exc!r}") from exc
    return Command(
        field=field,
        message_id=message_id,
        has_data_set=data_set_type != _NO_DATA_SET,
        affected_sop_class=values.get(0x0002, b""),
        affected_sop_instance=values.get(0x1000, b""),
    )


def _ui(raw: bytes) -> bytes:
    value = raw.rstrip(b"\0 ")  # as pynetdicom re-encodes the UID it read
    return value + b"\0" if len(value) % 2 else value


def _command_set(elements: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(_ELEMENT.pack(0, element, len(value)) + value for element, value in elements)
    return _ELEMENT.pack(0, 0x0000, 4) + _UL.pack(len(body)) + body


def store_response(request: Command, status_code: int) -> bytes:
    """The C-STORE-RSP command set pynetdicom sends for ``request`` (PS3.7 §9.3.1.2)."""
    elements = [
        (0x0002, _ui(request.affected_sop_class)),
        (0x0100, _US.pack(_C_STORE_RSP)),
        (0x0120, _US.pack(request.message_id)),
        (0x0800, _US.pack(_NO_DATA_SET)),
        (0x0900, _US.pack(status_code)),
        (0x1000, _ui(request.affected_sop_instance)),
    ]
    return _command_set([e for e in elements if e[1]])


def echo_response(request: Command) -> bytes:
    """The C-ECHO-RSP command set pynetdicom sends for ``request`` (PS3.7 §9.3.5.2)."""
    elements = [
        (0x0002, _ui(request.affected_sop_class)),
        (0x0100, _US.pack(_C_ECHO_RSP)),
        (0x0120, _US.pack(request.message_id)),
        (0x0800, _US.pack(_NO_DATA_SET)),
        (0x0900, _US.pack(status.SUCCESS)),
    ]
    return _command_set([e for e in elements if e[1]])


def p_data_pdus(context_id: int, command: bytes, max_pdu_length: int) -> list[bytes]:
    """P-DATA-TF PDUs carrying one command set, fragmented as pynetdicom does.

    One PDV per PDU, each PDV value at most ``max_pdu_length - 6`` bytes (pynetdicom's
    ``DIMSEMessage.encode_msg``); ``0`` means the peer set no limit (PS3.8 D.1).
    """
    size = len(command) if max_pdu_length == 0 else max(1, max_pdu_length - 6)
    fragments = [command[i : i + size] for i in range(0, len(command), size)] or [b""]
    pdus = []
    for index, fragment in enumerate(fragments):
        control = 0x03 if index == len(fragments) - 1 else 0x01  # command; last fragment
        pdv = _PDV_HEAD.pack(len(fragment) + 2, context_id, control) + fragment
        pdus.append(_PDU_HEAD.pack(_P_DATA_TF, 0, len(pdv)) + pdv)
    return pdus


class _Connection:
    """Blocking reads of whole PDUs from the association's socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._head = bytearray(6)
        self._buffer = bytearray(64 * 1024)  # reused: a PDU's bytes are consumed before the next read

    def _read_into(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise _Closed("the peer closed the connection")
            got += n

    def read_pdu(self) -> tuple[int, memoryview]:
        """The next PDU's type and body; the body is valid until the next call."""
        self._read_into(memoryview(self._head))
        pdu_type, _, length = _PDU_HEAD.unpack(self._head)
        if length > len(self._buffer):
            self._buffer = bytearray(length)
        body = memoryview(self._buffer)[:length]
        if length:
            self._read_into(body)
        return pdu_type, body

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


class _Transfer:
    """One association's data phase (see the module docstring)."""

    def __init__(self, assoc: Any, spool: Spool, tracker: AssociationTracker) -> None:
        self.assoc = assoc
        self.spool = spool
        self.tracker = tracker
        self.contexts: dict[int, str] = {cx.context_id: str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        self.max_pdu = int(assoc.requestor.maximum_length or 0)
        self.conn = _Connection(assoc.dul.socket.socket)
        # The message being received: its presentation context, command fragments, command.
        self._context: int | None = None
        self._command_parts: list[bytes] = []
        self._command: Command | None = None
        self._store: InstanceStore | None = None  # the C-STORE data set being written

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        assoc = self.assoc
        self.conn.sock.settimeout(assoc.network_timeout)
        how = "aborted"
        try:
            while True:
                pdu_type, body = self.conn.read_pdu()
                if pdu_type == _P_DATA_TF:
                    self._p_data(body)
                elif pdu_type == _A_RELEASE_RQ:
                    self.conn.send(_A_RELEASE_RP)
                    how = "released"
                    self._await_close()
                    break
                elif pdu_type == _A_ABORT:
                    log.info("association %s: the peer sent A-ABORT", self.tracker.info(assoc).label)
                    break
                elif pdu_type in (0x01, 0x02, 0x03, 0x06):
                    raise _Abort(f"unexpected PDU type 0x{pdu_type:02X} in the data phase", _ABORT_UNEXPECTED_PDU)
                else:
                    raise _Abort(f"unrecognized PDU type 0x{pdu_type:02X}", _ABORT_UNRECOGNIZED_PDU)
        except _Abort as exc:
            log.warning("association %s: sending A-ABORT: %s", self.tracker.info(assoc).label, exc)
            self._send_abort(exc.reason)
        except TimeoutError:
            log.warning(
                "association %s: no PDU for %s s (network timeout); sending A-ABORT",
                self.tracker.info(assoc).label,
                assoc.network_timeout,
            )
            self._send_abort(_ABORT_NOT_SPECIFIED)
        except (_Closed, OSError) as exc:
            log.info("association %s: connection lost: %s", self.tracker.info(assoc).label, exc)
        except Exception:  # a bug here must end this association, not the receiver
            log.exception("association %s: unexpected error; sending A-ABORT", self.tracker.info(assoc).label)
            self._send_abort(_ABORT_NOT_SPECIFIED)
        finally:
            self._finish(how)

    def _p_data(self, body: memoryview) -> None:
        offset, end = 0, len(body)
        while offset < end:
            if end - offset < 6:
                raise _Abort("truncated PDV item", _ABORT_INVALID_PARAMETER)
            item_length, context_id, control = _PDV_HEAD.unpack_from(body, offset)
            value_end = offset + 4 + item_length
            if item_length < 2 or value_end > end:
                raise _Abort("PDV item length does not fit its PDU", _ABORT_INVALID_PARAMETER)
            fragment = body[offset + 6 : value_end]
            offset = value_end
            if context_id not in self.contexts:
                raise _Abort(f"PDV on presentation context {context_id}, which was not accepted", _ABORT_INVALID_PARAMETER)
            if self._context is None:
                self._context = context_id
            elif context_id != self._context:
                raise _Abort("PDVs of one message arrived on two presentation contexts", _ABORT_INVALID_PARAMETER)
            is_command, is_last = bool(control & 0x01), bool(control & 0x02)
            if is_command:
                if self._command is not None:
                    raise _Abort("command fragment after a complete command set", _ABORT_INVALID_PARAMETER)
                self._command_parts.append(bytes(fragment))
                if is_last:
                    try:
                        self._command = decode_command(b"".join(self._command_parts))
                    except ValueError as exc:
                        raise _Abort(str(exc)) from exc
                    if not self._command.has_data_set:
                        self._serve()
                    elif self._command.field == _C_STORE_RQ:
                        self._store = self._open_store(self._command, context_id)
            else:
                if self._command is None or not self._command.has_data_set:
                    raise _Abort("data set fragment without a command that announced one", _ABORT_INVALID_PARAMETER)
                if self._store is None:
                    raise _Abort(f"unsupported DIMSE command 0x{self._command.field:04X} with a data set")
                self._store.add(fragment)  # written to the spool now, while the rest arrives
                if is_last:
                    self._serve()

    def _open_store(self, command: Command, context_id: int) -> InstanceStore:
        return InstanceStore(
            self.assoc,
            self.spool,
            self.tracker,
            sop_class_uid=command.sop_class_uid,
            sop_instance_uid=command.sop_instance_uid,
            transfer_syntax=self.contexts[context_id],
        )

    def _serve(self) -> None:
        command, context_id, store = self._command, self._context, self._store
        assert command is not None and context_id is not None
        self._context, self._command, self._command_parts, self._store = None, None, [], None
        if store is not None:
            response = store_response(command, store.finish())
        elif command.field == _C_ECHO_RQ:
            response = echo_response(command)
        elif command.field == _C_STORE_RQ:
            raise _Abort("C-STORE-RQ without a data set (Command Data Set Type 0x0101)")
        else:
            raise _Abort(f"unsupported DIMSE command 0x{command.field:04X} (this SCP serves C-STORE and C-ECHO)")
        for pdu in p_data_pdus(context_id, response, self.max_pdu):
            self.conn.send(pdu)

    # -- ending -----------------------------------------------------------------------------

    def _await_close(self) -> None:
        """After A-RELEASE-RP the requestor closes the connection (PS3.8 §7.2.2)."""
        try:
            self.conn.sock.settimeout(RELEASE_CLOSE_TIMEOUT)
            while self.conn.sock.recv(4096):
                pass
        except OSError:
            pass

    def _send_abort(self, reason: int) -> None:
        try:
            self.conn.send(bytes([_A_ABORT, 0, 0, 0, 0, 4, 0, 0, 2, reason]))
        except OSError:
            pass

    def _finish(self, how: str) -> None:
        if self._store is not None:  # the association ended inside a data set: never acknowledged
            self._store.discard()
            self._store = None
        assoc = self.assoc
        assoc.is_established = False
        if how == "released":
            assoc.is_released = True
            evt.trigger(assoc, evt.EVT_RELEASED, {})
        else:
            assoc.is_aborted = True
            evt.trigger(assoc, evt.EVT_ABORTED, {})
        remote = assoc.requestor.address_info
        assoc.dul.socket.close()  # shuts the socket down; pynetdicom then skips its own close
        assoc.dul.state_machine.current_state = "Sta1"
        evt.trigger(assoc, evt.EVT_CONN_CLOSE, {"address": remote.as_tuple if remote is not None else None})
        assoc.kill()


def _run_data_phase(assoc: Any, spool: Spool, tracker: AssociationTracker, pynetdicom_reactor: Any) -> None:
    dul = assoc.dul
    dul.join(DUL_EXIT_TIMEOUT)
    if dul.is_alive() or dul.state_machine.current_state != "Sta6" or dul.socket is None or dul.socket.socket is None:
        # The hand-over did not happen as planned (the peer vanished, a timeout): let
        # pynetdicom's reactor find the DUL's state and end the association its way.
        pynetdicom_reactor()
        return
    _Transfer(assoc, spool, tracker).run()


def attach(event: Event, spool: Spool, tracker: AssociationTracker) -> None:
    """EVT_REQUESTED: arrange for this association's data phase to run in :class:`_Transfer`.

    Only this association is changed (instance attributes): its DUL thread stops once it has
    sent the A-ASSOCIATE-AC, and its reactor becomes the loop of this module. A rejected or
    aborted negotiation never reaches either.
    """
    assoc = event.assoc
    dul = assoc.dul
    machine = dul.state_machine
    do_action = machine.do_action

    def do_action_then_hand_over(fsm_event: str) -> None:
        do_action(fsm_event)
        if machine.current_state == "Sta6":  # A-ASSOCIATE-AC sent: the data phase is ours
            dul._kill_thread = True

    machine.do_action = do_action_then_hand_over  # type: ignore[method-assign,assignment]
    pynetdicom_reactor = assoc._run_reactor
    assoc._run_reactor = lambda: _run_data_phase(assoc, spool, tracker, pynetdicom_reactor)  # type: ignore[method-assign]
