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

Cost of the short polls: an idle, open association polls ~10× more often (two threads waking every 0.1 ms use
a few % of a core); connections that are not associated yet and a receiver with no association
do not poll. Set ``ScpConfig.reactor_delay=None`` to keep pynetdicom's behaviour.
"""

from __future__ import annotations

import time as _time
import struct
from types import ModuleType
from typing import Any

__all__ = [
    "DEFAULT_REACTOR_DELAY",
    "shorten_reactor_sleeps",
    "restore_reactor_sleeps",
    "set_pynetdicom_event_logging",
    "fast_command_encoding",
    "encode_command_set",
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
