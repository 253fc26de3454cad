"""Shorter polling sleeps for pynetdicom's reactors (the receiver process only).

pynetdicom 3.0 runs two polling loops per association (storage_perf.md §4):

* the DUL reactor (``pynetdicom/dul.py``, ``DULServiceProvider.run_reactor``) sleeps
  ``_run_loop_delay = 0.001`` s whenever its previous pass found nothing to do;
* the association reactor (``pynetdicom/association.py``, ``Association._run_reactor``) sleeps
  ``time.sleep(0.001)`` at the top of every pass before looking for a complete DIMSE message.

A C-STORE therefore waits on up to three of these sleeps (request noticed, message picked up,
response sent) on top of the real work: measured here, 64×64 images went from ~200 to ~500
instances/s on one association when the sleeps were 0.1 ms instead of 1 ms, 512×512 CT from
~195 to ~225/s. Neither loop has a setting for it, so :func:`shorten_reactor_sleeps` replaces
the ``time`` module those two pynetdicom modules see with a proxy whose ``sleep`` turns exactly
those 1 ms polls into ``delay``; every other sleep (timeouts, shutdown waits) is unchanged.

Separately, :func:`set_pynetdicom_event_logging` flips pynetdicom's documented switch
``_config.LOG_HANDLER_LEVEL`` (``"standard"`` → ``"none"``): its built-in handlers format a log
record for every DIMSE message sent and received, under the AE-wide lock, even when the
logger's level drops them (profiled: ~8 % of the SCP's CPU on small images). The receiver
logs its own line per association instead.

Third, :func:`fast_command_encoding` gives pynetdicom a byte-level encoder for DIMSE command
sets (always Implicit VR Little Endian, group 0000, PS3.7 §6.3.1 and §9.3): pynetdicom encodes
every command set twice with ``pydicom.filewriter.write_dataset`` (once for the Command Group
Length, once to send it), which profiled at ~25 % of the SCP's CPU on small images. The encoder
writes exactly the bytes pydicom would (tests compare them on every message kind we send) and
hands any element it does not handle (other groups, sequences, binary values, AT) back to
pydicom.

Fourth, :func:`fast_command_decoding` is the symmetric decoder for the command sets pynetdicom
receives (``pynetdicom.dimse_messages.decode``, used only in ``DIMSEMessage.decode_msg``):
pydicom's reader gives raw elements that are then converted, validated (UID regexes) and
looked up one by one when pynetdicom turns the message into a primitive. The decoder builds
the already-converted elements of the ~20 command tags pynetdicom uses (US, UL, UI, AE; values
checked so that skipping pydicom's validation hides no warning) and hands anything else (AT,
LO comments, empty or multiple values, unknown tags, truncation) back to pydicom; tests
compare tag, VR, value, value type and validation mode with pydicom's, and the resulting
primitives, on every message kind. Measured: ``decode_msg`` + ``message_to_primitive`` of a
C-STORE-RQ 123 → 60 µs; SCP alone (spool, no ingest), 2000 × 64×64 from DCMTK storescu, six
alternating runs each: median SCP CPU 0.98 → 0.90 ms per C-STORE, wall 2.61 → 2.44 s (~7 %).
``ScpConfig.fast_command_decoding=False`` keeps pydicom's reader.

Fifth, :func:`fast_store_response` swaps pynetdicom's ``C_STORE_RSP`` message class (entry
``C_STORE`` of ``pynetdicom.dimse._RSP_TO_MESSAGE``, the table ``send_msg`` picks response
classes from) for a subclass that builds the usual response command set (UIDs, message id,
status, command field, data set type, group length) as DataElements directly instead of
adding every keyword as a None element, matching keywords to the primitive and deleting the
unset ones; a response with an Error Comment, an Offending Element or a dataset path takes
pynetdicom's own code. Tests compare the elements (tag, VR, value, type, validation mode)
and the P-DATA pieces for ten responses. Measured: building + encoding a C-STORE-RSP
120 → 52 µs (→ ~40 µs once UID and US values that pydicom would neither change nor warn about
skip its conversion); SCP alone, 2000 × 64×64, six alternating runs each: median SCP CPU 0.97 → 0.785
ms per C-STORE, wall 2.62 → 2.29 s. ``ScpConfig.fast_store_response=False`` keeps pynetdicom's.

Cost of the short polls: an idle, open association polls ~10× more often (two threads waking every 0.1 ms use
a few % of a core); connections that are not associated yet and a receiver with no association
do not poll. Set ``ScpConfig.reactor_delay=None`` to keep pynetdicom's behaviour.
"""

from __future__ import annotations

import re
import struct
import time as _time
from io import BytesIO
from types import ModuleType
from typing import Any, cast

from pydicom.charset import default_encoding
from pydicom.config import IGNORE, settings
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID

__all__ = [
    "DEFAULT_REACTOR_DELAY",
    "shorten_reactor_sleeps",
    "restore_reactor_sleeps",
    "set_pynetdicom_event_logging",
    "fast_command_encoding",
    "encode_command_set",
    "fast_command_decoding",
    "decode_command_set",
    "fast_store_response",
]

DEFAULT_REACTOR_DELAY = 0.0001
"""Poll interval (s) of pynetdicom's association and DUL reactors in the receiver (pynetdicom: 0.001)."""

_POLL = 0.001  # the literal both reactors use


class _ReactorTime:
    """Stands in for :mod:`time` inside two pynetdicom modules; only ``sleep(0.001)`` changes."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def sleep(self, seconds: float) -> None:
        _time.sleep(self.delay if seconds == _POLL else seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)


def _modules() -> list[ModuleType]:
    import pynetdicom.association
    import pynetdicom.dul

    return [pynetdicom.association, pynetdicom.dul]


def shorten_reactor_sleeps(delay: float = DEFAULT_REACTOR_DELAY) -> None:
    """Make pynetdicom's reactors poll every ``delay`` seconds in this process (idempotent).

    Parameters
    ----------
    delay : float
        Seconds, ``0 < delay <= 0.001``.

    Raises
    ------
    ValueError
        If ``delay`` is out of range.
    """
    if not 0 < delay <= _POLL:
        raise ValueError(f"reactor delay must be in (0, {_POLL}] s, not {delay}")
    for module in _modules():
        current = module.time
        if isinstance(current, _ReactorTime):
            current.delay = delay
        else:
            module.time = _ReactorTime(delay)  # type: ignore[attr-defined]


def restore_reactor_sleeps() -> None:
    """Give pynetdicom back the real :mod:`time` module."""
    for module in _modules():
        if isinstance(module.time, _ReactorTime):
            module.time = _time  # type: ignore[attr-defined]


def set_pynetdicom_event_logging(enabled: bool) -> None:
    """Turn pynetdicom's per-message standard event logging on or off for new associations.

    Sets ``pynetdicom._config.LOG_HANDLER_LEVEL`` (read when an association is created).
    """
    from pynetdicom import _config

    _config.LOG_HANDLER_LEVEL = "standard" if enabled else "none"


_US = struct.Struct("<H").pack
_UL = struct.Struct("<I").pack
_HEAD = struct.Struct("<HHI").pack  # implicit VR LE element header: group, element, length (PS3.5 §7.1.3)
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "SH", "ST", "TM", "UC", "UT"})


class _Unhandled(Exception):
    pass


def _value_bytes(vr: str, value: Any) -> bytes:
    if value is None or value == "":
        return b""
    if vr == "US" or vr == "UL":
        pack = _US if vr == "US" else _UL
        if isinstance(value, int) and not isinstance(value, bool):
            return pack(value)
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            return b"".join(pack(int(v)) for v in value)
        raise _Unhandled
    if vr == "UI" or vr in _TEXT_VRS:
        if not isinstance(value, str):
            raise _Unhandled  # multi-valued strings and the like: pydicom's job
        data = value.encode("ascii")
        if len(data) % 2:
            data += b"\0" if vr == "UI" else b" "
        return data
    raise _Unhandled


def encode_command_set(ds: Any) -> bytes | None:
    """Encode a DIMSE command set in Implicit VR Little Endian without pydicom's writer.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The command set (group 0000 elements only).

    Returns
    -------
    bytes or None
        The encoding, byte for byte what ``pydicom.filewriter.write_dataset`` produces; ``None``
        when the dataset holds something this encoder leaves to pydicom.
    """
    out = []
    try:
        for elem in ds:
            tag = elem.tag
            if tag >> 16 != 0:
                return None
            data = _value_bytes(elem.VR, elem.value)
            out.append(_HEAD(0, tag & 0xFFFF, len(data)))
            out.append(data)
    except (_Unhandled, UnicodeEncodeError, struct.error, TypeError, ValueError):
        return None
    return b"".join(out)


def _fast_encode(original: Any) -> Any:
    def encode(ds: Any, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False) -> bytes | None:
        if is_implicit_vr and is_little_endian and not deflated:
            data = encode_command_set(ds)
            if data is not None:
                return data
        return original(ds, is_implicit_vr, is_little_endian, deflated)

    encode.original = original  # type: ignore[attr-defined]
    return encode


def fast_command_encoding(enabled: bool = True) -> None:
    """Use :func:`encode_command_set` for pynetdicom's command sets in this process (idempotent).

    Replaces the ``encode`` name that ``pynetdicom.dimse_messages`` imported from
    ``pynetdicom.dsutils`` (used there only for command sets); ``enabled=False`` restores it.
    """
    import pynetdicom.dimse_messages as dm

    current = dm.encode
    original = getattr(current, "original", current)
    dm.encode = _fast_encode(original) if enabled else original  # type: ignore[attr-defined]


# -- decoding ---------------------------------------------------------------------------------

_TAG_LEN = struct.Struct("<HHI").unpack_from
_U16 = struct.Struct("<H").unpack
_U32 = struct.Struct("<I").unpack
# The group 0000 elements pynetdicom's DIMSE messages use (PS3.7 §E.1, Table E.1-1), with their
# dictionary VR; any other tag (retired ones, AT lists, LO comments…) is left to pydicom.
_COMMAND_VRS: dict[int, str] = {
    0x0000: "UL",  # Command Group Length
    0x0002: "UI",  # Affected SOP Class UID
    0x0003: "UI",  # Requested SOP Class UID
    0x0100: "US",  # Command Field
    0x0110: "US",  # Message ID
    0x0120: "US",  # Message ID Being Responded To
    0x0600: "AE",  # Move Destination
    0x0700: "US",  # Priority
    0x0800: "US",  # Command Data Set Type
    0x0900: "US",  # Status
    0x0903: "US",  # Error ID
    0x1000: "UI",  # Affected SOP Instance UID
    0x1001: "UI",  # Requested SOP Instance UID
    0x1002: "US",  # Event Type ID
    0x1008: "US",  # Action Type ID
    0x1020: "US",  # Number of Remaining Sub-operations
    0x1021: "US",  # Number of Completed Sub-operations
    0x1022: "US",  # Number of Failed Sub-operations
    0x1023: "US",  # Number of Warning Sub-operations
    0x1030: "AE",  # Move Originator Application Entity Title
    0x1031: "US",  # Move Originator Message ID
}
# Values pydicom would accept without a validation warning (PS3.5 §9.1, Table 6.2-1), so that
# skipping its validation changes nothing: UIDs of digits and dots up to 64 characters, AE titles
# of printable ASCII without backslash up to 16. Anything else goes to pydicom.
_UID_OK = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*").fullmatch
_AE_OK = re.compile(r"[ -\[\]-~]{0,16}").fullmatch


def decode_command_set(data: bytes) -> Any | None:
    """Decode a DIMSE command set (Implicit VR Little Endian, group 0000) without pydicom's reader.

    Parameters
    ----------
    data : bytes
        The encoded command set, as reassembled from the command fragments of P-DATA.

    Returns
    -------
    pydicom.dataset.Dataset or None
        A Dataset whose elements (tag, VR, value) equal what
        ``pynetdicom.dsutils.decode(BytesIO(data), True, True)`` gives once its raw elements are
        converted; ``None`` when ``data`` holds anything this decoder leaves to pydicom (a tag
        not in :data:`_COMMAND_VRS`, empty or multiple values, a UID or AE title pydicom would
        warn about, non-ASCII text, tags out of order, a truncated element).
    """
    mode = settings.reading_validation_mode  # what pydicom gives the elements it converts
    elements: dict[BaseTag, DataElement | RawDataElement] = {}
    n = len(data)
    pos = 0
    last = -1
    try:
        while pos < n:
            group, element, length = _TAG_LEN(data, pos)
            start = pos + 8
            pos = start + length
            vr = _COMMAND_VRS.get(element) if group == 0 else None
            if vr is None or pos > n or element <= last:
                return None
            last = element
            raw = data[start:pos]
            value: Any
            if vr == "US":
                if length != 2:
                    return None
                (value,) = _U16(raw)
            elif vr == "UL":
                if length != 4:
                    return None
                (value,) = _U32(raw)
            else:
                text = raw.decode("ascii")
                if vr == "UI":
                    text = text.rstrip("\0 ")
                    if len(text) > 64 or not _UID_OK(text):
                        return None
                    value = UID(text, validation_mode=IGNORE)  # checked just above
                else:  # AE: leading and trailing spaces are not significant
                    if not _AE_OK(text):
                        return None
                    value = text.strip()
                    if not value:
                        return None
            tag = BaseTag(element)
            elements[tag] = DataElement(tag, vr, value, already_converted=True, validation_mode=mode)
    except (struct.error, UnicodeDecodeError):
        return None
    # As pydicom's read_dataset builds it: Dataset(dict of tag -> element) + original encoding.
    ds = Dataset(elements)
    ds.set_original_encoding(True, True, default_encoding)
    return ds


def _fast_decode(original: Any) -> Any:
    def decode(fp: Any, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False) -> Any:
        if is_implicit_vr and is_little_endian and not deflated:
            ds = decode_command_set(fp.getvalue())
            if ds is not None:
                return ds
        return original(fp, is_implicit_vr, is_little_endian, deflated)

    decode.original = original  # type: ignore[attr-defined]
    return decode


def fast_command_decoding(enabled: bool = True) -> None:
    """Use :func:`decode_command_set` for the command sets pynetdicom receives (idempotent).

    Replaces the ``decode`` name that ``pynetdicom.dimse_messages`` imported from
    ``pynetdicom.dsutils`` (used there only in ``DIMSEMessage.decode_msg`` for the command set);
    ``enabled=False`` restores it.
    """
    import pynetdicom.dimse_messages as dm

    current = dm.decode
    original = getattr(current, "original", current)
    dm.decode = _fast_decode(original) if enabled else original  # type: ignore[attr-defined]


# -- C-STORE-RSP ------------------------------------------------------------------------------

# (keyword, tag, VR) of the C-STORE-RSP command elements copied from the primitive when set
# (PS3.7 §9.3.1.2, Table 9.3-2), in pynetdicom's _COMMAND_SET_KEYWORDS["C-STORE-RSP"] order.
_STORE_RSP_FIELDS = (
    ("AffectedSOPClassUID", 0x00000002, "UI"),
    ("MessageIDBeingRespondedTo", 0x00000120, "US"),
    ("Status", 0x00000900, "US"),
    ("AffectedSOPInstanceUID", 0x00001000, "UI"),
)
_CGL, _CF, _CDST = BaseTag(0x00000000), BaseTag(0x00000100), BaseTag(0x00000800)


def _store_response_class() -> type[Any]:
    """A ``C_STORE_RSP`` message class whose command set is built without pydicom's keyword
    machinery for the usual responses (status, UIDs, message id); anything else (an Error
    Comment, an Offending Element, a dataset path) takes pynetdicom's own code."""
    import pynetdicom.dimse_messages as dm
    from pynetdicom.dimse_primitives import C_STORE

    base_init = dm.DIMSEMessage.__init__

    class C_STORE_RSP(dm.C_STORE_RSP):  # the same name: pynetdicom looks messages up by class name
        __doc__ = dm.C_STORE_RSP.__doc__

        def __init__(self) -> None:
            # DIMSEMessage.__init__ minus the None-valued elements it adds per keyword; they
            # are added (or dropped) by primitive_to_message.
            self.context_id: int | None = None
            self.encoded_command_set = BytesIO()
            self.data_set: BytesIO | None = BytesIO()
            self.command_set = Dataset()
            self._data_set_path = None
            self._data_set_file = None

        def primitive_to_message(self, primitive: Any) -> None:
            if (
                type(primitive) is not C_STORE
                or primitive.ErrorComment is not None
                or primitive.OffendingElement is not None
                or getattr(primitive, "_dataset_path", None)
            ):
                base_init(self)  # pynetdicom's message, exactly
                super().primitive_to_message(primitive)
                return
            ds = self.command_set
            for keyword, tag, vr in _STORE_RSP_FIELDS:
                value = getattr(primitive, keyword)
                if value is not None:
                    # what Dataset.__setattr__ + ``elem.value = value`` produce; values that
                    # pydicom would neither change nor warn about skip its conversion
                    done = (
                        (type(value) is int and 0 <= value <= 0xFFFF)
                        if vr == "US"
                        else (type(value) is UID and len(value) <= 64 and _UID_OK(value) is not None)
                    )
                    ds._dict[BaseTag(tag)] = DataElement(BaseTag(tag), vr, value, already_converted=done)
            ds._dict[_CF] = DataElement(_CF, "US", 0x8001)
            ds._dict[_CDST] = DataElement(_CDST, "US", 0x0101)
            self.data_set = BytesIO()
            self._data_set_path = None
            ds._dict[_CGL] = DataElement(_CGL, "UL", len(cast(bytes, dm.encode(ds, True, True))))

    C_STORE_RSP.__qualname__ = "C_STORE_RSP"
    C_STORE_RSP.__module__ = dm.__name__
    return C_STORE_RSP


_FAST_STORE_RSP: type[Any] | None = None


def fast_store_response(enabled: bool = True) -> None:
    """Build C-STORE-RSP messages with :func:`_store_response_class` in this process (idempotent).

    Swaps the entry for ``C_STORE`` in ``pynetdicom.dimse._RSP_TO_MESSAGE`` (the table
    ``DIMSEServiceProvider.send_msg`` uses to pick the message class of a response);
    ``enabled=False`` restores pynetdicom's ``C_STORE_RSP``.
    """
    global _FAST_STORE_RSP
    import pynetdicom.dimse_messages as dm
    from pynetdicom import dimse
    from pynetdicom.dimse_primitives import C_STORE

    if enabled:
        if _FAST_STORE_RSP is None:
            _FAST_STORE_RSP = _store_response_class()
        dimse._RSP_TO_MESSAGE[C_STORE] = _FAST_STORE_RSP
    else:
        dimse._RSP_TO_MESSAGE[C_STORE] = dm.C_STORE_RSP
