"""The ``run-job`` flow: one job of a session, on a worker that serves the job's channel.

The series flow dispatches a job whose dcm-processor ``channel`` is not ``default`` as a run
of this flow on the work queue ``channel-<name>`` (:mod:`tasks.dispatch`); a worker started
with ``prefect worker start --pool dcmflow --work-queue channel-gpu`` runs it with its own
``DCMFLOW_HOME``, sharing only the databases and the object store with the series flow.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from tasks.context import PlannedJob
from tasks.dispatch import run_dispatched_job

from flows._settings import load_settings

__all__ = ["run_job"]


@flow(name="run-job", validate_parameters=True)  # run name set by the dispatcher: "<job> s<session> #<attempt>"
def run_job(session_id: int, job: PlannedJob, attempt: int = 1) -> dict[str, Any]:
    """Run one planned job of a processing session here (dispatched by the series flow).

    Args:
        session_id: The processing session the job belongs to (its records say the series,
            headers and added_params).
        job: The planned job, as the series flow planned it (worker, service version,
            params, timeout, channel).
        attempt: Which attempt of the job this is (the series flow retries by dispatching again).
    """
    run_id = str(flow_run.id) if flow_run.id else None
    return run_dispatched_job(load_settings(), session_id, job, attempt, run_id)
