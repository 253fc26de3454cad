"""Repository behaviour on SQLite and PostgreSQL: recording, versions, revisions, claims, runs."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import threading
from collections import Counter

import pytest
from sqlalchemy.engine import Engine

import storage.models as m
from storage.db import create_engine
from storage.errors import InvalidKeyError, RecordError
from storage.repository import InstanceIn, RecordStatus, Repository, SeriesClaim

T0 = dt.datetime(2025, 3, 1, 8, 0, tzinfo=dt.UTC)
STUDY = "1.2.826.0.1.3680043.10.1"


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def inst(
    series: int,
    number: int,
    *,
    study: str = STUDY,
    content: str = "v1",
    received: float = 0,
    ae: str = "MODALITY",
    expected: int | None = None,
) -> InstanceIn:
    series_uid = f"{study}.{series}"
    sop_uid = f"{series_uid}.{number}"
    return InstanceIn(
        study_uid=study,
        series_uid=series_uid,
        sop_uid=sop_uid,
        sha256=hashlib.sha256(f"{sop_uid}:{content}".encode()).hexdigest(),
        size=1000 + number,
        object_key=f"instances/{study}/{series_uid}/{sop_uid}.dcm",
        received_at=at(received),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        instance_number=number,
        calling_ae=ae,
        patient_id="PAT-1",
        patient_name="Doe^Jane",
        study_description="CT chest",
        modality="CT" if series % 2 else "MR",
        series_number=series,
        series_description=f"series {series}",
        expected_instance_count=expected,
    )


def emitted(repo: Repository, claims: list[SeriesClaim]) -> list[SeriesClaim]:
    """Mark claimed series revisions emitted, as the monitor does after sending their events."""
    for c in claims:
        assert repo.mark_series_emitted(c.series_uid, c.revision) is True
    return claims


def announced(repo: Repository, *study_uids: str) -> None:
    """Claim and mark ``dicom.study.received`` of every pending study (they must be these)."""
    got = repo.claim_received_studies(now=T0, claimer="a")
    assert sorted(c.study_uid for c in got) == sorted(study_uids)
    for c in got:
        assert repo.mark_study_received_emitted(c.study_uid) is True


def test_record_multi_series_study_counts(repo: Repository) -> None:
    batch = [inst(s, n) for s in (1, 2, 3) for n in range(1, 11)]
    out = repo.record_instances(batch)
    assert [o.status for o in out] == [RecordStatus.NEW] * 30
    assert {(o.version, o.series_revision) for o in out} == {(1, 1)}
    for s in (1, 2, 3):
        series = repo.get_series(f"{STUDY}.{s}")
        assert series is not None
        assert (series.instance_count, series.revision, series.state) == (10, 1, "receiving")
        assert series.study_uid == STUDY and series.calling_ae == "MODALITY"
        assert len(repo.list_instances(series.series_uid)) == 10
    study = repo.get_study(STUDY)
    assert study is not None and study.revision == 1 and set(study.modalities.split("\\")) == {"CT", "MR"}
    patient = repo.get_patient(study.patient_id)
    assert patient is not None and (patient.patient_id, patient.name) == ("PAT-1", "Doe^Jane")
    assert len(repo.list_series(limit=2)) == 2 and len(repo.list_series(limit=10, offset=2)) == 1


def test_first_and_last_received_and_second_batch(repo: Repository) -> None:
    repo.record_instances([inst(1, 1, received=5), inst(1, 2, received=1)])
    repo.record_instances([inst(1, 3, received=9)])
    s = repo.get_series(f"{STUDY}.1")
    assert s is not None
    assert (s.first_received_at, s.last_received_at, s.instance_count) == (at(1), at(9), 3)


def test_duplicates_are_noops(repo: Repository) -> None:
    repo.record_instances([inst(1, n) for n in range(1, 6)])
    again = repo.record_instances([inst(1, n, received=30) for n in range(1, 6)] + [inst(1, 1, received=31)])
    assert [o.status for o in again] == [RecordStatus.DUPLICATE] * 6
    s = repo.get_series(f"{STUDY}.1")
    assert s is not None and s.instance_count == 5 and s.last_received_at == at(0)
    assert len(repo.list_instances(f"{STUDY}.1", all_versions=True)) == 5


def test_duplicate_within_one_batch(repo: Repository) -> None:
    out = repo.record_instances([inst(1, 1), inst(1, 1)])
    assert [o.status for o in out] == [RecordStatus.NEW, RecordStatus.DUPLICATE]


def test_conflicting_resend_becomes_version_2_and_version_1_is_untouched(repo: Repository) -> None:
    repo.record_instances([inst(1, 1), inst(1, 2)])
    before = repo.get_instance_versions(f"{STUDY}.1.1")
    out = repo.record_instances([inst(1, 1, content="edited", received=3)])
    assert (out[0].status, out[0].version) == (RecordStatus.NEW_VERSION, 2)
    versions = repo.get_instance_versions(f"{STUDY}.1.1")
    assert [v.version for v in versions] == [1, 2]
    assert versions[0] == before[0]  # every column of version 1 unchanged
    assert versions[1].sha256 != versions[0].sha256
    latest = {i.sop_uid: i.version for i in repo.list_instances(f"{STUDY}.1")}
    assert latest == {f"{STUDY}.1.1": 2, f"{STUDY}.1.2": 1}
    s = repo.get_series(f"{STUDY}.1")
    assert s is not None and s.instance_count == 2  # distinct SOP UIDs
    # sending version 1's bytes again is a duplicate of version 1, not version 3
    again = repo.record_instances([inst(1, 1)])
    assert (again[0].status, again[0].version) == (RecordStatus.DUPLICATE, 1)


def test_invalid_uid_writes_nothing(repo: Repository) -> None:
    bad = InstanceIn(
        study_uid=STUDY, series_uid="1.2.3", sop_uid="../../etc/passwd", sha256="x", size=1, object_key="k",
        received_at=T0,
    )  # fmt: skip
    with pytest.raises(InvalidKeyError):
        repo.record_instances([inst(1, 1), bad])
    assert repo.get_series(f"{STUDY}.1") is None
    with pytest.raises(ValueError, match="naive"):
        repo.record_instances([dataclasses.replace(inst(1, 1), received_at=dt.datetime(2025, 1, 1))])


def test_late_instance_after_stable_is_revision_2(repo: Repository) -> None:
    repo.record_instances([inst(1, n) for n in range(1, 4)])
    claims = emitted(repo, repo.claim_due_series(now=at(61), default_stable_age=60, claimer="a"))
    assert [(c.series_uid, c.revision, c.instance_count, c.reason) for c in claims] == [
        (f"{STUDY}.1", 1, 3, "quiet")
    ]
    assert (claims[0].added_instance_count, claims[0].added_sop_uids) == (3, ())  # revision 1 added everything
    announced(repo, STUDY)
    assert [c.study_uid for c in repo.claim_due_studies(now=at(62), claimer="a")] == [STUDY]
    out = repo.record_instances([inst(1, 4, received=100), inst(1, 5, received=101)])
    assert [o.series_revision for o in out] == [2, 2]
    s = repo.get_series(f"{STUDY}.1")
    assert s is not None and (s.revision, s.state, s.instance_count, s.stable_at) == (2, "receiving", 5, None)
    study = repo.get_study(STUDY)
    assert study is not None and (study.revision, study.state) == (2, "receiving")
    revisions = {i.sop_uid.rsplit(".", 1)[1]: i.series_revision for i in repo.list_instances(f"{STUDY}.1")}
    assert revisions == {"1": 1, "2": 1, "3": 1, "4": 2, "5": 2}
    # a duplicate of an old instance does not reopen the series once stable again
    assert [c.revision for c in repo.claim_due_series(now=at(200), default_stable_age=60, claimer="a")] == [2]
    assert repo.record_instances([inst(1, 1, received=300)])[0].status is RecordStatus.DUPLICATE
    s = repo.get_series(f"{STUDY}.1")
    assert s is not None and (s.revision, s.state) == (2, "stable")


def test_quiet_period_default_and_peer_override(repo: Repository) -> None:
    repo.upsert_peer(m.PeerBase(name="slow-ct", ae_title="SLOWCT", host="10.0.0.5", port=104, stable_age_seconds=300))
    repo.record_instances([inst(1, 1, ae="MODALITY"), inst(2, 1, ae="SLOWCT")])
    assert repo.claim_due_series(now=at(59), default_stable_age=60, claimer="a") == []
    first = repo.claim_due_series(now=at(60), default_stable_age=dt.timedelta(seconds=60), claimer="a")
    assert [c.series_uid for c in first] == [f"{STUDY}.1"]
    assert repo.claim_due_series(now=at(299), default_stable_age=60, claimer="a") == []
    assert [c.series_uid for c in repo.claim_due_series(now=at(300), default_stable_age=60, claimer="a")] == [
        f"{STUDY}.2"
    ]


def test_expected_count_reached_is_claimed_before_quiet_period(repo: Repository) -> None:
    repo.record_instances([inst(1, n, expected=3) for n in (1, 2)])
    assert repo.claim_due_series(now=at(1), default_stable_age=60, claimer="a") == []
    repo.record_instances([inst(1, 3, received=1)])
    claims = repo.claim_due_series(now=at(2), default_stable_age=60, claimer="a")
    assert [(c.instance_count, c.expected_instance_count, c.reason) for c in claims] == [(3, 3, "expected_count")]


def test_open_association_blocks_claim_until_closed(repo: Repository) -> None:
    repo.association_opened("assoc-1", "MODALITY", now=at(0))
    repo.record_instances([inst(1, 1), inst(2, 1, expected=1)])
    repo.association_touched_series("assoc-1", [f"{STUDY}.1", f"{STUDY}.2"], now=at(0))
    assert repo.claim_due_series(now=at(120), default_stable_age=60, claimer="a") == []
    assert repo.claim_due_studies(now=at(120), claimer="a") == []
    repo.association_closed("assoc-1")
    claims = emitted(repo, repo.claim_due_series(now=at(121), default_stable_age=60, claimer="a"))
    assert sorted(c.series_uid for c in claims) == [f"{STUDY}.1", f"{STUDY}.2"]
    announced(repo, STUDY)
    study_claims = repo.claim_due_studies(now=at(122), claimer="a")
    assert [(c.study_uid, c.series_uids, c.instance_count) for c in study_claims] == [
        (STUDY, (f"{STUDY}.1", f"{STUDY}.2"), 2)
    ]


def test_stale_open_association_stops_blocking(repo: Repository) -> None:
    repo.association_opened("dead", "MODALITY", now=at(0))
    repo.association_touched_series("dead", [f"{STUDY}.1"], now=at(0))
    repo.record_instances([inst(1, 1)])
    assert repo.claim_due_series(now=at(120), default_stable_age=60, claimer="a") == []
    later = at(0) + dt.timedelta(hours=1, seconds=1)
    assert len(repo.claim_due_series(now=later, default_stable_age=60, claimer="a")) == 1


def test_study_waits_for_all_its_series(repo: Repository) -> None:
    repo.record_instances([inst(1, 1, received=0), inst(2, 1, received=50)])
    announced(repo, STUDY)
    assert len(emitted(repo, repo.claim_due_series(now=at(61), default_stable_age=60, claimer="a"))) == 1
    assert repo.claim_due_studies(now=at(61), claimer="a") == []
    assert len(emitted(repo, repo.claim_due_series(now=at(111), default_stable_age=60, claimer="a"))) == 1
    claims = repo.claim_due_studies(now=at(112), claimer="a")
    assert [(c.study_uid, c.revision, c.patient_id) for c in claims] == [(STUDY, 1, "PAT-1")]
    assert repo.claim_due_studies(now=at(113), claimer="a") == []
    assert repo.mark_study_emitted(STUDY, 1) is True
    assert repo.mark_study_emitted(STUDY, 1) is False


def test_mark_series_emitted_once_per_revision(repo: Repository) -> None:
    uid = f"{STUDY}.1"
    repo.record_instances([inst(1, 1)])
    assert repo.mark_series_emitted(uid, 2) is False  # no such revision yet
    assert repo.mark_series_emitted(uid, 1) is True
    assert repo.mark_series_emitted(uid, 1) is False
    repo.claim_due_series(now=at(61), default_stable_age=60, claimer="a")
    repo.record_instances([inst(1, 2, received=70)])
    assert repo.mark_series_emitted(uid, 2) is True
    assert repo.mark_series_emitted(uid, 1) is False
    assert repo.mark_series_emitted("9.9.9", 1) is False


def test_concurrent_claims_never_hand_a_series_to_two_claimers(db_url: str, repo: Repository) -> None:
    for study in range(6):
        repo.record_instances([inst(s, 1, study=f"{STUDY}.{study}") for s in range(1, 11)])
    expected = {s.series_uid for s in repo.list_series(limit=1000)}
    assert len(expected) == 60

    claimed: dict[str, list[str]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def claimer(name: str) -> None:
        engine: Engine = create_engine(db_url)
        mine = Repository(engine)
        got: list[str] = []
        try:
            start.wait()
            while batch := mine.claim_due_series(now=at(120), default_stable_age=60, claimer=name, limit=5):
                assert len(batch) <= 5
                got.extend(c.series_uid for c in batch)
        except BaseException as exc:  # reported below; a thread cannot fail the test itself
            errors.append(exc)
        finally:
            engine.dispose()
            claimed[name] = got

    threads = [threading.Thread(target=claimer, args=(f"c{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    everything = [uid for got in claimed.values() for uid in got]
    counts = Counter(everything)
    assert [uid for uid, n in counts.items() if n > 1] == []
    assert set(everything) == expected
    owner = {uid: name for name, got in claimed.items() for uid in got}
    assert all(repo.get_series(uid).claimed_by == owner[uid] for uid in expected)  # type: ignore[union-attr]


def test_settings_peers_nodes(repo: Repository) -> None:
    repo.set_setting("fullTags", True)
    repo.set_setting("headerFields", ["Modality", "SeriesDescription"])
    repo.set_setting("fullTags", False)
    assert repo.get_setting("fullTags") is False
    assert repo.get_setting("missing", 7) == 7
    assert repo.list_settings() == {"fullTags": False, "headerFields": ["Modality", "SeriesDescription"]}

    p = repo.upsert_peer(m.PeerBase(name="pacs", ae_title="PACS", host="10.0.0.1", port=104))
    p2 = repo.upsert_peer(m.PeerBase(name="pacs", ae_title="PACS", host="10.0.0.2", port=11112, receive_results=True))
    assert p2.id == p.id and (p2.host, p2.port, p2.receive_results) == ("10.0.0.2", 11112, True)
    assert [x.name for x in repo.list_peers(ae_title="PACS")] == ["pacs"]
    assert repo.remove_peer("pacs") is True and repo.get_peer("pacs") is None and repo.remove_peer("pacs") is False

    repo.upsert_node(m.NodeBase(name="main", ae_title="DCMFLOW", port=11112))
    repo.upsert_node(m.NodeBase(name="main", ae_title="DCMFLOW2", port=11113))
    assert [(n.ae_title, n.port) for n in repo.list_nodes()] == [("DCMFLOW2", 11113)]
    assert repo.remove_node("main") and repo.get_node("main") is None


def test_service_registration_versioning(repo: Repository) -> None:
    jobs = [
        m.ServiceJobBase(job_name="seg", worker="seg.worker", callback="seg.callback", priority="low"),
        m.ServiceJobBase(
            job_name="report", worker="rep.worker", callback="rep.callback", depends_on=["seg"],
            params={"lang": "de"}, sort_position=5, extra={"custom": 1},
        ),
    ]  # fmt: skip
    v1 = repo.register_service(m.ServiceBase(name="lung", content_hash="aaa"), jobs)
    assert (v1.version, v1.active) == (1, True)
    assert [j.job_name for j in v1.jobs] == ["report", "seg"]  # sortPosition order
    seg = next(j for j in v1.jobs if j.job_name == "seg")
    assert (seg.priority, seg.priority_rank, seg.sort_position, seg.timeout_seconds) == ("low", 10, 999, 3600)
    report = next(j for j in v1.jobs if j.job_name == "report")
    assert (report.depends_on, report.params, report.extra) == (["seg"], {"lang": "de"}, {"custom": 1})

    same = repo.register_service(m.ServiceBase(name="lung", content_hash="aaa"), jobs)
    assert (same.id, same.version) == (v1.id, 1)
    v2 = repo.register_service(m.ServiceBase(name="lung", content_hash="bbb"), jobs[:1])
    assert (v2.version, v2.active, len(v2.jobs)) == (2, True, 1)
    assert [(s.name, s.version) for s in repo.list_services()] == [("lung", 2)]
    assert [(s.version, s.active) for s in repo.list_services(include_inactive=True)] == [(1, False), (2, True)]
    got = repo.get_service("lung", 1)
    assert got is not None and len(got.jobs) == 2 and got.active is False
    with pytest.raises(RecordError, match="duplicate job names"):
        repo.register_service(m.ServiceBase(name="dup", content_hash="c"), [jobs[0], jobs[0]])
    assert repo.remove_service("lung") == 2
    assert repo.get_service("lung") is None and repo.list_services(include_inactive=True) == []


def test_sessions_jobs_data_and_files(repo: Repository) -> None:
    sess = repo.create_session(series_uid=f"{STUDY}.1", study_uid=STUDY, revision=2, trigger="dicom.series.stable")
    assert sess.state == "running" and sess.created_at.tzinfo == dt.UTC
    jobs = repo.create_jobs(
        sess.id,
        [
            m.JobBase(service_name="lung", service_version=1, job_name="seg", max_retries=2),
            {"service_name": "lung", "service_version": 1, "job_name": "report", "priority_rank": 40},
        ],
    )
    assert [(j.job_name, j.state, j.revision, j.series_uid) for j in jobs] == [
        ("seg", "pending", 2, f"{STUDY}.1"),
        ("report", "pending", 2, f"{STUDY}.1"),
    ]
    running = repo.update_job(jobs[0].id, state="running", attempts=1, flow_run_id="fr-1")
    assert running.started_at is not None and running.finished_at is None
    done = repo.update_job(jobs[0].id, state="failed", exit_code=3, error="boom")
    assert (done.state, done.exit_code, done.error, done.attempts) == ("failed", 3, "boom", 1)
    assert done.finished_at is not None and done.finished_at >= running.started_at  # type: ignore[operator]
    with pytest.raises(ValueError, match="not job fields"):
        repo.update_job(jobs[0].id, colour="red")
    with pytest.raises(RecordError):
        repo.update_job(10_000, state="running")
    with pytest.raises(RecordError):
        repo.create_jobs(10_000, [m.JobBase(service_name="x", service_version=1, job_name="y")])
    assert [j.job_name for j in repo.list_jobs(f"{STUDY}.1")] == ["seg", "report"]
    assert [j.job_name for j in repo.list_jobs(state="failed")] == ["seg"]
    assert repo.list_jobs("9.9") == []

    value = {"storage": [{"type": "nifti", "path": "out/a.nii.gz"}], "n": 3, "ok": True, "x": None}
    repo.put_session_data(sess.id, "result", value, job_name="seg")
    repo.put_session_data(sess.id, "result", [1, 2, 3])
    repo.put_session_data(sess.id, "flag", None)
    assert repo.get_session_data(sess.id, "result", job_name="seg") == value
    assert repo.get_session_data(sess.id, "result") == [1, 2, 3]
    repo.put_session_data(sess.id, "result", "replaced")
    assert repo.list_session_data(sess.id) == {"flag": None, "result": "replaced"}
    assert repo.get_session_data(sess.id, "absent", default="d") == "d"

    # a job's end in one commit: its state and its result
    ended = repo.update_job_with_data(jobs[1].id, {"result": {"n": 1}, "process": {"pid": 7}}, state="succeeded", exit_code=0)
    assert ended.state == "succeeded" and ended.finished_at is not None
    assert repo.get_session_data(sess.id, "result", job_name="report") == {"n": 1}
    assert repo.job_session_data(sess.id, "result") == {"report": {"n": 1}, "seg": value}  # session-wide value left out
    with pytest.raises(RecordError):
        repo.update_job_with_data(10_000, {"result": 1}, state="failed")

    f = repo.add_session_file(sess.id, "mask.nii.gz", object_key="sessions/1/seg/mask.nii.gz", size=2**33,
                              sha256="ab" * 32, job_name="seg")  # fmt: skip
    assert f.size == 2**33
    repo.add_session_file(sess.id, "report.pdf", object_key="sessions/1/report.pdf", size=10, sha256="cd" * 32,
                          content_type="application/pdf")  # fmt: skip
    assert [(x.job_name, x.name) for x in repo.list_session_files(sess.id)] == [
        ("", "report.pdf"), ("seg", "mask.nii.gz"),
    ]  # fmt: skip
    got = repo.get_session_file(sess.id, "mask.nii.gz", job_name="seg")
    assert got is not None and got.object_key == "sessions/1/seg/mask.nii.gz"
    finished = repo.finish_session(sess.id, "failed")
    assert finished.state == "failed" and finished.finished_at is not None
