"""The completeness monitor: declares series and studies stable and emits their events.

State lives in the database, not here: :meth:`storage.repository.Repository.claim_due_series`
decides (quiet period per calling peer, expected instance count, no open association sending
the series) and hands each due series to exactly one claimer (row locks, ``SKIP LOCKED`` on
PostgreSQL), so any number of receivers can run a monitor on one database. Studies follow
their series (:meth:`~storage.repository.Repository.claim_due_studies`).

One :meth:`CompletenessMonitor.tick`
------------------------------------
1. **New studies** → ``dicom.study.received``: ``claim_received_studies`` hands each study
   not yet announced to one monitor (a claim left unmarked for ``reemit_after`` is taken
   over); emit, flush, then ``mark_study_received_emitted``.
2. **Series** → claim due series, build ``dicom.series.stable`` for each (the claim carries
   what the revision added), emit them, flush the emitter, and only then
   ``mark_series_emitted(uid, revision)``.
3. **Recovery of series** (at the first tick, then every ``recovery_interval``): stable
   series whose current revision was claimed more than ``reemit_after`` ago but never marked
   emitted (``list_unemitted_series``, a partial index of exactly those) are emitted again.
4. **Studies** → the same with ``claim_due_studies`` / ``dicom.study.stable`` /
   ``mark_study_emitted``. The repository claims a study only when its received event and
   the current revision of every one of its series were marked emitted, so
   ``dicom.study.stable`` always follows them, recovered ones included (step 3 runs first).
5. **Recovery of studies**: as step 3, with ``list_unemitted_studies``.

Why each (series, revision) reaches Prefect once
------------------------------------------------
The claim is exactly-once (database), but emitting and recording "emitted" cannot be one
transaction with Prefect. So the monitor is **at-least-once with an idempotent event id**:

* crash after the claim, before or during the emit: the row is claimed but not marked; the
  recovery step of any monitor (this one after a restart, or another receiver) emits it
  again after ``reemit_after``;
* crash after the emit, before the mark: same, and the re-sent event carries the same id
  (:func:`receiver.events.event_id` = uuid5 of name, resource and revision), which the Prefect
  server de-duplicates, so no second flow run starts;
* Prefect unreachable: ``emit``/``flush`` report it, nothing is marked, the recovery step
  retries every ``recovery_interval`` until it is back (one warning per outage, not per attempt);
* after a mark, :meth:`~storage.repository.Repository.mark_series_emitted` returns True only
  once per (series, revision), and nothing re-emits a marked revision.

``dicom.study.received`` follows the same rules with its own claim/mark columns on the study
row, so it too is sent once per study whatever the number of receivers or restarts (again
only a crash between emit and mark re-sends it, with the same id).

A late instance for a stable series is recorded as revision n+1 (by ``record_instances``);
the monitor then emits revision n+1 with what was added: ``added_instance_count`` and the
``added_sop_uids`` (instance versions whose ``series_revision`` is n+1), both computed by the
repository in the claim transaction.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from receiver.events import (
    STUDY_RECEIVED,
    Emitter,
    EventSpec,
    StudySeen,
    series_stable_event,
    study_received_event,
    study_stable_event,
)
from storage.repository import DEFAULT_ASSOCIATION_TIMEOUT

if TYPE_CHECKING:
    from storage.repository import Repository, StudyClaim, StudyReceivedClaim

__all__ = [
    "DEFAULT_INTERVAL",
    "DEFAULT_REEMIT_AFTER",
    "DEFAULT_RECOVERY_INTERVAL",
    "MonitorOptions",
    "TickReport",
    "CompletenessMonitor",
    "default_claimer",
]

log = logging.getLogger("receiver.completeness")

DEFAULT_INTERVAL = 0.25
"""Seconds between ticks of the monitor thread: how late past its quiet period (or its last
instance and closed association) a series is declared stable. A tick with nothing due is
three indexed queries."""

DEFAULT_REEMIT_AFTER = dt.timedelta(seconds=60)
"""A claim not marked emitted this long after it was made is emitted again (its claimer died)."""

DEFAULT_RECOVERY_INTERVAL = dt.timedelta(seconds=30)
"""How often the recovery step looks for claimed-but-unemitted series and studies."""


def default_claimer() -> str:
    """``host:pid``: who claimed a row, as kept in ``claimed_by`` for diagnosis."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, kw_only=True)
class MonitorOptions:
    """Tuning of a :class:`CompletenessMonitor`.

    Attributes
    ----------
    stable_age : float
        Default quiet period in seconds (``Settings.stable_age``); peers with
        ``stable_age_seconds`` override it for their series (done by the repository).
    interval : float
        Seconds between ticks of the thread.
    claim_limit : int
        Studies or series claimed per repository call; a tick loops until none is due.
    association_timeout : datetime.timedelta
        Open-association rows untouched this long stop blocking stability.
    reemit_after : datetime.timedelta
        Grace before a claimed-but-unmarked event is emitted again (by any monitor).
    recovery_interval : datetime.timedelta
        Period of the recovery step.
    recovery_scan : int
        Claimed-but-unmarked series (and studies) the recovery step re-emits per run.
    flush_timeout : float
        Seconds ``Emitter.flush`` may take before the batch counts as not sent.
    """

    stable_age: float = 60.0
    interval: float = DEFAULT_INTERVAL
    claim_limit: int = 100
    association_timeout: dt.timedelta = DEFAULT_ASSOCIATION_TIMEOUT
    reemit_after: dt.timedelta = DEFAULT_REEMIT_AFTER
    recovery_interval: dt.timedelta = DEFAULT_RECOVERY_INTERVAL
    recovery_scan: int = 1000
    flush_timeout: float = 10.0


@dataclass
class TickReport:
    """What one tick did (only events that were sent and marked by this monitor)."""

    received: list[EventSpec] = field(default_factory=list)
    series: list[EventSpec] = field(default_factory=list)
    studies: list[EventSpec] = field(default_factory=list)
    recovered: list[EventSpec] = field(default_factory=list)
    unsent: int = 0  # claims whose event could not be sent (left for recovery)
    order: list[EventSpec] = field(default_factory=list)  # every event sent, in sending order

    @property
    def events(self) -> list[EventSpec]:
        """Every event emitted by the tick, grouped by kind (``order`` has the sending order)."""
        return [*self.received, *self.series, *self.studies, *self.recovered]


class CompletenessMonitor:
    """Claims due series and studies and emits their events (see the module docstring).

    Parameters
    ----------
    repository : Repository
        The shared record database.
    emitter : Emitter
        Where events go (:class:`receiver.events.PrefectEmitter` in production,
        :class:`~receiver.events.RecordingEmitter` in tests).
    options : MonitorOptions
        Quiet period and timings.
    claimer : str, optional
        Who claims (default ``host:pid``).
    clock : callable, optional
        Returns the current aware UTC time for the thread's ticks (tests call :meth:`tick`
        with explicit times instead).
    """

    def __init__(
        self,
        repository: Repository,
        emitter: Emitter,
        options: MonitorOptions = MonitorOptions(),
        *,
        claimer: str | None = None,
        clock: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        self.repository = repository
        self.emitter = emitter
        self.options = options
        self.claimer = claimer or default_claimer()
        self._clock = clock
        self._next_recovery: dt.datetime | None = None
        self._lost_outstanding = {"series": False, "studies": False}  # warned, not yet all re-sent
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tick_lock = threading.Lock()
        self._failing = False

    # ------------------------------------------------------------------ thread

    def start(self) -> None:
        """Run :meth:`tick` every ``options.interval`` seconds in a daemon thread."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="dcmflow-completeness", daemon=True)
        self._thread.start()
        log.info(
            "completeness: monitoring as %s (quiet period %.0f s, tick %.1f s)",
            self.claimer,
            self.options.stable_age,
            self.options.interval,
        )

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread after its current tick (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick(self._clock())
                if self._failing:
                    log.warning("completeness: database reachable again; resuming")
                    self._failing = False
            except Exception as exc:  # the database may be down: keep trying, log once
                if not self._failing:
                    first = str(exc).splitlines()[0] if str(exc) else ""
                    log.error("completeness: tick failed, retrying: %s: %s", type(exc).__name__, first)
                    self._failing = True
            self._stop.wait(self.options.interval)

    # ------------------------------------------------------------------ one tick

    def tick(self, now: dt.datetime) -> TickReport:
        """Announce new studies, claim and emit due series and studies, recover lost emits.

        Parameters
        ----------
        now : datetime.datetime
            Timezone-aware current time (explicit so tests need no sleeping).

        Returns
        -------
        TickReport
        """
        opts = self.options
        with self._tick_lock:
            report = TickReport()
            while True:
                received = self.repository.claim_received_studies(
                    now=now, claimer=self.claimer, limit=opts.claim_limit, reclaim_after=opts.reemit_after
                )
                if not received:
                    break
                sent = self._emit_and_mark([self._received_event(c, now) for c in received], report)
                report.received.extend(sent)
                if len(received) < opts.claim_limit or len(sent) < len(received):
                    break
            while True:
                claims = self.repository.claim_due_series(
                    now=now,
                    default_stable_age=opts.stable_age,
                    claimer=self.claimer,
                    limit=opts.claim_limit,
                    association_timeout=opts.association_timeout,
                )
                if not claims:
                    break
                report.series.extend(self._emit_and_mark([series_stable_event(c) for c in claims], report))
                if len(claims) < opts.claim_limit:
                    break
            recovering = self._next_recovery is None or now >= self._next_recovery
            if recovering:
                # Before the studies: a study is claimable only once its series are marked.
                lost = self.repository.list_unemitted_series(now - opts.reemit_after, limit=opts.recovery_scan)
                if lost:
                    self._say_lost("series", len(lost))
                    sent = self._emit_and_mark([series_stable_event(c) for c in lost], report)
                    report.recovered.extend(sent)
                    self._lost_outstanding["series"] = len(sent) < len(lost)
            while True:
                study_claims = self.repository.claim_due_studies(now=now, claimer=self.claimer, limit=opts.claim_limit)
                if not study_claims:
                    break
                report.studies.extend(self._emit_and_mark([self._study_event(c) for c in study_claims], report))
                if len(study_claims) < opts.claim_limit:
                    break
            if recovering:
                lost_studies = self.repository.list_unemitted_studies(now - opts.reemit_after, limit=opts.recovery_scan)
                if lost_studies:
                    self._say_lost("studies", len(lost_studies))
                    sent = self._emit_and_mark([self._study_event(c) for c in lost_studies], report)
                    report.recovered.extend(sent)
                    self._lost_outstanding["studies"] = len(sent) < len(lost_studies)
                self._next_recovery = now + opts.recovery_interval
            return report

    def _say_lost(self, what: str, count: int) -> None:
        """Warn about unemitted claims once per outage (the emitter says why), then only in debug."""
        level = logging.DEBUG if self._lost_outstanding[what] else logging.WARNING
        log.log(level, "completeness: %d %s were claimed but never emitted; emitting them again", count, what)

    # ------------------------------------------------------------------ emitting

    def _emit_and_mark(self, specs: list[EventSpec], report: TickReport) -> list[EventSpec]:
        """Emit, flush, then mark; returns the specs marked by this call."""
        accepted = [s for s in specs if self.emitter.emit(s)]
        if not accepted:
            report.unsent += len(specs)
            return []
        if not self.emitter.flush(self.options.flush_timeout):
            report.unsent += len(specs)
            return []
        report.unsent += len(specs) - len(accepted)
        marked = []
        for spec in accepted:
            if self._mark(spec):
                marked.append(spec)
                log.info("completeness: %s %s revision %s", spec.event, spec.resource_id, spec.payload["revision"])
            else:  # another monitor marked it meanwhile: our copy had the same id
                log.debug("completeness: %s %s was already marked", spec.event, spec.resource_id)
        report.order.extend(marked)
        return marked

    def _mark(self, spec: EventSpec) -> bool:
        payload = spec.payload
        if spec.event == STUDY_RECEIVED:
            return self.repository.mark_study_received_emitted(payload["study_uid"])
        if "series_uid" in payload:
            return self.repository.mark_series_emitted(payload["series_uid"], int(payload["revision"]))
        return self.repository.mark_study_emitted(payload["study_uid"], int(payload["revision"]))

    def _received_event(self, claim: StudyReceivedClaim, now: dt.datetime) -> EventSpec:
        seen = StudySeen(
            study_uid=claim.study_uid,
            patient_id=claim.patient_id,
            modalities=claim.modalities,
            description=claim.description,
            calling_ae=claim.calling_ae,
            first_received_at=claim.first_received_at,
            series_uids=claim.series_uids,
            instance_count=claim.instance_count,
        )
        return study_received_event(seen, now=now)

    def _study_event(self, claim: StudyClaim) -> EventSpec:
        members = self.repository.list_series(limit=10_000, study_uid=claim.study_uid)
        calling_ae = members[0].calling_ae if members else ""  # most recently received first
        return study_stable_event(
            claim, calling_ae=calling_ae, series_revisions={s.series_uid: s.revision for s in members}
        )
