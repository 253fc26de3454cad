"""Output helpers shared by every command: tables or JSON on stdout, one-line errors on stderr."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

__all__ = ["emit", "emit_one", "fail", "info", "stdout", "stderr"]

stdout = Console()
stderr = Console(stderr=True)


def _plain(row: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(row, BaseModel):
        return row.model_dump(mode="json")
    return json.loads(json.dumps(dict(row), default=str))


def emit(
    rows: Sequence[BaseModel | Mapping[str, Any]],
    as_json: bool,
    *,
    columns: Sequence[str] | None = None,
    title: str | None = None,
) -> None:
    """Print ``rows`` as a rich table, or as a JSON array when ``as_json``.

    ``columns`` picks and orders the table columns; JSON always carries every field.
    """
    plain = [_plain(r) for r in rows]
    if as_json:
        typer.echo(json.dumps(plain, indent=2))
        return
    cols = list(columns) if columns else (list(plain[0]) if plain else [])
    table = Table(title=title)
    for col in cols:
        table.add_column(col, overflow="fold")  # UIDs must stay whole, never "1.2.82…"
    for row in plain:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in cols))
    stdout.print(table)


def emit_one(row: BaseModel | Mapping[str, Any], as_json: bool, *, title: str | None = None) -> None:
    """Print one record as a two-column field/value table, or as a JSON object."""
    plain = _plain(row)
    if as_json:
        typer.echo(json.dumps(plain, indent=2))
        return
    table = Table(title=title, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in plain.items():
        table.add_row(key, "" if value is None else (json.dumps(value) if isinstance(value, (dict, list)) else str(value)))
    stdout.print(table)


def info(message: str) -> None:
    """A progress or status line for people, on stderr (stdout stays machine-readable)."""
    stderr.print(message, markup=False, highlight=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one red error line on stderr and exit non-zero; never a traceback."""
    # soft_wrap: one line, however long; markup off so brackets in messages print as-is.
    stderr.print("[red]Error:[/red] ", end="", highlight=False)
    stderr.print(message, markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code=code)
