"""Exceptions raised by :mod:`receiver`.

::

    ReceiverError                 base of everything below; the CLI catches this
    ├── SpoolError                the spool folder cannot be used (missing, not writable, locked)
    │   ├── SpoolLockedError      another receiver holds the spool's lock file
    │   └── SpoolFullError        free space under the spool is below the watermark
    ├── InvalidInstanceError      a received dataset is unusable (no/invalid UIDs, does not parse)
    └── ConfigError               receiver configuration is inconsistent (TLS files, networks)

Storage errors (:class:`storage.errors.StorageError`) pass through unchanged: ingest catches
:class:`~storage.errors.ObjectStoreUnavailableError` and :class:`~storage.errors.RecordError`
itself and retries, so they only reach a caller when a store is misconfigured.
"""

from __future__ import annotations

__all__ = [
    "ReceiverError",
    "SpoolError",
    "SpoolLockedError",
    "SpoolFullError",
    "InvalidInstanceError",
    "ConfigError",
]


class ReceiverError(Exception):
    """Base class of all receiver errors."""


class SpoolError(ReceiverError):
    """The spool folder cannot be used."""


class SpoolLockedError(SpoolError):
    """Another receiver process holds the spool lock (one receiver per spool folder)."""


class SpoolFullError(SpoolError):
    """Free space under the spool is below the configured watermark; nothing was written."""


class InvalidInstanceError(ReceiverError, ValueError):
    """A dataset cannot be accepted.

    Attributes
    ----------
    status : int
        The DIMSE failure status to answer with (see :mod:`receiver.status`).
    """

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class ConfigError(ReceiverError, ValueError):
    """The receiver configuration is inconsistent (bad TLS files, bad network list)."""
