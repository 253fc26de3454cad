"""Jobs on a dcm-processor ``channel``: run on the workers that serve that channel, and no others.

A job whose ``channel`` is not ``default`` (e.g. ``gpu``) runs as a flow run of the
``run-job`` deployment on the work queue ``channel-<name>`` of the series flow's work pool;
only workers started with ``--work-queue channel-<name>`` take it. The series flow keeps the
DAG (:mod:`flows._dag`): it submits :func:`dispatch_job` in place of
:func:`tasks.jobs.run_job`, so dependencies, priorities, retries (a new attempt is a new
flow run), skipped dependents and the job table are the same for both.

Why a flow run per job and not a background task (bench/dispatch/README.md): ≈ 5 s per job
instead of ≈ 0.4 s, but every failure the DAG must report is visible in Prefect and the
database: a queue no worker polls is ``NOT_READY`` (the job fails "no worker serves channel
gpu" instead of waiting for ever), a dead machine's run turns ``Crashed`` (heartbeats and
the zombie automation), a cancelled run stays cancelled. Only jobs that must run elsewhere
pay it.

Nothing is shared with the worker but the databases and the object store: the run-job flow
(:func:`run_dispatched_job`) reads the session's headers and ``added_params`` from the
records, the series from the object store, the outputs of the session's finished jobs from
the object store, and the service version from its bundle; the job's outputs go to the
object store, from where the series flow puts them in its session folder for the jobs after.

A served flow (``dcmflow up`` without a work pool) has no queues to dispatch to: its
channel jobs run in the flow like the others (logged once).
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from storage.models import JobState

from tasks._storage import RuntimeSettings, repository_of, store_of, work_dirs
from tasks.context import PlannedJob, SessionRun, link_module, session_run_of
from tasks.errors import JobFailedError, JobTimedOutError, retry_unless_final
from tasks.outputs import remove_tree, restore_outputs, safe_segment, storage_requests

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

__all__ = [
    "DEFAULT_CHANNEL",
    "RUN_JOB_DEPLOYMENT",
    "channel_queue",
    "flow_run_work_pool",
    "why_no_worker",
    "wait_for_worker",
    "dispatch_job",
    "run_dispatched_job",
]

DEFAULT_CHANNEL = "default"
RUN_JOB_DEPLOYMENT = "run-job/run-job"
"""``flow/deployment`` of :func:`flows.run_job.run_job` in ``deployments/prefect.yaml``."""
POLL_SECONDS = 0.5
"""How often the series flow reads a dispatched run's state."""
QUEUE_CHECK_SECONDS = 1.0
"""How often a job waiting for its channel's worker re-checks the queue (workers poll every
``PREFECT_WORKER_QUERY_SECONDS``, 10 s by default)."""
RUNNING_MARGIN_SECONDS = 120.0
"""A dispatched run running this long past the job's timeout is cancelled (the worker kills
at the timeout itself; this catches a run whose machine stopped answering)."""


def channel_queue(channel: str) -> str:
    """The work queue of a channel: ``channel-<name>``."""
    return f"channel-{channel}"


def flow_run_work_pool() -> str | None:
    """The work pool of the running flow run; ``None`` when it is served (no pool)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if not flow_run.id:
        return None
    with get_client(sync_client=True) as client:
        return client.read_flow_run(UUID(str(flow_run.id))).work_pool_name


def why_no_worker(client: SyncPrefectClient, pool: str, channel: str) -> str | None:
    """Why no worker would take a run on the channel's queue now; ``None`` when one polls it.

    A queue is ``READY`` while a worker polled it recently (Prefect's own bookkeeping). A
    worker polling a queue that does not exist does not create it, and its polls mark
    nothing: so a missing queue is created here, and the next poll of a worker serving the
    channel makes it ``READY``.
    """
    from prefect.client.schemas.objects import WorkQueueStatus
    from prefect.exceptions import ObjectNotFound

    queue_name = channel_queue(channel)
    try:
        queue = client.read_work_queue_by_name(queue_name, work_pool_name=pool)
    except ObjectNotFound:
        client.create_work_queue(name=queue_name, work_pool_name=pool, description=f"dcmflow jobs on channel {channel}")
        return f"no worker serves channel {channel!r} (work queue {queue_name} of pool {pool!r} was missing)"
    if queue.status == WorkQueueStatus.READY:
        return None
    if queue.is_paused or queue.status == WorkQueueStatus.PAUSED:
        return f"channel {channel!r} is paused (work queue {queue_name} of pool {pool!r})"
    polled = queue.last_polled.isoformat(timespec="seconds") if queue.last_polled else "never"
    return f"no worker serves channel {channel!r} (work queue {queue_name} of pool {pool!r}, last polled: {polled})"


def wait_for_worker(client: SyncPrefectClient, pool: str, channel: str, wait: float) -> str | None:
    """``None`` once a worker polls the channel's queue; else, after ``wait`` seconds, why not."""
    deadline = time.monotonic() + wait
    while True:
        problem = why_no_worker(client, pool, channel)
        if problem is None or time.monotonic() >= deadline:
            return problem
        time.sleep(QUEUE_CHECK_SECONDS)


def _cancel(client: SyncPrefectClient, flow_run_id: UUID, message: str, *, running: bool) -> None:
    """Cancel a dispatched run: a running one through ``Cancelling`` (its worker then kills the
    run's process), one that never started at once."""
    from prefect.states import Cancelled, Cancelling

    client.set_flow_run_state(flow_run_id, Cancelling(message=message) if running else Cancelled(message=message), force=True)


def _follow(client: SyncPrefectClient, flow_run_id: UUID, pool: str, job: PlannedJob, wait: float) -> tuple[str, str]:
    """Wait for the dispatched run to end: its state type and message.

    Gives up (cancelling the run) when it waits ``wait`` seconds with no worker polling its
    queue (the workers went away after it was dispatched), or runs
    ``RUNNING_MARGIN_SECONDS`` past the job's timeout.
    """
    unserved_since: float | None = None
    running_since: float | None = None
    next_check = 0.0
    while True:
        state = client.read_flow_run(flow_run_id).state
        if state is not None and state.is_final():
            return state.type.value, state.message or ""
        now = time.monotonic()
        if state is not None and state.is_running():
            running_since = running_since or now
            unserved_since = None
            if now - running_since > job.timeout + RUNNING_MARGIN_SECONDS:
                message = f"still running {job.timeout + RUNNING_MARGIN_SECONDS:.0f} s after it started (timeout {job.timeout:.0f} s)"
                _cancel(client, flow_run_id, message, running=True)
                return "TIMED_OUT", message
        elif now >= next_check:
            next_check = now + QUEUE_CHECK_SECONDS
            problem = why_no_worker(client, pool, job.channel)
            if problem is None:
                unserved_since = None
            elif unserved_since is None:
                unserved_since = now
            elif now - unserved_since >= wait:
                message = f"{problem}; gave up after {wait:.0f} s"
                _cancel(client, flow_run_id, message, running=False)
                return "NO_WORKER", message
        time.sleep(POLL_SECONDS)


def _fail(settings: RuntimeSettings, job: PlannedJob, state: JobState, error: str, attempt: int) -> None:
    assert job.job_id is not None
    finished = dt.datetime.now(dt.UTC)
    repository_of(settings).update_job(job.job_id, state=state.value, error=error, attempts=attempt, finished_at=finished)


@task(name="dispatch-job", cache_policy=NO_CACHE, retry_condition_fn=retry_unless_final)
def dispatch_job(settings: RuntimeSettings, run: SessionRun, job: PlannedJob, pool: str) -> dict[str, Any]:
    """Run one job on its channel's workers (a ``run-job`` flow run); retried by Prefect.

    Returns what :func:`tasks.jobs.run_job` returns, read back from the records; the job's
    output files are placed in this session's ``$DATA`` for the jobs after it.

    Raises
    ------
    JobFailedError
        No worker serves the channel, or the job failed, or its run crashed or was cancelled.
    JobTimedOutError
        The job ran past its timeout.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment
    from prefect.runtime import task_run

    logger = get_run_logger()
    repository = repository_of(settings)
    assert job.job_id is not None
    attempt = int(task_run.run_count or 1)
    queue = channel_queue(job.channel)
    with get_client(sync_client=True) as client:
        problem = wait_for_worker(client, pool, job.channel, settings.channel_wait)
        if problem is not None:
            problem = f"{problem}; waited {settings.channel_wait:.0f} s (DCMFLOW_CHANNEL_WAIT)"
            _fail(settings, job, JobState.FAILED, problem, attempt)
            raise JobFailedError(f"job {job.name!r}: {problem}")
        flow_run = run_deployment(  # called from sync code: returns the FlowRun, not a coroutine
            RUN_JOB_DEPLOYMENT,
            parameters={"session_id": run.session_id, "job": job.model_dump(mode="json"), "attempt": attempt},
            work_queue_name=queue,
            timeout=0,
            idempotency_key=f"session-{run.session_id}/{job.name}/attempt-{attempt}",
            flow_run_name=f"{job.name} s{run.session_id} #{attempt}",
        )
        assert isinstance(flow_run, FlowRun)
        where = {"channel": job.channel, "pool": pool, "queue": queue, "flow_run_id": str(flow_run.id),
                 "flow_run": flow_run.name, "attempt": attempt}
        repository.put_session_data(run.session_id, "dispatch", where, job_name=job.name)
        logger.info("job %s attempt %d dispatched to channel %s: flow run %s", job.name, attempt, job.channel, flow_run.name)
        started = time.monotonic()
        state, message = _follow(client, flow_run.id, pool, job, settings.channel_wait)
    record = next(j for j in repository.list_jobs(session_id=run.session_id) if j.id == job.job_id)
    if state == "COMPLETED" and record.state == JobState.SUCCEEDED.value:
        files = [f for f in repository.list_session_files(run.session_id) if f.job_name == job.name]
        restore_outputs(store_of(settings), files, Path(run.data_dir))
        result = repository.get_session_data(run.session_id, "result", job_name=job.name)
        process = repository.get_session_data(run.session_id, "process", job_name=job.name, default={}) or {}
        return {
            "job": job.name,
            "pid": process.get("pid"),
            "result": result,
            "files": [f.name for f in files],
            "storage": [r.__dict__ for r in storage_requests(job.name, run.added_params, result)],
            "duration": round(time.monotonic() - started, 3),
        }
    if state == "TIMED_OUT" or record.state == JobState.TIMED_OUT.value:
        error = record.error or message
        if record.state != JobState.TIMED_OUT.value:
            _fail(settings, job, JobState.TIMED_OUT, error, attempt)
        raise JobTimedOutError(f"job {job.name!r}: {error}", retryable=job.retry_on_timeout)
    if record.state == JobState.FAILED.value and record.attempts == attempt and record.error:
        raise JobFailedError(f"job {job.name!r}: {record.error}")
    error = f"flow run {flow_run.name} on channel {job.channel} ended {state.lower()}: {message}".rstrip(": ")
    _fail(settings, job, JobState.CRASHED if state == "CRASHED" else JobState.FAILED, error, attempt)
    raise JobFailedError(f"job {job.name!r}: {error}")


def run_dispatched_job(settings: RuntimeSettings, session_id: int, job: PlannedJob, attempt: int, run_id: str | None) -> dict[str, Any]:
    """The body of the ``run-job`` flow: one attempt of one job of a session, on this machine.

    Works in a folder of its own (``work/dispatched/<session>-<job>-<attempt>``, removed
    after): the series from the object store, the outputs of the session's jobs that have
    succeeded so far from the object store, the service version the session planned from its
    bundle. Raises as :func:`tasks.jobs.execute_job` does.
    """
    from services_registry.install import installed_version

    from tasks.jobs import execute_job, materialise

    repository, store = repository_of(settings), store_of(settings)
    folder = work_dirs(settings)["dispatched"] / f"{session_id}-{safe_segment(job.name)}-{attempt}"
    remove_tree(folder)
    run = session_run_of(repository, session_id, work_dir=folder)
    if job.service:
        spec = installed_version(repository, Path(settings.services_dir), store, job.service, job.service_version)
        job = job.model_copy(update={"module_dir": str(spec.module_dir) if spec.module_dir else None})
        link_module(run, job)
    try:
        materialise(settings, run)
        done = {j.job_name for j in repository.list_jobs(session_id=session_id) if j.state == JobState.SUCCEEDED.value}
        earlier = [f for f in repository.list_session_files(session_id) if f.job_name in done and f.job_name != job.name]
        restore_outputs(store, earlier, Path(run.data_dir))
        return execute_job(settings, run, job, attempt=attempt, run_id=run_id)
    finally:
        remove_tree(folder)
