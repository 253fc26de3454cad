"""Session data (named JSON values, per job or for the whole session) and session files."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from storage import models as m
from storage.db import write_transaction
from storage.records._core import (
    T_SESSION_DATA,
    T_SESSION_FILE,
    RecordsCore,
    _public,
    _upsert,
    _wrap_integrity,
)

__all__ = ["SessionDataRecords"]


class SessionDataRecords(RecordsCore):
    """Data and files a session's jobs leave behind (values and object keys)."""

    def put_session_data(self, session_id: int, name: str, value: Any, job_name: str | None = None) -> None:
        """Create or replace a JSON value of a session (of one job when ``job_name`` is given)."""
        row = {"session_id": session_id, "job_name": job_name or "", "name": name, "value": value}
        row["updated_at"] = m.utcnow()
        try:
            with write_transaction(self.engine) as conn:
                _upsert(conn, T_SESSION_DATA, [row], ["session_id", "job_name", "name"])
        except IntegrityError as exc:
            raise _wrap_integrity(exc, f"cannot store session data {name!r}") from exc

    def get_session_data(self, session_id: int, name: str, job_name: str | None = None, default: Any = None) -> Any:
        """A session value, or ``default`` when absent."""
        t = T_SESSION_DATA
        stmt = sa.select(t.c.value).where(t.c.session_id == session_id, t.c.job_name == (job_name or ""), t.c.name == name)
        with self.engine.connect() as conn:
            row = conn.execute(stmt).first()
        return default if row is None else row[0]

    def list_session_data(self, session_id: int, job_name: str | None = None) -> dict[str, Any]:
        """All values of a session scope (session-wide when ``job_name`` is None)."""
        t = T_SESSION_DATA
        stmt = sa.select(t.c.name, t.c.value).where(t.c.session_id == session_id, t.c.job_name == (job_name or ""))
        with self.engine.connect() as conn:
            return dict(conn.execute(stmt.order_by(t.c.name)).all())

    def job_session_data(self, session_id: int, name: str) -> dict[str, Any]:
        """The value ``name`` of every job of a session that has one, by job name (one query
        where a job table would otherwise ask once per job)."""
        t = T_SESSION_DATA
        stmt = sa.select(t.c.job_name, t.c.value).where(t.c.session_id == session_id, t.c.name == name, t.c.job_name != "")
        with self.engine.connect() as conn:
            return dict(conn.execute(stmt.order_by(t.c.job_name)).all())

    def add_session_file(
        self,
        session_id: int,
        name: str,
        *,
        object_key: str,
        size: int,
        sha256: str,
        content_type: str = "application/octet-stream",
        job_name: str | None = None,
    ) -> m.SessionFilePublic:
        """Record (or replace) a file a job stored for its session; the bytes are already in the store."""
        row = {
            "session_id": session_id,
            "job_name": job_name or "",
            "name": name,
            "object_key": object_key,
            "size": size,
            "sha256": sha256,
            "content_type": content_type,
            "created_at": m.utcnow(),
        }
        t = T_SESSION_FILE
        try:
            with write_transaction(self.engine) as conn:
                _upsert(conn, t, [row], ["session_id", "job_name", "name"])
                found = conn.execute(
                    sa.select(t).where(t.c.session_id == session_id, t.c.job_name == row["job_name"], t.c.name == name)
                ).one()
        except IntegrityError as exc:
            raise _wrap_integrity(exc, f"cannot record session file {name!r}") from exc
        return _public(m.SessionFilePublic, found)

    def get_session_file(
        self, session_id: int, name: str, job_name: str | None = None
    ) -> m.SessionFilePublic | None:
        """One session file, or ``None``."""
        t = T_SESSION_FILE
        stmt = sa.select(t).where(t.c.session_id == session_id, t.c.job_name == (job_name or ""), t.c.name == name)
        with self.engine.connect() as conn:
            row = conn.execute(stmt).first()
        return _public(m.SessionFilePublic, row) if row is not None else None

    def list_session_files(self, session_id: int) -> list[m.SessionFilePublic]:
        """Every file of a session (all scopes), by job then name."""
        t = T_SESSION_FILE
        stmt = sa.select(t).where(t.c.session_id == session_id).order_by(t.c.job_name, t.c.name)
        with self.engine.connect() as conn:
            return [_public(m.SessionFilePublic, r) for r in conn.execute(stmt)]
