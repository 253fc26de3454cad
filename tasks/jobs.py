"""The Prefect tasks of a processing run. Each takes typed values and does one thing.

============================  ====================================================
task                          does
============================  ====================================================
:func:`load_target`           reads the headers of a series or study
:func:`start_session`         records the Session, claiming (level, uid, revision)
:func:`plan_jobs`             evaluates callbacks, plans the DAG (no side effect)
:func:`record_jobs`           records the session's pending Jobs
:func:`materialise`           puts the received files under ``$DATA/<dcmpath>``
:func:`run_job`               runs one job in its own process; keeps outputs and log
:func:`record_skipped`        records jobs that will never run
:func:`send_outputs`          C-STOREs a job's ``storage`` outputs to a peer
:func:`publish_artifacts`     job table + DAG markdown on the flow run
:func:`finish_session`        the session's final state
============================  ====================================================

Retries and the task-run name of :func:`run_job` come from the job spec through
``.with_options(retries=…, retry_delay_seconds=…, task_run_name=jobName)`` in the flow;
the real timeout is the process-group kill in :mod:`tasks.execution`, not Prefect's
``timeout_seconds`` (reference/prefect.md §4).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from storage.errors import StorageError
from storage.models import InstancePublic, JobState, SessionState

from tasks._storage import RuntimeSettings, repository_of, store_of, work_dirs
from tasks.artifacts import job_artifact_key, job_artifacts
from tasks.context import (
    EarlierRun,
    PlannedJob,
    PlannedRun,
    SessionRun,
    Target,
    load_series_target,
    load_study_target,
    open_session,
    plan_target,
    record_jobs as record_session_jobs,
)
from tasks.claims import GaveUp, prefect_dead_run
from tasks.errors import JobFailedError, JobTimedOutError, SendError, TaskError, retry_unless_final
from tasks.execution import JobProcess, ProcessOutcome, run_job_process
from tasks.archiving import archive_series
from tasks.materialise import CachedSeries, fill_cache, place_series
from tasks.outputs import (
    changed_files,
    link_tree,
    merge_outputs,
    remove_tree,
    safe_segment,
    snapshot,
    storage_requests,
    store_log,
    store_outputs,
)
from tasks.send import client_tls_context, dicom_files, send_files
from tasks.venvs import callback_interpreter, service_python

__all__ = [
    "load_target",
    "plan_jobs",
    "start_session",
    "record_jobs",
    "materialise",
    "archive",
    "MaterialisedSeries",
    "run_job",
    "execute_job",
    "record_skipped",
    "send_outputs",
    "publish_artifacts",
    "finish_session",
    "artifact_key",
]


def artifact_key(level: str, uid: str) -> str:
    """``jobs-series-1-2-3``: the job-table artifact key of a series (or study), history per UID."""
    return f"jobs-{level}-{uid.replace('.', '-')}"


@task(name="load-headers", cache_policy=NO_CACHE)
def load_target(settings: RuntimeSettings, level: str, uid: str, revision: int | None = None) -> Target:
    """Headers and facts of the received series (``level="series"``) or study."""
    repository, store = repository_of(settings), store_of(settings)
    if level == "study":
        return load_study_target(repository, store, uid, revision)
    return load_series_target(repository, store, uid, revision)


@task(name="evaluate-callbacks", cache_policy=NO_CACHE)
def plan_jobs(settings: RuntimeSettings, target: Target, only_jobs: list[str] | None = None) -> PlannedRun:
    """Evaluate the installed services' callbacks on ``target`` and plan the DAG."""
    from services_registry.install import installed_specs

    specs = installed_specs(repository_of(settings), Path(settings.services_dir), store_of(settings))
    return plan_target(
        specs,
        target,
        only_jobs=only_jobs,
        callback_timeout=settings.callback_timeout,
        interpreter=callback_interpreter(work_dirs(settings)["venvs"]),
    )


@task(name="start-session", cache_policy=NO_CACHE)
def start_session(settings: RuntimeSettings, target: Target, trigger: str, claim: bool) -> SessionRun | EarlierRun | GaveUp:
    """Record the run's Session; with ``claim``, only if its (level, uid, revision) has none
    yet, or its holder's flow run is dead by Prefect's account (a worker that died).

    Returns the new session, the earlier session holding the claim (nothing recorded), or
    the session failed at once because the revision's runs crashed too often.
    """
    from prefect.runtime import flow_run

    flow_run_id = str(flow_run.id) if flow_run.id else None
    return open_session(
        repository_of(settings),
        target,
        sessions_dir=work_dirs(settings)["sessions"],
        trigger=trigger,
        flow_run_id=flow_run_id,
        claim=claim,
        dead_run=prefect_dead_run,
    )


@task(name="record-jobs", cache_policy=NO_CACHE)
def record_jobs(settings: RuntimeSettings, run: SessionRun, planned: PlannedRun) -> tuple[SessionRun, PlannedRun]:
    """Record one pending Job per planned job; the run with its ``added_params``, jobs with ids."""
    return record_session_jobs(repository_of(settings), run, planned)


@dataclass(frozen=True)
class MaterialisedSeries:
    """One series as :func:`materialise` read it: its instances and their cache files."""

    series_uid: str
    instances: list[InstancePublic]
    cached: CachedSeries


@task(name="materialise-files", cache_policy=NO_CACHE)
def materialise(settings: RuntimeSettings, run: SessionRun) -> list[MaterialisedSeries]:
    """Put every series of the run under ``$DATA/dicom/<study>/<series>`` (read-only, cached).

    Each series comes from its archive when it has one, else from its instance objects
    (:mod:`tasks.materialise`); :func:`archive` then archives what the archive lacks, from
    what this returns.
    """
    logger = get_run_logger()
    repository, store = repository_of(settings), store_of(settings)
    read = []
    for uid in _series_of(run):
        instances = repository.list_instances(uid)
        cached = fill_cache(store, instances, study_uid=run.study_uid, series_uid=uid, cache_dir=work_dirs(settings)["cache"])
        logger.info("series %s: %s", uid, cached.line())
        place_series(instances, cached, Path(run.data_dir) / "dicom" / run.study_uid / uid)
        read.append(MaterialisedSeries(uid, instances, cached))
    return read


@task(name="archive-series", cache_policy=NO_CACHE)
def archive(settings: RuntimeSettings, run: SessionRun, read: Sequence[MaterialisedSeries]) -> int:
    """Append to each series' archive the instances it lacks, from the cache files
    :func:`materialise` read (the first run of a revision writes its part; later ones find
    nothing to add), without listing or fetching anything again.

    The flow runs it beside the jobs, not before them: packing a 300-instance CT takes
    seconds that no job should wait for. A failed write is a warning, not a failed run: the
    next run of the series appends what is missing, and reads fall back to the instance
    objects meanwhile. Returns the number of instances archived now.
    """
    logger = get_run_logger()
    store = store_of(settings)
    added = 0
    for series in read:
        try:
            archived = archive_series(
                store, series.instances, series.cached.files, study_uid=run.study_uid, series_uid=series.series_uid,
                index=series.cached.index, index_known=series.cached.index_read,
            )
        except StorageError as exc:
            logger.warning("series %s: archive not written: %s", series.series_uid, exc)
            continue
        logger.info("series %s: %s", series.series_uid, archived.line())
        added += archived.appended
    return added


def _series_of(run: SessionRun) -> list[str]:
    """The series of a run: its own, or every series of its study."""
    return [run.series_uid] if run.series_uid else list(run.headers.get("seriesIds", []))


def _import_paths(job: PlannedJob, run: SessionRun) -> list[str]:
    if not job.module_dir:
        return []
    module_dir = Path(job.module_dir)
    if module_dir.name == "python":  # Python-API service: the folder is its import root
        return [str(module_dir)]
    # seed layout: module/ is package <service> under $MODULES, packages inside it are top level
    # (services_registry.loader.top_level_names: module/__init__.py makes the alias win)
    paths = [str(module_dir), run.modules_dir]
    return paths[::-1] if (module_dir / "__init__.py").is_file() else paths


@task(name="run-job", cache_policy=NO_CACHE, retry_condition_fn=retry_unless_final)
def run_job(settings: RuntimeSettings, run: SessionRun, job: PlannedJob) -> dict[str, Any]:
    """Run one job here, in its own process group (:func:`execute_job`); a failure is retried
    by Prefect (the job's ``retries``), a timeout only with ``retryOnTimeout``.

    Raises
    ------
    JobTimedOutError
        The job ran past its timeout; its process group was killed.
    JobFailedError
        Non-zero exit, a signal, or its environment could not be built.
    """
    from prefect.runtime import task_run

    return execute_job(
        settings,
        run,
        job,
        attempt=int(task_run.run_count or 1),
        run_id=str(task_run.id) if task_run.id else None,
    )


def execute_job(
    settings: RuntimeSettings,
    run: SessionRun,
    job: PlannedJob,
    *,
    attempt: int,
    run_id: str | None,
) -> dict[str, Any]:
    """Run one job attempt in its own process group; record it, its outputs and its log.

    The attempt's ``$DATA`` is a hard-linked copy of the session's folder on this machine
    (``run.data_dir``: earlier jobs' outputs; ``dicom/``, the received files, is a link to the
    session's read-only folder); its new files go to the object store, and into
    ``run.data_dir`` when it succeeded.

    Returns
    -------
    dict
        ``job``, ``pid``, ``result`` (the worker's return value), ``files`` (output paths
        under ``$DATA``), ``storage`` (send requests), ``duration``.

    Raises
    ------
    JobTimedOutError
        The job ran past its timeout; its process group was killed.
    JobFailedError
        Non-zero exit, a signal, or its environment could not be built.
    """
    logger = get_run_logger()
    repository, store = repository_of(settings), store_of(settings)
    assert job.job_id is not None
    job_id = job.job_id
    fields: dict[str, Any] = {"state": JobState.RUNNING.value, "attempts": attempt, "error": None, "exit_code": None}
    if run_id:
        fields["task_run_id"] = run_id
    if attempt > 1:
        previous = next((j for j in repository.list_jobs(session_id=run.session_id) if j.id == job.job_id), None)
        if previous is not None and previous.started_at is not None:
            fields["started_at"] = previous.started_at
    work = Path(run.work_dir)
    log_path = work / "joblogs" / f"{safe_segment(job.name)}.log"
    try:
        python = service_python(
            Path(job.module_dir) if job.module_dir else None, work_dirs(settings)["venvs"], job.service, job.service_version
        )
    except TaskError as exc:
        repository.update_job(job.job_id, **{**fields, "state": JobState.FAILED.value, "error": str(exc)})
        raise JobFailedError(f"job {job.name!r}: {exc}") from None
    data_dir = work / "jobs" / safe_segment(job.name) / "data"  # this attempt's own $DATA
    remove_tree(data_dir)
    link_tree(Path(run.data_dir), data_dir, shared=("dicom",))  # received series: read-only, one link
    before = snapshot(data_dir)
    if attempt > 1:
        with log_path.open("a") as fh:
            fh.write(f"dcmflow: attempt {attempt}\n")
    pid_holder: dict[str, int] = {}

    def started(pid: int) -> None:  # running, and its process, in one commit while the process starts
        pid_holder["pid"] = pid
        repository.update_job_with_data(job_id, {"process": {"pid": pid, "attempt": attempt}}, **fields)
        logger.info("job %s attempt %d started (pid %d)", job.name, attempt, pid)

    try:
        outcome = _run_process(job, run, python, data_dir, log_path, logger, started)
    except OSError as exc:  # the interpreter could not be started
        repository.update_job(job.job_id, **{**fields, "state": JobState.FAILED.value, "error": f"cannot start: {exc}"})
        raise JobFailedError(f"job {job.name!r}: cannot start: {exc}") from None
    files = changed_files(before, snapshot(data_dir))
    if outcome.status == "succeeded":
        merge_outputs(data_dir, Path(run.data_dir), files)
    stored = store_outputs(repository, store, session_id=run.session_id, job_name=job.name, data_dir=data_dir, paths=files)
    log_key = store_log(store, session_id=run.session_id, job_name=job.name, log_path=log_path)
    finished = dt.datetime.fromtimestamp(outcome.finished, dt.UTC)
    if outcome.status == "succeeded":
        repository.update_job_with_data(
            job.job_id, {"result": outcome.result}, state=JobState.SUCCEEDED.value, exit_code=0, log_key=log_key,
            finished_at=finished,
        )
        requests = storage_requests(job.name, run.added_params, outcome.result)
        return {
            "job": job.name,
            "pid": outcome.pid,
            "result": outcome.result,
            "files": [f.name for f in stored],
            "storage": [r.__dict__ for r in requests],
            "duration": outcome.duration,
        }
    state = JobState.TIMED_OUT if outcome.status == "timed_out" else JobState.FAILED
    repository.update_job(
        job.job_id, state=state.value, exit_code=outcome.exit_code, error=outcome.error, log_key=log_key, finished_at=finished
    )
    logger.error("job %s attempt %d %s: %s", job.name, attempt, state.value, outcome.error)
    if outcome.status == "timed_out":
        raise JobTimedOutError(f"job {job.name!r}: {outcome.error}", retryable=job.retry_on_timeout)
    raise JobFailedError(f"job {job.name!r}: {outcome.error}")


def _run_process(
    job: PlannedJob, run: SessionRun, python: str, data_dir: Path, log_path: Path, logger: Any,
    started: Callable[[int], None],
) -> ProcessOutcome:
    """The job's process (:func:`tasks.execution.run_job_process`), its lines to the run logger."""
    work = Path(run.work_dir)
    return run_job_process(
        JobProcess(
            python=python,
            worker=job.worker,
            import_paths=_import_paths(job, run),
            kwargs={
                "jobName": job.name,
                "headers": run.headers,
                "params": job.params,
                "added_params": run.added_params,
            },
            env={"DATA": str(data_dir), "MODULES": run.modules_dir, "LOGS": run.logs_dir},
            work_dir=work / "jobs" / safe_segment(job.name),
            log_path=log_path,
            timeout=job.timeout,
        ),
        on_line=lambda line: logger.info("%s | %s", job.name, line),
        on_start=started,
    )


@task(name="record-skipped", cache_policy=NO_CACHE)
def record_skipped(settings: RuntimeSettings, skipped: Mapping[int, str]) -> None:
    """Record jobs that will never run (a dependency failed), with the reason."""
    repository = repository_of(settings)
    for job_id, reason in skipped.items():
        repository.update_job(job_id, state=JobState.SKIPPED.value, error=reason)


@task(name="send-outputs", cache_policy=NO_CACHE)
def send_outputs(settings: RuntimeSettings, run: SessionRun, job_name: str, requests: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """C-STORE every ``type: dicom`` output of a job to its peer, with retries; record each send.

    The destination is the request's ``destination`` (a Peer name), else every peer with
    ``receive_results``. Other types (``pdf``, ``nifti``) are recorded as not sent.

    Raises
    ------
    SendError
        A peer is unknown, or files are still unsent after the retries (recorded first).
    """
    logger = get_run_logger()
    repository = repository_of(settings)
    records: list[dict[str, Any]] = []
    problems: list[str] = []
    for request in requests:
        path = (Path(run.data_dir) / str(request["path"])).resolve()
        base = {"job": job_name, "path": request["path"], "type": request["type"]}
        if request["type"] != "dicom":
            records.append({**base, "peer": request.get("destination"), "status": "not sent: only type 'dicom' is sent"})
            continue
        if not path.is_relative_to(Path(run.data_dir).resolve()) or not path.exists():
            records.append({**base, "peer": request.get("destination"), "status": "failed", "error": "no such output"})
            problems.append(f"{request['path']}: no such output under $DATA")
            continue
        if request.get("destination"):
            peer = repository.get_peer(str(request["destination"]))
            peers = [peer] if peer is not None else []
            if peer is None:
                problems.append(f"no peer named {request['destination']!r}")
                records.append({**base, "peer": request["destination"], "status": "failed", "error": "unknown peer"})
        else:
            peers = [p for p in repository.list_peers() if p.receive_results]
            if not peers:
                problems.append(f"{request['path']}: no destination and no peer receives results")
        files = dicom_files(path)
        for peer in peers:
            try:
                tls = client_tls_context(settings.tls_cert, settings.tls_key, settings.tls_ca) if peer.tls else None
                report = send_files(peer, files, calling_ae=settings.ae_title, tls=tls)
            except SendError as exc:
                records.append({**base, "peer": peer.name, "status": "failed", "error": str(exc)})
                problems.append(str(exc))
                logger.error("send %s to %s failed: %s", request["path"], peer.name, exc)
                continue
            records.append(
                {**base, "peer": peer.name, "status": "sent", "instances": len(report.sent), "attempts": report.attempts}
            )
            logger.info("sent %d instance(s) of %s to %s", len(report.sent), request["path"], peer.name)
    repository.put_session_data(run.session_id, "sent", records, job_name=job_name)
    if problems:
        raise SendError(f"job {job_name!r}: " + "; ".join(problems))
    return records


@task(name="publish-artifacts", cache_policy=NO_CACHE)
def publish_artifacts(settings: RuntimeSettings, run: SessionRun, planned: PlannedRun, target: Target) -> dict[str, str]:
    """The job table (key ``jobs-series-<uid>``), a markdown DAG with outputs, and what each job
    asked to show (:mod:`tasks.artifacts`, key ``<job>-series-<uid>``), on the flow run."""
    repository = repository_of(settings)
    jobs = repository.list_jobs(session_id=run.session_id)
    dispatched = repository.job_session_data(run.session_id, "dispatch")
    table = [
        {
            "job": j.job_name,
            "service": f"{j.service_name} v{j.service_version}",
            "runs_on": f"channel {d['channel']} ({d['flow_run']})" if (d := dispatched.get(j.job_name)) else "in the flow",
            "state": j.state,
            "attempts": j.attempts,
            "duration_s": round((j.finished_at - j.started_at).total_seconds(), 2) if j.started_at and j.finished_at else None,
            "exit_code": j.exit_code,
            "error": j.error or "",
        }
        for j in jobs
    ]
    uid = target.series_uid or target.study_uid
    key = artifact_key(target.level, uid)
    create_table_artifact(table, key=key, description=f"Jobs of {target.level} {uid} (session {run.session_id})")
    files = repository.list_session_files(run.session_id)
    lines = [
        f"# {target.level} {uid}",
        "",
        f"{target.modality} {target.description!r}, revision {target.revision}, session {run.session_id}",
        "",
        "```mermaid",
        planned.mermaid.rstrip(),
        "```",
        "",
        "| job | state |",
        "|---|---|",
        *(f"| {j.job_name} | {j.state} |" for j in jobs),
    ]
    if planned.rejected:
        lines += ["", "## Not selected", "", *(f"- `{r['job']}` ({r['service']}): {r['reason']}" for r in planned.rejected)]
    lines += ["", "## Outputs", ""]
    lines += [f"- `{f.job_name}`: `{f.name}` ({f.size} bytes) → object `{f.object_key}`" for f in files] or ["none"]
    dag_key = key.replace("jobs-", "dag-", 1)
    create_markdown_artifact("\n".join(lines) + "\n", key=dag_key, description=f"DAG and outputs of {target.level} {uid}")
    published = {"table": key, "markdown": dag_key}
    for shown in job_artifacts(repository, store_of(settings), run.session_id, jobs):
        job_key = job_artifact_key(shown.job_name, target.level, uid)
        create_markdown_artifact(shown.markdown, key=job_key, description=shown.description)
        published[f"job:{shown.job_name}"] = job_key
    return published


@task(name="finish-session", cache_policy=NO_CACHE)
def finish_session(settings: RuntimeSettings, run: SessionRun, failed: bool) -> None:
    """Set the session's final state, unless another run took its claim over meanwhile (this
    run was taken for dead: no heartbeat reached Prefect): that session stays ``crashed``."""
    state = SessionState.FAILED if failed else SessionState.COMPLETED
    repository = repository_of(settings)
    current = repository.get_session(run.session_id)
    if current is not None and current.state == SessionState.CRASHED.value:
        get_run_logger().warning(
            "session %d was marked crashed and its claim taken over while this run went on: it stays crashed",
            run.session_id,
        )
        return
    repository.finish_session(run.session_id, state.value)
