"""Alembic environment of dcmflow's record database.

Run through :func:`storage.db.upgrade` (which passes an open connection in
``config.attributes["connection"]``), or with a URL in ``sqlalchemy.url``.
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlmodel import SQLModel

import storage.models
from storage.models import UTCDateTime

config = context.config
target_metadata = SQLModel.metadata

# Arbitrary constant key of the PostgreSQL advisory lock held while migrating.
_PG_MIGRATION_LOCK = 0x64636D66  # "dcmf"


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    """Render our UTCDateTime as plain ``sa.DateTime(timezone=True)``.

    Migration scripts must not import the models (they change; a migration must not), so
    only standard SQLAlchemy and sqlmodel types appear in them.
    """
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(connection: Any) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        render_item=render_item,
        compare_type=True,
    )


def run_migrations_online() -> None:
    """Migrate through the given connection, or one made from ``sqlalchemy.url``."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from storage.db import create_engine

    engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


def _run(connection: Any) -> None:
    _configure(connection)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run storage.db.upgrade()")
run_migrations_online()
assert storage.models  # keep the import: it registers every table on SQLModel.metadata
