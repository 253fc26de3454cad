"""Taking over the claim of a dead run (tasks/claims.py), on SQLite and PostgreSQL.

The "is it dead?" question is Prefect's to answer in a flow run (:func:`prefect_dead_run`,
exercised end to end in tests/dcmflow/test_worker_death.py); here it is a plain function.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy.engine import Engine

from storage.repository import Repository, SessionClaim
from tasks.claims import MAX_CRASHED_SESSIONS, claim_revision, give_up_if_crashing

STUDY = "1.2.826.0.1.3680043.10.999.8"
SERIES = f"{STUDY}.1"


def dead(flow_run_id: str) -> str | None:
    return f"flow run {flow_run_id} is Crashed" if flow_run_id.startswith("dead") else None


def claim(repo: Repository, flow_run_id: str, revision: int = 1) -> SessionClaim:
    return claim_revision(
        repo, "series", SERIES, revision, study_uid=STUDY, trigger="prefect.flow-run.Crashed", flow_run_id=flow_run_id, dead_run=dead
    )


def test_a_dead_holder_s_claim_is_taken_over_and_its_session_marked_crashed(repo: Repository) -> None:
    first = claim(repo, "dead-1")
    assert first.claimed
    taken = claim(repo, "fr-2")
    assert taken.claimed and taken.session.flow_run_id == "fr-2"
    old = repo.get_session(first.session.id)
    assert old is not None and old.state == "crashed" and old.claim_key is None
    reason = repo.get_session_data(first.session.id, "released")["reason"]
    assert reason == "flow run dead-1 is Crashed; its claim was taken over by flow run fr-2"


def test_a_live_or_finished_holder_keeps_its_claim(repo: Repository) -> None:
    live = claim(repo, "fr-1")
    assert not claim(repo, "fr-2").claimed  # fr-1 is not dead
    repo.finish_session(live.session.id, "completed")
    other = claim_revision(repo, "series", SERIES, 1, study_uid=STUDY, trigger="", flow_run_id="fr-3", dead_run=lambda _: "dead")
    assert not other.claimed and other.session.id == live.session.id  # finished: never taken over
    assert not claim_revision(repo, "series", SERIES, 1, study_uid=STUDY, trigger="", flow_run_id="fr-4", dead_run=None).claimed


def test_racing_re_runs_of_a_dead_holder_exactly_one_claims(engine: Engine) -> None:
    claim(Repository(engine), "dead-1", revision=2)
    threads = 6
    start = threading.Barrier(threads)

    def attempt(i: int) -> SessionClaim:
        repo = Repository(engine)
        start.wait()
        return claim(repo, f"fr-{i}", revision=2)

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(attempt, range(threads)))
    winners = [r for r in results if r.claimed]
    assert len(winners) == 1
    assert {r.session.id for r in results} == {winners[0].session.id}
    states = sorted(s.state for s in Repository(engine).list_sessions(series_uid=SERIES))
    assert states == ["crashed", "running"]


def test_a_revision_that_keeps_crashing_is_given_up(repo: Repository) -> None:
    for attempt in range(MAX_CRASHED_SESSIONS):
        run = claim(repo, f"dead-{attempt}")
        assert run.claimed and give_up_if_crashing(repo, run.session.id, "series", SERIES, 1) is None
    last = claim(repo, "fr-last")
    assert last.claimed
    gave_up = give_up_if_crashing(repo, last.session.id, "series", SERIES, 1)
    assert gave_up is not None and f"crashed {MAX_CRASHED_SESSIONS} times" in gave_up.message
    session = repo.get_session(last.session.id)
    assert session is not None and session.state == "failed" and session.claim_key is not None  # later triggers end at once
    assert not claim(repo, "fr-after").claimed
