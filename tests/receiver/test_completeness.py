"""The completeness monitor on real databases (SQLite and PostgreSQL), ticked with explicit times.

Events go to a :class:`~receiver.events.RecordingEmitter`; the Prefect side is covered in
``test_events.py``.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
import uuid
from collections import Counter

import pytest

from receiver.completeness import CompletenessMonitor, MonitorOptions
from receiver.events import SERIES_STABLE, STUDY_RECEIVED, STUDY_STABLE, EventSpec, RecordingEmitter, event_id
from storage.models import PeerBase
from storage.repository import InstanceIn, Repository

T0 = dt.datetime(2026, 1, 5, 8, 0, 0, tzinfo=dt.UTC)
AGE = 60.0


def s(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def uid(*parts: int) -> str:
    return "1.2.826.0.1.3680043.8.498.77." + ".".join(str(p) for p in parts)


def record(
    repo: Repository,
    study: str,
    series: str,
    count: int,
    at: dt.datetime,
    *,
    start: int = 0,
    ae: str = "MODALITY",
    expected: int | None = None,
    modality: str = "CT",
    patient: str = "PAT-1",
) -> list[str]:
    """Record ``count`` new instances of one series received at ``at``; returns their SOP UIDs."""
    sops = [f"{series}.{start + i + 1}" for i in range(count)]
    repo.record_instances(
        [
            InstanceIn(
                study_uid=study,
                series_uid=series,
                sop_uid=sop,
                sha256=uuid.uuid5(uuid.NAMESPACE_OID, sop).hex * 2,
                size=100,
                object_key=f"instances/{study}/{series}/{sop}.dcm",
                received_at=at,
                calling_ae=ae,
                patient_id=patient,
                modality=modality,
                series_description="chest",
                expected_instance_count=expected,
            )
            for sop in sops
        ]
    )
    return sops


def monitor(repo: Repository, emitter: RecordingEmitter | None = None, **kw: object) -> CompletenessMonitor:
    return CompletenessMonitor(
        repo, emitter if emitter is not None else RecordingEmitter(), MonitorOptions(stable_age=AGE, **kw), claimer="test"  # type: ignore[arg-type]
    )


def names(events: list[EventSpec]) -> list[tuple[str, str, int]]:
    return [(e.event, e.resource_id, int(e.payload["revision"])) for e in events]


STUDY, SERIES = uid(1), uid(1, 1)


def test_quiet_period_then_exactly_once(repo: Repository) -> None:
    record(repo, STUDY, SERIES, 5, s(0))
    rec = RecordingEmitter()
    mon = monitor(repo, rec)

    first = mon.tick(s(30))  # still within the quiet period
    assert names(first.events) == [(STUDY_RECEIVED, f"dicom.study.{STUDY}", 1)]
    assert first.events[0].payload["series_uids"] == [SERIES]
    assert first.events[0].payload["patient_id"] == "PAT-1"
    assert first.events[0].payload["calling_ae"] == "MODALITY"

    due = mon.tick(s(61))
    assert names(due.events) == [
        (SERIES_STABLE, f"dicom.series.{SERIES}", 1),
        (STUDY_STABLE, f"dicom.study.{STUDY}", 1),
    ]
    series_ev, study_ev = due.events
    assert series_ev.payload["reason"] == "quiet"
    assert series_ev.payload["instance_count"] == 5 and series_ev.payload["added_instance_count"] == 5
    assert series_ev.resource["dicom.revision"] == "1"
    assert series_ev.id == event_id(SERIES_STABLE, f"dicom.series.{SERIES}", 1)
    assert study_ev.payload["series_uids"] == [SERIES]
    assert study_ev.payload["instance_count"] == 5
    assert study_ev.payload["calling_ae"] == "MODALITY"

    assert mon.tick(s(500)).events == []
    assert mon.tick(s(5000)).events == []  # recovery ran again: nothing unmarked
    assert len(rec.events) == 3
    got = repo.get_series(SERIES)
    assert got is not None and got.state == "stable" and got.emitted_revision == 1


def test_expected_count_is_stable_before_the_quiet_period(repo: Repository) -> None:
    done, short = uid(2, 1), uid(2, 2)
    record(repo, uid(2), done, 3, s(0), expected=3)
    record(repo, uid(2), short, 3, s(0), expected=4)
    rec = RecordingEmitter()
    report = monitor(repo, rec).tick(s(1))
    stable = rec.named(SERIES_STABLE)
    assert [e.payload["series_uid"] for e in stable] == [done]
    assert stable[0].payload["reason"] == "expected_count"
    assert stable[0].payload["expected_instance_count"] == 3
    assert report.studies == []  # the other series of the study is still receiving


def test_late_instance_emits_revision_two_with_what_was_added(repo: Repository) -> None:
    record(repo, STUDY, SERIES, 4, s(0))
    rec = RecordingEmitter()
    mon = monitor(repo, rec)
    mon.tick(s(61))
    late = record(repo, STUDY, SERIES, 1, s(100), start=4)

    assert mon.tick(s(120)).events == []  # quiet period of the late instance not over
    report = mon.tick(s(161))
    assert names(report.events) == [
        (SERIES_STABLE, f"dicom.series.{SERIES}", 2),
        (STUDY_STABLE, f"dicom.study.{STUDY}", 2),
    ]
    rev2 = report.series[0]
    assert rev2.payload["instance_count"] == 5
    assert rev2.payload["added_instance_count"] == 1
    assert rev2.payload["added_sop_uids"] == late
    assert rev2.resource["dicom.revision"] == "2"
    assert rev2.id != rec.named(SERIES_STABLE)[0].id
    assert report.studies[0].payload["series_revisions"] == {SERIES: 2}
    assert len(rec.named(STUDY_RECEIVED)) == 1  # a late instance is no new study
    assert mon.tick(s(1000)).events == []


def test_open_association_blocks_stability(repo: Repository) -> None:
    repo.association_opened("a" * 32, "MODALITY", now=s(0))
    repo.association_touched_series("a" * 32, [SERIES], now=s(0))
    record(repo, STUDY, SERIES, 2, s(0), expected=2)
    rec = RecordingEmitter()
    mon = monitor(repo, rec)
    assert mon.tick(s(300)).series == []  # quiet and complete, but the sender is still connected
    repo.association_closed("a" * 32)
    assert [e.payload["series_uid"] for e in mon.tick(s(301)).series] == [SERIES]


def test_peer_stable_age_overrides_the_default(repo: Repository) -> None:
    repo.upsert_peer(PeerBase(name="fast", ae_title="FAST", host="10.0.0.1", port=104, stable_age_seconds=5))
    fast, slow = uid(3, 1), uid(4, 1)
    record(repo, uid(3), fast, 2, s(0), ae="FAST")
    record(repo, uid(4), slow, 2, s(0), ae="SLOW")
    rec = RecordingEmitter()
    monitor(repo, rec).tick(s(6))
    assert [e.payload["series_uid"] for e in rec.named(SERIES_STABLE)] == [fast]


def test_restart_after_a_crash_between_emit_and_mark_resends_the_same_event(repo: Repository) -> None:
    class CrashOnFlush(RecordingEmitter):
        def flush(self, timeout: float = 10.0) -> bool:
            if self.named(SERIES_STABLE):  # killed after emitting, before marking
                raise SystemExit("receiver killed")
            return True

    record(repo, STUDY, SERIES, 3, s(0))
    crashed = CrashOnFlush()
    with pytest.raises(SystemExit):
        monitor(repo, crashed).tick(s(61))
    sent_before_crash = crashed.named(SERIES_STABLE)
    assert len(sent_before_crash) == 1
    assert repo.get_series(SERIES).emitted_revision is None  # type: ignore[union-attr]

    rec = RecordingEmitter()
    restarted = monitor(repo, rec)
    assert restarted.tick(s(70)).events == []  # the claim is too fresh to be taken for lost
    report = restarted.tick(s(125))  # > reemit_after (60 s) since the claim, recovery due
    assert [e.id for e in report.recovered if e.event == SERIES_STABLE] == [sent_before_crash[0].id]
    assert [e.event for e in rec.events].count(STUDY_STABLE) == 1
    assert repo.get_series(SERIES).emitted_revision == 1  # type: ignore[union-attr]

    again = monitor(repo, RecordingEmitter())  # a second restart: everything is marked
    assert again.tick(s(1000)).events == []


def test_restart_after_marking_emits_nothing(repo: Repository) -> None:
    record(repo, STUDY, SERIES, 3, s(0))
    monitor(repo).tick(s(61))
    rec = RecordingEmitter()
    restarted = monitor(repo, rec)
    restarted.tick(s(62))
    restarted.tick(s(10_000))
    assert rec.events == []


def test_unsent_events_are_not_marked_and_are_sent_later(repo: Repository) -> None:
    record(repo, STUDY, SERIES, 3, s(0))
    rec = RecordingEmitter(fail=True)
    mon = monitor(repo, rec)
    report = mon.tick(s(61))
    assert report.events == [] and report.unsent == 2  # the series and the study
    assert repo.get_series(SERIES).emitted_revision is None  # type: ignore[union-attr]
    rec.fail = False
    mon.tick(s(95))  # recovery every 30 s, but the claim is not 60 s old yet
    assert rec.named(SERIES_STABLE) == []
    mon.tick(s(125))
    assert len(rec.named(SERIES_STABLE)) == 1 and len(rec.named(STUDY_STABLE)) == 1
    assert repo.get_study(STUDY).emitted_revision == 1  # type: ignore[union-attr]


def test_an_outage_is_warned_once_not_at_every_recovery(repo: Repository, caplog: pytest.LogCaptureFixture) -> None:
    record(repo, STUDY, SERIES, 3, s(0))
    rec = RecordingEmitter(fail=True)
    mon = monitor(repo, rec)
    caplog.set_level(logging.DEBUG, logger="receiver.completeness")
    for second in (61, 125, 155, 185, 215):  # recovery runs at 125 and every 30 s after
        mon.tick(s(second))

    def warned() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "never emitted" in r.getMessage()]

    assert warned() == ["completeness: 1 series were claimed but never emitted; emitting them again"]
    rec.fail = False
    mon.tick(s(245))
    assert len(rec.named(SERIES_STABLE)) == 1
    caplog.clear()
    record(repo, STUDY, f"{SERIES}.9", 2, s(250))  # a later outage is a new one: warned again
    rec.fail = True
    for second in (320, 400):
        mon.tick(s(second))
    assert len(warned()) == 1


def test_two_monitors_on_one_database_never_double_emit(repo: Repository) -> None:
    n_studies, n_series = 4, 6
    for st in range(n_studies):
        for se in range(n_series):
            record(repo, uid(10, st), uid(10, st, se), 3, s(se))
    shared: list[EventSpec] = []  # both monitors' events in the order they were emitted
    lock = threading.Lock()

    class Shared(RecordingEmitter):
        def emit(self, spec: EventSpec) -> bool:
            with lock:
                shared.append(spec)
                return super().emit(spec)

    emitters = [Shared(), Shared()]
    monitors = [
        CompletenessMonitor(repo, em, MonitorOptions(stable_age=AGE, claim_limit=2), claimer=f"rx{i}")
        for i, em in enumerate(emitters)
    ]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run(mon: CompletenessMonitor) -> None:
        try:
            for step in range(8):
                barrier.wait()
                mon.tick(s(61 + step * 2))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(m,)) for m in monitors]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    stable = [e for em in emitters for e in em.events if e.event in (SERIES_STABLE, STUDY_STABLE)]
    counts = Counter((e.resource_id, e.payload["revision"]) for e in stable)
    assert len(counts) == n_studies * (n_series + 1)
    assert set(counts.values()) == {1}, [k for k, v in counts.items() if v > 1]
    received = [e for em in emitters for e in em.events if e.event == STUDY_RECEIVED]
    assert sorted(e.payload["study_uid"] for e in received) == [uid(10, st) for st in range(n_studies)]
    # and for each study: received, then every series, then the study, whichever monitor sent them
    for st in range(n_studies):
        mine = [e.event for e in shared if e.payload["study_uid"] == uid(10, st)]
        assert mine == [STUDY_RECEIVED] + [SERIES_STABLE] * n_series + [STUDY_STABLE], mine


def test_study_stable_never_precedes_a_recovered_series_stable(repo: Repository) -> None:
    """A crash between emitting and marking a series leaves its study unclaimable: the study
    event waits for the recovered series event, in the tick that recovers it, after it."""
    other = uid(1, 2)

    class CrashOnSeriesFlush(RecordingEmitter):
        def flush(self, timeout: float = 10.0) -> bool:
            if any(e.payload.get("series_uid") == SERIES for e in self.named(SERIES_STABLE)):
                raise SystemExit("receiver killed")
            return True

    record(repo, STUDY, SERIES, 3, s(0))
    record(repo, STUDY, other, 2, s(30))
    crashed = CrashOnSeriesFlush()
    with pytest.raises(SystemExit):
        monitor(repo, crashed).tick(s(61))  # SERIES due and sent, killed before its mark
    assert names(crashed.events) == [
        (STUDY_RECEIVED, f"dicom.study.{STUDY}", 1),
        (SERIES_STABLE, f"dicom.series.{SERIES}", 1),
    ]

    rec = RecordingEmitter()
    restarted = monitor(repo, rec)
    # the other series becomes stable and is emitted; the study is complete, but SERIES is
    # claimed-not-marked and too fresh to recover: no dicom.study.stable yet
    assert names(restarted.tick(s(95)).events) == [(SERIES_STABLE, f"dicom.series.{other}", 1)]
    assert repo.get_study(STUDY).state == "receiving"  # type: ignore[union-attr]
    assert restarted.tick(s(120)).events == []  # recovery ran at 95; next is due at 125
    report = restarted.tick(s(125))
    assert names(report.order) == [
        (SERIES_STABLE, f"dicom.series.{SERIES}", 1),
        (STUDY_STABLE, f"dicom.study.{STUDY}", 1),
    ]
    assert names(report.recovered) == [(SERIES_STABLE, f"dicom.series.{SERIES}", 1)]
    assert [e.event for e in rec.events] == [SERIES_STABLE, SERIES_STABLE, STUDY_STABLE]
    assert report.studies[0].payload["series_uids"] == [SERIES, other]
    assert restarted.tick(s(10_000)).events == []


def test_received_is_sent_once_across_a_crash_and_two_monitors(repo: Repository) -> None:
    class CrashOnFlush(RecordingEmitter):
        def flush(self, timeout: float = 10.0) -> bool:
            raise SystemExit("receiver killed")

    record(repo, STUDY, SERIES, 2, s(0))
    with pytest.raises(SystemExit):
        monitor(repo, CrashOnFlush()).tick(s(1))  # claimed and sent, never marked
    other_rec, rec = RecordingEmitter(), RecordingEmitter()
    other, restarted = monitor(repo, other_rec), monitor(repo, rec)
    assert other.tick(s(30)).received == [] and restarted.tick(s(31)).received == []  # the claim is fresh
    late = restarted.tick(s(62))  # claimed 61 s ago: taken over, sent again with the same id
    assert names(late.received) == [(STUDY_RECEIVED, f"dicom.study.{STUDY}", 1)]
    assert late.received[0].id == event_id(STUDY_RECEIVED, f"dicom.study.{STUDY}", 1)
    assert late.received[0].payload["series_uids"] == [SERIES] and late.received[0].payload["instance_count"] == 2
    assert other.tick(s(63)).received == []
    assert monitor(repo, RecordingEmitter()).tick(s(5000)).received == []  # another restart: marked
    assert len(rec.named(STUDY_RECEIVED)) + len(other_rec.named(STUDY_RECEIVED)) == 1
    study = repo.get_study(STUDY)
    assert study is not None and study.received_emitted_at is not None and study.received_claimed_by == "test"


def test_the_monitor_reads_claims_not_instance_lists_or_recent_rows(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Revision n+1 payloads come from the claim, and recovery from the unemitted listings."""

    def forbidden(*args: object, **kw: object) -> None:
        raise AssertionError("the monitor must not scan these")

    monkeypatch.setattr(repo, "list_instances", forbidden)
    monkeypatch.setattr(repo, "list_studies", forbidden)
    original_list_series = repo.list_series

    def list_series(*args: object, **kw: object) -> object:
        assert kw.get("study_uid") is not None, "only the members of one study"
        return original_list_series(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(repo, "list_series", list_series)
    record(repo, STUDY, SERIES, 3, s(0))
    rec = RecordingEmitter(fail=True)
    mon = monitor(repo, rec)
    mon.tick(s(61))  # everything claimed, nothing sent
    rec.fail = False
    mon.tick(s(125))  # received taken over, series and study recovered
    assert len(rec.named(SERIES_STABLE)) == 1 and len(rec.named(STUDY_STABLE)) == 1
    late = record(repo, STUDY, SERIES, 2, s(200), start=3)
    report = mon.tick(s(300))
    rev2 = report.series[0].payload
    assert (rev2["revision"], rev2["instance_count"], rev2["added_instance_count"]) == (2, 5, 2)
    assert rev2["added_sop_uids"] == sorted(late) and rev2["added_sop_uids_truncated"] is False
    assert names(report.order) == [
        (SERIES_STABLE, f"dicom.series.{SERIES}", 2),
        (STUDY_STABLE, f"dicom.study.{STUDY}", 2),
    ]


def test_thread_ticks_until_stopped(repo: Repository) -> None:
    record(repo, STUDY, SERIES, 2, s(0))
    rec = RecordingEmitter()
    mon = CompletenessMonitor(
        repo, rec, MonitorOptions(stable_age=AGE, interval=0.01), claimer="thread", clock=lambda: s(120)
    )
    mon.start()
    try:
        deadline = time.monotonic() + 10
        while len(rec.named(STUDY_STABLE)) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        mon.stop()
    assert len(rec.named(SERIES_STABLE)) == 1 and len(rec.named(STUDY_STABLE)) == 1
