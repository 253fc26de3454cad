"""PS3.15 Annex E Basic Application Level Confidentiality Profile on a pydicom dataset.

The attribute table is dicom-anonymizer's (KitwareMedical), generated from PS3.15 Table E.1-1
for DICOM 2026c: each tag, or repeating-group mask, with its action code (D, Z, X, U, Z/D,
X/Z, X/D, X/Z/D, X/Z/U*). Its per-element actions pick the dummy or empty value that fits the
VR. Two things of the library are not used, and are done here instead:

- UIDs (action U, and any UID an action replaces) become a keyed hash, not a random UID
  kept in a process-wide dictionary: HMAC-SHA256 of the UID under the key, as a ``2.25.``
  UID (PS3.5 B.2). The same UID maps to the same new one on every run, machine and series
  (a study's series keep one new Study Instance UID; references inside sequences still
  point at the new UIDs), and nobody without the key can map one to the other.
- Sequences: the library applies its table at the top level only, and fills or empties
  every element of a sequence it acts on (Referenced SOP Class UIDs included). Here the
  table applies at every nesting level; a sequence marked X is removed, Z (also when X/Z or
  X/Z/D allows it) becomes zero items, U* keeps its items with the table applied inside
  (their instance UIDs hashed), and D or X/D keeps its items with the table applied inside
  and every other value replaced by a dummy (class and coding-scheme UIDs name no one and
  stay).

Private elements are removed at every level (E.1.1: the Basic Profile keeps none). An overlay
whose Overlay Data (60xx,3000) the table removes loses its whole group, since an overlay
without data is not valid (PS3.3 C.9.2, Overlay Data is Type 1).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache

from dicomanonymizer import simpledicomanonymizer as library
from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

__all__ = [
    "PROFILE_TABLE",
    "PROFILE_NAME",
    "METHOD",
    "ProfileTable",
    "profile_table",
    "hashed_uid",
    "Deidentifier",
    "mark_deidentified",
]

PROFILE_TABLE = "dicomfields_2026c"
"""dicom-anonymizer's table of PS3.15 Table E.1-1 (DICOM 2026c), the newest it ships."""

PROFILE_NAME = "Basic Application Level Confidentiality Profile"

METHOD = "PS3.15 E.1.1 Basic Profile (dcmflow deid); UIDs HMAC-SHA256 2.25"
"""De-identification Method (0012,0063), LO: at most 64 characters."""

_CATEGORY_CODES = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}
"""The library's categories and the Table E.1-1 action code each stands for (PS3.15 E.1.1)."""

_LEAF_ACTIONS: Mapping[str, Callable[[Dataset, tuple[int, int]], None]] = {
    "D": library.replace,
    "Z": library.empty,
    "X": library.delete,
    "U": library.replace,
    "Z/D": library.empty_or_replace,
    "X/Z": library.delete_or_empty,
    "X/D": library.delete_or_replace,
    "X/Z/D": library.delete_or_empty_or_replace,
    "X/Z/U*": library.delete_or_empty_or_replace_UID,
}
"""dicom-anonymizer's action for each code on a non-UID, non-sequence element."""

_UID_ROOT = "2.25."
"""PS3.5 B.2: a UID under 2.25 is the decimal form of a 128-bit number."""

_OVERLAY_DATA = 0x3000


@dataclass(frozen=True)
class ProfileTable:
    """The Basic Profile's action codes: exact tags, and repeating-group masks such as Curve
    Data (50xx,xxxx) as ``(group, element, group_mask, element_mask, code)``."""

    exact: Mapping[tuple[int, int], str]
    masks: tuple[tuple[int, int, int, int, str], ...]

    def action(self, tag: int) -> str | None:
        """The action code for ``tag``, or ``None``: the profile keeps it."""
        group, element = tag >> 16, tag & 0xFFFF
        code = self.exact.get((group, element))
        if code is not None:
            return code
        for g, e, gmask, emask, masked in self.masks:
            if group & gmask == g & gmask and element & emask == e & emask:
                return masked
        return None


@cache
def profile_table(table: str = PROFILE_TABLE) -> ProfileTable:
    """The Basic Profile from dicom-anonymizer's table ``table``.

    Categories are read in the library's own order, so a tag listed twice gets the action
    the library would give it.
    """
    tables = dicom_anonymization_database_selector(table)
    exact: dict[tuple[int, int], str] = {}
    masks: list[tuple[int, int, int, int, str]] = []
    for category, code in _CATEGORY_CODES.items():
        for tag in tables[category]:
            if len(tag) == 4:
                masks.append((tag[0], tag[1], tag[2], tag[3], code))
            else:
                exact[(tag[0], tag[1])] = code
    return ProfileTable(exact=exact, masks=tuple(masks))


def hashed_uid(uid: str, key: bytes) -> str:
    """``2.25.<decimal>`` of the first 128 bits of HMAC-SHA256(key, uid): at most 44 characters.

    Deterministic for one key, unlinkable without it; 128 bits is what PS3.5 B.2 allows under
    2.25 and what a UUID carries, so collisions are as unlikely as between UUIDs.
    """
    digest = hmac.new(key, uid.strip().rstrip("\0").encode("ascii", "replace"), hashlib.sha256).digest()
    return _UID_ROOT + str(int.from_bytes(digest[:16], "big"))


@dataclass
class Deidentifier:
    """Applies the Basic Profile to datasets, hashing UIDs with ``key``; counts what it did.

    Parameters
    ----------
    key
        The HMAC key (``DCMFLOW_DEID_KEY``): the same key gives the same new UIDs.
    table
        The action codes; the Basic Profile by default.
    """

    key: bytes = field(repr=False)
    table: ProfileTable = field(default_factory=profile_table)
    counts: dict[str, int] = field(default_factory=lambda: {"removed": 0, "emptied": 0, "replaced": 0, "uids": 0, "private": 0})

    def uid(self, value: str) -> str:
        """The new UID for ``value`` (empty stays empty)."""
        return hashed_uid(value, self.key) if str(value).strip() else value

    def apply(self, ds: Dataset) -> None:
        """De-identify ``ds`` in place: private elements, then the table at every level.

        The file meta (group 0002) is not touched: a writer builds a new one from the result.
        """
        private = sum(1 for elem in ds.iterall() if elem.tag.is_private)
        ds.remove_private_tags()
        self.counts["private"] += private
        self._dataset(ds)

    def _dataset(self, ds: Dataset) -> None:
        for tag in list(ds.keys()):
            if tag not in ds:  # gone with its overlay group
                continue
            elem = ds[tag]
            code = self.table.action(tag)
            if elem.VR == "SQ":
                self._sequence(ds, elem, code)
            elif code is not None:
                self._leaf(ds, elem, code)

    def _sequence(self, ds: Dataset, elem: DataElement, code: str | None) -> None:
        if code == "X":
            del ds[elem.tag]
            self.counts["removed"] += 1
            return
        if code is not None and code != "X/Z/U*" and "Z" in code.split("/"):
            if elem.value:
                self.counts["emptied"] += 1
            elem.value = Sequence()
            return
        for item in elem.value:  # kept (no action, or U*: its instance UIDs hashed) or D
            self._dataset(item)
            if code is not None and code != "X/Z/U*":  # D, X/D: every value left becomes a dummy
                self._dummy(item)

    def _leaf(self, ds: Dataset, elem: DataElement, code: str) -> None:
        tag = elem.tag
        if elem.VR == "UI" and code not in ("X", "Z", "X/Z"):
            if elem.VM > 1:
                elem.value = [self.uid(v) for v in elem.value]
            else:
                elem.value = self.uid(elem.value)
            self.counts["uids"] += 1
            return
        if code == "X" and tag.group & 0xFF00 == 0x6000 and tag.element == _OVERLAY_DATA:
            self._remove_group(ds, tag)
            return
        had_value = not elem.is_empty
        try:
            _LEAF_ACTIONS[code](ds, (tag.group, tag.element))
        except NotImplementedError:  # a VR the library has no dummy for (AT, OW, OF…): remove it
            del ds[tag]
        if tag not in ds:
            self.counts["removed"] += 1
        elif had_value:
            self.counts["emptied" if ds[tag].is_empty else "replaced"] += 1

    def _remove_group(self, ds: Dataset, tag: BaseTag) -> None:
        for other in [t for t in ds.keys() if t.group == tag.group]:
            del ds[other]
            self.counts["removed"] += 1

    def _dummy(self, ds: Dataset) -> None:
        """Replace every non-empty value left in ``ds`` by a dummy of its VR (UIDs are kept:
        instance UIDs were hashed by the table, class and coding-scheme UIDs name no one)."""
        for tag in list(ds.keys()):
            elem = ds[tag]
            if elem.VR == "SQ":
                for item in elem.value:
                    self._dummy(item)
            elif elem.VR != "UI" and not elem.is_empty:
                try:
                    library.replace(ds, (tag.group, tag.element))
                    self.counts["replaced"] += 1
                except NotImplementedError:
                    del ds[tag]
                    self.counts["removed"] += 1


def mark_deidentified(ds: Dataset) -> None:
    """Record the de-identification as PS3.15 E.1.1 asks (PS3.3 C.7.1.1 Patient Module).

    Patient Identity Removed YES, De-identification Method, and its Code Sequence with
    (113100, DCM, "Basic Application Confidentiality Profile") from CID 7050. Dates were
    replaced by dummies, so Longitudinal Temporal Information Modified (0028,0303) is
    REMOVED (PS3.3 C.12.1).
    """
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = METHOD
    code = Dataset()
    code.CodeValue = "113100"
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    ds.DeidentificationMethodCodeSequence = Sequence([code])
    ds.LongitudinalTemporalInformationModified = "REMOVED"
