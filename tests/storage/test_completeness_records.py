"""Completeness records on SQLite and PostgreSQL: ``dicom.study.received`` claim/mark, the order
study-after-series, the unemitted listings (and their partial indexes), and what a revision added."""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
from collections import Counter

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from storage.db import create_engine
from storage.repository import MAX_CLAIM_ADDED_SOP_UIDS, InstanceIn, Repository

T0 = dt.datetime(2025, 3, 1, 8, 0, tzinfo=dt.UTC)
STUDY = "1.2.826.0.1.3680043.10.2"


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def inst(series: int, number: int, *, study: str = STUDY, content: str = "v1", received: float = 0,
         ae: str = "MODALITY") -> InstanceIn:  # fmt: skip
    series_uid = f"{study}.{series}"
    sop_uid = f"{series_uid}.{number}"
    return InstanceIn(
        study_uid=study,
        series_uid=series_uid,
        sop_uid=sop_uid,
        sha256=hashlib.sha256(f"{sop_uid}:{content}".encode()).hexdigest(),
        size=10,
        object_key=f"instances/{study}/{series_uid}/{sop_uid}.dcm",
        received_at=at(received),
        calling_ae=ae,
        patient_id="PAT-2",
        study_description="CT chest",
        modality="CT",
        series_number=series,
    )


def claim_series(repo: Repository, now: float) -> list[tuple[str, int]]:
    return [(c.series_uid, c.revision) for c in repo.claim_due_series(now=at(now), default_stable_age=60, claimer="a")]


# --------------------------------------------------------------------------- dicom.study.received


def test_received_is_claimed_once_marked_once_and_never_again(repo: Repository) -> None:
    repo.record_instances(
        [inst(2, 1, received=5, ae="SECOND"), inst(1, 1, received=3, ae="FIRST"), inst(1, 2, ae="FIRST")]
    )
    (claim,) = repo.claim_received_studies(now=at(10), claimer="a")
    assert (claim.study_uid, claim.patient_id) == (STUDY, "PAT-2")
    assert (claim.description, claim.modalities) == ("CT chest", "CT")
    # series in order of first receipt; the calling AE is the first series' sender
    assert claim.series_uids == (f"{STUDY}.1", f"{STUDY}.2") and claim.calling_ae == "FIRST"
    assert (claim.instance_count, claim.first_received_at, claim.claimed_at) == (3, at(0), at(10))
    assert repo.claim_received_studies(now=at(11), claimer="b") == []  # claimed: nobody else gets it
    study = repo.get_study(STUDY)
    assert study is not None and (study.received_claimed_by, study.received_emitted_at) == ("a", None)

    assert repo.mark_study_received_emitted(STUDY, now=at(12)) is True
    assert repo.mark_study_received_emitted(STUDY) is False
    assert repo.mark_study_received_emitted("9.9.9") is False
    assert repo.get_study(STUDY).received_emitted_at == at(12)  # type: ignore[union-attr]
    assert repo.claim_received_studies(now=at(10_000), claimer="b") == []  # marked: never again

    # a late instance opens revision 2 of the study: that is no new study
    for uid, revision in claim_series(repo, 70):
        repo.mark_series_emitted(uid, revision)
    assert [c.study_uid for c in repo.claim_due_studies(now=at(62), claimer="a")] == [STUDY]
    repo.record_instances([inst(1, 3, received=100)])
    assert repo.get_study(STUDY).revision == 2  # type: ignore[union-attr]
    assert repo.claim_received_studies(now=at(10_000), claimer="b") == []


def test_an_unmarked_received_claim_is_taken_over_after_reclaim_after(repo: Repository) -> None:
    repo.record_instances([inst(1, 1)])
    assert [c.study_uid for c in repo.claim_received_studies(now=at(0), claimer="dead")] == [STUDY]
    grace = dt.timedelta(seconds=60)
    assert repo.claim_received_studies(now=at(59), claimer="b", reclaim_after=grace) == []
    assert [c.study_uid for c in repo.claim_received_studies(now=at(60), claimer="b", reclaim_after=grace)] == [STUDY]
    assert repo.get_study(STUDY).received_claimed_by == "b"  # type: ignore[union-attr]
    assert repo.claim_received_studies(now=at(61), claimer="c", reclaim_after=grace) == []  # b's claim is fresh
    assert repo.mark_study_received_emitted(STUDY) is True


def test_concurrent_received_claims_hand_each_study_to_one_claimer(db_url: str, repo: Repository) -> None:
    studies = [f"{STUDY}.{n}" for n in range(40)]
    for uid in studies:
        repo.record_instances([inst(1, 1, study=uid)])
    claimed: dict[str, list[str]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(5)

    def claimer(name: str) -> None:
        engine: Engine = create_engine(db_url)
        mine = Repository(engine)
        got: list[str] = []
        try:
            start.wait()
            while batch := mine.claim_received_studies(now=at(1), claimer=name, limit=3):
                got.extend(c.study_uid for c in batch)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            engine.dispose()
            claimed[name] = got

    threads = [threading.Thread(target=claimer, args=(f"r{i}",)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    everything = [uid for got in claimed.values() for uid in got]
    assert [uid for uid, n in Counter(everything).items() if n > 1] == []
    assert sorted(everything) == sorted(studies)


# --------------------------------------------------------------------------- order


def test_study_is_claimed_only_after_every_current_series_revision_was_marked(repo: Repository) -> None:
    one, two = f"{STUDY}.1", f"{STUDY}.2"
    repo.record_instances([inst(1, 1), inst(2, 1)])
    assert claim_series(repo, 61) == [(one, 1), (two, 1)]
    assert repo.claim_due_studies(now=at(62), claimer="a") == []  # received not marked yet
    repo.claim_received_studies(now=at(62), claimer="a")
    assert repo.mark_study_received_emitted(STUDY)
    assert repo.claim_due_studies(now=at(62), claimer="a") == []  # no series marked
    assert repo.mark_series_emitted(one, 1)
    assert repo.claim_due_studies(now=at(63), claimer="a") == []  # series 2 claimed, not marked
    assert repo.mark_series_emitted(two, 1)
    assert [(c.study_uid, c.revision) for c in repo.claim_due_studies(now=at(64), claimer="a")] == [(STUDY, 1)]
    assert repo.mark_study_emitted(STUDY, 1)

    # revision 2: a late instance in series 2; series 1 (revision 1, marked) does not block
    repo.record_instances([inst(2, 2, received=100)])
    assert claim_series(repo, 161) == [(two, 2)]
    assert repo.claim_due_studies(now=at(162), claimer="a") == []  # revision 2 not marked
    assert repo.mark_series_emitted(two, 2)
    assert [(c.study_uid, c.revision) for c in repo.claim_due_studies(now=at(163), claimer="a")] == [(STUDY, 2)]


# --------------------------------------------------------------------------- unemitted listings


def test_list_unemitted_series_and_studies(repo: Repository) -> None:
    a, b = f"{STUDY}.1", f"{STUDY}.2"
    other = "1.2.826.0.1.3680043.10.3"
    repo.record_instances([inst(1, 1), inst(1, 2), inst(2, 1, received=30), inst(1, 1, study=other)])
    assert repo.list_unemitted_series(at(10_000)) == []  # receiving series are not "unemitted"
    claim_series(repo, 61)  # a and other's series at 61
    claim_series(repo, 91)  # b at 91
    assert [c.series_uid for c in repo.list_unemitted_series(at(60))] == []
    lost = repo.list_unemitted_series(at(61))
    assert sorted(c.series_uid for c in lost) == sorted([a, f"{other}.1"])
    got = {c.series_uid: c for c in repo.list_unemitted_series(at(1000))}
    assert set(got) == {a, b, f"{other}.1"}
    assert (got[a].study_uid, got[a].patient_id, got[a].revision, got[a].instance_count) == (STUDY, "PAT-2", 1, 2)
    assert (got[a].stable_at, got[a].reason, got[a].added_instance_count) == (at(61), "quiet", 2)
    assert len(repo.list_unemitted_series(at(1000), limit=2)) == 2
    assert repo.mark_series_emitted(a, 1)
    assert a not in {c.series_uid for c in repo.list_unemitted_series(at(1000))}
    with pytest.raises(ValueError, match="naive"):
        repo.list_unemitted_series(dt.datetime(2025, 1, 1))

    for uid in (STUDY, other):
        repo.claim_received_studies(now=at(92), claimer="a")
        repo.mark_study_received_emitted(uid)
    for c in repo.list_unemitted_series(at(1000)):
        repo.mark_series_emitted(c.series_uid, c.revision)
    assert repo.list_unemitted_studies(at(1000)) == []
    assert sorted(c.study_uid for c in repo.claim_due_studies(now=at(100), claimer="a")) == sorted([STUDY, other])
    assert repo.list_unemitted_studies(at(99)) == []
    (claim, _) = sorted(repo.list_unemitted_studies(at(100)), key=lambda c: c.study_uid != STUDY)
    assert (claim.study_uid, claim.series_uids, claim.instance_count, claim.stable_at) == (STUDY, (a, b), 3, at(100))
    repo.mark_study_emitted(STUDY, 1)
    assert [c.study_uid for c in repo.list_unemitted_studies(at(100))] == [other]


def test_the_pending_queries_use_the_partial_indexes(engine: Engine, repo: Repository) -> None:
    """EXPLAIN the very statements the repository sends: each reads its partial index."""
    from storage.models import RECEIVED_UNEMITTED_PREDICATE, UNEMITTED_PREDICATE

    repo.record_instances([inst(1, 1)])
    sent: list[tuple[str, object]] = []

    def capture(conn: object, cursor: object, statement: str, parameters: object, *args: object) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            sent.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        repo.list_unemitted_series(at(0))
        repo.list_unemitted_studies(at(0))
        repo.claim_received_studies(now=at(0), claimer="a")
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)

    def plan(marker: str, table: str) -> str:
        statement, parameters = [(q, p) for q, p in sent if marker in q and f"FROM {table}" in q][0]
        with engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)  # type: ignore[arg-type]
                return " ".join(str(r[-1]) for r in rows)
            conn.exec_driver_sql("SET enable_seqscan = off")  # tiny tables: is the index usable at all?
            rows = conn.exec_driver_sql(f"EXPLAIN {statement}", parameters)  # type: ignore[arg-type]
            return " ".join(str(r[0]) for r in rows)

    assert "ix_series_unemitted" in plan(UNEMITTED_PREDICATE, "series")
    assert "ix_study_unemitted" in plan(UNEMITTED_PREDICATE, "study")
    assert "ix_study_received_unemitted" in plan(RECEIVED_UNEMITTED_PREDICATE, "study")


# --------------------------------------------------------------------------- what a revision added


def test_series_claim_carries_what_the_revision_added(repo: Repository) -> None:
    uid = f"{STUDY}.1"
    repo.record_instances([inst(1, n) for n in range(1, 4)])
    (first,) = repo.claim_due_series(now=at(61), default_stable_age=60, claimer="a")
    assert (first.revision, first.added_instance_count, first.added_sop_uids, first.added_sop_uids_truncated) == (
        1, 3, (), False,
    )  # fmt: skip
    # revision 2: two new SOPs, a new version of an old one, and a duplicate (not recorded)
    repo.record_instances([
        inst(1, 5, received=100), inst(1, 4, received=100), inst(1, 1, content="edited", received=101),
        inst(1, 2, received=102),
    ])  # fmt: skip
    (second,) = repo.claim_due_series(now=at(200), default_stable_age=60, claimer="a")
    assert (second.revision, second.instance_count, second.added_instance_count) == (2, 5, 3)
    assert second.added_sop_uids == (f"{uid}.1", f"{uid}.4", f"{uid}.5") and not second.added_sop_uids_truncated
    # the recovery listing rebuilds the same claim from the records
    (again,) = repo.list_unemitted_series(at(200))
    assert again == second


def test_added_sop_uids_are_capped(repo: Repository) -> None:
    repo.record_instances([inst(1, 0)])
    repo.claim_due_series(now=at(61), default_stable_age=60, claimer="a")
    repo.record_instances([inst(1, n, received=100) for n in range(1, MAX_CLAIM_ADDED_SOP_UIDS + 3)])
    (claim,) = repo.claim_due_series(now=at(200), default_stable_age=60, claimer="a")
    assert claim.added_instance_count == MAX_CLAIM_ADDED_SOP_UIDS + 2
    assert len(claim.added_sop_uids) == MAX_CLAIM_ADDED_SOP_UIDS and claim.added_sop_uids_truncated
    assert list(claim.added_sop_uids) == sorted(claim.added_sop_uids)
