"""The on-disk format of the receive spool's segment log: records, positions, marks, scanning.

Pure format and reading helpers, no threads: :mod:`receiver.spool` writes the log, its
readers and the recovery scan read it with :func:`iter_records`.

A segment is a preallocated file ``segments/{seq:016d}.seg`` (its blocks written with zeros
once, or reused from an ingested segment, so that appending never changes the file's size or
allocation and ``fdatasync`` flushes data only, without a journal commit). Records follow one
another, each starting on a :data:`ALIGN` boundary (a record owns its pages: rewriting the page
of a new record can never tear an acknowledged one)::

    offset  size  field
    0       4     magic b"DCR1"
    4       1     version (1)
    5       1     calling AE length (<= 16, PS3.5 §6.2)
    6       1     SOP Instance UID length (<= 64, PS3.5 §9.1)
    7       1     flags (1 = a slot still being filled: never valid data)
    8       8     segment sequence number (a reused file's stale records carry an older one)
    16      8     data length
    24      8     extent: bytes the record occupies from its start (header + data, or a slot)
    32      8     receive time, ns since the epoch
    40      16    association id (UUID bytes)
    56      4     CRC-32 of the data
    60      4     CRC-32 of bytes 0-59 plus the AE title and the UID
    64      ..    calling AE title (ASCII), SOP Instance UID (ASCII), then the raw PS3.10 bytes

A *slot* is space reserved for a large data set while it still arrives, so that its bytes go
to disk during the transfer: its header is first written with the slot flag (readers and
recovery skip it like a torn record) and, once the data set is complete, rewritten in place
with the real length and CRC. The header lies in the first 512 bytes of a page-aligned
record, so that rewrite is one sector (the unit a disk writes atomically; PostgreSQL keeps
its control file under 512 bytes for the same reason).

A record is valid when its header checks out (magic, version, sequence number of the segment it
is in, header CRC) and its data matches the data CRC. The writer writes each header in order,
under its lock, before any later record is reserved; an acknowledgement follows an
``fdatasync`` of everything written before it. So every header before an acknowledged record
is durable, the first invalid header ends a segment, and a record whose header is valid but
whose data is not (torn by a crash, or a failed write) was never acknowledged and is skipped.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "ALIGN",
    "MAX_HEADER",
    "Position",
    "RecordHeader",
    "aligned",
    "decode_header",
    "decode_position",
    "encode_header",
    "encode_position",
    "header_length",
    "iter_records",
    "read_data",
    "read_position_file",
    "segment_name",
    "segment_seq",
    "write_position_file",
]

ALIGN = 4096
"""Records start on this boundary (one page: a record never shares a page with another)."""

_MAGIC = b"DCR1"
_VERSION = 1
_HEAD = struct.Struct("<4sBBBBQQQQ16sII")
_SLOT = 1
_CRC_SPAN = _HEAD.size - 4
MAX_HEADER = _HEAD.size + 16 + 64
"""Longest record header (fixed part, a 16-character AE title and a 64-character UID)."""

_POSITION = struct.Struct("<QQIII")  # seq, offset, worker index, worker count, crc
_SUFFIX = ".seg"


class Position(NamedTuple):
    """A place in the log: segment sequence number and byte offset (tuples order like the log)."""

    segment: int
    offset: int


@dataclass(frozen=True)
class RecordHeader:
    """One record's header, decoded (see the module docstring for the layout)."""

    segment: int
    offset: int
    data_length: int
    received_ns: int
    association_id: str
    calling_ae: str
    sop_uid: str
    data_crc: int
    header_length: int
    extent: int
    slot: bool = False

    @property
    def data_offset(self) -> int:
        """Where the PS3.10 bytes start in the segment file."""
        return self.offset + self.header_length

    @property
    def end(self) -> Position:
        """Where the next record starts."""
        return Position(self.segment, aligned(self.offset + self.extent))

    @property
    def position(self) -> Position:
        """Where this record starts."""
        return Position(self.segment, self.offset)


def aligned(n: int) -> int:
    """``n`` rounded up to :data:`ALIGN`."""
    return -(-n // ALIGN) * ALIGN


def segment_name(seq: int) -> str:
    """File name of segment ``seq``."""
    return f"{seq:016d}{_SUFFIX}"


def segment_seq(path: Path) -> int | None:
    """The sequence number of a segment file name, ``None`` for other names (free segments)."""
    name = path.name
    if not name.endswith(_SUFFIX) or len(name) != 16 + len(_SUFFIX) or not name[:16].isdigit():
        return None
    return int(name[:16])


def header_length(calling_ae: str, sop_uid: str) -> int:
    """Bytes of the header of a record with this AE title and UID."""
    return _HEAD.size + len(calling_ae.encode("ascii", "replace")[:16]) + len(sop_uid.encode("ascii"))


def encode_header(
    segment: int,
    *,
    data_length: int,
    received_ns: int,
    association_id: str,
    calling_ae: str,
    sop_uid: str,
    data_crc: int,
    extent: int | None = None,
    slot: bool = False,
) -> bytes:
    """The header bytes of one record (the caller validated the UID, AE title and id).

    ``extent`` defaults to header + data; ``slot`` marks a slot still being filled.
    """
    ae = calling_ae.encode("ascii", "replace")[:16]
    uid = sop_uid.encode("ascii")
    length = _HEAD.size + len(ae) + len(uid)
    fixed = _HEAD.pack(
        _MAGIC,
        _VERSION,
        len(ae),
        len(uid),
        _SLOT if slot else 0,
        segment,
        data_length,
        length + data_length if extent is None else extent,
        received_ns,
        bytes.fromhex(association_id),
        data_crc,
        0,
    )
    crc = zlib.crc32(ae + uid, zlib.crc32(fixed[:_CRC_SPAN]))
    return fixed[:_CRC_SPAN] + struct.pack("<I", crc) + ae + uid


def decode_header(buf: bytes, segment: int, offset: int) -> RecordHeader | None:
    """Decode the header at the start of ``buf``; ``None`` unless it is a valid header of ``segment``."""
    if len(buf) < _HEAD.size:
        return None
    magic, version, ae_len, uid_len, flags, seq, length, extent, ns, assoc, data_crc, crc = _HEAD.unpack_from(buf)
    if magic != _MAGIC or version != _VERSION or seq != segment or ae_len > 16 or uid_len > 64:
        return None
    end = _HEAD.size + ae_len + uid_len
    if extent < end + length:
        return None
    if len(buf) < end:
        return None
    names = buf[_HEAD.size : end]
    if zlib.crc32(names, zlib.crc32(buf[:_CRC_SPAN])) != crc:
        return None
    try:
        calling_ae = names[:ae_len].decode("ascii")
        sop_uid = names[ae_len:].decode("ascii")
    except UnicodeDecodeError:
        return None
    return RecordHeader(segment, offset, length, ns, assoc.hex(), calling_ae, sop_uid, data_crc, end, extent, bool(flags & _SLOT))


def read_data(fd: int, header: RecordHeader) -> bytes | None:
    """The record's PS3.10 bytes, or ``None`` when they are short or fail the data CRC (or a slot)."""
    if header.slot:
        return None
    data = os.pread(fd, header.data_length, header.data_offset)
    if len(data) != header.data_length or zlib.crc32(data) != header.data_crc:
        return None
    return data


def iter_records(fd: int, segment: int, start: int = 0, stop: int | None = None) -> Iterator[RecordHeader]:
    """Headers of the records of one segment from ``start``: until the first invalid header, or
    ``stop`` (records starting at or after it are not read).

    Data is not checked here (:func:`read_data` does that).
    """
    offset = start
    while stop is None or offset < stop:
        header = decode_header(os.pread(fd, MAX_HEADER, offset), segment, offset)
        if header is None:
            return
        yield header
        offset = header.end.offset


def encode_position(position: Position, *, index: int = 0, count: int = 1) -> bytes:
    """The 32 bytes of a mark or head file (CRC-checked when read back)."""
    body = _POSITION.pack(position.segment, position.offset, index, count, 0)[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def decode_position(data: bytes) -> tuple[Position, int, int] | None:
    """``(position, index, count)`` of a mark or head file's bytes; ``None`` if short or torn."""
    if len(data) < _POSITION.size:
        return None
    seq, offset, index, count, crc = _POSITION.unpack_from(data)
    if zlib.crc32(data[: _POSITION.size - 4]) != crc:
        return None
    return Position(seq, offset), index, count


def write_position_file(path: Path, position: Position, *, index: int = 0, count: int = 1) -> None:
    """Write a mark file in place and make it durable (one small write and an ``fdatasync``)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, encode_position(position, index=index, count=count), 0)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def read_position_file(path: Path) -> tuple[Position, int, int] | None:
    """``(position, index, count)`` of a mark or head file; ``None`` if missing or torn."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return decode_position(data)
