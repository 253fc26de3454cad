"""``dcmflow db``: create and migrate the records database (Alembic)."""

from __future__ import annotations

import typer

from dcmflow.cli._output import fail, info
from dcmflow.cli._common import load_settings

app = typer.Typer(help="Create and migrate the records database.", no_args_is_help=True)


@app.command()
def upgrade(
    revision: str = typer.Option("head", help="Alembic revision to upgrade to."),
) -> None:
    """Create or migrate the database schema (SQLite by default, PostgreSQL via DCMFLOW_DATABASE_URL).

    Examples:

        dcmflow db upgrade

        DCMFLOW_DATABASE_URL=postgresql+psycopg://dcmflow@db/dcmflow dcmflow db upgrade
    """
    from storage import db
    from storage.errors import StorageError

    from dcmflow.wiring import describe_database

    settings = load_settings()
    try:
        engine = db.create_engine(settings.effective_database_url)
        db.upgrade(engine, revision)
        current = db.current_revision(engine)
    except StorageError as exc:
        fail(str(exc))
    except Exception as exc:  # a driver error: unreachable server, bad URL, permissions
        fail(f"cannot upgrade {describe_database(settings)}: {exc.__class__.__name__}: {_first_line(exc)}")
    info(f"database {describe_database(settings)} is at revision {current}")


@app.command()
def current() -> None:
    """Print the schema revision the database is at (empty when never upgraded).

    Examples:

        dcmflow db current
    """
    from storage import db

    from dcmflow.wiring import describe_database

    settings = load_settings()
    try:
        rev = db.current_revision(db.create_engine(settings.effective_database_url))
    except Exception as exc:
        fail(f"cannot read {describe_database(settings)}: {exc.__class__.__name__}: {_first_line(exc)}")
    typer.echo(rev or "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
