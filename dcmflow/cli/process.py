"""``dcmflow process`` and ``dcmflow reprocess``: run the processing flow on a received series now.

``--wait`` runs the flow in this process and prints the job table (exit code 1 when a job
failed). Without it, the same command is started in the background (its own session, log
under ``DCMFLOW_HOME/logs/``) and this one returns at once; ``dcmflow jobs list --series``
shows progress. With no ``PREFECT_API_URL`` Prefect starts its ephemeral local server (about
20 s the first time), so a newcomer needs no setup; runs then show in ``prefect server start``.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import httpx
import typer

from dcmflow.cli._common import load_settings
from dcmflow.cli._output import emit, fail, info

if TYPE_CHECKING:
    from dcmflow.settings import Settings

__all__ = ["process", "reprocess", "JOB_COLUMNS"]

JOB_COLUMNS = ["id", "session_id", "job_name", "state", "attempts", "exit_code", "started_at", "finished_at", "error"]
"""Columns of the job table (``--json`` carries every field)."""


def _check_series(settings: Settings, series_uid: str) -> None:
    from storage.errors import StorageError
    from storage.keys import is_valid_uid

    from dcmflow.cli._common import open_repository

    if not is_valid_uid(series_uid):
        fail(f"invalid Series Instance UID: {series_uid!r} (expected digits and dots, at most 64 characters)")
    repository = open_repository(settings)
    try:
        found = repository.get_series(series_uid)
    except StorageError as exc:
        fail(str(exc))
    if found is None:
        fail(f"no received series {series_uid}")


def _background(settings: Settings, args: list[str], series_uid: str) -> None:
    logs = settings.home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"process-{series_uid}-{int(time.time())}.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from dcmflow.cli import main; main()", *args, "--wait"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    info(f"started in the background (pid {proc.pid}); log: {log_path}")
    info(f"follow it with: dcmflow jobs list --series {series_uid}")


def _run(settings: Settings, series_uid: str, *, only_jobs: list[str] | None, trigger: str,
         max_parallel: int | None, as_json: bool) -> None:
    from dcmflow.wiring import repository_from
    from flows.process import process_series, reprocess
    from tasks.errors import TaskError

    before = {j.session_id for j in repository_from(settings).list_jobs(series_uid)}
    try:
        if trigger == "reprocess":
            state = reprocess(series_uid, only_jobs=only_jobs, max_parallel=max_parallel, return_state=True)
        else:
            state = process_series(series_uid, only_jobs=only_jobs, max_parallel=max_parallel, return_state=True)
    except TaskError as exc:
        fail(str(exc))
    jobs = [j for j in repository_from(settings).list_jobs(series_uid) if j.session_id not in before]
    if state.is_failed() and not jobs:
        fail(state.message or "the flow run failed")
    emit(jobs, as_json, columns=JOB_COLUMNS, title=f"jobs of series {series_uid}")
    if not jobs:
        info("no service selected this series: nothing ran")
    if not state.is_completed():
        fail(state.message or f"flow run ended {state.name}")


def process(
    series_uid: str = typer.Argument(..., help="Series Instance UID of a received series."),
    wait: bool = typer.Option(False, "--wait", help="Run here and wait; print the job table."),
    max_parallel: int | None = typer.Option(None, "--max-parallel", min=1, help="Jobs at once (default DCMFLOW_MAX_PARALLEL_JOBS or 4)."),
    as_json: bool = typer.Option(False, "--json", help="Print the job records as JSON (with --wait)."),
) -> None:
    """Run the services on a received series now (the process-series flow).

    Examples:

        dcmflow process 1.2.840.113619.2.55.3.1234

        dcmflow process 1.2.840.113619.2.55.3.1234 --wait
    """
    settings = load_settings()
    _check_series(settings, series_uid)
    if not wait:
        extra = ["--max-parallel", str(max_parallel)] if max_parallel else []
        _background(settings, ["process", series_uid, *extra], series_uid)
        return
    _run(settings, series_uid, only_jobs=None, trigger="manual", max_parallel=max_parallel, as_json=as_json)


def _check_jobs(settings: Settings, job: list[str]) -> None:
    if not job:
        return
    from dcmflow.wiring import repository_from

    known = {j.job_name for s in repository_from(settings).list_services() for j in s.jobs}
    unknown = [name for name in job if name not in known]
    if unknown:
        fail(f"no installed job named {unknown[0]!r} (installed: {', '.join(sorted(known)) or 'none'})")


def _backfill(settings: Settings, since: dt.datetime | None, job: list[str], as_json: bool) -> None:
    """Queue one run of the reprocess deployment per series (received since ``since``) on the stack."""
    from deployments.loader import read_specs
    from storage.errors import StorageError

    from dcmflow.cli._common import open_repository
    from dcmflow.prefect_api import NoSuchDeployment, create_run
    from dcmflow.stack_state import read_state

    state = read_state(settings.home)
    api_url = state.api_url if state is not None else settings.prefect_api_url
    if api_url is None:
        fail(f"no running stack for DCMFLOW_HOME={settings.home} and no PREFECT_API_URL: start `dcmflow up`")
    deployment = next(spec.full_name for spec in read_specs() if spec.flow_name == "reprocess")
    repository = open_repository(settings)
    cutoff = since.astimezone(dt.UTC) if since is not None else None
    queued: list[dict[str, str]] = []
    offset, page = 0, 500
    try:
        while True:
            series = repository.list_series(limit=page, offset=offset)  # newest first
            for record in series:
                if cutoff is not None and (record.last_received_at is None or record.last_received_at < cutoff):
                    series = []
                    break
                run = create_run(api_url, deployment, {"series_uid": record.series_uid, "only_jobs": job or None})
                queued.append({"series_uid": record.series_uid, "flow_run_id": run["id"], "flow_run": run["name"]})
            if len(series) < page:
                break
            offset += page
    except (NoSuchDeployment, StorageError, httpx.HTTPError) as exc:
        fail(f"{exc} ({len(queued)} run(s) queued before)")
    if as_json:
        emit(queued, True)
        return
    info(f"queued {len(queued)} reprocess run(s) of {deployment} on its queue (backfill): live runs go first")
    info("follow them with: dcmflow status, or in the Prefect UI")


def reprocess(
    series_uid: str | None = typer.Argument(None, help="Series Instance UID of a received series."),
    all_series: bool = typer.Option(
        False, "--all", help="Queue a reprocess run of every received series on the running stack (backfill)."
    ),
    since: dt.datetime | None = typer.Option(
        None, "--since", help="Like --all, for the series last received at or after this (local) time, e.g. 2026-12-01."
    ),
    job: list[str] = typer.Option([], "--job", help="Re-run only this job and what depends on it (repeatable)."),
    wait: bool = typer.Option(False, "--wait", help="Run here and wait; print the job table."),
    max_parallel: int | None = typer.Option(None, "--max-parallel", min=1, help="Jobs at once."),
    as_json: bool = typer.Option(False, "--json", help="Print the job records (or queued runs) as JSON."),
) -> None:
    """Re-run a series with the current service versions, as a new session.

    With --all or --since, every (recent) series gets a reprocess run on the running stack's
    backfill queue instead: runs started by DICOM events keep going first.

    Examples:

        dcmflow reprocess 1.2.840.113619.2.55.3.1234 --job ct-volume --wait

        dcmflow reprocess --all

        dcmflow reprocess --since 2026-12-01 --job preview
    """
    settings = load_settings()
    if all_series or since is not None:
        if series_uid is not None or wait:
            fail("--all/--since queue runs for many series on the running stack: give no UID and no --wait")
        _check_jobs(settings, job)
        _backfill(settings, since, job, as_json)
        return
    if series_uid is None:
        fail("give a Series Instance UID, or --all / --since to reprocess many series")
    _check_series(settings, series_uid)
    _check_jobs(settings, job)
    if not wait:
        extra = [a for name in job for a in ("--job", name)]
        extra += ["--max-parallel", str(max_parallel)] if max_parallel else []
        _background(settings, ["reprocess", series_uid, *extra], series_uid)
        return
    _run(settings, series_uid, only_jobs=job or None, trigger="reprocess", max_parallel=max_parallel, as_json=as_json)
