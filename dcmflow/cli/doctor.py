"""``dcmflow doctor``: check this installation and print what to fix (the checks: :mod:`dcmflow.doctor`)."""

from __future__ import annotations

import typer
from rich.table import Table
from rich.text import Text

from dcmflow.cli._output import emit, fail, info, stdout

__all__ = ["doctor"]

_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def doctor(
    as_json: bool = typer.Option(False, "--json", help="Print the results as a JSON list."),
    timeout: float = typer.Option(5.0, "--timeout", min=0.5, help="Seconds each check may take."),
) -> None:
    """Check settings, database, object store, DICOM port, Prefect, services and DCMTK; say what to fix.

    Exits 0 when no check failed (warnings allowed), 1 otherwise.

    Examples:

        dcmflow doctor

        dcmflow doctor --json --timeout 2
    """
    from dcmflow.doctor import run_checks

    rows = run_checks(timeout)
    if as_json:
        emit(rows, True)
    else:
        table = Table(title="dcmflow doctor")
        for column in ("check", "status", "detail", "fix"):
            table.add_column(column, overflow="fold")
        for row in rows:
            # Text, not markup: details quote driver errors, whose brackets are not rich styles
            table.add_row(row.check, Text(row.status, style=_STYLE[row.status]), Text(row.detail), Text(row.fix))
        stdout.print(table)
    counts = {status: sum(r.status == status for r in rows) for status in _STYLE}
    summary = f"{counts['ok']} ok, {counts['warn']} warning(s), {counts['fail']} failed, {counts['skip']} skipped"
    failed = [r.check for r in rows if r.status == "fail"]
    if failed:
        fail(f"failed: {', '.join(failed)} ({summary})")
    if as_json:
        info(summary)
    else:
        stdout.print(summary, highlight=False)
