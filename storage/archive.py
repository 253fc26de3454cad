"""The series archive: a series packed into tar parts plus one small zstd index.

This takes the good ideas of Cloud Optimized DICOM (storage_perf.md §1) and leaves out its
costly one. Kept: the original P10 bytes stay unchanged inside a plain tar; byte offsets make
one instance readable with one ranged GET; metadata requests are served from a compressed
JSON document without touching a tar; duplicates are recognised by SOP UID + SHA-256.
Dropped: COD's append, which downloads the whole series tar, appends locally and re-uploads
it (O(series) per write). Here an append writes a **new** part holding only the new
instances and rewrites only the index; existing parts are never read.

Layout (all keys built from validated UIDs)::

    archives/{study}/{series}/part-0000.tar     first batch of instances
    archives/{study}/{series}/part-0001.tar     a later append, and so on
    archives/{study}/{series}/index.json.zst    one zstd frame: the JSON index of the series

Tar members are ``{sop}.dcm``, written with :class:`tarfile.TarInfo` + ``addfile`` in ustar
format with an integer mtime, so each member has one plain 512-byte header (no PAX header,
which ``tar.add`` of a real file would add because of its float mtime; storage_perf.md §1.5).
Any ``tar`` can unpack a part.

Index entries give ``offset`` (first byte of the P10 file inside the part, 0-based) and
``length`` (the exact number of bytes): ``store.get_range(part_key, offset, length)`` is the
original file byte-for-byte, preamble included. ``length`` is a count, not an end position,
so COD's inclusive/exclusive ``end_byte`` ambiguity cannot arise. ``size`` is the size of the
original file; it equals ``length`` for these uncompressed parts and is kept so the index
describes the instance on its own.

Per-instance ``metadata`` is the DICOM JSON Model (PS3.18 §F.2) of the header, read with
``stop_before_pixels=True``. Binary values over :data:`BULK_DATA_THRESHOLD` bytes and the
pixel data are not inlined: they become ``BulkDataURI`` (PS3.18 §F.2.6) values of the form
``archives/{study}/{series}/part-NNNN.tar?offset=O&length=L`` pointing at the value bytes
inside the part; :func:`read_bulk_data` resolves them with one ranged GET. ``file_meta`` is
the DICOM JSON of the PS3.10 §7.1 File Meta Information (group 0002), so
:func:`instance_header` rebuilds exactly the header ``dcmread(stop_before_pixels=True)``
gives, file meta included, from the index alone (indexes written before it was added lack
it; :func:`instance_header` then says so).

Reading a whole series: :func:`read_part_instances` streams one part with one GET and
returns the requested instances, each checked against its SHA-256; a part that is missing
or does not match the index raises :class:`~storage.errors.ArchiveError`, never wrong bytes.

Concurrency: parts are created with ``put_if_absent``, so two appends racing for the same
series cannot overwrite each other's part; the loser gets
:class:`~storage.errors.ObjectExistsError` and should re-read the index and retry. The index
itself is replaced with a plain ``put``; callers serialise appends per series (a database row
lock, DESIGN.md "no home-made lock service"). A crash between writing a part and the index
leaves an orphan part that is not in the index; the next append to take that part number
fails loudly instead of guessing, and the orphan can be deleted.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import pydicom
import zstandard
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError

from storage.errors import (
    ArchiveError,
    ForeignInstanceError,
    InvalidKeyError,
    ObjectExistsError,
    ObjectNotFoundError,
)
from storage.keys import validate_key, validate_uid
from storage.objects import ObjectStore

__all__ = [
    "ArchivedInstance",
    "ArchivePart",
    "SeriesIndex",
    "BULK_DATA_THRESHOLD",
    "INDEX_ZSTD_LEVEL",
    "MAX_PART_BYTES",
    "archive_prefix",
    "part_key",
    "index_key",
    "pack_series",
    "append_instances",
    "read_series_index",
    "read_instance",
    "read_part_instances",
    "instance_header",
    "list_metadata",
    "read_bulk_data",
    "parse_bulk_data_uri",
]

FORMAT = "dcmflow-series-archive"
FORMAT_VERSION = 1

BULK_DATA_THRESHOLD = 1024
"""Binary values (OB, OW, OF, OD, OL, OV, UN) longer than this many bytes become a
``BulkDataURI`` instead of ``InlineBinary``; pydicom's default, small enough that a private
2 KiB histogram does not bloat the index."""

INDEX_ZSTD_LEVEL = 3
"""zstd level of the index. One frame over the whole series already finds the cross-instance
redundancy (storage_perf.md §3.3); higher levels add little and cost an index rewrite per
append. ``bench/storage_bench.py`` prints the figures."""

MAX_PART_BYTES = 256 * 1024 * 1024
"""A batch larger than this is split into several parts. A conditional PUT is one request, so
on S3 a part is held in memory once while it is uploaded; this bounds that memory."""

_INDEX_NAME = "index.json.zst"
_STREAM_CHUNK = 1024 * 1024
_URI_RE = re.compile(r"^(?P<key>[^?#]+)\?offset=(?P<offset>\d+)&length=(?P<length>\d+)$")
_PIXEL_TAGS = {0x7FE00010: "PixelData", 0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData"}
_PIXEL_VR_DEFAULT = {0x7FE00010: "OW", 0x7FE00008: "OF", 0x7FE00009: "OD"}
_LONG_HEADER_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_DEFLATED = {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1"}  # PS3.5 §A.5 (values are deflated)
_UNDEFINED_LENGTH = 0xFFFFFFFF

Instance = bytes | tuple[str, bytes]
"""What the writers accept: P10 bytes, or ``(sop_uid, bytes)`` when the caller already knows
the SOP Instance UID (it is then checked against the file)."""


# -- index model ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchivedInstance:
    """Where one instance lives in the archive, and its header.

    Attributes
    ----------
    sop_uid : str
        SOP Instance UID (0008,0018).
    part : int
        Number of the part tar holding it.
    offset : int
        First byte of the P10 file inside the part (0-based).
    length : int
        Exact number of bytes to read at ``offset``.
    sha256 : str
        Hex SHA-256 of the P10 bytes.
    size : int
        Size of the original file (equals ``length`` in uncompressed parts).
    transfer_syntax : str
        Transfer Syntax UID (0002,0010).
    sop_class : str
        SOP Class UID (0008,0016).
    metadata : dict
        DICOM JSON (PS3.18 §F.2) of the header, bulk data as ``BulkDataURI``.
    file_meta : dict or None
        DICOM JSON of the File Meta Information (PS3.10 §7.1); ``None`` in older indexes.
    """

    sop_uid: str
    part: int
    offset: int
    length: int
    sha256: str
    size: int
    transfer_syntax: str
    sop_class: str
    metadata: dict[str, Any] = field(repr=False, compare=False)
    file_meta: dict[str, Any] | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class ArchivePart:
    """One part tar: its number, size, SHA-256 and instance count."""

    number: int
    size: int
    sha256: str
    count: int


@dataclass(frozen=True)
class SeriesIndex:
    """The decoded ``index.json.zst`` of one series.

    ``instances`` is in archive order. The same SOP UID appears more than once only when
    different bytes were archived under it later (a new version, never an overwrite; DESIGN.md
    "Object keys"); :meth:`find` returns the newest unless a hash is given.
    """

    study_uid: str
    series_uid: str
    parts: tuple[ArchivePart, ...]
    instances: tuple[ArchivedInstance, ...]

    def part_key(self, number: int) -> str:
        """Object key of part ``number`` of this series."""
        return part_key(self.study_uid, self.series_uid, number)

    def find(self, sop_uid: str, sha256: str | None = None) -> ArchivedInstance:
        """Return the newest entry for ``sop_uid`` (or the one with ``sha256``).

        Raises
        ------
        ObjectNotFoundError
            If the series has no such instance.
        """
        for entry in reversed(self.instances):
            if entry.sop_uid == sop_uid and (sha256 is None or entry.sha256 == sha256):
                return entry
        raise ObjectNotFoundError(f"{archive_prefix(self.study_uid, self.series_uid)}{sop_uid}.dcm")

    def latest(self) -> list[ArchivedInstance]:
        """One entry per SOP UID (the newest version), in order of first appearance."""
        newest: dict[str, ArchivedInstance] = {}
        for entry in self.instances:
            newest[entry.sop_uid] = entry
        order = dict.fromkeys(e.sop_uid for e in self.instances)
        return [newest[sop] for sop in order]

    def to_document(self) -> dict[str, Any]:
        """The JSON document stored (zstd-compressed) as ``index.json.zst``."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "parts": [
                {"part": p.number, "key": _part_name(p.number), "size": p.size, "sha256": p.sha256, "count": p.count}
                for p in self.parts
            ],
            "instances": [
                {
                    "sop_uid": e.sop_uid,
                    "part": e.part,
                    "offset": e.offset,
                    "length": e.length,
                    "sha256": e.sha256,
                    "size": e.size,
                    "transfer_syntax": e.transfer_syntax,
                    "sop_class": e.sop_class,
                    "metadata": e.metadata,
                    **({"file_meta": e.file_meta} if e.file_meta is not None else {}),
                }
                for e in self.instances
            ],
        }

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> SeriesIndex:
        """Rebuild an index from its JSON document.

        Raises
        ------
        ArchiveError
            If the document is not a version-1 series archive index.
        """
        try:
            if doc.get("format") != FORMAT or doc.get("version") != FORMAT_VERSION:
                raise ArchiveError(f"not a {FORMAT} v{FORMAT_VERSION} index: {doc.get('format')!r} {doc.get('version')!r}")
            return cls(
                study_uid=validate_uid(doc["study_uid"], "Study Instance UID"),
                series_uid=validate_uid(doc["series_uid"], "Series Instance UID"),
                parts=tuple(ArchivePart(p["part"], p["size"], p["sha256"], p["count"]) for p in doc["parts"]),
                instances=tuple(
                    ArchivedInstance(
                        sop_uid=e["sop_uid"],
                        part=e["part"],
                        offset=e["offset"],
                        length=e["length"],
                        sha256=e["sha256"],
                        size=e["size"],
                        transfer_syntax=e["transfer_syntax"],
                        sop_class=e["sop_class"],
                        metadata=e["metadata"],
                        file_meta=e.get("file_meta"),
                    )
                    for e in doc["instances"]
                ),
            )
        except (KeyError, TypeError, AttributeError, InvalidKeyError) as exc:
            raise ArchiveError(f"malformed series archive index: {exc!r}") from exc


# -- keys -------------------------------------------------------------------------------------


def archive_prefix(study_uid: str, series_uid: str) -> str:
    """``archives/{study}/{series}/`` with both UIDs validated (InvalidKeyError otherwise)."""
    study = validate_uid(study_uid, "Study Instance UID")
    series = validate_uid(series_uid, "Series Instance UID")
    return f"archives/{study}/{series}/"


def _part_name(number: int) -> str:
    if not isinstance(number, int) or number < 0:
        raise InvalidKeyError(f"invalid part number: {number!r}")
    return f"part-{number:04d}.tar"


def part_key(study_uid: str, series_uid: str, number: int) -> str:
    """Key of part ``number``: ``archives/{study}/{series}/part-NNNN.tar``."""
    return archive_prefix(study_uid, series_uid) + _part_name(number)


def index_key(study_uid: str, series_uid: str) -> str:
    """Key of the series index: ``archives/{study}/{series}/index.json.zst``."""
    return archive_prefix(study_uid, series_uid) + _INDEX_NAME


def parse_bulk_data_uri(uri: str) -> tuple[str, int, int]:
    """Split one of our ``BulkDataURI`` values into ``(key, offset, length)``.

    Raises
    ------
    InvalidKeyError
        If ``uri`` is not of the form ``{key}?offset=O&length=L`` with a valid key.
    """
    match = _URI_RE.fullmatch(uri) if isinstance(uri, str) else None
    if not match:
        raise InvalidKeyError(f"not a series-archive BulkDataURI: {uri!r}")
    return validate_key(match["key"]), int(match["offset"]), int(match["length"])


def _bulk_uri(key: str, offset: int, length: int) -> str:
    return f"{key}?offset={offset}&length={length}"


# -- writing ----------------------------------------------------------------------------------


@dataclass
class _Parsed:
    sop_uid: str
    data: bytes
    sha256: str
    dataset: pydicom.Dataset
    transfer_syntax: str
    sop_class: str
    pixel: tuple[int, str, int, int] | None  # (tag, vr, value offset in file, value length)


def _pixel_element(data: bytes, tell: int, little: bool, implicit: bool) -> tuple[int, str, int, int] | None:
    """Decode the header of the top-level pixel element where ``dcmread`` stopped.

    ``stop_before_pixels`` leaves the file positioned at the start of the (7FE0,00xx) element
    (pydicom rewinds to the tag); the header is 8 bytes in implicit VR and 8 or 12 in explicit
    VR (PS3.5 §7.1.2). Returns ``(tag, vr, value_offset, value_length)``.
    """
    if tell + 8 > len(data):
        return None
    endian = "<" if little else ">"
    group, elem = struct.unpack_from(f"{endian}HH", data, tell)
    tag = (group << 16) | elem
    if tag not in _PIXEL_TAGS:
        return None
    if implicit:
        vr = _PIXEL_VR_DEFAULT[tag]
        (length,) = struct.unpack_from(f"{endian}I", data, tell + 4)
        start = tell + 8
    else:
        raw_vr = data[tell + 4 : tell + 6]
        vr = raw_vr.decode("ascii", "replace")
        if raw_vr in _LONG_HEADER_VRS:
            (length,) = struct.unpack_from(f"{endian}I", data, tell + 8)
            start = tell + 12
        else:
            (length,) = struct.unpack_from(f"{endian}H", data, tell + 6)
            start = tell + 8
    if length == _UNDEFINED_LENGTH:  # encapsulated: the fragments run to the end of the file
        length = len(data) - start
    return tag, vr, start, min(length, len(data) - start)


def _parse(item: Instance, study_uid: str, series_uid: str) -> _Parsed:
    """Parse and check one offered instance; nothing is written yet."""
    if isinstance(item, tuple):
        sop_hint, data = item
        validate_uid(sop_hint, "SOP Instance UID")
    else:
        sop_hint, data = None, item
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"instance data must be bytes, not {type(data).__name__}")
    data = bytes(data)
    fp = io.BytesIO(data)
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True)
    except (InvalidDicomError, EOFError, ValueError, struct.error) as exc:
        raise ArchiveError(f"not a DICOM Part 10 file ({len(data)} bytes): {exc}") from exc
    tell = fp.tell()
    meta = ds.file_meta
    ts = pydicom.uid.UID(str(meta.get("TransferSyntaxUID", "")))
    if not ts:
        raise ArchiveError("not a DICOM Part 10 file: no Transfer Syntax UID (0002,0010) in the file meta")
    sop_uid = validate_uid(str(ds.get("SOPInstanceUID", "")), "SOP Instance UID")
    if sop_hint is not None and sop_hint != sop_uid:
        raise ArchiveError(f"instance given as {sop_hint} carries SOP Instance UID {sop_uid}")
    got_study = str(ds.get("StudyInstanceUID", ""))
    got_series = str(ds.get("SeriesInstanceUID", ""))
    if got_study != study_uid or got_series != series_uid:
        raise ForeignInstanceError(
            f"instance {sop_uid} belongs to study {got_study or '?'} series {got_series or '?'}, "
            f"not to the archive of study {study_uid} series {series_uid}; nothing was written"
        )
    sop_class = str(ds.get("SOPClassUID", meta.get("MediaStorageSOPClassUID", "")))
    pixel = None
    if tell < len(data) and ts not in _DEFLATED:
        pixel = _pixel_element(data, tell, ts.is_little_endian, ts.is_implicit_VR)
    return _Parsed(sop_uid, data, hashlib.sha256(data).hexdigest(), ds, str(ts), sop_class, pixel)


def _metadata(parsed: _Parsed, key: str, start: int) -> dict[str, Any]:
    """DICOM JSON of the header with bulk values as ``BulkDataURI`` into part ``key``.

    ``DataElement.file_tell`` is the value's offset in the P10 file, so the value sits at
    ``start + file_tell`` in the part. In a deflated transfer syntax file offsets do not exist
    for values, so there the URI names the whole instance.
    """
    deflated = parsed.transfer_syntax in _DEFLATED

    def handler(elem: pydicom.DataElement) -> str:
        value = elem.value
        n = len(value) if isinstance(value, (bytes, bytearray)) else 0
        if deflated or elem.file_tell is None or not n:
            return _bulk_uri(key, start, len(parsed.data))
        return _bulk_uri(key, start + elem.file_tell, n)

    doc = parsed.dataset.to_json_dict(
        bulk_data_threshold=BULK_DATA_THRESHOLD,
        bulk_data_element_handler=handler,
        suppress_invalid_tags=True,
    )
    if parsed.pixel is not None:
        tag, vr, value_start, value_len = parsed.pixel
        doc[f"{tag:08X}"] = {"vr": vr, "BulkDataURI": _bulk_uri(key, start + value_start, value_len)}
    elif deflated and "PixelData" not in parsed.dataset:
        doc["7FE00010"] = {"vr": "OW", "BulkDataURI": _bulk_uri(key, start, len(parsed.data))}
    return doc


def _iter_new(
    instances: Iterable[Instance], study_uid: str, series_uid: str, known: set[tuple[str, str]]
) -> Iterator[_Parsed]:
    """Parse, check and de-duplicate (by SOP UID + SHA-256) the offered instances."""
    single = isinstance(instances, tuple) and len(instances) == 2 and isinstance(instances[0], str)
    if isinstance(instances, (bytes, bytearray)) or single:
        raise TypeError("instances must be an iterable of instances, not a single instance")
    for item in instances:
        parsed = _parse(item, study_uid, series_uid)
        ident = (parsed.sop_uid, parsed.sha256)
        if ident in known:
            continue
        known.add(ident)
        yield parsed


def _write_parts(
    store: ObjectStore,
    study_uid: str,
    series_uid: str,
    first_part: int,
    parsed: list[_Parsed],
    max_part_bytes: int,
) -> tuple[list[ArchivePart], list[ArchivedInstance]]:
    """Write ``parsed`` as parts ``first_part``, ``first_part + 1``, … (each put-if-absent)."""
    parts: list[ArchivePart] = []
    entries: list[ArchivedInstance] = []
    number = first_part
    i = 0
    while i < len(parsed):
        key = part_key(study_uid, series_uid, number)
        batch_entries: list[ArchivedInstance] = []
        with tempfile.SpooledTemporaryFile(max_size=64 * 1024 * 1024) as spool:
            with tarfile.open(fileobj=spool, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                mtime = int(time.time())
                while i < len(parsed):
                    item = parsed[i]
                    if batch_entries and tar.offset + 512 + len(item.data) > max_part_bytes:
                        break
                    info = tarfile.TarInfo(f"{item.sop_uid}.dcm")
                    info.size = len(item.data)
                    info.mtime = mtime
                    info.mode = 0o444
                    header_len = len(info.tobuf(tarfile.USTAR_FORMAT, tar.encoding, tar.errors))
                    start = tar.offset + header_len
                    tar.addfile(info, io.BytesIO(item.data))
                    batch_entries.append(
                        ArchivedInstance(
                            sop_uid=item.sop_uid,
                            part=number,
                            offset=start,
                            length=len(item.data),
                            sha256=item.sha256,
                            size=len(item.data),
                            transfer_syntax=item.transfer_syntax,
                            sop_class=item.sop_class,
                            metadata=_metadata(item, key, start),
                            file_meta=item.dataset.file_meta.to_json_dict(),
                        )
                    )
                    i += 1
            size = spool.tell()
            spool.seek(0)
            result = store.put_if_absent(key, spool, length=size)  # type: ignore[arg-type]
        parts.append(ArchivePart(number, result.size, result.sha256, len(batch_entries)))
        entries.extend(batch_entries)
        number += 1
    return parts, entries


def _write_index(store: ObjectStore, index: SeriesIndex, level: int) -> None:
    body = json.dumps(index.to_document(), separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    frame = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(body)
    store.put(index_key(index.study_uid, index.series_uid), frame, content_type="application/zstd")


def pack_series(
    store: ObjectStore,
    study_uid: str,
    series_uid: str,
    instances: Iterable[Instance],
    *,
    max_part_bytes: int = MAX_PART_BYTES,
    zstd_level: int = INDEX_ZSTD_LEVEL,
) -> SeriesIndex:
    """Create the archive of a series: ``part-0000.tar`` (more if large), then the index.

    Parameters
    ----------
    store : ObjectStore
        Where to write.
    study_uid, series_uid : str
        The series; every instance must carry exactly these UIDs.
    instances : iterable of bytes or (sop_uid, bytes)
        DICOM Part 10 files. Identical repeats (same SOP UID and SHA-256) are stored once.
    max_part_bytes : int
        Split into several parts above this size (see :data:`MAX_PART_BYTES`).
    zstd_level : int
        zstd level of the index.

    Returns
    -------
    SeriesIndex
        The index as written.

    Raises
    ------
    InvalidKeyError
        If a UID is not a valid DICOM UID (PS3.5 §9.1).
    ForeignInstanceError
        If an instance belongs to another study or series; nothing is written.
    ArchiveError
        If an instance is not a Part 10 file; nothing is written.
    ObjectExistsError
        If the series already has an archive (use :func:`append_instances`).
    """
    prefix = archive_prefix(study_uid, series_uid)
    parsed = list(_iter_new(instances, study_uid, series_uid, set()))
    if store.exists(prefix + _INDEX_NAME):
        raise ObjectExistsError(prefix + _INDEX_NAME)
    parts, entries = _write_parts(store, study_uid, series_uid, 0, parsed, max_part_bytes)
    index = SeriesIndex(study_uid, series_uid, tuple(parts), tuple(entries))
    _write_index(store, index, zstd_level)
    return index


def append_instances(
    store: ObjectStore,
    study_uid: str,
    series_uid: str,
    instances: Iterable[Instance],
    *,
    max_part_bytes: int = MAX_PART_BYTES,
    zstd_level: int = INDEX_ZSTD_LEVEL,
) -> SeriesIndex:
    """Add late instances as a new part and rewrite only the index.

    Reads the index (one GET), skips instances already archived with the same SHA-256,
    writes the rest to the next part number with ``put_if_absent`` and replaces the index.
    Existing parts are never read. Different bytes under a SOP UID already archived become a
    new version entry. Creates the archive when the series has none.

    Parameters
    ----------
    store, study_uid, series_uid, instances, max_part_bytes, zstd_level
        As for :func:`pack_series`.

    Returns
    -------
    SeriesIndex
        The new index (unchanged, and not rewritten, when nothing was new).

    Raises
    ------
    ObjectExistsError
        If the next part already exists: a concurrent append won, or an earlier one crashed
        after writing its part. Re-read the index and retry (under the series lock).
    InvalidKeyError, ForeignInstanceError, ArchiveError
        As for :func:`pack_series`; nothing is written.
    """
    archive_prefix(study_uid, series_uid)
    try:
        current = read_series_index(store, study_uid, series_uid)
    except ObjectNotFoundError:
        return pack_series(
            store, study_uid, series_uid, instances, max_part_bytes=max_part_bytes, zstd_level=zstd_level
        )
    known = {(e.sop_uid, e.sha256) for e in current.instances}
    parsed = list(_iter_new(instances, study_uid, series_uid, known))
    if not parsed:
        return current
    next_part = max((p.number for p in current.parts), default=-1) + 1
    parts, entries = _write_parts(store, study_uid, series_uid, next_part, parsed, max_part_bytes)
    index = SeriesIndex(study_uid, series_uid, current.parts + tuple(parts), current.instances + tuple(entries))
    _write_index(store, index, zstd_level)
    return index


# -- reading ----------------------------------------------------------------------------------


def read_series_index(store: ObjectStore, study_uid: str, series_uid: str) -> SeriesIndex:
    """Fetch and decode ``index.json.zst`` (one GET).

    Raises
    ------
    ObjectNotFoundError
        If the series has no archive.
    ArchiveError
        If the index cannot be decoded or describes another series.
    """
    key = index_key(study_uid, series_uid)
    frame = store.get(key)
    try:
        body = zstandard.ZstdDecompressor().decompress(frame)
        doc = json.loads(body)
    except (zstandard.ZstdError, ValueError) as exc:
        raise ArchiveError(f"unreadable series archive index {key}: {exc}") from exc
    index = SeriesIndex.from_document(doc)
    if (index.study_uid, index.series_uid) != (study_uid, series_uid):
        raise ArchiveError(f"index {key} describes study {index.study_uid} series {index.series_uid}")
    return index


def _resolve(store: ObjectStore, index_or_ids: SeriesIndex | tuple[str, str]) -> SeriesIndex:
    if isinstance(index_or_ids, SeriesIndex):
        return index_or_ids
    study_uid, series_uid = index_or_ids
    return read_series_index(store, study_uid, series_uid)


def read_instance(
    store: ObjectStore,
    index_or_ids: SeriesIndex | tuple[str, str],
    sop_uid: str,
    *,
    sha256: str | None = None,
    verify: bool = True,
) -> bytes:
    """Return the P10 bytes of one archived instance with one ranged GET.

    Parameters
    ----------
    store : ObjectStore
        Where the archive lives.
    index_or_ids : SeriesIndex or (study_uid, series_uid)
        An index already read (then exactly one request is made), or the UIDs (one more GET
        for the index).
    sop_uid : str
        SOP Instance UID.
    sha256 : str, optional
        Pick this version; the newest by default.
    verify : bool
        Check the SHA-256 of the bytes read (about 0.5 ms per 512 KiB).

    Raises
    ------
    ObjectNotFoundError
        If the series has no such instance.
    ArchiveError
        If the bytes read do not match the recorded hash.
    """
    validate_uid(sop_uid, "SOP Instance UID")
    index = _resolve(store, index_or_ids)
    entry = index.find(sop_uid, sha256)
    data = store.get_range(index.part_key(entry.part), entry.offset, entry.length)
    if verify and hashlib.sha256(data).hexdigest() != entry.sha256:
        raise ArchiveError(f"instance {sop_uid} in {index.part_key(entry.part)} does not match its SHA-256")
    return data


def _read_exact(stream: BinaryIO, length: int) -> bytes:
    chunks: list[bytes] = []
    remaining = length
    while remaining > 0:
        chunk = stream.read(min(remaining, _STREAM_CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_part_instances(
    store: ObjectStore, index: SeriesIndex, part: int, entries: Iterable[ArchivedInstance]
) -> Iterator[tuple[ArchivedInstance, bytes]]:
    """Stream part ``part`` with one GET and yield the bytes of ``entries``, in part order.

    The part is read front to back and never held whole in memory; reading stops after the
    last requested instance. Use it when most of a part is wanted (a whole series onto a new
    machine); :func:`read_instance` reads one instance with one ranged GET.

    Parameters
    ----------
    store : ObjectStore
        Where the archive lives.
    index : SeriesIndex
        The series index (:func:`read_series_index`).
    part : int
        Part number; every entry must live in it.
    entries : iterable of ArchivedInstance
        Entries of ``index`` to return.

    Yields
    ------
    tuple of (ArchivedInstance, bytes)
        Each entry with its P10 bytes, checked against its SHA-256.

    Raises
    ------
    ArchiveError
        If the part is missing, shorter than the index says, or an instance in it does not
        match its SHA-256 (the part is damaged: nothing wrong is yielded).
    """
    wanted = sorted({e.offset: e for e in entries}.values(), key=lambda e: e.offset)
    key = index.part_key(part)
    if any(e.part != part for e in wanted):
        raise ValueError(f"entries of other parts passed for {key}")
    if not wanted:
        return
    try:
        stream = store.open_stream(key)
    except ObjectNotFoundError:
        raise ArchiveError(f"series archive part {key} is missing although its index lists it") from None
    with stream:
        position = 0
        for entry in wanted:
            if entry.offset < position:
                raise ArchiveError(f"index of {key} has overlapping instances at offset {entry.offset}")
            gap = entry.offset - position
            skipped = len(_read_exact(stream, gap))
            data = _read_exact(stream, entry.length)
            position = entry.offset + entry.length
            if skipped != gap or len(data) != entry.length:
                raise ArchiveError(f"series archive part {key} ends before instance {entry.sop_uid}: it is truncated")
            if hashlib.sha256(data).hexdigest() != entry.sha256:
                raise ArchiveError(f"instance {entry.sop_uid} in {key} does not match its SHA-256: the part is damaged")
            yield entry, data


def _no_bulk_data(tag: str, vr: str, uri: str) -> None:
    """Bulk values stay empty in a header (``read_bulk_data`` fetches one when needed)."""
    return None


def instance_header(index: SeriesIndex, sop_uid: str, sha256: str | None = None) -> pydicom.Dataset:
    """The header of one instance rebuilt from the index alone: no part is read.

    Equals ``dcmread(..., stop_before_pixels=True)`` of the instance, file meta included,
    except that values stored as ``BulkDataURI`` (binary values over
    :data:`BULK_DATA_THRESHOLD` bytes) are empty.

    Raises
    ------
    ObjectNotFoundError
        If the index has no such instance (or not with ``sha256``).
    ArchiveError
        If the index was written before file meta was kept in it.
    """
    entry = index.find(sop_uid, sha256)
    if entry.file_meta is None:
        raise ArchiveError(f"index of series {index.series_uid} has no file meta for {sop_uid} (written by an older dcmflow)")
    ds = pydicom.Dataset.from_json(entry.metadata, bulk_data_uri_handler=_no_bulk_data)
    for tag in _PIXEL_TAGS:
        if tag in ds:
            del ds[tag]
    ds.file_meta = FileMetaDataset(pydicom.Dataset.from_json(entry.file_meta))
    return ds


def list_metadata(store: ObjectStore, index_or_ids: SeriesIndex | tuple[str, str]) -> list[dict[str, Any]]:
    """DICOM JSON of every instance (newest version per SOP UID), from the index alone.

    No part tar is read: this is what serves WADO-RS ``/metadata`` and the headers given to
    service callbacks.
    """
    return [entry.metadata for entry in _resolve(store, index_or_ids).latest()]


def read_bulk_data(store: ObjectStore, uri: str) -> bytes:
    """Fetch the value a ``BulkDataURI`` from the index points at (one ranged GET)."""
    key, offset, length = parse_bulk_data_uri(uri)
    return store.get_range(key, offset, length)

