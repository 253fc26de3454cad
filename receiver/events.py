"""The Prefect events of DESIGN.md, built as plain data and sent with ``prefect.events.emit_event``.

This is the only module of :mod:`receiver` that imports Prefect (``tests/test_layout.py``
enforces it), and it imports it lazily, inside :class:`PrefectEmitter`, so a receiver without
Prefect configured never pays for ``import prefect``.

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
is at-least-once (it marks an event emitted only after it was handed to Prefect and flushed,
and re-sends claims that were never marked); the fixed id is what makes a re-send harmless:
the Prefect server drops an id it has seen (messaging de-duplication and ``ON CONFLICT DO
NOTHING`` in its event store), so a re-sent event creates no second flow run
(reference/prefect.md §1.1, verified there and in ``tests/receiver/test_events.py``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
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
    """One event as plain data: exactly the arguments of ``prefect.events.emit_event``.

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
    """Sends events. ``emit`` hands one over; ``flush`` confirms everything handed over was sent.

    The completeness monitor marks a claim emitted only when ``emit`` returned True for its
    event and the following ``flush`` returned True.
    """

    def emit(self, spec: EventSpec) -> bool:
        """Hand one event over; False when it certainly was not (logged)."""
        ...

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every handed-over event was sent; False on failure or timeout (logged)."""
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


class _FailureCounter(logging.Handler):
    """Counts the errors Prefect's EventsWorker logs when it drops an event it could not send."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # pragma: no cover - a broken record is still a failure
            text = "EventsWorker"
        if "EventsWorker" in text:
            self.count += 1


class PrefectEmitter:
    """Sends :class:`EventSpec` with ``prefect.events.emit_event`` (id = the deterministic uuid5).

    ``emit_event`` is fire-and-forget: it queues the event on Prefect's background
    ``EventsWorker`` and swallows errors (returning ``None`` when events are disabled). So:

    * ``emit`` returns False, with one warning, whenever ``emit_event`` returns ``None`` or
      raises; with no API URL at all it returns False without starting Prefect's ephemeral
      server (which ``emit_event`` would otherwise do inside the receiver), warning once;
    * ``flush`` waits until the worker's queue is empty and returns False (one warning) if it
      timed out, the worker died, or it logged a dropped event meanwhile;
    * an id queued twice before a ``flush`` is queued once;
    * ``close`` drains the worker (``EventsWorker.drain_all``), which a short-lived process
      must call before exiting or queued events are lost.

    Parameters
    ----------
    api_url : str, optional
        The Prefect API (``http://host:4200/api``). When omitted, Prefect's own configuration
        (``PREFECT_API_URL`` or the active profile) decides. When given, the events worker is
        started with it (Prefect keeps one events worker per process: use one URL per process).
    """

    def __init__(self, api_url: str | None = None) -> None:
        from prefect._internal.concurrency import logger as services_logger
        from prefect.events.worker import EventsWorker
        from prefect.settings import PREFECT_API_URL

        self._explicit_url = api_url
        self.api_url = api_url or PREFECT_API_URL.value()
        self._worker_cls: Any = EventsWorker
        self._failures = _FailureCounter()
        services_logger.addHandler(self._failures)
        self._services_logger = services_logger
        self._warned_disabled = False
        self._queued: set[uuid.UUID] = set()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """True when there is a Prefect API to send to."""
        return bool(self.api_url)

    def _settings(self) -> contextlib.AbstractContextManager[Any]:
        """Prefect settings with our API URL. The events worker is started inside this context
        (Prefect copies contextvars into its loop thread), so its websocket client and its
        orchestration client both use this URL and no ephemeral server is started."""
        if not self._explicit_url:
            return contextlib.nullcontext()
        from prefect.settings import PREFECT_API_URL, temporary_settings

        return temporary_settings(updates={PREFECT_API_URL: self._explicit_url})

    def emit(self, spec: EventSpec) -> bool:
        """Queue ``spec`` on Prefect's events worker; False (logged) if it was not queued.

        An id already queued since the last :meth:`flush` is not queued again (Prefect's
        worker keys per-event state by id and fails the second copy).
        """
        from prefect.events import emit_event

        if not self.enabled:
            if not self._warned_disabled:
                log.warning("events: no Prefect API URL (PREFECT_API_URL); %s and later events are not sent", spec.event)
                self._warned_disabled = True
            return False
        with self._lock:
            if spec.id in self._queued:
                return True
            try:
                with self._settings():
                    sent = emit_event(
                        spec.event,
                        resource=spec.resource,
                        occurred=spec.occurred,
                        related=spec.related,
                        payload=spec.payload,
                        id=spec.id,
                    )
            except Exception as exc:  # EventTooLarge is the one emit_event raises
                log.warning("events: cannot emit %s for %s: %s: %s", spec.event, spec.resource_id, type(exc).__name__, exc)
                return False
            if sent is None:
                log.warning(
                    "events: Prefect did not accept %s for %s (events disabled or client error)", spec.event, spec.resource_id
                )
                return False
            self._queued.add(spec.id)
            return True

    def _workers(self) -> list[Any]:
        cls: Any = self._worker_cls
        with cls._instance_cache_lock:
            return list(cls._instances.values())

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the events worker sent everything queued; False (logged) on failure."""
        if not self.enabled:
            return False
        with self._lock:
            self._queued.clear()
            failures_before = self._failures.count
            deadline = time.monotonic() + timeout
            # Prefect 3.8 internals: a QueueService keeps a queue.Queue whose
            # ``unfinished_tasks`` drops to 0 once every queued event was handled (sent, or
            # dropped with an error log). A worker whose connection failed stops with items
            # still unfinished (and logs "Service 'EventsWorker' failed with N pending items").
            workers = self._workers()
            while True:
                pending = sum(w._queue.unfinished_tasks for w in workers)
                dead = [w for w in workers if w._stopped and w._queue.unfinished_tasks]
                if dead or pending == 0:
                    break
                if time.monotonic() >= deadline:
                    log.warning("events: %d event(s) still unsent after %.0f s; they will be re-sent", pending, timeout)
                    return False
                time.sleep(0.01)
            dropped = self._failures.count - failures_before
            if dead or dropped:
                log.warning(
                    "events: Prefect's events worker could not send %d event(s); they will be re-sent",
                    max(dropped, sum(w._queue.unfinished_tasks for w in dead)),
                )
                return False
            return True

    def close(self, timeout: float = 10.0) -> None:
        """Drain the events worker (call before a short-lived process exits)."""
        try:
            self._worker_cls.drain_all(timeout=timeout, at_exit=False)
        finally:
            self._services_logger.removeHandler(self._failures)
