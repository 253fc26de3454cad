"""Exactly once per (series or study, revision): triggered runs against a real Prefect server.

A trigger fires ``process_series(series_uid, revision=n, trigger="dicom.series.stable")``;
firing it again, or twice at once, must not process the revision twice. One home with a
one-job service is shared by the module (every flow run costs about a second).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa

from flows import process_series, process_study
from tests.factories import make_small_series
from tests.flows.conftest import prefect_client_env
from tests.tasks.helpers import Home, job, make_home, write_service

STABLE = "dicom.series.stable"


@dataclass
class Env:
    home: Home
    server: Any
    seed: int = 40

    def new_series(self, n: int = 1) -> str:
        self.seed += 1
        return self.home.receive(make_small_series(n, seed=self.seed))

    def sessions(self, uid: str) -> list[tuple[int, int, str, str | None, str | None]]:
        """(id, revision, state, flow_run_id, claim_key) of the sessions of a series or study."""
        table = sa.text(
            "SELECT id, revision, state, flow_run_id, claim_key FROM session "
            "WHERE series_uid = :u OR (series_uid IS NULL AND study_uid = :u) ORDER BY id"
        )
        with self.home.repo.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(table, {"u": uid})]  # type: ignore[misc]


@pytest.fixture(scope="module")
def shared(prefect_server, tmp_path_factory: pytest.TempPathFactory) -> Env:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("once")
    home = make_home(root / "home")
    home.install(write_service(root / "src", "once-svc", [job("only", "record", params={"sleep": 0.05})]))
    return Env(home, prefect_server)


@pytest.fixture
def env(shared: Env) -> Iterator[Env]:
    """The shared home, with DCMFLOW_HOME set for this test (clean_environ clears it per test)."""
    with shared.home.environ(), prefect_client_env(shared.server):
        yield shared


def flow_run_of(state: Any) -> Any:
    from prefect.client.orchestration import get_client

    async def read() -> Any:
        async with get_client() as client:
            return await client.read_flow_run(state.state_details.flow_run_id)

    return asyncio.run(read())


def new_revision(env: Env, uid: str, datasets: list[Any]) -> int:
    """Declare the series stable, then receive ``datasets`` of it: its next revision."""
    env.home.repo.claim_due_series(
        now=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1), default_stable_age=1, claimer="test"
    )
    env.home.receive(datasets)
    series = env.home.repo.get_series(uid)
    assert series is not None
    return series.revision


def test_second_trigger_of_a_revision_ends_completed_naming_the_first_run(env: Env) -> None:
    uid = env.new_series()
    first = process_series(uid, revision=1, trigger=STABLE, return_state=True)
    assert first.is_completed(), first.message
    ((session_id, revision, state, first_run, key),) = env.sessions(uid)
    assert (revision, state, key) == (1, "completed", f"series/{uid}/1")
    assert first_run == str(first.state_details.flow_run_id)
    jobs = env.home.repo.list_jobs(uid)

    again = process_series(uid, revision=1, trigger=STABLE, return_state=True)
    assert again.is_completed()
    assert again.message == (
        f"series {uid} revision 1 already processed by flow run {first_run} (session {session_id}, completed)"
    )
    assert len(env.sessions(uid)) == 1 and env.home.repo.list_jobs(uid) == jobs
    assert flow_run_of(first).name.endswith(" r1") and flow_run_of(again).name.endswith(" r1")


def test_older_revision_is_superseded_and_a_newer_one_is_an_error(env: Env) -> None:
    datasets = make_small_series(2, seed=90)
    uid = env.home.receive(datasets[:1])
    assert new_revision(env, uid, datasets[1:]) == 2

    old = process_series(uid, revision=1, trigger=STABLE, return_state=True)
    assert old.is_completed() and old.name == "Superseded"
    assert old.message == f"series {uid} revision 1 superseded by revision 2"
    assert flow_run_of(old).name.endswith(" r1")  # the run's own revision, not the current one

    future = process_series(uid, revision=3, trigger=STABLE, return_state=True)
    assert future.is_failed()
    assert future.message == f"series {uid} has no revision 3 (current revision 2)"
    assert env.sessions(uid) == [] and env.home.repo.list_jobs(uid) == []


def test_manual_runs_always_run_on_the_current_revision(env: Env) -> None:
    uid = env.new_series()
    triggered = process_series(uid, revision=1, trigger=STABLE, return_state=True)
    manual = [process_series(uid, return_state=True) for _ in range(2)]
    assert triggered.is_completed() and all(s.is_completed() and s.name == "Completed" for s in manual)
    sessions = env.sessions(uid)
    assert [(rev, state, key) for _, rev, state, _, key in sessions] == [
        (1, "completed", f"series/{uid}/1"), (1, "completed", None), (1, "completed", None)]  # fmt: skip
    assert len(env.home.repo.list_jobs(uid)) == 3


def test_two_triggers_at_once_process_the_revision_once(env: Env) -> None:
    uid = env.new_series()
    start = threading.Barrier(2)
    states: list[Any] = [None, None]

    def fire(i: int) -> None:
        with prefect_client_env(env.server):
            start.wait()
            states[i] = process_series(uid, revision=1, trigger=STABLE, return_state=True)

    threads = [threading.Thread(target=fire, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(s is not None and s.is_completed() for s in states), [getattr(s, "message", s) for s in states]
    ((session_id, _, state, winner, _),) = env.sessions(uid)
    assert state == "completed"
    assert [j.session_id for j in env.home.repo.list_jobs(uid)] == [session_id]
    messages = sorted(s.message for s in states)
    assert messages[0] == "1 jobs succeeded"
    assert messages[1].startswith(f"series {uid} revision 1 already processed by flow run {winner} (session {session_id}, ")


def test_study_trigger_is_claimed_per_study_revision(env: Env) -> None:
    uid = env.new_series()
    series = env.home.repo.get_series(uid)
    assert series is not None
    study_uid = series.study_uid
    first = process_study(study_uid, revision=1, trigger="dicom.study.stable", return_state=True)
    again = process_study(study_uid, revision=1, trigger="dicom.study.stable", return_state=True)
    assert first.is_completed() and again.is_completed()
    ((session_id, _, _, run_id, key),) = env.sessions(study_uid)
    assert key == f"study/{study_uid}/1"
    assert again.message == f"study {study_uid} revision 1 already processed by flow run {run_id} (session {session_id}, completed)"

