"""Exceptions raised by :mod:`storage`.

::

    StorageError                     base of everything below; the CLI catches this
    ├── InvalidKeyError              a UID or object key that fails validation (PS3.5 §9.1)
    ├── ObjectExistsError            put-if-absent found the key already written
    ├── ObjectNotFoundError          get/range/stat of a key that does not exist
    ├── ObjectStoreUnavailableError  the object store cannot be reached (network, auth, disk)
    ├── ObjectRangeError             a ranged read outside the object (also a ValueError)
    ├── ArchiveError                 a series archive is inconsistent (bad index, hash mismatch)
    │   └── ForeignInstanceError     an instance does not belong to the archive's series
    └── RecordError                  a database operation failed or was refused
        └── ClaimConflictError       a row expected to be claimable was taken by someone else
"""

from __future__ import annotations

__all__ = [
    "StorageError",
    "InvalidKeyError",
    "ObjectExistsError",
    "ObjectNotFoundError",
    "ObjectStoreUnavailableError",
    "ObjectRangeError",
    "ArchiveError",
    "ForeignInstanceError",
    "RecordError",
    "ClaimConflictError",
]


class StorageError(Exception):
    """Base class of all storage errors."""


class InvalidKeyError(StorageError, ValueError):
    """A UID, name or object key failed validation; nothing was read or written."""


class ObjectExistsError(StorageError):
    """A conditional write found the key already present."""

    def __init__(self, key: str) -> None:
        super().__init__(f"object already exists: {key}")
        self.key = key


class ObjectNotFoundError(StorageError, KeyError):
    """The requested object does not exist."""

    def __init__(self, key: str) -> None:
        super().__init__(f"no such object: {key}")
        self.key = key

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class ObjectStoreUnavailableError(StorageError):
    """The object store could not be reached or refused our credentials."""


class ObjectRangeError(StorageError, ValueError):
    """A ranged read asked for bytes the object does not have (or a negative range)."""


class ArchiveError(StorageError):
    """A series archive is inconsistent: unreadable index, hash mismatch, orphan part."""


class ForeignInstanceError(ArchiveError, ValueError):
    """An instance was offered to the archive of another study or series; nothing was written."""


class RecordError(StorageError):
    """A database operation failed."""


class ClaimConflictError(RecordError):
    """A row was claimed by another worker first."""
