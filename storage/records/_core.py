"""The shared core of the record domains: tables, dialect helpers, the engine.

Every domain module of :mod:`storage.records` builds its statements from these tables and
helpers and runs them on :attr:`RecordsCore.engine`, one transaction per public method.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import SQLModel

from storage import models as m
from storage.errors import RecordError

__all__ = ["RecordsCore"]


_P = TypeVar("_P", bound=SQLModel)


def _t(model: type[SQLModel]) -> sa.Table:
    return model.__table__  # type: ignore[attr-defined,no-any-return]


T_SETTING = _t(m.AppSetting)
T_PEER = _t(m.Peer)
T_NODE = _t(m.Node)
T_SERVICE = _t(m.Service)
T_SERVICE_JOB = _t(m.ServiceJob)
T_WORKER = _t(m.Worker)
T_SESSION = _t(m.Session)
T_JOB = _t(m.Job)
T_SESSION_DATA = _t(m.SessionData)
T_SESSION_FILE = _t(m.SessionFile)
T_PATIENT = _t(m.Patient)
T_STUDY = _t(m.Study)
T_SERIES = _t(m.Series)
T_INSTANCE = _t(m.Instance)
T_ASSOC = _t(m.Association)
T_ASSOC_SERIES = _t(m.AssociationSeries)
RECEIVING = m.SeriesState.RECEIVING.value
STABLE = m.SeriesState.STABLE.value


def _require_aware(value: dt.datetime, what: str) -> dt.datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware (UTC), got naive {value!r}")
    return value


def _seconds(value: float | dt.timedelta) -> dt.timedelta:
    return value if isinstance(value, dt.timedelta) else dt.timedelta(seconds=float(value))


def _insert(conn: Connection, table: sa.Table) -> Any:
    """The dialect's INSERT, which has ``on_conflict_do_nothing/do_update``."""
    if conn.dialect.name == "postgresql":
        return pg_dialect.insert(table)
    if conn.dialect.name == "sqlite":
        return sqlite_dialect.insert(table)
    raise RecordError(f"unsupported database dialect {conn.dialect.name!r} (SQLite or PostgreSQL only)")


def _upsert(conn: Connection, table: sa.Table, rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> None:
    """INSERT rows; on a key conflict overwrite every non-key column given."""
    if not rows:
        return
    stmt = _insert(conn, table)
    cols = [c for c in rows[0] if c not in keys and c != "id"]
    if cols:
        stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_={c: stmt.excluded[c] for c in cols})
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=list(keys))
    conn.execute(stmt, list(rows))


def _for_update(conn: Connection, stmt: sa.Select[Any], *, skip_locked: bool = False) -> sa.Select[Any]:
    """Row locks on PostgreSQL; on SQLite the BEGIN IMMEDIATE transaction already excludes others."""
    if conn.dialect.name == "postgresql":
        return stmt.with_for_update(skip_locked=skip_locked)
    return stmt


def _public(model: type[_P], row: Any) -> _P:
    return model.model_validate(dict(row._mapping))


def _chunks(items: Sequence[Any], size: int = 500) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _wrap_integrity(exc: IntegrityError, what: str) -> RecordError:
    first = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
    return RecordError(f"{what}: {first}")


class RecordsCore:
    """The engine the domain mixins of :class:`storage.repository.Repository` run on."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
