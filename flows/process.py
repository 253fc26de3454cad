"""The processing flows: ``process_series``, ``process_study`` and ``reprocess``.

Each is the same short sequence (STYLE.md §9): load the headers, record a session, evaluate
callbacks and plan the DAG, record the jobs, materialise the files, run the DAG
(:mod:`flows._dag`) while the series archive gets what it lacks, publish the job table and
DAG artifacts, close the session. The flow run
ends **Failed** when any job failed or timed out (or an output could not be sent),
**Completed** otherwise; the Job records say what happened to each job.

Exactly once per (series or study, revision): a run given a ``revision`` (the triggers of
``deployments/prefect.yaml`` always give one) claims it when it records its session
(:meth:`storage.repository.Repository.claim_session`, a unique key in the records database),
before any job is planned or recorded. So however often, or however concurrently, a trigger
fires for one revision, one run does the work; the others end at once:

* the revision already has a session (running or finished): **Completed**, message
  ``series <uid> revision <n> already processed by flow run <id> (session <s>, <state>)``;
* a newer revision arrived since: **Completed** named ``Superseded``, message
  ``series <uid> revision <n> superseded by revision <m>``;
* the revision does not exist yet: **Failed**, ``series <uid> has no revision <n> (current
  revision <m>)``.

A run whose claim is held by a run that died (its worker was killed: Prefect reports that flow
run Crashed while its session still says running) takes the claim over: the dead run's session
becomes ``crashed`` and this run processes the revision (:mod:`tasks.claims`); that is how the
``rerun-crashed`` triggers of ``deployments/prefect.yaml`` end with the revision processed once.
After three crashed sessions of one revision the next run gives up: **Failed**, ``series <uid>
revision <n> crashed 3 times (...)``.

Runs without a revision (``dcmflow process``, ``reprocess``, a deployment run by hand) always
run, as a new session of the current revision.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.claims import GaveUp
from tasks.context import EarlierRun, PlannedRun, Target
from tasks.jobs import (
    archive,
    finish_session,
    load_target,
    materialise,
    plan_jobs,
    publish_artifacts,
    record_jobs,
    start_session,
)

from flows._dag import run_dag
from flows._settings import load_settings, max_parallel_jobs

__all__ = ["process_series", "process_study", "reprocess", "run_processing", "MAX_POOL_THREADS"]

MAX_POOL_THREADS = 32
"""Threads of the flows' task runner; ``max_parallel`` is capped to it."""


def _short(uid: str) -> str:
    return uid if len(uid) <= 14 else "…" + uid[-12:]


def _run_name(level: str, uid_param: str) -> Any:
    def name() -> str:
        params = flow_run.parameters
        uid = str(params.get(uid_param, ""))
        revision = params.get("revision")
        words = [level]
        try:
            from tasks._storage import repository_of

            repository = repository_of(load_settings())
            if level == "series":
                record = repository.get_series(uid)
                if record is not None:
                    words = [record.modality or "series", repr(record.description or "")]
                    revision = record.revision if revision is None else revision
            else:
                study = repository.get_study(uid)
                if study is not None:
                    words = ["study", study.modalities or "", repr(study.description or "")]
                    revision = study.revision if revision is None else revision
        except Exception:  # noqa: BLE001 - a name must never fail the run
            pass
        jobs = params.get("only_jobs")
        suffix = f" jobs={','.join(jobs)}" if jobs else ""
        return " ".join(w for w in [*words, _short(uid), f"r{revision or 1}"] if w) + suffix

    return name


def _revision_state(target: Target) -> State | None:
    """The final state of a run for a revision that is not the current one (else ``None``)."""
    what = f"{target.level} {target.uid}"
    if target.revision < target.current_revision:
        return Completed(
            name="Superseded",
            message=f"{what} revision {target.revision} superseded by revision {target.current_revision}",
        )
    if target.revision > target.current_revision:
        return Failed(message=f"{what} has no revision {target.revision} (current revision {target.current_revision})")
    return None


def run_processing(
    level: str,
    uid: str,
    *,
    revision: int | None,
    only_jobs: list[str] | None,
    trigger: str,
    max_parallel: int | None,
) -> State:
    """The body shared by the flows (call it only inside a flow run)."""
    settings = load_settings()
    parallel = min(max_parallel_jobs(settings, max_parallel), MAX_POOL_THREADS)
    target = load_target(settings, level, uid, revision)
    if revision is not None and (other := _revision_state(target)) is not None:
        return other
    run = start_session(settings, target, trigger, claim=revision is not None)
    if isinstance(run, EarlierRun):
        return Completed(message=run.message, data={"session_id": run.session_id, "flow_run_id": run.flow_run_id})
    if isinstance(run, GaveUp):
        return Failed(message=run.message)
    failed = True
    planned: PlannedRun | None = None
    try:
        planned = plan_jobs(settings, target, only_jobs)
        run, planned = record_jobs(settings, run, planned)
        read = materialise(settings, run)
        archiving = archive.submit(settings, run, read)  # beside the jobs: no job waits for the packing
        outcome = run_dag(settings, run, planned, parallel)
        archiving.wait()
        failed = bool(outcome.failed or outcome.send_errors)
    finally:
        if planned is not None:
            publish_artifacts(settings, run, planned, target)
        finish_session(settings, run, failed)
    summary = {
        "session_id": run.session_id,
        "level": level,
        "uid": uid,
        "jobs": outcome.status,
        "reasons": outcome.reasons,
        "send_errors": outcome.send_errors,
    }
    if failed:
        parts = [f"{name} {outcome.status[name].replace('_', ' ')}" for name in outcome.failed]
        parts += outcome.send_errors
        # no data: a Failed state's data must be an exception, or Prefect's engine raises on it
        return Failed(message=f"{len(outcome.failed)} of {len(planned.jobs)} jobs failed: " + "; ".join(parts))
    return Completed(message=f"{len(planned.jobs)} jobs succeeded", data=summary)


@flow(
    name="process-series",
    flow_run_name=_run_name("series", "series_uid"),
    task_runner=ThreadPoolTaskRunner(max_workers=MAX_POOL_THREADS),  # type: ignore[arg-type]
    validate_parameters=True,
)
def process_series(
    series_uid: str,
    revision: int | None = None,
    only_jobs: list[str] | None = None,
    trigger: str = "manual",
    max_parallel: int | None = None,
) -> State:
    """Run every selected series-level job of the installed services on a received series.

    (Google-style ``Args``: Prefect shows these lines as the parameters' descriptions.)

    Args:
        series_uid: Series Instance UID of a received series.
        revision: The series revision this run is for. Given (as the dicom.series.stable trigger
            does), the run claims (series, revision) and ends at once if another run has it or a
            newer revision superseded it; empty: the current revision, always run.
        only_jobs: Run only these jobs and what depends on them (empty: every selected job).
        trigger: What started the run, recorded on the session: dicom.series.stable, manual, ...
        max_parallel: Jobs at once (empty: DCMFLOW_MAX_PARALLEL_JOBS, default 4).
    """
    return run_processing("series", series_uid, revision=revision, only_jobs=only_jobs, trigger=trigger, max_parallel=max_parallel)


@flow(
    name="process-study",
    flow_run_name=_run_name("study", "study_uid"),
    task_runner=ThreadPoolTaskRunner(max_workers=MAX_POOL_THREADS),  # type: ignore[arg-type]
)
def process_study(
    study_uid: str,
    revision: int | None = None,
    only_jobs: list[str] | None = None,
    trigger: str = "manual",
    max_parallel: int | None = None,
) -> State:
    """Run every selected study-level job (``level: study``) on a received study.

    Headers are the study's first series' representative instance, with ``dcmpath`` =
    ``dicom/<study>`` (every series in its own sub-folder) and ``seriesIds``.

    Args:
        study_uid: Study Instance UID of a received study.
        revision: The study revision this run is for. Given (as the dicom.study.stable trigger
            does), the run claims (study, revision) and ends at once if another run has it or a
            newer revision superseded it; empty: the current revision, always run.
        only_jobs: Run only these jobs and what depends on them (empty: every selected job).
        trigger: What started the run, recorded on the session: dicom.study.stable, manual, ...
        max_parallel: Jobs at once (empty: DCMFLOW_MAX_PARALLEL_JOBS, default 4).
    """
    return run_processing("study", study_uid, revision=revision, only_jobs=only_jobs, trigger=trigger, max_parallel=max_parallel)


@flow(
    name="reprocess",
    flow_run_name=_run_name("series", "series_uid"),
    task_runner=ThreadPoolTaskRunner(max_workers=MAX_POOL_THREADS),  # type: ignore[arg-type]
)
def reprocess(series_uid: str, only_jobs: list[str] | None = None, max_parallel: int | None = None) -> State:
    """Re-run a series with the current service versions as a new session (optionally some jobs).

    Args:
        series_uid: Series Instance UID of a received series.
        only_jobs: Re-run only these jobs and what depends on them (empty: every selected job).
        max_parallel: Jobs at once (empty: DCMFLOW_MAX_PARALLEL_JOBS, default 4).
    """
    return run_processing("series", series_uid, revision=None, only_jobs=only_jobs, trigger="reprocess", max_parallel=max_parallel)
