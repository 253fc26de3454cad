"""Two settings of pynetdicom for the receiver process: shorter reactor polls, no per-message logs.

Since :mod:`receiver.transfer` runs the data phase of every association itself, pynetdicom's
reactors only run while an association is negotiated (and for the whole association when
``ScpConfig.fast_transfer`` is off). pynetdicom 3.0 runs two polling loops per association
(storage_perf.md §4):

* the DUL reactor (``pynetdicom/dul.py``, ``DULServiceProvider.run_reactor``) sleeps
  ``_run_loop_delay = 0.001`` s whenever its previous pass found nothing to do;
* the association reactor (``pynetdicom/association.py``, ``Association._run_reactor``) sleeps
  ``time.sleep(0.001)`` at the top of every pass before looking for a complete DIMSE message.

Neither loop has a setting for it, so :func:`shorten_reactor_sleeps` replaces the ``time``
module those two pynetdicom modules see with a proxy whose ``sleep`` turns exactly those 1 ms
polls into ``delay``; every other sleep (timeouts, shutdown waits) is unchanged. With
pynetdicom's own data phase this took 64×64 images from ~200 to ~500 instances/s on one
association (measured on a faster machine than today's); an idle, open association then polls
~10× more often (a few % of a core). ``ScpConfig.reactor_delay=None`` keeps pynetdicom's 1 ms.

:func:`set_pynetdicom_event_logging` flips pynetdicom's documented switch
``_config.LOG_HANDLER_LEVEL`` (``"standard"`` → ``"none"``): its built-in handlers format a log
record for every PDU and DIMSE message, under the AE-wide lock, even when the logger's level
drops them. The receiver logs its own line per association instead.

:func:`set_pydicom_uid_validation` turns off pydicom's reading validation
(``pydicom.config.settings.reading_validation_mode``, public and process-wide, so it is called
only in receiving processes, which run the SCP alone: :mod:`receiver.processes`). pynetdicom builds a
``pydicom.uid.UID`` for every abstract and transfer syntax of an A-ASSOCIATE-RQ, and each one
runs pydicom's regular-expression check (which only warns); pynetdicom then checks every UID
again with its own validator, which rejects what is invalid. DCMTK ``storescu`` proposes 128
presentation contexts: sampled by py-spy (``--gil``) pydicom's check was 25 % of the CPU an
association costs the receiver, and decoding the request took 13.2 → 8.6 ms without it; CPU
of the receiver's process tree per association of one instance sent by storescu (80 of them,
two A/B pairs): 44.4 and 45.6 ms with it, 33.6 and 33.2 ms without. Ingest (other processes)
parses data sets with its own checks and is not affected.

(Byte-level command-set encoding and decoding and a cheaper C-STORE-RSP class used to be
patched in here as well; :mod:`receiver.transfer` made them unnecessary.)
"""

from __future__ import annotations

import time as _time
from types import ModuleType
from typing import Any

__all__ = [
    "DEFAULT_REACTOR_DELAY",
    "restore_reactor_sleeps",
    "set_pydicom_uid_validation",
    "set_pynetdicom_event_logging",
    "shorten_reactor_sleeps",
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


def set_pydicom_uid_validation(enabled: bool) -> None:
    """Turn pydicom's reading validation (a warning per invalid value) on or off in this process.

    pynetdicom validates association UIDs itself; see the module docstring for the cost.
    """
    from pydicom import config

    config.settings.reading_validation_mode = config.WARN if enabled else config.IGNORE
