"""The Prefect events of DESIGN.md, built as plain data and sent to Prefect's public REST API.

:class:`PrefectEmitter` sends them with ``POST {PREFECT_API_URL}/events`` (a JSON array of
``prefect.events.Event``); the server answers 204 once the batch is published to its event
pipeline, and that answer is the confirmation the completeness monitor waits for before it
marks an event emitted. No Prefect client internals are used, so a Prefect upgrade that keeps
its REST API keeps the emitter working.

This is the only module of :mod:`receiver` that imports Prefect (``tests/test_layout.py``
enforces it), and it imports it (and ``httpx``) lazily, when a :class:`PrefectEmitter` is
built, so importing the builders costs nothing and a receiver without the completeness monitor
never pays for ``import prefect``.

Events
------
``dicom.series.stable``
    resource ``dicom.series.<SeriesInstanceUID>``; related: the study (role ``study``) and the
    patient (role ``patient``). Once per (series, revision).
``dicom.study.stable``
    resource ``dicom.study.<StudyInstanceUID>``; related: the patient and up to
    :data:`MAX_RELATED_SERIES` series (role ``series``). Once per (study, revision).
``dicom.study.received``
    resource ``dicom.study.<StudyInstanceUID>``; sent when a study is first seen (revision 1),
    once per study (claimed and marked on the study row), always before its first
    ``dicom.study.stable``.

Labels (``dicom.study-uid``, ``dicom.series-uid``, ``dicom.patient-id``, ``dicom.modality``,
``dicom.revision``, ``dicom.calling-ae``) are strings, as Prefect requires; the payload keeps
typed values (``revision`` and counts as ints) for templated deployment parameters such as
``{{ event.payload.revision }}``.

Idempotent ids
--------------
Every event's id is :func:`event_id` = ``uuid5(NAMESPACE, "<event>/<resource id>/<revision>")``,
the same however often, by whichever receiver, the event is sent. The completeness monitor
is at-least-once (it marks an event emitted only after :meth:`PrefectEmitter.flush` returned
True, i.e. the server accepted it, and re-sends claims that were never marked); the fixed id is
what makes a re-send harmless: the Prefect server drops an id it has seen (messaging
de-duplication, in server memory for minutes, and ``ON CONFLICT DO NOTHING`` in its event
store), so a re-sent event creates no second flow run (reference/prefect.md §1.1 and the
"Duplicates" measurements there; verified in ``tests/receiver/test_events.py``).

Delivery
--------
``emit`` buffers, ``flush`` POSTs the buffer in chunks and returns True only when every chunk
was answered 2xx. What a 204 confirms is what ``create_events`` does: the batch passed the
server's validation and was published to its messaging layer. With Prefect's default
in-memory broker a server killed in the next moment can still lose it before storing it or
running its automations; that window is Prefect's, not ours (a durable broker such as
``prefect-redis`` closes it).

When the server is unreachable or answers an error, ``flush`` returns False and the monitor
re-sends later; the emitter logs one warning when such an outage starts (with the reason) and
one info line when delivery works again. Without ``PREFECT_API_URL`` it warns once, when it is
built, and refuses every event without trying the network.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import httpx

    from storage.repository import SeriesClaim, StudyClaim

__all__ = [
    "SERIES_STABLE",
    "STUDY_STABLE",
    "STUDY_RECEIVED",
    "NAMESPACE",
    "MAX_RELATED_SERIES",
    "EventSpec",
    "StudySeen",
    "Emitter",
    "event_id",
    "series_resource_id",
    "study_resource_id",
    "series_stable_event",
    "study_stable_event",
    "study_received_event",
    "RecordingEmitter",
    "PrefectEmitter",
    "DEFAULT_CHUNK_SIZE",
]

log = logging.getLogger("receiver.events")

SERIES_STABLE = "dicom.series.stable"
STUDY_STABLE = "dicom.study.stable"
STUDY_RECEIVED = "dicom.study.received"

NAMESPACE = uuid.UUID("5b0f3c2e-7d1a-4c55-9e0b-6d636d666c6f")
"""uuid5 namespace of dcmflow event ids (fixed forever: changing it breaks de-duplication)."""

MAX_RELATED_SERIES = 50
"""Series listed as related resources of a study event (Prefect allows 100 related in all)."""

MAX_ADDED_SOP_UIDS = 500
"""SOP Instance UIDs listed in the payload of a revision > 1 (an event must stay < 1.5 MB)."""


@dataclass(frozen=True)
class EventSpec:
    """One event as plain data: the fields of ``prefect.events.Event``.

    Attributes
    ----------
    event : str
        Event name, e.g. ``dicom.series.stable``.
    resource : dict of str to str
        The primary resource: ``prefect.resource.id`` plus string labels.
    related : list of dict
        Related resources, each with ``prefect.resource.id`` and ``prefect.resource.role``.
    payload : dict
        JSON-serialisable details.
    id : uuid.UUID
        Deterministic id (:func:`event_id`).
    occurred : datetime.datetime
        When it happened (timezone-aware UTC).
    """

    event: str
    resource: dict[str, str]
    related: list[dict[str, str]]
    payload: dict[str, Any]
    id: uuid.UUID
    occurred: dt.datetime

    @property
    def resource_id(self) -> str:
        """``prefect.resource.id`` of the primary resource."""
        return self.resource["prefect.resource.id"]


@dataclass(frozen=True, kw_only=True)
class StudySeen:
    """What :func:`study_received_event` needs about a study seen for the first time."""

    study_uid: str
    patient_id: str
    modalities: str
    description: str
    calling_ae: str
    first_received_at: dt.datetime | None
    series_uids: tuple[str, ...] = ()
    instance_count: int = 0


class Emitter(Protocol):
    """Sends events. ``emit`` hands one over; ``flush`` confirms everything handed over since the
    last ``flush`` was sent.

    The completeness monitor marks a claim emitted only when ``emit`` returned True for its
    event and the following ``flush`` returned True.
    """

    def emit(self, spec: EventSpec) -> bool:
        """Hand one event over; False when it certainly was not (logged)."""
        ...

    def flush(self, timeout: float = 10.0) -> bool:
        """Send every event handed over since the last flush; False on failure or timeout (logged)."""
        ...


# --------------------------------------------------------------------------- pure builders


def event_id(event: str, resource_id: str, revision: int) -> uuid.UUID:
    """The deterministic id of ``event`` for ``resource_id`` at ``revision`` (uuid5).

    Parameters
    ----------
    event : str
        Event name.
    resource_id : str
        ``dicom.series.<uid>`` or ``dicom.study.<uid>``.
    revision : int
        Series or study revision (1 for ``dicom.study.received``).

    Returns
    -------
    uuid.UUID
    """
    return uuid.uuid5(NAMESPACE, f"{event}/{resource_id}/{revision}")


def series_resource_id(series_uid: str) -> str:
    """``dicom.series.<uid>``."""
    return f"dicom.series.{series_uid}"


def study_resource_id(study_uid: str) -> str:
    """``dicom.study.<uid>``."""
    return f"dicom.study.{study_uid}"


def _iso(value: dt.datetime | None) -> str | None:
    return value.astimezone(dt.UTC).isoformat() if value is not None else None


def _patient_related(patient_id: str) -> list[dict[str, str]]:
    if not patient_id:
        return []
    return [
        {
            "prefect.resource.id": f"dicom.patient.{patient_id}",
            "prefect.resource.role": "patient",
            "dicom.patient-id": patient_id,
        }
    ]


def _short(uid: str) -> str:
    return uid if len(uid) <= 12 else f"…{uid[-10:]}"


def series_stable_event(
    claim: SeriesClaim,
    *,
    added_instance_count: int | None = None,
    added_sop_uids: Sequence[str] | None = None,
) -> EventSpec:
    """``dicom.series.stable`` for one claimed series revision.

    Parameters
    ----------
    claim : SeriesClaim
        From :meth:`storage.repository.Repository.claim_due_series` (or
        ``list_unemitted_series``), which computes what the revision added.
    added_instance_count : int, optional
        Instance versions recorded in this revision; defaults to the claim's
        ``added_instance_count``, or to ``claim.instance_count`` when the claim has none.
    added_sop_uids : sequence of str, optional
        For revision > 1: the SOP Instance UIDs that arrived in it; defaults to the claim's
        ``added_sop_uids``. At most :data:`MAX_ADDED_SOP_UIDS` are listed, and
        ``added_sop_uids_truncated`` says whether there were more.

    Returns
    -------
    EventSpec
    """
    rid = series_resource_id(claim.series_uid)
    resource = {
        "prefect.resource.id": rid,
        "prefect.resource.name": " ".join(
            x for x in (claim.modality, claim.description, _short(claim.series_uid)) if x
        ),
        "dicom.series-uid": claim.series_uid,
        "dicom.study-uid": claim.study_uid,
        "dicom.patient-id": claim.patient_id,
        "dicom.modality": claim.modality,
        "dicom.revision": str(claim.revision),
        "dicom.calling-ae": claim.calling_ae,
    }
    related = [
        {
            "prefect.resource.id": study_resource_id(claim.study_uid),
            "prefect.resource.role": "study",
            "dicom.study-uid": claim.study_uid,
        },
        *_patient_related(claim.patient_id),
    ]
    if added_instance_count is not None:
        added = added_instance_count
    else:
        added = claim.instance_count if claim.added_instance_count is None else claim.added_instance_count
    payload: dict[str, Any] = {
        "series_uid": claim.series_uid,
        "study_uid": claim.study_uid,
        "patient_id": claim.patient_id,
        "modality": claim.modality,
        "description": claim.description,
        "revision": claim.revision,
        "instance_count": claim.instance_count,
        "added_instance_count": added,
        "expected_instance_count": claim.expected_instance_count,
        "calling_ae": claim.calling_ae,
        "reason": claim.reason,
        "first_received_at": _iso(claim.first_received_at),
        "last_received_at": _iso(claim.last_received_at),
        "stable_at": _iso(claim.stable_at),
    }
    if claim.revision > 1:
        uids = list(claim.added_sop_uids if added_sop_uids is None else added_sop_uids)
        more = claim.added_sop_uids_truncated if added_sop_uids is None else False
        payload["added_sop_uids"] = uids[:MAX_ADDED_SOP_UIDS]
        payload["added_sop_uids_truncated"] = more or len(uids) > MAX_ADDED_SOP_UIDS
    return EventSpec(
        event=SERIES_STABLE,
        resource=resource,
        related=related,
        payload=payload,
        id=event_id(SERIES_STABLE, rid, claim.revision),
        occurred=claim.stable_at,
    )


def study_stable_event(
    claim: StudyClaim,
    *,
    calling_ae: str = "",
    series_revisions: Mapping[str, int] | None = None,
) -> EventSpec:
    """``dicom.study.stable`` for one claimed study revision.

    Parameters
    ----------
    claim : StudyClaim
        From :meth:`storage.repository.Repository.claim_due_studies`.
    calling_ae : str
        The AE that sent its most recent series (``StudyClaim`` does not carry one).
    series_revisions : mapping, optional
        Current revision of each series, so a consumer of revision n+1 can see which
        series changed.

    Returns
    -------
    EventSpec
    """
    rid = study_resource_id(claim.study_uid)
    resource = {
        "prefect.resource.id": rid,
        "prefect.resource.name": " ".join(x for x in (claim.modalities, _short(claim.study_uid)) if x),
        "dicom.study-uid": claim.study_uid,
        "dicom.patient-id": claim.patient_id,
        "dicom.modality": claim.modalities,
        "dicom.revision": str(claim.revision),
        "dicom.calling-ae": calling_ae,
    }
    related = [
        *_patient_related(claim.patient_id),
        *(
            {"prefect.resource.id": series_resource_id(uid), "prefect.resource.role": "series", "dicom.series-uid": uid}
            for uid in claim.series_uids[:MAX_RELATED_SERIES]
        ),
    ]
    payload: dict[str, Any] = {
        "study_uid": claim.study_uid,
        "patient_id": claim.patient_id,
        "revision": claim.revision,
        "modalities": [m for m in claim.modalities.split("\\") if m],
        "series_uids": list(claim.series_uids),
        "series_count": len(claim.series_uids),
        "series_revisions": dict(series_revisions or {}),
        "instance_count": claim.instance_count,
        "calling_ae": calling_ae,
        "stable_at": _iso(claim.stable_at),
    }
    return EventSpec(
        event=STUDY_STABLE,
        resource=resource,
        related=related,
        payload=payload,
        id=event_id(STUDY_STABLE, rid, claim.revision),
        occurred=claim.stable_at,
    )


def study_received_event(seen: StudySeen, *, now: dt.datetime | None = None) -> EventSpec:
    """``dicom.study.received`` for a study seen for the first time (revision 1, once).

    Parameters
    ----------
    seen : StudySeen
        What is known of the study so far.
    now : datetime, optional
        Used as ``occurred`` when the first receipt time is unknown.

    Returns
    -------
    EventSpec
    """
    rid = study_resource_id(seen.study_uid)
    resource = {
        "prefect.resource.id": rid,
        "prefect.resource.name": " ".join(x for x in (seen.modalities, seen.description, _short(seen.study_uid)) if x),
        "dicom.study-uid": seen.study_uid,
        "dicom.patient-id": seen.patient_id,
        "dicom.modality": seen.modalities,
        "dicom.revision": "1",
        "dicom.calling-ae": seen.calling_ae,
    }
    occurred = seen.first_received_at or now or dt.datetime.now(dt.UTC)
    payload: dict[str, Any] = {
        "study_uid": seen.study_uid,
        "patient_id": seen.patient_id,
        "revision": 1,
        "modalities": [m for m in seen.modalities.split("\\") if m],
        "description": seen.description,
        "series_uids": list(seen.series_uids),
        "instance_count": seen.instance_count,
        "calling_ae": seen.calling_ae,
        "first_received_at": _iso(seen.first_received_at),
    }
    return EventSpec(
        event=STUDY_RECEIVED,
        resource=resource,
        related=_patient_related(seen.patient_id),
        payload=payload,
        id=event_id(STUDY_RECEIVED, rid, 1),
        occurred=occurred,
    )


# --------------------------------------------------------------------------- emitters


@dataclass
class RecordingEmitter:
    """Keeps events in memory (unit tests of the monitor; a dry run).

    Attributes
    ----------
    events : list of EventSpec
        Everything emitted, in order (re-sends included, so tests can see them).
    fail : bool
        When True, ``emit`` refuses (returns False) as a disconnected emitter would.
    """

    events: list[EventSpec] = field(default_factory=list)
    fail: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def emit(self, spec: EventSpec) -> bool:
        """Record ``spec`` (False and nothing recorded when ``fail``)."""
        if self.fail:
            return False
        with self._lock:
            self.events.append(spec)
        return True

    def flush(self, timeout: float = 10.0) -> bool:
        """Nothing to wait for."""
        return not self.fail

    def named(self, event: str) -> list[EventSpec]:
        """The recorded events with this name."""
        with self._lock:
            return [e for e in self.events if e.event == event]


DEFAULT_CHUNK_SIZE = 100
"""Events per ``POST /events`` request."""

DEFAULT_CHUNK_BYTES = 8_000_000
"""Upper bound of one request body (a chunk closes early when its events are large)."""

DEFAULT_CONNECT_TIMEOUT = 5.0
"""Seconds to open a connection to the Prefect API (bounded by ``flush``'s own timeout)."""

DEFAULT_REQUEST_TIMEOUT = 30.0
"""Seconds one request may take (bounded by the time ``flush`` has left)."""

_OFF_MESSAGE = (
    "events are off: no PREFECT_API_URL; series are declared stable but no flow starts (dcmflow up sets it)"
)


class _Undelivered(Exception):
    """A chunk that did not reach the server's event pipeline; ``reason`` says why, for people."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Rejected(Exception):
    """A chunk the server refused because of what some of its events contain (HTTP 422, or 413
    for a single event)."""

    def __init__(self, reasons: dict[uuid.UUID, str]) -> None:
        super().__init__(f"{len(reasons)} event(s) refused")
        self.reasons = reasons


class PrefectEmitter:
    """Sends :class:`EventSpec` to the Prefect API's ``POST /events`` route and confirms delivery.

    The route (``create_events`` in ``prefect/server/api/events.py``) takes a JSON array of
    ``prefect.events.Event`` and answers 204 once the batch is published to the server's event
    pipeline (the one that stores events and fires automations). That answer is the
    confirmation ``flush`` waits for; nothing of Prefect's client-side machinery is used.

    * ``emit`` validates the event as a ``prefect.events.Event`` and buffers it in memory (an
      id buffered twice is kept once). It returns False, logged, when it certainly will not be
      sent: no API URL, an event Prefect's model refuses or that is larger than
      ``PREFECT_EVENTS_MAXIMUM_SIZE_BYTES`` (the server would drop it silently), or an id the
      server refused before in this process (HTTP 422; 413 for that event alone).
    * ``flush`` POSTs the buffer in chunks of :data:`DEFAULT_CHUNK_SIZE` events and returns
      True only when every chunk got a 2xx answer within ``timeout``; the buffer is emptied
      either way (the completeness monitor re-emits what it could not mark). A chunk a proxy
      finds too large (HTTP 413) is split in halves and sent again.
    * Logging: with no API URL, one warning when the emitter is built; when the server is
      unreachable or answers an error, one warning when the outage starts (with the reason)
      and one info line when delivery works again; an event the server refuses as invalid
      (HTTP 422) is named, with the reason, once.

    Authentication is that of Prefect's own clients: ``PREFECT_API_AUTH_STRING``
    (``user:password``, HTTP basic) wins over ``PREFECT_API_KEY`` (bearer token); TLS follows
    ``PREFECT_API_TLS_INSECURE_SKIP_VERIFY`` and ``PREFECT_API_SSL_CERT_FILE``. All are read
    through ``prefect.settings`` when the emitter is built (environment or active profile).

    Parameters
    ----------
    api_url : str, optional
        The Prefect API (``http://host:4200/api``). When omitted, Prefect's configuration
        (``PREFECT_API_URL`` or the active profile) decides; when given, it wins.
    chunk_size : int
        Events per request.
    """

    def __init__(self, api_url: str | None = None, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        from prefect.settings import (  # imports Prefect (seconds): only when an emitter is built
            PREFECT_API_AUTH_STRING,
            PREFECT_API_KEY,
            PREFECT_API_SSL_CERT_FILE,
            PREFECT_API_TLS_INSECURE_SKIP_VERIFY,
            PREFECT_API_URL,
            PREFECT_EVENTS_MAXIMUM_SIZE_BYTES,
        )

        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, not {chunk_size}")
        url = api_url or PREFECT_API_URL.value() or ""
        self.api_url: str = url.rstrip("/")
        self.chunk_size = chunk_size
        self.max_event_bytes: int = PREFECT_EVENTS_MAXIMUM_SIZE_BYTES.value()
        self._auth_string: str | None = PREFECT_API_AUTH_STRING.value()
        self._api_key: str | None = PREFECT_API_KEY.value()
        self._insecure: bool = bool(PREFECT_API_TLS_INSECURE_SKIP_VERIFY.value())
        self._cert_file: str | None = PREFECT_API_SSL_CERT_FILE.value()
        self._client: httpx.Client | None = None
        self._buffer: dict[uuid.UUID, tuple[EventSpec, bytes]] = {}
        self._buffer_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._rejected: dict[uuid.UUID, str] = {}
        self._outage: str | None = None  # why delivery failed when the current outage began
        self._last_reason = ""
        self._outage_since = 0.0
        self._failed_flushes = 0
        if not self.enabled:
            log.warning(_OFF_MESSAGE)

    @property
    def enabled(self) -> bool:
        """True when there is a Prefect API to send to."""
        return bool(self.api_url)

    # ------------------------------------------------------------------ emit

    def emit(self, spec: EventSpec) -> bool:
        """Buffer ``spec`` until the next :meth:`flush`; False (logged) if it will not be sent.

        Parameters
        ----------
        spec : EventSpec
            The event; its ``id`` is kept (the deterministic uuid5 of :func:`event_id`).

        Returns
        -------
        bool
            True when buffered (or already buffered under the same id).
        """
        if not self.enabled:
            log.debug("events are off: %s for %s not sent", spec.event, spec.resource_id)
            return False
        if spec.id in self._rejected:
            log.debug("events: %s for %s (id %s) was refused by Prefect before; not sent", spec.event, spec.resource_id, spec.id)
            return False
        with self._buffer_lock:
            if spec.id in self._buffer:
                return True
        try:
            body = self._encode(spec)
        except Exception as exc:  # pydantic's ValidationError, or too large
            self._refuse(spec, _first_line(str(exc)))
            return False
        with self._buffer_lock:
            self._buffer.setdefault(spec.id, (spec, body))
        return True

    def _encode(self, spec: EventSpec) -> bytes:
        """``spec`` as Prefect's public ``Event`` model, dumped to JSON (raises when invalid)."""
        from prefect.events import Event
        from pydantic import ValidationError

        try:
            event = Event(
                id=spec.id,
                occurred=spec.occurred,
                event=spec.event,
                resource=spec.resource,
                related=spec.related,
                payload=spec.payload,
            )
        except ValidationError as exc:
            raise ValueError(
                "; ".join(
                    f"{'.'.join(str(x) for x in e['loc']) or 'event'}: {_first_line(e['msg'])}" for e in exc.errors()
                )
            ) from None
        body = json.dumps(event.model_dump(mode="json"), separators=(",", ":")).encode()
        if len(body) > self.max_event_bytes:
            raise ValueError(
                f"{len(body)} bytes, more than PREFECT_EVENTS_MAXIMUM_SIZE_BYTES ({self.max_event_bytes})"
            )
        return body

    def _refuse(self, spec: EventSpec, reason: str) -> None:
        """Remember and log (once per id) an event that cannot be sent as it is."""
        if spec.id not in self._rejected:
            log.warning(
                "events: %s for %s (id %s) cannot be sent: %s; "
                "it stays unsent and is not tried again until the receiver restarts",
                spec.event,
                spec.resource_id,
                spec.id,
                reason,
            )
        self._rejected[spec.id] = reason

    # ------------------------------------------------------------------ flush

    def flush(self, timeout: float = 10.0) -> bool:
        """POST everything emitted since the last flush; True when the server accepted all of it.

        Parameters
        ----------
        timeout : float
            Seconds for the whole flush (every chunk); what is not accepted by then counts
            as not sent.

        Returns
        -------
        bool
            True when every chunk got a 2xx answer (or nothing was buffered); False when
            events are off, the server was unreachable, answered an error, or refused an event.
            The buffer is empty afterwards either way.
        """
        with self._buffer_lock:
            batch = list(self._buffer.values())
            self._buffer.clear()
        if not self.enabled:
            return False
        if not batch:
            return True
        with self._send_lock:
            deadline = time.monotonic() + timeout
            try:
                for chunk in self._chunks(batch):
                    self._post(chunk, deadline, timeout)
            except _Rejected as exc:
                for spec, _ in batch:
                    if spec.id in exc.reasons:
                        self._refuse(spec, exc.reasons[spec.id])
                return False
            except _Undelivered as exc:
                self._outage_begins(exc.reason, len(batch))
                return False
            self._delivered()
            return True

    def _chunks(self, batch: list[tuple[EventSpec, bytes]]) -> list[list[tuple[EventSpec, bytes]]]:
        chunks: list[list[tuple[EventSpec, bytes]]] = [[]]
        size = 0
        for item in batch:
            if chunks[-1] and (len(chunks[-1]) >= self.chunk_size or size + len(item[1]) > DEFAULT_CHUNK_BYTES):
                chunks.append([])
                size = 0
            chunks[-1].append(item)
            size += len(item[1]) + 1
        return chunks

    def _post(self, chunk: list[tuple[EventSpec, bytes]], deadline: float, timeout: float) -> None:
        """POST one chunk; raises :class:`_Undelivered` or :class:`_Rejected` unless 2xx."""
        import httpx

        left = deadline - time.monotonic()
        if left <= 0:
            raise _Undelivered(f"flush timed out after {timeout:g} s")
        content = b"[" + b",".join(body for _, body in chunk) + b"]"
        try:
            response = self._http().post(
                "/events",
                content=content,
                timeout=httpx.Timeout(min(left, DEFAULT_REQUEST_TIMEOUT), connect=min(left, DEFAULT_CONNECT_TIMEOUT)),
            )
        except httpx.HTTPError as exc:
            raise _Undelivered(_transport_reason(exc)) from exc
        except (httpx.InvalidURL, OSError, ValueError) as exc:  # a bad URL or TLS file: the settings' fault
            raise _Undelivered(f"{type(exc).__name__}: {_first_line(str(exc))}") from exc
        if response.is_success:
            return
        if response.status_code == 413:  # a proxy in front of Prefect limits the body size
            if len(chunk) > 1:
                half = len(chunk) // 2
                self._post(chunk[:half], deadline, timeout)
                self._post(chunk[half:], deadline, timeout)
                return
            raise _Rejected({chunk[0][0].id: f"{_http_reason(response)} (a proxy limits the request size?)"})
        if response.status_code == 422:
            reasons = _validation_reasons(chunk, response)
            if reasons:
                raise _Rejected(reasons)
        raise _Undelivered(_http_reason(response))

    def _http(self) -> httpx.Client:
        """The HTTP client (built on first use, again after :meth:`close`)."""
        if self._client is None:
            import ssl

            import httpx

            headers = {"Content-Type": "application/json", "User-Agent": "dcmflow-receiver"}
            if self._auth_string:  # as Prefect's clients: the auth string wins over the key
                token = base64.b64encode(self._auth_string.encode()).decode()
                headers["Authorization"] = f"Basic {token}"
            elif self._api_key:
                headers["Authorization"] = f"Bearer {self._api_key}"
            verify: ssl.SSLContext | bool = True
            if self._insecure:
                verify = False
            elif self._cert_file:
                try:
                    verify = ssl.create_default_context(cafile=self._cert_file)
                except OSError as exc:
                    raise OSError(f"PREFECT_API_SSL_CERT_FILE {self._cert_file}: {exc.strerror or exc}") from exc
            self._client = httpx.Client(base_url=self.api_url, headers=headers, verify=verify)
        return self._client

    def _outage_begins(self, reason: str, count: int) -> None:
        self._failed_flushes += 1
        self._last_reason = reason
        if self._outage is None:
            self._outage = reason
            self._outage_since = time.monotonic()
            log.warning(
                "events: cannot deliver to Prefect at %s: %s; %d event(s) will be re-sent "
                "(logged once until delivery works again)",
                self.api_url,
                reason,
                count,
            )
        else:
            log.debug("events: still cannot deliver to Prefect at %s: %s", self.api_url, reason)

    def _delivered(self) -> None:
        if self._outage is not None:
            log.info(
                "events: delivering to Prefect at %s again (undelivered for %.0f s, %d failed attempt(s), last: %s)",
                self.api_url,
                time.monotonic() - self._outage_since,
                self._failed_flushes,
                self._last_reason,
            )
            self._outage = None
            self._failed_flushes = 0

    # ------------------------------------------------------------------ close

    def close(self) -> None:
        """Close the HTTP client. Events emitted but not flushed are dropped (the monitor
        re-sends what it did not mark)."""
        with self._buffer_lock:
            self._buffer.clear()
        with self._send_lock:
            if self._client is not None:
                self._client.close()
                self._client = None


def _first_line(text: str, limit: int = 200) -> str:
    line = next((x.strip() for x in text.splitlines() if x.strip()), "")
    return line if len(line) <= limit else f"{line[: limit - 1]}…"


def _transport_reason(exc: Exception) -> str:
    """``connection refused``, ``name or service not known``, ``no answer within …``."""
    import httpx

    text = re.sub(r"^\[Errno -?\d+\]\s*", "", str(exc)).strip()
    if isinstance(exc, httpx.ConnectTimeout):
        return "connection timed out"
    if isinstance(exc, httpx.TimeoutException):
        return "no answer in time"
    if isinstance(exc, httpx.ConnectError):
        return (text[:1].lower() + text[1:]) if text else "cannot connect"
    return f"{type(exc).__name__}: {_first_line(text)}" if text else type(exc).__name__


def _http_reason(response: httpx.Response) -> str:
    """``HTTP 409 Conflict: <first line of the body, or its JSON "detail">``."""
    head = f"HTTP {response.status_code} {response.reason_phrase}".rstrip()
    try:
        detail: Any = response.json().get("detail")
    except Exception:
        detail = None
    text = detail if isinstance(detail, str) else response.text
    line = _first_line(text)
    return f"{head}: {line}" if line else head


def _validation_reasons(chunk: list[tuple[EventSpec, bytes]], response: httpx.Response) -> dict[uuid.UUID, str]:
    """Which events of ``chunk`` a FastAPI 422 answer blames, and why.

    FastAPI lists each error with ``loc`` = ``["body", <index in the array>, <field>, …]``.
    Empty when the answer does not point at events of the chunk.
    """
    try:
        errors = response.json().get("detail")
    except Exception:
        return {}
    reasons: dict[uuid.UUID, list[str]] = {}
    for error in errors if isinstance(errors, list) else []:
        loc = error.get("loc") if isinstance(error, dict) else None
        if not (isinstance(loc, list) and len(loc) >= 2 and loc[0] == "body" and isinstance(loc[1], int)):
            continue
        if not 0 <= loc[1] < len(chunk):
            continue
        where = ".".join(str(x) for x in loc[2:]) or "event"
        reasons.setdefault(chunk[loc[1]][0].id, []).append(f"{where}: {error.get('msg', 'invalid')}")
    return {k: f"HTTP 422: {'; '.join(v)}" for k, v in reasons.items()}
