"""The completeness monitor on real databases (SQLite and PostgreSQL), ticked with explicit times.

Events go to a :class:`~receiver.events.RecordingEmitter`; the Prefect side is covered in
``test_events.py``.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from receiver.completeness import CompletenessMonitor, MonitorOptions
from receiver.events import SERIES_STABLE, STUDY_RECEIVED, STUDY_STABLE, EventSpec, RecordingEmitter, event_id
from storage.db import create_engine, upgrade
from storage.models import PeerBase
from storage.repository import InstanceIn, Repository

T0 = dt.datetime(2026, 1, 5, 8, 0, 0, tzinfo=dt.UTC)
AGE = 60.0


def s(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


# Same idea as tests/storage/conftest.py (conftest fixtures are not shared across folders).
@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'dcmflow.db'}"
        return
    base: str = request.getfixturevalue("postgres_url")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        yield sa.engine.make_url(base).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False
        )
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        admin.dispose()


@pytest.fixture
def repo(db_url: str) -> Iterator[Repository]:
    engine = create_engine(db_url)
    upgrade(engine)
    try:
        yield Repository(engine)
    finally:
        engine.dispose()


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
    assert restarted.tick(s(70)).series == []  # the claim is too fresh to be taken for lost
    report = restarted.tick(s(125))  # > reemit_after (60 s) since the claim, recovery due
    assert [e.id for e in report.recovered if e.event == SERIES_STABLE] == [sent_before_crash[0].id]
    # The study was claimed (its series are stable) and emitted at s(70), once.
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


def test_two_monitors_on_one_database_never_double_emit(repo: Repository) -> None:
    n_studies, n_series = 4, 6
    for st in range(n_studies):
        for se in range(n_series):
            record(repo, uid(10, st), uid(10, st, se), 3, s(se))
    emitters = [RecordingEmitter(), RecordingEmitter()]
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
    # received has no database marker: both may announce a study, always with one id per study
    assert len({e.id for e in received}) == n_studies
    assert {e.payload["study_uid"] for e in received} == {uid(10, st) for st in range(n_studies)}


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
