"""Run a planned DAG of jobs as Prefect task runs: ready jobs only, priority first, at most N.

The pattern of reference/prefect.md §4 ("in-flow scheduler"), because Prefect has no task
priority and a dependent submitted early would sit in a pool thread, or stay ``Pending``
for ever when its upstream failed:

* a job is submitted only when every dependency *succeeded*; among ready jobs the highest
  priority rank first, then ``sortPosition``, then ``jobName`` (the planner's ready order:
  both take jobs from :class:`services_registry.graph.ReadyQueue`);
* at most ``max_parallel`` jobs run at once;
* a job whose dependency failed, timed out or was skipped is *skipped* (recorded, never run);
* ``fut.wait()`` before reading a finished future's state (it can be stale before).

A job on a dcm-processor channel other than ``default`` is submitted as
:func:`tasks.dispatch.dispatch_job` (a ``run-job`` flow run on that channel's work queue of
the flow's work pool) and otherwise treated the same; a served flow has no pool, so its
channel jobs run here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger
from prefect.futures import PrefectFuture, as_completed

from services_registry.graph import ReadyQueue, ready_key
from tasks.context import PlannedJob, PlannedRun, SessionRun
from tasks.dispatch import DEFAULT_CHANNEL, dispatch_job, flow_run_work_pool
from tasks.errors import JobTimedOutError
from tasks.jobs import record_skipped, run_job, send_outputs

__all__ = ["DagOutcome", "run_dag"]

_FAILED = {"failed", "timed_out", "skipped"}


@dataclass
class DagOutcome:
    """Per job: ``succeeded``, ``failed``, ``timed_out`` or ``skipped``; why; the task results."""

    status: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    send_errors: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        """Jobs that failed or timed out (not the skipped ones)."""
        return [name for name, state in self.status.items() if state in {"failed", "timed_out"}]


def _channel_pool(jobs: list[PlannedJob]) -> str | None:
    """The work pool to dispatch channel jobs to (``None``: none to dispatch, or a served flow)."""
    channels = sorted({job.channel for job in jobs if job.channel != DEFAULT_CHANNEL})
    if not channels:
        return None
    pool = flow_run_work_pool()
    if pool is None:
        get_run_logger().warning(
            "channel %s: this flow run is served, not on a work pool, so its channel jobs run here",
            ", ".join(channels),
        )
    return pool


def run_dag(settings: Any, run: SessionRun, planned: PlannedRun, max_parallel: int) -> DagOutcome:
    """Run every job of ``planned`` (see the module docstring); sends start as jobs finish."""
    pool = _channel_pool(planned.jobs)
    jobs = {job.name: job for job in planned.jobs}
    order = [job.name for job in planned.jobs]
    queue = ReadyQueue(
        {name: job.depends_on for name, job in jobs.items()},
        lambda name: ready_key(jobs[name].rank, jobs[name].sort_position, name),
    )
    outcome = DagOutcome()
    running: dict[PrefectFuture[Any], str] = {}
    sends: list[tuple[str, PrefectFuture[Any]]] = []
    while True:
        skipped: dict[int, str] = {}
        changed = True
        while changed:
            changed = False
            for name in order:
                if name in outcome.status or name in running.values():
                    continue
                bad = next((d for d in jobs[name].depends_on if outcome.status.get(d) in _FAILED), None)
                if bad is not None:
                    outcome.status[name] = "skipped"
                    outcome.reasons[name] = f"dependency {bad!r} {outcome.status[bad].replace('_', ' ')}"
                    skipped[jobs[name].job_id or 0] = outcome.reasons[name]
                    changed = True
        if skipped:
            record_skipped(settings, skipped)
        while queue and len(running) < max_parallel:
            name = queue.pop()
            job = jobs[name]
            if pool is not None and job.channel != DEFAULT_CHANNEL:
                future = dispatch_job.with_options(
                    retries=job.retries, retry_delay_seconds=job.retry_delay, task_run_name=f"{job.name} ({job.channel})"
                ).submit(settings, run, job, pool)
            else:
                future = run_job.with_options(
                    retries=job.retries, retry_delay_seconds=job.retry_delay, task_run_name=job.name
                ).submit(settings, run, job)
            running[future] = name
        if not running:
            break
        done = next(as_completed(list(running)))
        name = running.pop(done)
        done.wait()
        if done.state.is_completed():
            outcome.status[name] = "succeeded"
            queue.done(name)
            result = done.result()
            outcome.results[name] = result
            if result.get("storage"):
                sends.append((name, send_outputs.with_options(task_run_name=f"send-{name}").submit(
                    settings, run, name, result["storage"])))
        else:
            error = done.result(raise_on_failure=False)
            outcome.status[name] = "timed_out" if isinstance(error, JobTimedOutError) else "failed"
            outcome.reasons[name] = str(error)
    for name, future in sends:
        future.wait()
        if not future.state.is_completed():
            outcome.send_errors.append(str(future.result(raise_on_failure=False)))
    return outcome
