"""Session claims: one session per triggered (series or study, revision), on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

import storage.models as m
from storage.repository import Repository, SessionClaim

STUDY = "1.2.826.0.1.3680043.10.999.7"
SERIES = f"{STUDY}.1"


def claim(repo: Repository, revision: int = 1, flow_run_id: str = "fr-1", uid: str = SERIES) -> SessionClaim:
    return repo.claim_session("series", uid, revision, study_uid=STUDY, trigger="dicom.series.stable", flow_run_id=flow_run_id)


def test_second_claim_of_a_revision_gets_the_first_session(repo: Repository) -> None:
    first = claim(repo, flow_run_id="fr-1")
    assert first.claimed
    session = first.session
    assert (session.series_uid, session.study_uid, session.revision, session.state) == (SERIES, STUDY, 1, "running")
    assert session.claim_key == f"series/{SERIES}/1" == m.session_claim_key("series", SERIES, 1)
    assert session.trigger == "dicom.series.stable" and session.flow_run_id == "fr-1"

    second = claim(repo, flow_run_id="fr-2")
    assert not second.claimed
    assert second.session.id == session.id and second.session.flow_run_id == "fr-1"

    repo.finish_session(session.id, m.SessionState.COMPLETED.value)
    later = claim(repo, flow_run_id="fr-3")  # a finished session keeps its claim
    assert not later.claimed and later.session.id == session.id and later.session.state == "completed"


def test_claims_are_per_level_uid_and_revision_and_manual_sessions_never_conflict(repo: Repository) -> None:
    assert claim(repo, 1).claimed and claim(repo, 2).claimed
    assert claim(repo, 1, uid=f"{STUDY}.2").claimed
    study = repo.claim_session("study", STUDY, 1, trigger="dicom.study.stable")
    assert study.claimed
    assert (study.session.series_uid, study.session.study_uid, study.session.claim_key) == (None, STUDY, f"study/{STUDY}/1")
    assert not repo.claim_session("study", STUDY, 1).claimed
    # manual sessions (no claim key) for the same revision: as many as asked for
    manual = [repo.create_session(series_uid=SERIES, study_uid=STUDY, revision=1, trigger="manual") for _ in range(2)]
    assert [s.claim_key for s in manual] == [None, None] and manual[0].id != manual[1].id


def test_list_sessions_of_a_series_or_of_a_study_and_its_series(repo: Repository) -> None:
    series_session = claim(repo, 1).session
    other_series = claim(repo, 1, uid=f"{STUDY}.2").session
    study_session = repo.claim_session("study", STUDY, 1).session
    elsewhere = repo.create_session(series_uid="1.2.3.9", study_uid="1.2.3", trigger="manual")
    assert [s.id for s in repo.list_sessions(series_uid=SERIES)] == [series_session.id]
    assert [s.id for s in repo.list_sessions(study_uid=STUDY)] == [series_session.id, other_series.id, study_session.id]
    assert elsewhere.id in {s.id for s in repo.list_sessions()}


def test_claim_rejects_bad_input(repo: Repository) -> None:
    with pytest.raises(ValueError, match="level"):
        repo.claim_session("instance", SERIES, 1)
    with pytest.raises(ValueError, match="Series Instance UID"):
        repo.claim_session("series", "../etc", 1)


def test_release_claim_marks_the_session_crashed_and_lets_the_revision_be_claimed_again(repo: Repository) -> None:
    held = claim(repo).session
    running, pending, done = repo.create_jobs(
        held.id, [m.JobBase(service_name="s", service_version=1, job_name=n) for n in ("running", "pending", "done")]
    )
    repo.update_job(running.id, state="running", attempts=1)
    repo.update_job(done.id, state="succeeded")
    finished = claim(repo, 2).session
    repo.finish_session(finished.id)

    stale = repo.list_stale_claims()
    assert [(c.session_id, c.level, c.uid, c.revision, c.flow_run_id, c.claim_key) for c in stale] == [
        (held.id, "series", SERIES, 1, "fr-1", f"series/{SERIES}/1")
    ]
    assert repo.list_stale_claims(created_before=held.created_at) == []
    assert len(repo.list_stale_claims(created_before=held.created_at + dt.timedelta(seconds=1))) == 1

    assert repo.release_claim(held.id, reason="flow run crashed (dcmflow up after kill -9)")
    assert not repo.release_claim(held.id, reason="again")  # no longer running: nothing changes
    assert not repo.release_claim(finished.id, reason="finished")
    assert not repo.release_claim(10_000, reason="no such session")
    after = repo.get_session(held.id)
    assert after is not None and after.state == "crashed" and after.claim_key is None and after.finished_at is not None
    states = {j.job_name: (j.state, j.error) for j in repo.list_jobs(session_id=held.id)}
    assert states == {
        "running": ("crashed", "flow run crashed (dcmflow up after kill -9)"),
        "pending": ("cancelled", "flow run crashed (dcmflow up after kill -9)"),
        "done": ("succeeded", None),
    }
    released = repo.get_session_data(held.id, "released")
    assert released["state"] == "crashed" and released["claim_key"] == f"series/{SERIES}/1"
    assert repo.list_stale_claims() == []

    again = claim(repo, flow_run_id="fr-9")
    assert again.claimed and again.session.id != held.id and again.session.flow_run_id == "fr-9"
    with pytest.raises(ValueError):
        repo.release_claim(again.session.id, state="running")
    assert repo.release_claim(again.session.id, state=m.SessionState.CANCELLED, reason="stopped")
    assert repo.get_session(again.session.id).state == "cancelled"  # type: ignore[union-attr]


def test_concurrent_claims_of_one_revision_exactly_one_wins(engine: Engine) -> None:
    threads = 8
    start = threading.Barrier(threads)

    def attempt(i: int) -> SessionClaim:
        repo = Repository(engine)
        start.wait()
        return claim(repo, 3, flow_run_id=f"fr-{i}")

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(attempt, range(threads)))
    winners = [r for r in results if r.claimed]
    assert len(winners) == 1
    assert {r.session.id for r in results} == {winners[0].session.id}
    with engine.connect() as conn:
        count = conn.execute(sa.text("SELECT count(*) FROM session WHERE claim_key IS NOT NULL")).scalar_one()
    assert count == 1


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_postgres_claim_waits_for_an_uncommitted_claim_of_the_same_revision(
    engine: Engine, outcome: str
) -> None:
    """A claim racing an open transaction that inserted the same key: it waits, then loses to
    a commit or wins after a rollback (never two sessions, never an error)."""
    assert engine.dialect.name == "postgresql"  # SQLite has one writer at a time: nothing to wait on
    repo = Repository(engine)
    key = m.session_claim_key("series", SERIES, 1)
    with engine.connect() as other:
        tx = other.begin()
        other.execute(
            sa.text(
                "INSERT INTO session (series_uid, study_uid, revision, trigger, flow_run_id, state, claim_key, created_at) "
                "VALUES (:s, :st, 1, 'dicom.series.stable', 'fr-other', 'running', :k, now()) RETURNING id"
            ),
            {"s": SERIES, "st": STUDY, "k": key},
        )
        with ThreadPoolExecutor(1) as pool:
            racing = pool.submit(claim, repo, 1, "fr-mine")
            with pytest.raises(TimeoutError):
                racing.result(timeout=0.5)  # blocked on the other transaction's key
            if outcome == "commit":
                tx.commit()
            else:
                tx.rollback()
            result = racing.result(timeout=10)
    if outcome == "commit":
        assert not result.claimed and result.session.flow_run_id == "fr-other"
    else:
        assert result.claimed and result.session.flow_run_id == "fr-mine"


def test_0003_upgrade_leaves_existing_sessions_unclaimed_and_downgrade_keeps_them(db_url: str) -> None:
    from alembic import command

    from storage.db import alembic_config, create_engine, current_revision, upgrade, write_transaction

    engine = create_engine(db_url)
    try:
        upgrade(engine, "0002")
        with engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO session (series_uid, study_uid, revision, trigger, state, created_at) "
                "VALUES (:s, :st, 1, 'dicom.series.stable', 'completed', :at)"
            ), {"s": SERIES, "st": STUDY, "at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC)})  # fmt: skip
        upgrade(engine)
        repo = Repository(engine)
        assert repo.get_session(1).claim_key is None  # type: ignore[union-attr]
        assert claim(repo).claimed  # the pre-upgrade session does not hold the revision
        with write_transaction(engine) as conn:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0002")
        assert current_revision(engine) == "0002"
        assert "claim_key" not in {c["name"] for c in sa.inspect(engine).get_columns("session")}
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM session")).scalar_one() == 2
    finally:
        engine.dispose()
