"""Things every command needs: settings loaded with a one-line error on bad values, and the
repository opened (and migrated, if it is the embedded SQLite default) with one-line errors."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer
from pydantic import ValidationError

from dcmflow.cli._output import fail
from dcmflow.settings import Settings

if TYPE_CHECKING:
    from storage.repository import Repository

__all__ = ["load_settings", "settings_problems", "open_repository"]


def settings_problems(exc: ValidationError) -> str:
    """What is wrong with the ``DCMFLOW_*`` variables, in one line naming each variable."""
    return "; ".join(
        f"DCMFLOW_{str(err['loc'][0]).upper()}: {err['msg']}"
        if err.get("loc")
        else str(err["msg"]).removeprefix("Value error, ")  # a rule across variables names them itself
        for err in exc.errors()
    )


def load_settings() -> Settings:
    """Build :class:`Settings` from the environment, or exit with one line naming the variable."""
    try:
        return Settings()
    except ValidationError as exc:
        fail(f"bad configuration: {settings_problems(exc)}")


def open_repository(settings: Settings) -> Repository:
    """The repository, migrated if it is the embedded SQLite default; else one-line errors.

    Parameters
    ----------
    settings : Settings
        Where the database is.

    Returns
    -------
    Repository

    Raises
    ------
    typer.Exit
        Unreachable or unmigrated database (after one error line on stderr).
    """
    from storage import db
    from storage.errors import StorageError

    from dcmflow.wiring import describe_database, repository_from

    try:
        repository = repository_from(settings)
        if db.current_revision(repository.engine) != db.head_revision():
            if repository.engine.dialect.name != "sqlite":
                fail(f"database {describe_database(settings)} is not migrated: run `dcmflow db upgrade`")
            db.upgrade(repository.engine)  # the embedded SQLite default migrates itself
    except StorageError as exc:
        fail(str(exc))
    except typer.Exit:
        raise
    except Exception as exc:
        text = str(exc).strip()
        fail(f"cannot open {describe_database(settings)}: {type(exc).__name__}: {text.splitlines()[0] if text else ''}")
    return repository
