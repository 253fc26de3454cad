"""Installed services: one row per version (one active), its job specs, and the workers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from storage import models as m
from storage.db import write_transaction
from storage.errors import RecordError
from storage.priority import priority_rank
from storage.records._core import (
    T_SERVICE,
    T_SERVICE_JOB,
    T_WORKER,
    RecordsCore,
    _for_update,
    _public,
    _upsert,
    _wrap_integrity,
)

__all__ = ["ServiceRecords"]


class ServiceRecords(RecordsCore):
    """Installed service versions with their job specs, and workers."""

    def register_service(self, service: m.ServiceBase, jobs: Sequence[m.ServiceJobBase]) -> m.ServicePublic:
        """Register a service version and make it the active one.

        Unchanged ``content_hash`` (same as the newest version): that version is returned
        (and re-activated). Changed: version n+1 is recorded with ``jobs``, the older
        versions stay (for history and running flows) but are inactive. ``service.version``
        is ignored; the repository numbers versions.

        Raises
        ------
        RecordError
            Duplicate job names, or a concurrent registration of the same service won.
        """
        names = [j.job_name for j in jobs]
        if len(set(names)) != len(names):
            raise RecordError(f"service {service.name!r}: duplicate job names in {names}")
        try:
            with write_transaction(self.engine) as conn:
                latest = conn.execute(
                    _for_update(
                        conn,
                        sa.select(T_SERVICE.c.id, T_SERVICE.c.version, T_SERVICE.c.content_hash)
                        .where(T_SERVICE.c.name == service.name)
                        .order_by(T_SERVICE.c.version.desc())
                        .limit(1),
                    )
                ).first()
                if latest is not None and latest.content_hash == service.content_hash:
                    service_id = latest.id
                else:
                    values = service.model_dump(include=set(m.ServiceBase.model_fields))
                    values.update(version=(latest.version + 1) if latest else 1, active=True, installed_at=m.utcnow())
                    service_id = conn.execute(sa.insert(T_SERVICE).values(values).returning(T_SERVICE.c.id)).scalar_one()
                    if jobs:
                        conn.execute(sa.insert(T_SERVICE_JOB), [self._job_spec_row(service_id, j) for j in jobs])
                conn.execute(
                    sa.update(T_SERVICE)
                    .where(T_SERVICE.c.name == service.name)
                    .values(active=T_SERVICE.c.id == service_id)
                )
                return self._services(conn, T_SERVICE.c.id == service_id)[0]
        except IntegrityError as exc:
            raise _wrap_integrity(exc, f"cannot register service {service.name!r}") from exc

    @staticmethod
    def _job_spec_row(service_id: int, job: m.ServiceJobBase) -> dict[str, Any]:
        row = job.model_dump(include=set(m.ServiceJobBase.model_fields))
        if "priority_rank" not in job.model_fields_set:
            row["priority_rank"] = priority_rank(job.priority)
        row["service_id"] = service_id
        return row

    def _services(self, conn: Connection, where: sa.ColumnElement[bool]) -> list[m.ServicePublic]:
        rows = conn.execute(sa.select(T_SERVICE).where(where).order_by(T_SERVICE.c.name, T_SERVICE.c.version)).all()
        ids = [r.id for r in rows]
        jobs: dict[int, list[m.ServiceJobPublic]] = {}
        if ids:
            for j in conn.execute(
                sa.select(T_SERVICE_JOB)
                .where(T_SERVICE_JOB.c.service_id.in_(ids))
                .order_by(T_SERVICE_JOB.c.sort_position, T_SERVICE_JOB.c.id)
            ):
                jobs.setdefault(j.service_id, []).append(_public(m.ServiceJobPublic, j))
        return [m.ServicePublic.model_validate({**dict(r._mapping), "jobs": jobs.get(r.id, [])}) for r in rows]

    def list_services(self, *, include_inactive: bool = False) -> list[m.ServicePublic]:
        """Registered services (active versions only by default), with their job specs."""
        where = sa.true() if include_inactive else T_SERVICE.c.active.is_(True)
        with self.engine.connect() as conn:
            return self._services(conn, where)

    def get_service(self, name: str, version: int | None = None) -> m.ServicePublic | None:
        """A service's active version (or the given ``version``), or ``None``."""
        where = T_SERVICE.c.name == name
        where = sa.and_(where, T_SERVICE.c.version == version if version is not None else T_SERVICE.c.active.is_(True))
        with self.engine.connect() as conn:
            found = self._services(conn, where)
        return found[0] if found else None

    def set_service_active(self, name: str, version: int | None) -> m.ServicePublic | None:
        """Make ``version`` the one active version of ``name`` (returned), or, with ``None``,
        no version active (a disabled service: kept, but no new session plans it)."""
        with write_transaction(self.engine) as conn:
            active = (T_SERVICE.c.version == version) if version is not None else sa.false()
            conn.execute(sa.update(T_SERVICE).where(T_SERVICE.c.name == name).values(active=active))
            if version is None:
                return None
            found = self._services(conn, sa.and_(T_SERVICE.c.name == name, T_SERVICE.c.version == version))
        return found[0] if found else None

    def remove_service(self, name: str, version: int | None = None) -> int:
        """Delete a service (every version, or one) and its job specs; returns versions removed.

        Job runs keep their ``service_name``/``service_version`` text, so history survives.
        """
        where = T_SERVICE.c.name == name
        if version is not None:
            where = sa.and_(where, T_SERVICE.c.version == version)
        with write_transaction(self.engine) as conn:
            ids = list(conn.execute(sa.select(T_SERVICE.c.id).where(where)).scalars())
            if not ids:
                return 0
            conn.execute(sa.delete(T_SERVICE_JOB).where(T_SERVICE_JOB.c.service_id.in_(ids)))
            conn.execute(sa.delete(T_SERVICE).where(T_SERVICE.c.id.in_(ids)))
            return len(ids)

    def upsert_worker(self, worker: m.WorkerBase) -> m.WorkerPublic:
        """Create or replace the worker environment with this name."""
        with write_transaction(self.engine) as conn:
            _upsert(conn, T_WORKER, [worker.model_dump(include=set(m.WorkerBase.model_fields))], ["name"])
            row = conn.execute(sa.select(T_WORKER).where(T_WORKER.c.name == worker.name)).one()
        return _public(m.WorkerPublic, row)

    def list_workers(self) -> list[m.WorkerPublic]:
        """All worker environments by name."""
        with self.engine.connect() as conn:
            return [_public(m.WorkerPublic, r) for r in conn.execute(sa.select(T_WORKER).order_by(T_WORKER.c.name))]
