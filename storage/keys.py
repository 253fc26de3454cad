"""Validated UIDs and the object keys built from them.

Object keys are built only from values that pass these checks, never from a path that came
over the wire, so no ``..``, slash or control character can reach the object store or a file
name.
"""

from __future__ import annotations

import re

from storage.errors import InvalidKeyError

__all__ = [
    "is_valid_uid",
    "validate_uid",
    "is_valid_name",
    "validate_name",
    "validate_key",
    "instance_key",
    "instance_version_key",
    "series_prefix",
    "study_prefix",
]

# PS3.5 §9.1: a UID is dot-separated numeric components, at most 64 characters. The
# standard also forbids leading zeros in a component (except "0" itself); many real
# devices break that rule, so we accept them: they are still safe in a key.
_RE_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UID_MAX_LEN = 64

# Names we build keys from ourselves (service names, session file names, hashes):
# letters, digits, and . _ - with no leading dot.
_RE_NAME = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,127}$")

# A whole key: slash-separated names, no empty, '.' or '..' segments.
_KEY_MAX_LEN = 1024


def is_valid_uid(value: object) -> bool:
    """True when ``value`` is a DICOM UID (PS3.5 §9.1 grammar, ≤ 64 chars)."""
    return isinstance(value, str) and len(value) <= _UID_MAX_LEN and bool(_RE_UID.fullmatch(value))


def validate_uid(value: object, what: str = "UID") -> str:
    """Return ``value`` if it is a valid UID.

    Raises
    ------
    InvalidKeyError
        If it is not; the message names ``what`` and shows the offending value.
    """
    if not is_valid_uid(value):
        raise InvalidKeyError(f"invalid {what}: {value!r} (expected digits and dots, at most 64 characters)")
    return value  # type: ignore[return-value]


def is_valid_name(value: object) -> bool:
    """True when ``value`` is a safe single key segment (letters, digits, ``._-``)."""
    return isinstance(value, str) and bool(_RE_NAME.fullmatch(value)) and value not in {".", ".."}


def validate_name(value: object, what: str = "name") -> str:
    """Return ``value`` if it is a safe key segment, else raise :class:`InvalidKeyError`."""
    if not is_valid_name(value):
        raise InvalidKeyError(
            f"invalid {what}: {value!r} (letters, digits, '.', '_' and '-' only, not starting with '.')"
        )
    return value  # type: ignore[return-value]


def validate_key(key: object) -> str:
    """Return ``key`` if every ``/``-separated segment is a safe name, else raise."""
    if not isinstance(key, str) or not key or len(key) > _KEY_MAX_LEN:
        raise InvalidKeyError(f"invalid object key: {key!r}")
    for segment in key.split("/"):
        if not is_valid_name(segment):
            raise InvalidKeyError(f"invalid object key: {key!r} (bad segment {segment!r})")
    return key


def study_prefix(study_uid: str) -> str:
    """Key prefix of everything stored for one study."""
    return f"instances/{validate_uid(study_uid, 'Study Instance UID')}/"


def series_prefix(study_uid: str, series_uid: str) -> str:
    """Key prefix of the instances of one series."""
    return f"{study_prefix(study_uid)}{validate_uid(series_uid, 'Series Instance UID')}/"


def instance_key(study_uid: str, series_uid: str, sop_uid: str) -> str:
    """Immutable key of an instance: ``instances/{study}/{series}/{sop}.dcm`` (DESIGN.md)."""
    return f"{series_prefix(study_uid, series_uid)}{validate_uid(sop_uid, 'SOP Instance UID')}.dcm"


def instance_version_key(study_uid: str, series_uid: str, sop_uid: str, content_hash: str) -> str:
    """Key of a later, different version of an instance (same SOP UID, other bytes).

    The first version keeps :func:`instance_key`; later ones live beside it under
    ``{sop}.versions/{hash}.dcm`` so nothing is ever overwritten.
    """
    sop = validate_uid(sop_uid, "SOP Instance UID")
    digest = validate_name(content_hash, "content hash")
    return f"{series_prefix(study_uid, series_uid)}{sop}.versions/{digest}.dcm"
