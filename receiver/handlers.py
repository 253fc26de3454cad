"""pynetdicom event handlers of the receiver: one ``handle_<event>(event, *deps)`` per event.

Handlers are plain functions; :mod:`receiver.scp` binds them as ``(evt.EVT_X, handler, [deps])``
tuples, so every dependency arrives as an argument and nothing lives in module globals.

* :func:`handle_store` (intervention, EVT_C_STORE) runs :func:`store_dataset`, which checks the
  request cheaply, writes the raw bytes durably to the spool and gives the status; it never
  raises (a handler that raises yields only 0xC211 in pynetdicom) and never decodes more than
  the few header elements it checks. :mod:`receiver.transfer` calls the same function.
* :func:`handle_echo` (EVT_C_ECHO) answers Success (PS3.7 §9.1.5 Verification).
* :func:`handle_requested` (notification, EVT_REQUESTED) applies the caller policy and sends
  A-ASSOCIATE-RJ (PS3.8 §7.1.1.9) to callers that may not send.
* :func:`handle_established`, :func:`handle_closed` (notifications) only record facts for the
  completeness monitor; their errors are logged and swallowed.
"""

from __future__ import annotations

import io
import logging
import ssl
import zlib
from typing import TYPE_CHECKING, Any, cast

from pydicom.filereader import read_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from receiver import status
from receiver.errors import InvalidInstanceError, SpoolFullError
from receiver.p10 import SERIES_UID, SOP_UID, STUDY_UID, file_meta, scan_uids
from storage.keys import is_valid_uid

if TYPE_CHECKING:
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.events import Event

    from receiver.associations import AssociationTracker, CallerPolicy
    from receiver.spool import Spool, SpoolWriter

__all__ = [
    "HEADER_PREFIX",
    "InstanceStore",
    "check_dataset",
    "handle_closed",
    "handle_echo",
    "handle_established",
    "handle_requested",
    "handle_store",
    "store_dataset",
]

log = logging.getLogger("receiver")



def _stop_after_series_uid(tag: int, vr: str | None, length: int) -> bool:
    # Tags are stored in ascending order (PS3.5 §7.1), so nothing we need follows (0020,000E).
    return tag > SERIES_UID


def check_dataset(dataset: bytes | memoryview, transfer_syntax: str, affected_sop_uid: str) -> tuple[str, str, str]:
    """Check that a received dataset carries usable identifying UIDs, reading only its start.

    Tries the byte-level walker :func:`receiver.p10.scan_uids` first and falls back to
    pydicom for what it does not handle. The elements are read up to (0020,000E) only, which is enough for the three UIDs that
    build the object key (PS3.3 C.7.2.1 Study, C.7.3.1 Series, C.12.1 SOP Common).

    Parameters
    ----------
    dataset : bytes
        The encoded dataset as received (no file meta), in ``transfer_syntax``.
    transfer_syntax : str
        Transfer syntax UID of the presentation context it arrived on.
    affected_sop_uid : str
        The C-STORE request's Affected SOP Instance UID (PS3.7 §9.1.1.1).

    Returns
    -------
    (study_uid, series_uid, sop_uid) : tuple of str

    Raises
    ------
    InvalidInstanceError
        With ``status`` 0xC000 (Cannot understand) when the dataset does not parse, or 0xA900
        (Data Set does not match SOP Class) when a UID is missing, is not a UID (PS3.5 §9.1),
        or the SOP Instance UID differs from the request's.
    """
    fast = scan_uids(dataset, transfer_syntax)
    if fast is not None:
        return _check_uids([fast.get(t, "") for t in (STUDY_UID, SERIES_UID, SOP_UID)], affected_sop_uid)
    ts = UID(transfer_syntax)
    try:
        raw = dataset
        if ts == DeflatedExplicitVRLittleEndian:  # PS3.5 A.5: raw deflate of the dataset
            raw = zlib.decompressobj(-zlib.MAX_WBITS).decompress(dataset)
        ds = read_dataset(io.BytesIO(raw), ts.is_implicit_VR, ts.is_little_endian, stop_when=_stop_after_series_uid)
        values = [ds.get(tag) for tag in (STUDY_UID, SERIES_UID, SOP_UID)]
        uids = [str(el.value).strip("\0 ") if el is not None and el.value is not None else "" for el in values]
    except InvalidInstanceError:
        raise
    except Exception as exc:  # pydicom raises many types on garbage; all mean "cannot parse"
        raise InvalidInstanceError(f"dataset does not parse: {type(exc).__name__}: {exc}", status.CANNOT_UNDERSTAND) from exc
    return _check_uids(uids, affected_sop_uid)


def _check_uids(uids: list[str], affected_sop_uid: str) -> tuple[str, str, str]:
    names = ("Study Instance UID", "Series Instance UID", "SOP Instance UID")
    for name, uid in zip(names, uids, strict=True):
        if not uid:
            raise InvalidInstanceError(f"{name} missing", status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS)
        if not is_valid_uid(uid):
            raise InvalidInstanceError(f"{name} is not a UID: {uid[:80]!r}", status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS)
    if uids[2] != affected_sop_uid:
        raise InvalidInstanceError(
            f"SOP Instance UID {uids[2]!r} differs from the request's {affected_sop_uid[:80]!r}",
            status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
        )
    return uids[0], uids[1], uids[2]


HEADER_PREFIX = 64 * 1024
"""Bytes of a data set kept in memory while it streams to the spool, for :func:`check_dataset`."""


class InstanceStore:
    """One C-STORE data set on its way into the spool, fragment by fragment (PS3.4 B.2.3).

    Everything this receiver does for a C-STORE-RQ: created when the request's command set is
    known, it validates the Affected SOP Instance UID and opens a spool entry with the file
    meta (:func:`receiver.p10.file_meta`); :meth:`add` collects each data-set fragment as it
    arrives; :meth:`finish` checks the identifying UIDs (:func:`check_dataset`, on the first
    :data:`HEADER_PREFIX` bytes, re-reading the data set in the rare case that is not enough),
    then appends it to the spool's log durably (group commit) or drops it, and gives the
    status to answer: a data set that fails a check or ends early never becomes a record. Nothing is
    decoded or hashed here. It never raises.

    Parameters
    ----------
    assoc : pynetdicom.association.Association
        The association (for the tracker: its id and calling AE title).
    spool : Spool
        Where acknowledged instances are kept until ingest.
    tracker : AssociationTracker
        Counts what the association stored.
    sop_class_uid, sop_instance_uid : str
        The request's Affected SOP Class and Instance UIDs (PS3.7 §9.1.1.1).
    transfer_syntax : str
        Of the presentation context the data set arrives on.
    """

    def __init__(
        self,
        assoc: Any,
        spool: Spool,
        tracker: AssociationTracker,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax: str,
    ) -> None:
        self._assoc = assoc
        self._tracker = tracker
        self._transfer_syntax = transfer_syntax
        self._writer: SpoolWriter | None = None
        self._meta_size = 0
        self._size = 0
        self._head = bytearray()
        self.status: int | None = None  # decided before the data set: the answer whatever comes
        self.affected = sop_instance_uid.strip("\0 ")
        self._label = "?"
        try:
            info = tracker.info(assoc)
            self._label = info.label
            if not is_valid_uid(self.affected):
                log.warning(
                    "store from %s refused: Affected SOP Instance UID is not a UID: %r", self._label, self.affected[:80]
                )
                self.status = status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
                return
            # Same bytes as ``event.encoded_dataset()`` (plus (0002,0016) Source AE Title),
            # built without pydicom: see receiver/p10.py.
            meta = file_meta(sop_class_uid, self.affected, transfer_syntax, info.calling_ae)
            self._writer = spool.open_entry(
                sop_uid=self.affected, association_id=info.association_id, calling_ae=info.calling_ae
            )
            self._writer.write(meta)
            self._meta_size = len(meta)
        except Exception as exc:  # noqa: BLE001 - never raise: the sender must get an answer
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, SpoolFullError):
            self._tracker.note_refused(self._assoc, str(exc))
            self.status = status.OUT_OF_RESOURCES
        elif isinstance(exc, OSError):
            log.error("store from %s: spool write failed (0xA700): %s", self._label, exc)
            self.status = status.OUT_OF_RESOURCES
        else:
            log.exception("store: unexpected error, answering 0xC000")
            self.status = status.CANNOT_UNDERSTAND
        self.discard()

    def add(self, fragment: bytes | bytearray | memoryview) -> None:
        """Write the next data-set fragment (ignored once the answer is decided)."""
        if self._writer is None:
            return
        try:
            if len(self._head) < HEADER_PREFIX:
                self._head += fragment[: HEADER_PREFIX - len(self._head)]
            self._writer.write(fragment)
            self._size += len(fragment)
        except Exception as exc:  # noqa: BLE001 - as above
            self._fail(exc)

    def _check(self) -> str:
        assert self._writer is not None
        head = bytes(self._head)
        if self._size > len(head):
            found = scan_uids(head, self._transfer_syntax)
            if found is not None and all(found.get(t) for t in (STUDY_UID, SERIES_UID, SOP_UID)):
                # All three seen whole in the prefix: the same answer as on the whole data set.
                return _check_uids([found[t] for t in (STUDY_UID, SERIES_UID, SOP_UID)], self.affected)[1]
            head = self._writer.read_back(self._meta_size)
        return check_dataset(head, self._transfer_syntax, self.affected)[1]

    def finish(self) -> int:
        """Check, commit durably (or drop), and return the status to answer."""
        if self.status is not None:
            return self.status
        try:
            try:
                series_uid = self._check()
            except InvalidInstanceError as exc:
                log.warning("store from %s refused (0x%04X): %s [%s]", self._label, exc.status, exc, self.affected)
                self.discard()
                return exc.status
            assert self._writer is not None
            self._writer.commit()
            self._writer = None
        except Exception as exc:  # noqa: BLE001 - as above
            self._fail(exc)
            assert self.status is not None
            return self.status
        self._tracker.note_stored(self._assoc, self._size, series_uid)
        return status.SUCCESS

    def discard(self) -> None:
        """Drop what was written (the association ended before the data set did)."""
        if self._writer is not None:
            self._writer.discard()
            self._writer = None


def store_dataset(
    assoc: Any,
    spool: Spool,
    tracker: AssociationTracker,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    data_set: bytes,
) -> int:
    """:class:`InstanceStore` for a data set received whole; returns the status to answer.

    0x0000 when the bytes are durable; 0xA900 / 0xC000 for unusable datasets; 0xA700 when the
    spool is below its watermark or the write failed. It never raises.
    """
    store = InstanceStore(
        assoc,
        spool,
        tracker,
        sop_class_uid=sop_class_uid,
        sop_instance_uid=sop_instance_uid,
        transfer_syntax=transfer_syntax,
    )
    store.add(data_set)
    return store.finish()


def handle_store(event: Event, spool: Spool, tracker: AssociationTracker) -> int:
    """EVT_C_STORE: :func:`store_dataset` for a request pynetdicom decoded.

    Parameters
    ----------
    event : pynetdicom.events.Event
        The C-STORE event.
    spool : Spool
        Where acknowledged instances are kept until ingest.
    tracker : AssociationTracker
        Gives the association's id and calling AE title.

    Returns
    -------
    int
        The status of :func:`store_dataset`.
    """
    try:
        request = cast("C_STORE", event.request)
        return store_dataset(
            event.assoc,
            spool,
            tracker,
            sop_class_uid=str(request.AffectedSOPClassUID or ""),
            sop_instance_uid=str(request.AffectedSOPInstanceUID or ""),
            transfer_syntax=event.context.transfer_syntax,
            data_set=request.DataSet.getvalue(),  # type: ignore[union-attr]
        )
    except Exception:  # never raise out of an intervention handler (pynetdicom answers 0xC211)
        log.exception("store: unexpected error, answering 0xC000")
        return status.CANNOT_UNDERSTAND


def handle_echo(event: Event) -> int:
    """EVT_C_ECHO: Verification (PS3.4 Annex A) always succeeds while we are up."""
    return status.SUCCESS


def handle_requested(event: Event, policy: CallerPolicy, tracker: AssociationTracker) -> None:
    """EVT_REQUESTED: reject callers that may not send, with the proper A-ASSOCIATE-RJ.

    The reject is permanent, from the service user, reason "calling AE title not recognized"
    (PS3.8 §9.3.4, Table 9-21: result 1, source 1, reason 3). pynetdicom then skips its own
    negotiation (``Association.run_reactor`` checks ``is_rejected``).
    """
    try:
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        calling = str(primitive.calling_ae_title if primitive is not None else "").strip()
        address = str(assoc.requestor.address)
        secure = isinstance(getattr(assoc.dul.socket, "socket", None), ssl.SSLSocket)
        allowed, reason = policy.allows(calling, address, secure=secure)
        if not allowed:
            log.warning("association from %s@%s rejected: %s", calling, address, reason)
            # PS3.8 Table 9-21: 0x01 rejected-permanent, 0x01 service-user, 0x03 calling AE not recognized
            assoc.acse.send_reject(0x01, 0x01, 0x03)
            # As pynetdicom's own negotiation does after a reject: wait until the DUL has sent
            # the A-ASSOCIATE-RJ and the peer closed (state Sta1) before the socket is shut.
            assoc.kill()
    except Exception:
        # A policy failure must not let an unchecked caller in: reject transiently.
        log.exception("association policy failed; rejecting (transient)")
        try:
            event.assoc.acse.send_reject(0x02, 0x01, 0x01)
            event.assoc.kill()
        except Exception:
            log.exception("could not send A-ASSOCIATE-RJ")


def handle_established(event: Event, tracker: AssociationTracker) -> None:
    """EVT_ESTABLISHED: give the association its id and record that it is open."""
    try:
        tracker.opened(event.assoc)
    except Exception:
        log.exception("recording an opened association failed")


def handle_closed(event: Event, tracker: AssociationTracker) -> None:
    """EVT_RELEASED / EVT_ABORTED / EVT_CONN_CLOSE: record that the association ended (once)."""
    try:
        tracker.closed(event.assoc, event.event.name)
    except Exception:
        log.exception("recording a closed association failed")
