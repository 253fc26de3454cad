"""process_series against a real Prefect server: DAG order, timeouts, crashes, retries, outputs, sends.

One flow run of a service with every kind of job is shared by the tests of this module
(each asserts one behaviour), so the suite stays fast on two cores.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

from flows import process_series
from storage.models import PeerBase
from tasks.execution import pid_alive
from tasks.jobs import artifact_key
from tests.factories import make_small_series
from tests.flows.conftest import prefect_client_env
from tests.tasks.helpers import Home, job, make_home, read_trace, storescp, write_service

TIMEOUT = 1.5


def dag_jobs() -> list[dict[str, Any]]:
    fast = {"sleep": 0.3}
    return [
        job("a", "record", params=fast, sortPosition=1),
        # b and c wait (at most 20 s) for each other: they overlap whenever the scheduler gives
        # them two slots at once, however slow the machine or busy the other slots.
        job("b", "record", params={**fast, "meet": "c"}, dependsOn="a"),
        job("c", "record", params={**fast, "meet": "b"}, dependsOn="a"),
        job("d", "record", params=fast, dependsOn=["b", "c"]),
        # a timeout is final although the job has retries left (as RQ), unless it asks
        job("slow", "sleeper", params={"sleep": 30}, timeout=TIMEOUT, priority="high", retries=1),
        job("slow-again", "sleeper", params={"sleep": 30}, timeout=TIMEOUT, retries=1, retryOnTimeout=True),
        job("after-slow", "record", dependsOn="slow"),
        job("after-after-slow", "record", dependsOn="after-slow"),
        job("crash", "crasher"),
        job("flaky", "flaky", retries=1, retryDelay=0),
        job("export", "dicom_out", callback="send", params={"peer": "pacs"}),
    ]


class DagRun:
    home: Home
    state: Any
    series_uid: str
    session_id: int
    received: Path
    elapsed: float


@pytest.fixture(scope="module")
def dag_run(prefect_server, tmp_path_factory: pytest.TempPathFactory) -> DagRun:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("dag")
    home = make_home(root / "home")
    home.install(write_service(root / "src", "dag-svc", dag_jobs()))
    run = DagRun()
    run.home = home
    run.series_uid = home.receive(make_small_series(3, seed=11))
    run.received = root / "pacs"
    with storescp(run.received) as port:
        home.repo.upsert_peer(PeerBase(name="pacs", ae_title="PACS", host="127.0.0.1", port=port, receive_results=True))
        with home.environ(), prefect_client_env(prefect_server):
            started = time.monotonic()
            run.state = process_series(run.series_uid, max_parallel=3, return_state=True)
            run.elapsed = time.monotonic() - started
    (session,) = {j.session_id for j in home.repo.list_jobs(run.series_uid)}
    run.session_id = session
    return run


def jobs_by_name(run: DagRun) -> dict[str, Any]:
    return {j.job_name: j for j in run.home.repo.list_jobs(run.series_uid)}


def spans(run: DagRun) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for line in read_trace(run.home, run.session_id):
        out.setdefault(line["job"], {})[line["event"]] = line["t"]
    return out


def test_flow_fails_when_a_job_failed_and_says_which(dag_run: DagRun) -> None:
    assert dag_run.state.is_failed()
    assert "slow timed out" in dag_run.state.message and "crash failed" in dag_run.state.message
    assert "slow-again timed out" in dag_run.state.message
    session = dag_run.home.repo.get_session(dag_run.session_id)
    assert session is not None and session.state == "failed" and session.finished_at is not None


def test_fan_in_dag_runs_in_dependency_order(dag_run: DagRun) -> None:
    t = spans(dag_run)
    assert t["b"]["start"] >= t["a"]["end"] and t["c"]["start"] >= t["a"]["end"]
    assert t["d"]["start"] >= max(t["b"]["end"], t["c"]["end"])
    assert all(jobs_by_name(dag_run)[n].state == "succeeded" for n in "abcd")
    # b and c are independent: they ran side by side
    assert t["b"]["start"] < t["c"]["end"] and t["c"]["start"] < t["b"]["end"]


def test_at_most_max_parallel_jobs_at_once(dag_run: DagRun) -> None:
    jobs = jobs_by_name(dag_run)
    events = []
    for j in jobs.values():
        if j.started_at and j.finished_at and j.state != "skipped":
            events += [(j.started_at.timestamp(), 1), (j.finished_at.timestamp(), -1)]
    running = peak = 0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):
        running += delta
        peak = max(peak, running)
    assert 2 <= peak <= 3


def test_timed_out_job_is_killed_within_a_second_and_dependents_skipped(dag_run: DagRun) -> None:
    jobs = jobs_by_name(dag_run)
    slow = jobs["slow"]
    assert slow.state == "timed_out" and "timed out" in (slow.error or "")
    assert slow.attempts == 1 and slow.max_retries == 1  # not retried: a timeout is final
    took = (slow.finished_at - slow.started_at).total_seconds()
    assert TIMEOUT <= took <= TIMEOUT + 1.0, took
    trace = spans(dag_run)["slow"]
    assert "end" not in trace  # it never got to finish its sleep
    line = next(x for x in read_trace(dag_run.home, dag_run.session_id) if x["job"] == "slow")
    assert not pid_alive(line["pid"]) and not pid_alive(line["child"])  # the whole group is gone
    for name in ("after-slow", "after-after-slow"):
        assert jobs[name].state == "skipped" and jobs[name].attempts == 0 and jobs[name].started_at is None
        assert name not in spans(dag_run)
    assert "slow" in (jobs["after-slow"].error or "")


def test_timed_out_job_that_asks_is_retried(dag_run: DagRun) -> None:
    again = jobs_by_name(dag_run)["slow-again"]
    assert again.state == "timed_out" and again.attempts == 2
    log = dag_run.home.store.get(again.log_key).decode()
    assert log.count("timed out after") == 2 and "attempt 2" in log


def test_crashing_job_fails_alone(dag_run: DagRun) -> None:
    jobs = jobs_by_name(dag_run)
    crash = jobs["crash"]
    assert crash.state == "failed" and crash.exit_code == 3 and "about to crash" in (crash.error or "")
    assert {n for n, j in jobs.items() if j.state == "failed"} == {"crash"}
    log = dag_run.home.store.get(crash.log_key).decode()
    assert "about to crash" in log


def test_flaky_job_succeeds_on_retry(dag_run: DagRun) -> None:
    flaky = jobs_by_name(dag_run)["flaky"]
    assert flaky.state == "succeeded" and flaky.attempts == 2 and flaky.max_retries == 1
    assert dag_run.home.repo.get_session_data(dag_run.session_id, "result", job_name="flaky") == "second time lucky"
    log = dag_run.home.store.get(flaky.log_key).decode()
    assert "first attempt fails" in log and "attempt 2" in log


def test_outputs_and_session_data_are_stored(dag_run: DagRun) -> None:
    repo, store = dag_run.home.repo, dag_run.home.store
    files = {(f.job_name, f.name): f for f in repo.list_session_files(dag_run.session_id)}
    assert ("d", "results/d.json") in files
    stored = json.loads(store.get(files[("d", "results/d.json")].object_key))
    assert stored["series"] == dag_run.series_uid and "export" in stored["saw"]
    assert sorted(n.split("/")[0] for (j, n) in files if j == "export") == ["out", "out"], sorted(files)
    headers = repo.get_session_data(dag_run.session_id, "headers")
    assert headers["seriesId"] == dag_run.series_uid and headers["dcmpath"].endswith(dag_run.series_uid)
    assert repo.get_session_data(dag_run.session_id, "result", job_name="a") == {"job": "a"}
    # the received series was materialised read-only where dcmpath says
    series_dir = dag_run.home.root / "work" / "sessions" / str(dag_run.session_id) / "data" / headers["dcmpath"]
    assert len(list(series_dir.glob("*.dcm"))) == 3 and (series_dir.stat().st_mode & 0o222) == 0


def test_output_marked_for_sending_arrives_at_the_peer(dag_run: DagRun) -> None:
    received = sorted(dag_run.received.iterdir())
    assert len(received) == 2
    assert {str(pydicom.dcmread(p).SeriesDescription) for p in received} == {"dcmflow result"}
    (sent,) = dag_run.home.repo.get_session_data(dag_run.session_id, "sent", job_name="export")
    assert sent["status"] == "sent" and sent["peer"] == "pacs" and sent["instances"] == 2


def test_artifacts_exist_on_the_flow_run(dag_run: DagRun, prefect_server) -> None:  # type: ignore[no-untyped-def]
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    session = dag_run.home.repo.get_session(dag_run.session_id)
    assert session is not None and session.flow_run_id

    async def read() -> list[Any]:
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[session.flow_run_id]))
            )

    with prefect_client_env(prefect_server):
        artifacts = {a.key: a for a in asyncio.run(read())}
    key = artifact_key("series", dag_run.series_uid)
    assert key == "jobs-series-" + dag_run.series_uid.replace(".", "-")
    table = artifacts[key]
    assert table.type == "table"
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert {r["job"]: r["state"] for r in rows}["slow"] == "timed_out"
    dag = artifacts[key.replace("jobs-", "dag-")]
    assert "```mermaid" in dag.data and "flowchart TD" in dag.data


def test_task_runs_are_named_after_jobs(dag_run: DagRun, prefect_server) -> None:  # type: ignore[no-untyped-def]
    from prefect.client.orchestration import get_client

    jobs = jobs_by_name(dag_run)

    async def names() -> set[str]:
        # Task runs reach the server as events, asynchronously: on a busy machine the last ones
        # may land a few seconds after the flow returned.
        from prefect.exceptions import ObjectNotFound

        async with get_client() as client:
            for _ in range(150):
                try:
                    return {(await client.read_task_run(j.task_run_id)).name for j in jobs.values() if j.task_run_id}
                except ObjectNotFound:
                    await asyncio.sleep(0.2)
        return set()

    with prefect_client_env(prefect_server):
        found = asyncio.run(names())
    assert {"a", "b", "c", "d", "slow", "crash", "flaky", "export"} <= found


def test_the_run_archives_the_series_it_read(dag_run: DagRun) -> None:
    """The archive-series task packs, beside the jobs, every instance the run materialised."""
    from storage.archive import read_series_index

    series = dag_run.home.repo.get_series(dag_run.series_uid)
    assert series is not None
    index = read_series_index(dag_run.home.store, series.study_uid, dag_run.series_uid)
    instances = dag_run.home.repo.list_instances(dag_run.series_uid)
    assert {(e.sop_uid, e.sha256) for e in index.latest()} == {(i.sop_uid, i.sha256) for i in instances}
