"""A series whose service has a callback that hangs and one that kills its interpreter still
runs its other jobs; the session and the run's DAG artifact say why the two were not selected."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from flows import process_series
from tasks.jobs import artifact_key
from tests.factories import make_small_series
from tests.flows.conftest import prefect_client_env
from tests.tasks.helpers import CALLBACKS, job, make_home, write_service

UNRULY = CALLBACKS + '''

def hang(jobName, headers, params, added_params, **kwargs):
    import time
    time.sleep(120)


def exit_now(jobName, headers, params, added_params, **kwargs):
    import os
    os._exit(3)


def tag(jobName, headers, params, added_params, **kwargs):
    return True, {"after": sorted(added_params)}
'''


def test_hanging_and_crashing_callbacks_do_not_stop_the_series(
    prefect_server, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    home = make_home(tmp_path / "home")
    home.install(write_service(tmp_path / "src", "unruly", [
        job("first", "record", sortPosition=1),
        job("hangs", "record", callback="hang", sortPosition=2),
        job("exits", "record", callback="exit_now", sortPosition=3),
        job("last", "record", callback="tag", sortPosition=4, dependsOn="first"),
    ], callbacks=UNRULY))
    series_uid = home.receive(make_small_series(2, seed=21))
    with home.environ(), prefect_client_env(prefect_server):
        os.environ["DCMFLOW_CALLBACK_TIMEOUT"] = "1"  # home.environ() removes it again
        state = process_series(series_uid, return_state=True)

    assert state.is_completed(), state.message
    jobs = {j.job_name: j.state for j in home.repo.list_jobs(series_uid)}
    assert jobs == {"first": "succeeded", "last": "succeeded"}
    (session_id,) = {j.session_id for j in home.repo.list_jobs(series_uid)}
    rejected = {r["job"]: r["reason"] for r in home.repo.get_session_data(session_id, "rejected")}
    assert rejected == {"hangs": "callback timed out after 1 s",
                        "exits": "callback crashed its process (exit code 3)"}
    assert home.repo.get_session_data(session_id, "added_params") == {"first": {}, "last": {"after": ["first"]}}

    session = home.repo.get_session(session_id)
    assert session is not None and session.flow_run_id
    artifacts = _artifacts(prefect_server, session.flow_run_id)
    dag = artifacts[artifact_key("series", series_uid).replace("jobs-", "dag-")]
    assert "`hangs` (unruly): callback timed out after 1 s" in dag.data
    assert "`exits` (unruly): callback crashed its process (exit code 3)" in dag.data


def _artifacts(prefect_server: Any, flow_run_id: str) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read() -> list[Any]:
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
            )

    with prefect_client_env(prefect_server):
        return {a.key: a for a in asyncio.run(read())}

