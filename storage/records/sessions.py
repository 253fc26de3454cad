"""Processing sessions, their exactly-once claims, and their job runs.

A run started by a trigger records its session with :meth:`Repository.claim_session`: the
row carries ``claim_key`` (``series/<uid>/<revision>`` or ``study/…``) under a unique index,
so of any number of runs of one revision exactly one inserts it (``INSERT … ON CONFLICT DO
NOTHING``) and the others are told which session holds it. The claim outlives the session's
end; only :meth:`Repository.release_claim` frees it, for a session whose flow run died while
``running`` (:meth:`Repository.list_stale_claims` lists the candidates). Manual runs use
:meth:`Repository.create_session` and claim nothing.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from storage import models as m
from storage.db import write_transaction
from storage.errors import ClaimConflictError, RecordError
from storage.keys import validate_uid
from storage.records._core import (
    T_JOB,
    T_SERIES,
    T_SESSION,
    T_SESSION_DATA,
    T_STUDY,
    RecordsCore,
    _for_update,
    _insert,
    _public,
    _require_aware,
    _upsert,
)

__all__ = ["SessionRecords", "SessionClaim", "StaleClaim"]


@dataclass(frozen=True, slots=True)
class SessionClaim:
    """What :meth:`Repository.claim_session` did.

    ``claimed``: the session was recorded and holds the claim. Otherwise nothing was written
    and ``session`` is the earlier session that holds it (running or finished).
    """

    claimed: bool
    session: m.SessionPublic


@dataclass(frozen=True, slots=True)
class StaleClaim:
    """A session that holds a claim and is still ``running`` (:meth:`Repository.list_stale_claims`)."""

    session_id: int
    level: str  # "series" or "study"
    uid: str
    revision: int
    flow_run_id: str | None
    claim_key: str
    trigger: str
    created_at: dt.datetime


class SessionRecords(RecordsCore):
    """Processing sessions, their exactly-once claims, and their job runs."""

    def create_session(
        self,
        *,
        series_uid: str | None = None,
        study_uid: str | None = None,
        revision: int = 1,
        trigger: str = "",
        flow_run_id: str | None = None,
    ) -> m.SessionPublic:
        """Start a processing session for one series or study revision."""
        values = m.SessionBase(
            series_uid=series_uid, study_uid=study_uid, revision=revision, trigger=trigger, flow_run_id=flow_run_id
        ).model_dump()
        with write_transaction(self.engine) as conn:
            row = conn.execute(sa.insert(T_SESSION).values(values).returning(*T_SESSION.c)).one()
        return _public(m.SessionPublic, row)

    def get_session(self, session_id: int) -> m.SessionPublic | None:
        """One session, or ``None``."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(T_SESSION).where(T_SESSION.c.id == session_id)).first()
        return _public(m.SessionPublic, row) if row is not None else None

    def list_sessions(
        self, *, series_uid: str | None = None, study_uid: str | None = None, limit: int = 1000
    ) -> list[m.SessionPublic]:
        """Sessions of a series, or of a study and its series (both given: either matches), oldest first."""
        t = T_SESSION
        stmt = sa.select(t).order_by(t.c.id).limit(limit)
        wanted = [c == v for c, v in ((t.c.series_uid, series_uid), (t.c.study_uid, study_uid)) if v is not None]
        if wanted:
            stmt = stmt.where(sa.or_(*wanted))
        with self.engine.connect() as conn:
            return [_public(m.SessionPublic, r) for r in conn.execute(stmt)]

    def finish_session(
        self, session_id: int, state: str = m.SessionState.COMPLETED.value, *, now: dt.datetime | None = None
    ) -> m.SessionPublic:
        """Set a session's final state and ``finished_at``."""
        at = _require_aware(now, "now") if now is not None else m.utcnow()
        with write_transaction(self.engine) as conn:
            row = conn.execute(
                sa.update(T_SESSION)
                .where(T_SESSION.c.id == session_id)
                .values(state=state, finished_at=at)
                .returning(*T_SESSION.c)
            ).first()
        if row is None:
            raise RecordError(f"no session {session_id}")
        return _public(m.SessionPublic, row)

    def claim_session(
        self,
        level: str,
        uid: str,
        revision: int,
        *,
        study_uid: str | None = None,
        trigger: str = "",
        flow_run_id: str | None = None,
    ) -> SessionClaim:
        """Start the one session of a (series or study, revision), unless one already exists.

        The session is inserted with ``claim_key`` = :func:`storage.models.session_claim_key`
        under its unique index (``INSERT … ON CONFLICT DO NOTHING``): of any number of
        concurrent callers exactly one inserts; the others read the session that did. A claim
        stays held when its session finishes (completed, failed or cancelled), so a trigger
        fired again later is a duplicate too; only :meth:`release_claim` frees it.

        Parameters
        ----------
        level
            ``"series"`` or ``"study"``.
        uid
            Series (or study) Instance UID.
        revision
            The revision the run is for.
        study_uid
            The series' study (``level="series"``); recorded on the session.

        Returns
        -------
        SessionClaim
            ``claimed=True`` and the new session, or ``claimed=False`` and the holder.
        """
        if level not in ("series", "study"):
            raise ValueError(f"level must be 'series' or 'study', not {level!r}")
        validate_uid(uid, "Series Instance UID" if level == "series" else "Study Instance UID")
        key = m.session_claim_key(level, uid, revision)
        values = m.SessionBase(
            series_uid=uid if level == "series" else None,
            study_uid=study_uid if level == "series" else uid,
            revision=revision,
            trigger=trigger,
            flow_run_id=flow_run_id,
            claim_key=key,
        ).model_dump()
        values["created_at"] = m.utcnow()
        for _ in range(5):  # the holder can release between our conflict and our read: try again
            with write_transaction(self.engine) as conn:
                stmt = _insert(conn, T_SESSION).values(values).on_conflict_do_nothing(index_elements=["claim_key"])
                row = conn.execute(stmt.returning(*T_SESSION.c)).first()
                if row is not None:
                    return SessionClaim(True, _public(m.SessionPublic, row))
                holder = conn.execute(sa.select(T_SESSION).where(T_SESSION.c.claim_key == key)).first()
                if holder is not None:
                    return SessionClaim(False, _public(m.SessionPublic, holder))
        raise ClaimConflictError(f"{key}: claimed and released repeatedly while claiming it")

    def list_unclaimed_emitted(
        self, level: str, *, stable_after: dt.datetime, stable_before: dt.datetime, limit: int = 500
    ) -> list[tuple[str, int]]:
        """Series (or studies) whose current revision's stable event went out but no run claimed it.

        After a crash of the whole stack these are the revisions whose event the Prefect server
        accepted but never turned into a run (its event pipeline is in memory). Returns
        ``(uid, revision)`` pairs, oldest stable first, of rows that became stable in the window.
        """
        table, uid_col = (T_SERIES, T_SERIES.c.series_uid) if level == "series" else (T_STUDY, T_STUDY.c.study_uid)
        session_uid = T_SESSION.c.series_uid if level == "series" else T_SESSION.c.study_uid
        claimed = sa.exists().where(
            session_uid == uid_col, T_SESSION.c.revision == table.c.revision, T_SESSION.c.claim_key.is_not(None)
        )
        if level == "study":
            claimed = claimed.where(T_SESSION.c.series_uid.is_(None))
        stmt = (
            sa.select(uid_col, table.c.revision)
            .where(
                table.c.state == m.SeriesState.STABLE.value,
                table.c.emitted_revision == table.c.revision,
                table.c.stable_at >= _require_aware(stable_after, "stable_after"),
                table.c.stable_at < _require_aware(stable_before, "stable_before"),
                ~claimed,
            )
            .order_by(table.c.stable_at)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [(r[0], int(r[1])) for r in conn.execute(stmt)]

    def list_stale_claims(self, *, created_before: dt.datetime | None = None) -> list[StaleClaim]:
        """Sessions that hold a claim and are still ``running``, oldest first.

        After a crash of the whole stack (``kill -9``) these are the runs that will never
        finish; while the stack is up they include the runs in progress, so check each
        ``flow_run_id`` with Prefect before :meth:`release_claim`.

        Parameters
        ----------
        created_before
            Only sessions started before this (timezone-aware) time.
        """
        stmt = (
            sa.select(T_SESSION)
            .where(T_SESSION.c.claim_key.is_not(None), T_SESSION.c.state == m.SessionState.RUNNING.value)
            .order_by(T_SESSION.c.created_at, T_SESSION.c.id)
        )
        if created_before is not None:
            stmt = stmt.where(T_SESSION.c.created_at < _require_aware(created_before, "created_before"))
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).all()
        return [
            StaleClaim(
                session_id=r.id,
                level="series" if r.series_uid is not None else "study",
                uid=r.series_uid if r.series_uid is not None else r.study_uid,
                revision=r.revision,
                flow_run_id=r.flow_run_id,
                claim_key=r.claim_key,
                trigger=r.trigger,
                created_at=r.created_at,
            )
            for r in rows
        ]

    def release_claim(
        self,
        session_id: int,
        *,
        state: str = m.SessionState.CRASHED.value,
        reason: str = "",
        now: dt.datetime | None = None,
    ) -> bool:
        """End a session that is still ``running`` and free its claim, in one transaction.

        The session gets ``state`` (default ``crashed``), ``finished_at`` and no claim key, so a
        new run of the same revision can claim it. Its ``running`` jobs become ``crashed``,
        its ``pending`` ones ``cancelled``, both with ``reason`` as their error. The reason,
        the state and the freed key are kept as session data ``released``.

        Returns
        -------
        bool
            ``False`` when the session does not exist or is no longer running (nothing changed).

        Raises
        ------
        ValueError
            ``state`` is ``running``.
        """
        state = m.SessionState(state).value
        if state == m.SessionState.RUNNING.value:
            raise ValueError("a released session cannot stay running")
        at = _require_aware(now, "now") if now is not None else m.utcnow()
        running = m.SessionState.RUNNING.value
        with write_transaction(self.engine) as conn:
            old_key = conn.execute(
                _for_update(conn, sa.select(T_SESSION.c.claim_key).where(T_SESSION.c.id == session_id))
            ).first()
            done = conn.execute(
                sa.update(T_SESSION)
                .where(T_SESSION.c.id == session_id, T_SESSION.c.state == running)
                .values(state=state, finished_at=at, claim_key=None)
                .returning(T_SESSION.c.id)
            ).first()
            if done is None:
                return False
            for before, after in ((m.JobState.RUNNING, m.JobState.CRASHED), (m.JobState.PENDING, m.JobState.CANCELLED)):
                conn.execute(
                    sa.update(T_JOB)
                    .where(T_JOB.c.session_id == session_id, T_JOB.c.state == before.value)
                    .values(state=after.value, error=reason or None, finished_at=at)
                )
            record = {
                "state": state,
                "reason": reason,
                "claim_key": old_key.claim_key if old_key is not None else None,
                "at": at.isoformat(),
            }
            _upsert(
                conn,
                T_SESSION_DATA,
                [{"session_id": session_id, "job_name": "", "name": "released", "value": record, "updated_at": at}],
                ["session_id", "job_name", "name"],
            )
        return True

    def create_jobs(self, session_id: int, specs: Sequence[m.JobBase | Mapping[str, Any]]) -> list[m.JobPublic]:
        """Create the job runs of a session (series/study UID and revision default to the session's).

        Raises
        ------
        RecordError
            There is no such session.
        """
        with write_transaction(self.engine) as conn:
            sess = conn.execute(sa.select(T_SESSION).where(T_SESSION.c.id == session_id)).first()
            if sess is None:
                raise RecordError(f"no session {session_id}")
            rows = []
            for spec in specs:
                base = spec if isinstance(spec, m.JobBase) else m.JobBase.model_validate(spec)
                given = base.model_fields_set
                row = base.model_dump()
                for key in ("series_uid", "study_uid", "revision"):
                    if key not in given:
                        row[key] = getattr(sess, key)
                row.update(session_id=session_id, created_at=m.utcnow())
                rows.append(row)
            if not rows:
                return []
            ids = list(
                conn.execute(
                    sa.insert(T_JOB).returning(T_JOB.c.id, sort_by_parameter_order=True), rows
                ).scalars()
            )
            found = conn.execute(sa.select(T_JOB).where(T_JOB.c.id.in_(ids)).order_by(T_JOB.c.id)).all()
        return [_public(m.JobPublic, r) for r in found]

    _JOB_UPDATABLE = frozenset(m.JobBase.model_fields) | {"started_at", "finished_at"}

    def update_job(self, job_id: int, **fields: Any) -> m.JobPublic:
        """Change fields of a job run (state, attempts, exit_code, error, run ids …).

        Moving to ``running`` sets ``started_at`` and to a final state sets ``finished_at``
        (to now) unless given, so every caller records times the same way. Raises as
        :meth:`update_job_with_data`.
        """
        return self.update_job_with_data(job_id, {}, **fields)

    def update_job_with_data(self, job_id: int, data: Mapping[str, Any], **fields: Any) -> m.JobPublic:
        """:meth:`update_job`, and :meth:`put_session_data` of each ``data`` value of that job,
        in one transaction: a job's start (state, its process) or end (state, its result) is
        one commit, not two (bench/dag: a commit costs milliseconds per job).

        Raises
        ------
        ValueError
            A field that is not a job field.
        RecordError
            There is no such job.
        """
        unknown = set(fields) - self._JOB_UPDATABLE
        if unknown:
            raise ValueError(f"not job fields: {sorted(unknown)}")
        state = fields.get("state")
        if state == m.JobState.RUNNING:
            fields.setdefault("started_at", m.utcnow())
        elif state is not None and state != m.JobState.PENDING:
            fields.setdefault("finished_at", m.utcnow())
        with write_transaction(self.engine) as conn:
            stmt = sa.update(T_JOB).where(T_JOB.c.id == job_id).returning(*T_JOB.c)
            row = conn.execute(stmt.values(**fields) if fields else stmt.values(id=T_JOB.c.id)).first()
            if row is None:
                raise RecordError(f"no job {job_id}")
            now = m.utcnow()
            rows = [
                {"session_id": row.session_id, "job_name": row.job_name, "name": name, "value": value, "updated_at": now}
                for name, value in data.items()
            ]
            _upsert(conn, T_SESSION_DATA, rows, ["session_id", "job_name", "name"])
        return _public(m.JobPublic, row)

    def list_jobs(
        self, series_uid: str | None = None, *, session_id: int | None = None, state: str | None = None
    ) -> list[m.JobPublic]:
        """Job runs in creation order, optionally of one series, session or state."""
        stmt = sa.select(T_JOB).order_by(T_JOB.c.id)
        if series_uid is not None:
            stmt = stmt.where(T_JOB.c.series_uid == series_uid)
        if session_id is not None:
            stmt = stmt.where(T_JOB.c.session_id == session_id)
        if state is not None:
            stmt = stmt.where(T_JOB.c.state == state)
        with self.engine.connect() as conn:
            return [_public(m.JobPublic, r) for r in conn.execute(stmt)]
