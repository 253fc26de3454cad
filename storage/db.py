"""Engine and schema migrations of the record database (SQLite or PostgreSQL).

The schema is created and changed only by the Alembic scripts shipped inside this package
(``storage/migrations``); :func:`upgrade` runs them through Alembic's Python API, so no
``alembic.ini`` is needed and an installed wheel can migrate its own database.

Quick start::

    from storage.db import create_engine, upgrade
    engine = create_engine("sqlite:///.dcmflow/dcmflow.db")
    upgrade(engine)            # idempotent: a no-op when already at head
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session

__all__ = [
    "SQLITE_BUSY_TIMEOUT_MS",
    "MIGRATIONS_DIR",
    "create_engine",
    "alembic_config",
    "upgrade",
    "current_revision",
    "head_revision",
    "session",
    "write_transaction",
]

SQLITE_BUSY_TIMEOUT_MS = 30_000
"""How long a SQLite writer waits for the lock before failing (default 30 s).

Ingest workers, the completeness monitor and flows write to the same file; a short wait is
normal, an error after 30 s means something holds a transaction open far too long.
"""

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
"""The Alembic script directory shipped as package data."""

_IMMEDIATE = "dcmflow_sqlite_immediate"


def _configure_sqlite(engine: Engine) -> None:
    """Pragmas per connection, and our own BEGIN so writers can take the lock up front.

    pysqlite's implicit transaction handling is switched off (``isolation_level = None``) and
    replaced by a ``begin`` hook: a plain ``BEGIN`` for readers, ``BEGIN IMMEDIATE`` on a
    connection marked by :func:`write_transaction`. IMMEDIATE takes the write lock at the
    start, so read-then-write transactions (claims, upserts) are serialised instead of
    failing with "database is locked" when two of them try to upgrade their read locks.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get(_IMMEDIATE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def create_engine(url: str, **kwargs: Any) -> Engine:
    """Create the engine for a record database URL.

    Parameters
    ----------
    url
        ``sqlite:///path/to.db`` (the parent folder is created) or
        ``postgresql+psycopg://user@host/db``. A bare ``postgresql://`` URL is given the
        psycopg 3 driver, the one dcmflow installs.
    **kwargs
        Passed on to :func:`sqlalchemy.create_engine`.

    Returns
    -------
    Engine
        SQLite: WAL, ``synchronous=NORMAL``, foreign keys on, 30 s busy timeout.
        PostgreSQL: ``pool_pre_ping`` so a restarted server does not break the first query,
        ``plan_cache_mode=force_custom_plan`` (see the comment in the code), and network
        limits (10 s connect timeout, TCP keepalives, 60 s ``tcp_user_timeout``) so a
        vanished server is an error within a minute, not a hang.
    """
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(parsed, **kwargs)
        _configure_sqlite(engine)
        return engine
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    kwargs.setdefault("pool_pre_ping", True)
    if parsed.drivername == "postgresql+psycopg":
        # psycopg prepares a statement after 5 runs, and PostgreSQL may then switch to a
        # generic plan chosen while a table was still nearly empty: during ingest that was a
        # sequential scan of ``instance`` per batch (measured: re-sent duplicates 5x slower
        # in batches of 100). force_custom_plan keeps the prepared statements (executemany
        # stays fast) but plans each run with current statistics.
        given = parsed.query.get("options", "")
        given = " ".join(given) if isinstance(given, tuple) else given
        parsed = parsed.update_query_dict({"options": f"{given} -c plan_cache_mode=force_custom_plan".strip()})
        # A database host that vanishes from the network (no RST, packets dropped) would
        # otherwise hold a connect or a query for the kernel's TCP retries, many minutes,
        # before ingest's outage back-off even starts. libpq parameters; the URL's own win.
        parsed = parsed.update_query_dict({k: v for k, v in _PG_NETWORK_LIMITS.items() if k not in parsed.query})
    return sa.create_engine(parsed, **kwargs)


_PG_NETWORK_LIMITS = {
    "connect_timeout": "10",  # s
    "keepalives": "1",
    "keepalives_idle": "30",  # s of silence before the first probe
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "tcp_user_timeout": "60000",  # ms that sent data may stay unacknowledged
}


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction that will write: ``BEGIN IMMEDIATE`` on SQLite.

    On PostgreSQL this is an ordinary transaction; exclusivity there comes from row locks
    (``FOR UPDATE [SKIP LOCKED]``) taken by the statements themselves.
    """
    with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            conn.execution_options(**{_IMMEDIATE: True})
        with conn.begin():
            yield conn


def alembic_config(url: str | None = None) -> Config:
    """An Alembic :class:`~alembic.config.Config` pointing at the shipped scripts.

    Useful for ``alembic.command`` calls beyond upgrade (``history``, ``downgrade``, or
    ``revision --autogenerate`` when writing a new migration).
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@contextmanager
def _engine_of(url_or_engine: str | Engine) -> Iterator[Engine]:
    if isinstance(url_or_engine, Engine):
        yield url_or_engine
        return
    engine = create_engine(url_or_engine)
    try:
        yield engine
    finally:
        engine.dispose()


def upgrade(url_or_engine: str | Engine, revision: str = "head") -> None:
    """Migrate the database to ``revision`` (idempotent at head).

    On PostgreSQL the run holds an advisory lock, so several machines starting together
    do not race each other through the same migration.
    """
    with _engine_of(url_or_engine) as engine, write_transaction(engine) as conn:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def current_revision(url_or_engine: str | Engine) -> str | None:
    """The revision the database is at, or ``None`` for an empty (unmigrated) database."""
    with _engine_of(url_or_engine) as engine, engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    """The newest revision shipped with this package."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None  # the package always ships at least 0001
    return head


@contextmanager
def session(engine: Engine) -> Iterator[Session]:
    """A SQLModel session that keeps loaded attributes after commit (``expire_on_commit=False``)."""
    with Session(engine, expire_on_commit=False) as s:
        yield s
