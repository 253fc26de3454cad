"""The completeness monitor: declares series and studies stable and emits their events.

State lives in the database, not here: :meth:`storage.repository.Repository.claim_due_series`
decides (quiet period per calling peer, expected instance count, no open association sending
the series) and hands each due series to exactly one claimer (row locks, ``SKIP LOCKED`` on
PostgreSQL), so any number of receivers can run a monitor on one database. Studies follow
their series (:meth:`~storage.repository.Repository.claim_due_studies`).

One :meth:`CompletenessMonitor.tick`
------------------------------------
1. **New studies** → ``dicom.study.received``. Studies with a series still receiving
   (``list_series(state="receiving")``, served by the ``(state, last_received_at)`` index)
   that are at revision 1 and not yet announced by this monitor are announced. A study at
   revision 1 is also announced right before its first ``dicom.study.stable`` if it was not
   (a study that arrived complete between two ticks).
2. **Series** → claim due series, build ``dicom.series.stable`` for each, emit them, flush the
   emitter, and only then ``mark_series_emitted(uid, revision)``.
3. **Studies** → the same with ``claim_due_studies`` / ``dicom.study.stable`` /
   ``mark_study_emitted``.
4. **Recovery** (at the first tick, then every ``recovery_interval``): stable series and studies
   whose current revision was claimed more than ``reemit_after`` ago but never marked
   emitted are emitted again and marked.

Why each (series, revision) reaches Prefect once
------------------------------------------------
The claim is exactly-once (database), but emitting and recording "emitted" cannot be one
transaction with Prefect. So the monitor is **at-least-once with an idempotent event id**:

* crash after the claim, before or during the emit: the row is stable but not marked; the
  recovery step of any monitor (this one after a restart, or another receiver) emits it
  again after ``reemit_after``;
* crash after the emit, before the mark: same, and the re-sent event carries the same id
  (:func:`receiver.events.event_id` = uuid5 of name, resource and revision), which the Prefect
  server de-duplicates, so no second flow run starts;
* Prefect unreachable: ``emit``/``flush`` report it, nothing is marked, the recovery step
  retries every ``recovery_interval`` (one warning per failed attempt) until it is back;
* after a mark, :meth:`~storage.repository.Repository.mark_series_emitted` returns True only
  once per (series, revision), and nothing re-emits a marked revision.

A late instance for a stable series is recorded as revision n+1 (by ``record_instances``);
the monitor then emits revision n+1 with what was added: ``added_instance_count`` and the
``added_sop_uids`` (instance versions whose ``series_revision`` is n+1).

``dicom.study.received`` has no "emitted" column in the database, so this monitor remembers
what it announced in memory; after a restart, or with several receivers, a study still
arriving may be announced again, always with the same id (de-duplicated by Prefect). A
``received_emitted`` study column claimed like the others would make it exactly-once.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from receiver.events import (
    Emitter,
    EventSpec,
    StudySeen,
    series_stable_event,
    study_received_event,
    study_stable_event,
)
from storage.models import SeriesState
from storage.repository import DEFAULT_ASSOCIATION_TIMEOUT, SeriesClaim, StudyClaim

if TYPE_CHECKING:
    from storage.models import SeriesPublic, StudyPublic
    from storage.repository import Repository

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

DEFAULT_INTERVAL = 1.0
"""Seconds between ticks of the monitor thread."""

DEFAULT_REEMIT_AFTER = dt.timedelta(seconds=60)
"""A claim not marked emitted this long after it was made is emitted again (its claimer died)."""

DEFAULT_RECOVERY_INTERVAL = dt.timedelta(seconds=30)
"""How often the recovery step looks for claimed-but-unemitted series and studies."""

_ANNOUNCED_MAX = 10_000


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
        Series (and studies) claimed per repository call; a tick loops until none is due.
    association_timeout : datetime.timedelta
        Open-association rows untouched this long stop blocking stability.
    reemit_after : datetime.timedelta
        Grace before a claimed-but-unmarked revision is emitted again.
    recovery_interval : datetime.timedelta
        Period of the recovery step.
    recovery_scan : int
        Most recent stable series / studies the recovery step looks at.
    new_study_scan : int
        Receiving series looked at per tick to find new studies.
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
    new_study_scan: int = 500
    flush_timeout: float = 10.0


@dataclass
class TickReport:
    """What one tick did."""

    received: list[EventSpec] = field(default_factory=list)
    series: list[EventSpec] = field(default_factory=list)
    studies: list[EventSpec] = field(default_factory=list)
    recovered: list[EventSpec] = field(default_factory=list)
    unsent: int = 0  # claims whose event could not be sent (left for recovery)

    @property
    def events(self) -> list[EventSpec]:
        """Every event emitted by the tick, in order."""
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
        self._announced: OrderedDict[str, None] = OrderedDict()
        self._next_recovery: dt.datetime | None = None
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
                    log.error("completeness: tick failed, retrying: %s: %s", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
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
        with self._tick_lock:
            report = TickReport()
            self._announce_new_studies(now, report)
            while True:
                claims = self.repository.claim_due_series(
                    now=now,
                    default_stable_age=self.options.stable_age,
                    claimer=self.claimer,
                    limit=self.options.claim_limit,
                    association_timeout=self.options.association_timeout,
                )
                if not claims:
                    break
                specs = [self._series_event(c) for c in claims]
                report.series.extend(self._emit_and_mark(specs, report))
                if len(claims) < self.options.claim_limit:
                    break
            while True:
                study_claims = self.repository.claim_due_studies(
                    now=now, claimer=self.claimer, limit=self.options.claim_limit
                )
                if not study_claims:
                    break
                self._ensure_announced(study_claims, now, report)
                specs = [self._study_event(c) for c in study_claims]
                report.studies.extend(self._emit_and_mark(specs, report))
                if len(study_claims) < self.options.claim_limit:
                    break
            if self._next_recovery is None or now >= self._next_recovery:
                self._recover(now, report)
                self._next_recovery = now + self.options.recovery_interval
            return report

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
            uid = spec.payload["series_uid"] if "series_uid" in spec.payload else spec.payload["study_uid"]
            revision = int(spec.payload["revision"])
            if "series_uid" in spec.payload:
                first = self.repository.mark_series_emitted(uid, revision)
            else:
                first = self.repository.mark_study_emitted(uid, revision)
            if first:
                marked.append(spec)
                log.info("completeness: %s %s revision %d", spec.event, uid, revision)
            else:  # another monitor marked it meanwhile: our copy had the same id
                log.debug("completeness: %s %s revision %d was already marked", spec.event, uid, revision)
        return marked

    def _series_event(self, claim: SeriesClaim) -> EventSpec:
        if claim.revision <= 1:
            return series_stable_event(claim)
        added = [
            i.sop_uid
            for i in self.repository.list_instances(claim.series_uid, all_versions=True)
            if i.series_revision == claim.revision
        ]
        return series_stable_event(claim, added_instance_count=len(added), added_sop_uids=sorted(set(added)))

    def _study_event(self, claim: StudyClaim) -> EventSpec:
        members = self.repository.list_series(limit=10_000, study_uid=claim.study_uid)
        calling_ae = members[0].calling_ae if members else ""  # most recently received first
        return study_stable_event(
            claim, calling_ae=calling_ae, series_revisions={s.series_uid: s.revision for s in members}
        )

    # ------------------------------------------------------------------ dicom.study.received

    def _remember(self, study_uid: str) -> None:
        self._announced[study_uid] = None
        self._announced.move_to_end(study_uid)
        while len(self._announced) > _ANNOUNCED_MAX:
            self._announced.popitem(last=False)

    def _announce(self, study: StudyPublic, members: list[SeriesPublic], now: dt.datetime, report: TickReport) -> None:
        patient = self.repository.get_patient(study.patient_id)
        firsts = [s.first_received_at for s in members if s.first_received_at is not None]
        ordered = sorted(members, key=lambda s: (s.first_received_at or now, s.series_uid))
        seen = StudySeen(
            study_uid=study.study_uid,
            patient_id=patient.patient_id if patient is not None else "",
            modalities=study.modalities,
            description=study.description,
            calling_ae=ordered[0].calling_ae if ordered else "",
            first_received_at=min(firsts) if firsts else None,
            series_uids=tuple(s.series_uid for s in ordered),
            instance_count=sum(s.instance_count for s in members),
        )
        spec = study_received_event(seen, now=now)
        if self.emitter.emit(spec):
            self._remember(study.study_uid)
            report.received.append(spec)

    def _announce_new_studies(self, now: dt.datetime, report: TickReport) -> None:
        receiving = self.repository.list_series(limit=self.options.new_study_scan, state=SeriesState.RECEIVING.value)
        candidates = sorted({s.study_uid for s in receiving if s.study_uid not in self._announced})
        for study_uid in candidates:
            study = self.repository.get_study(study_uid)
            if study is None or study.revision != 1 or study.emitted_revision is not None:
                self._remember(study_uid)  # an old study receiving a late instance
                continue
            self._announce(study, self.repository.list_series(limit=10_000, study_uid=study_uid), now, report)
        if report.received and not self.emitter.flush(self.options.flush_timeout):
            for spec in report.received:  # try again next tick (same ids)
                self._announced.pop(spec.payload["study_uid"], None)
            report.received.clear()

    def _ensure_announced(self, claims: list[StudyClaim], now: dt.datetime, report: TickReport) -> None:
        for claim in claims:
            if claim.revision != 1 or claim.study_uid in self._announced:
                continue
            study = self.repository.get_study(claim.study_uid)
            if study is not None:
                self._announce(study, self.repository.list_series(limit=10_000, study_uid=claim.study_uid), now, report)

    # ------------------------------------------------------------------ recovery

    def _recover(self, now: dt.datetime, report: TickReport) -> None:
        """Emit again what was claimed long enough ago but never marked emitted."""
        cutoff = now - self.options.reemit_after
        series = [
            s
            for s in self.repository.list_series(limit=self.options.recovery_scan, state=SeriesState.STABLE.value)
            if s.emitted_revision != s.revision and s.claimed_at is not None and s.claimed_at <= cutoff
        ]
        if series:
            patients: dict[str, str] = {}
            claims = []
            for s in series:
                if s.study_uid not in patients:
                    study = self.repository.get_study(s.study_uid)
                    patient = self.repository.get_patient(study.patient_id) if study is not None else None
                    patients[s.study_uid] = patient.patient_id if patient is not None else ""
                claims.append(_claim_of_series(s, patients[s.study_uid]))
            log.warning("completeness: %d series were claimed but never emitted; emitting them again", len(claims))
            report.recovered.extend(self._emit_and_mark([self._series_event(c) for c in claims], report))
        studies = [
            st
            for st in self.repository.list_studies(limit=self.options.recovery_scan)
            if st.state == SeriesState.STABLE.value
            and st.emitted_revision != st.revision
            and st.claimed_at is not None
            and st.claimed_at <= cutoff
        ]
        if studies:
            study_claims = []
            for st in studies:
                members = self.repository.list_series(limit=10_000, study_uid=st.study_uid)
                patient = self.repository.get_patient(st.patient_id)
                study_claims.append(_claim_of_study(st, members, patient.patient_id if patient is not None else ""))
            log.warning("completeness: %d studies were claimed but never emitted; emitting them again", len(study_claims))
            self._ensure_announced(study_claims, now, report)
            report.recovered.extend(self._emit_and_mark([self._study_event(c) for c in study_claims], report))


def _claim_of_series(s: SeriesPublic, patient_id: str) -> SeriesClaim:
    """The claim a monitor made for a stable series (rebuilt from its record)."""
    reached = s.expected_instance_count is not None and s.instance_count >= s.expected_instance_count
    return SeriesClaim(
        series_uid=s.series_uid,
        study_uid=s.study_uid,
        patient_id=patient_id,
        modality=s.modality,
        description=s.description,
        revision=s.revision,
        instance_count=s.instance_count,
        expected_instance_count=s.expected_instance_count,
        calling_ae=s.calling_ae,
        first_received_at=s.first_received_at,
        last_received_at=s.last_received_at,
        stable_at=s.stable_at or s.claimed_at or _utcnow(),
        reason="expected_count" if reached else "quiet",
    )


def _claim_of_study(st: StudyPublic, members: list[SeriesPublic], patient_id: str) -> StudyClaim:
    """The claim a monitor made for a stable study (rebuilt from its record)."""
    ordered = sorted(members, key=lambda s: (s.number is None, s.number or 0, s.series_uid))
    return StudyClaim(
        study_uid=st.study_uid,
        patient_id=patient_id,
        revision=st.revision,
        series_uids=tuple(s.series_uid for s in ordered),
        instance_count=sum(s.instance_count for s in members),
        modalities=st.modalities,
        stable_at=st.stable_at or st.claimed_at or _utcnow(),
    )
