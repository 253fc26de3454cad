"""``dcmflow jobs``: the Job records of processing runs (no Prefect needed)."""

from __future__ import annotations

import typer

from dcmflow.cli._common import load_settings
from dcmflow.cli._output import emit, fail
from dcmflow.cli.process import JOB_COLUMNS

app = typer.Typer(help="Job records of processing runs.", no_args_is_help=True)


@app.command("list")
def list_jobs(
    series: str | None = typer.Option(None, "--series", help="Only jobs of this Series Instance UID."),
    session: int | None = typer.Option(None, "--session", help="Only jobs of this session."),
    state: str | None = typer.Option(None, "--state", help="Only jobs in this state (succeeded, failed, timed_out, skipped …)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List job runs, oldest first.

    Examples:

        dcmflow jobs list --series 1.2.840.113619.2.55.3.1234

        dcmflow jobs list --state failed --json
    """
    from storage.errors import StorageError

    from dcmflow.cli._common import open_repository

    repository = open_repository(load_settings())
    try:
        jobs = repository.list_jobs(series, session_id=session, state=state)
    except StorageError as exc:
        fail(str(exc))
    emit(jobs, as_json, columns=JOB_COLUMNS, title="jobs")
