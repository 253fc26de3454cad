"""dcmflow tasks: the Prefect tasks of a processing run, and the job process they start.

Quick start (inside a flow)::

    from tasks import load_target, plan_jobs, start_session, record_jobs, materialise, run_job

    target = load_target(settings, "series", series_uid)
    run = start_session(settings, target, "manual", claim=False)  # claim=True: EarlierRun if taken
    planned = plan_jobs(settings, target)
    run, planned = record_jobs(settings, run, planned)
    materialise(settings, run)
    job = planned.jobs[0]
    run_job.with_options(retries=job.retries, task_run_name=job.name).submit(settings, run, job)

Names are imported lazily: ``python -m tasks._job_runner`` (every job's process) must start
without importing Prefect (seconds of import time) and may run in a service's own venv.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    # Prefect tasks (tasks.jobs)
    "load_target",
    "plan_jobs",
    "start_session",
    "record_jobs",
    "materialise",
    "run_job",
    "record_skipped",
    "send_outputs",
    "publish_artifacts",
    "finish_session",
    "artifact_key",
    "dispatch_job",
    # values (tasks.context)
    "Target",
    "PlannedJob",
    "PlannedRun",
    "SessionRun",
    "EarlierRun",
    # job processes (tasks.execution)
    "JobProcess",
    "ProcessOutcome",
    "run_job_process",
    # errors
    "TaskError",
    "SeriesNotFoundError",
    "JobFailedError",
    "JobTimedOutError",
    "EnvironmentBuildError",
    "SendError",
    "WebhookError",
]

_WHERE = {
    **dict.fromkeys(
        ["load_target", "plan_jobs", "start_session", "record_jobs", "materialise", "run_job", "record_skipped",
         "send_outputs", "publish_artifacts", "finish_session", "artifact_key"],
        "tasks.jobs",
    ),
    "dispatch_job": "tasks.dispatch",
    **dict.fromkeys(["Target", "PlannedJob", "PlannedRun", "SessionRun", "EarlierRun"], "tasks.context"),
    **dict.fromkeys(["JobProcess", "ProcessOutcome", "run_job_process"], "tasks.execution"),
    **dict.fromkeys(
        ["TaskError", "SeriesNotFoundError", "JobFailedError", "JobTimedOutError", "EnvironmentBuildError", "SendError",
         "WebhookError"],
        "tasks.errors",
    ),
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'tasks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
