"""All record reads and writes of dcmflow, one transaction per method.

:class:`Repository` is the only code that writes records. Each public method runs in its own
transaction and returns detached values (``*Public`` models or frozen dataclasses), so a
caller can never lazy-load through a closed session.

SQLite and PostgreSQL behave alike:

* upserts use the dialect's ``INSERT … ON CONFLICT`` (``sqlalchemy.dialects.sqlite`` /
  ``postgresql``);
* writers that read first (record, claim, register) lock what they read: on PostgreSQL with
  ``SELECT … FOR UPDATE`` (``SKIP LOCKED`` for claims, so claimers never wait for each other);
  on SQLite with ``BEGIN IMMEDIATE`` (one writer at a time, see
  :func:`storage.db.write_transaction`), and every claim ``UPDATE`` re-checks the state it
  expects, so a series is handed to exactly one claimer.

Completeness (DESIGN.md "completeness monitor")
-----------------------------------------------
A series is *receiving* until :meth:`Repository.claim_due_series` declares it *stable*: when
its calling peer's ``stable_age_seconds`` (or the default stable age) has passed since the
last new instance, or as soon as its expected instance count is reached, and in both cases
only when no open association has touched it. An instance arriving for a stable series
reopens it as revision n+1. :meth:`Repository.mark_series_emitted` then lets the event
emitter send ``dicom.series.stable`` exactly once per revision. Studies follow their series:
:meth:`Repository.claim_due_studies` takes a study only once every one of its series' current
revision was marked emitted and its ``dicom.study.received`` was marked too, so
``dicom.study.stable`` never precedes the events of its series, even recovered ones.

``dicom.study.received`` has its own claim/mark pair on the study row
(:meth:`Repository.claim_received_studies`, :meth:`Repository.mark_study_received_emitted`);
a claim left unmarked for ``reclaim_after`` (its claimer died, or Prefect was down) is
handed to the next claimer. Stable revisions claimed but never marked are found through the
partial indexes ``ix_series_unemitted`` / ``ix_study_unemitted``
(:meth:`Repository.list_unemitted_series`, :meth:`Repository.list_unemitted_studies`), so
recovering them reads only what is pending.

Processing sessions
-------------------
A run started by a trigger records its session with :meth:`Repository.claim_session`: the
row carries ``claim_key`` (``series/<uid>/<revision>`` or ``study/…``) under a unique index,
so of any number of runs of one revision exactly one inserts it (``INSERT … ON CONFLICT DO
NOTHING``) and the others are told which session holds it. The claim outlives the session's
end; only :meth:`Repository.release_claim` frees it, for a session whose flow run died while
``running`` (:meth:`Repository.list_stale_claims` lists the candidates). Manual runs use
:meth:`Repository.create_session` and claim nothing.

Open associations are rows in ``association`` / ``association_series``, written by the
receiver's notification handlers (:meth:`~Repository.association_opened`,
:meth:`~Repository.association_touched_series`, :meth:`~Repository.association_closed`). A
receiver that crashes cannot close its rows, so rows untouched for ``association_timeout``
(default one hour) no longer block anything.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import SQLModel

from storage import models as m
from storage.db import write_transaction
from storage.errors import ClaimConflictError, RecordError
from storage.keys import validate_uid
from storage.priority import priority_rank

__all__ = [
    "DEFAULT_ASSOCIATION_TIMEOUT",
    "InstanceIn",
    "RecordStatus",
    "RecordOutcome",
    "SeriesClaim",
    "StudyClaim",
    "StudyReceivedClaim",
    "SessionClaim",
    "StaleClaim",
    "DEFAULT_RECLAIM_AFTER",
    "MAX_CLAIM_ADDED_SOP_UIDS",
    "Repository",
]

DEFAULT_ASSOCIATION_TIMEOUT = dt.timedelta(hours=1)
"""Open-association rows untouched this long stop blocking claims (a receiver died)."""

DEFAULT_RECLAIM_AFTER = dt.timedelta(seconds=60)
"""A ``dicom.study.received`` claim not marked emitted this long is handed to another claimer."""

MAX_CLAIM_ADDED_SOP_UIDS = 1000
"""SOP Instance UIDs of a revision listed in a :class:`SeriesClaim` (the first, in UID order)."""

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


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class InstanceIn:
    """The parsed main tags of one received instance, and where its bytes went.

    String tags are the raw values received ("" when absent); UIDs are validated by
    :meth:`Repository.record_instances` (PS3.5 §9.1).
    """

    study_uid: str
    series_uid: str
    sop_uid: str
    sha256: str
    size: int
    object_key: str
    received_at: dt.datetime
    sop_class_uid: str = ""
    transfer_syntax_uid: str = ""
    instance_number: int | None = None
    calling_ae: str = ""
    patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_date: str = ""
    study_time: str = ""
    study_description: str = ""
    accession_number: str = ""
    referring_physician: str = ""
    modality: str = ""
    series_number: int | None = None
    series_description: str = ""
    body_part: str = ""
    expected_instance_count: int | None = None


class RecordStatus(StrEnum):
    """What recording one instance did."""

    NEW = "new"  # first version of this SOP Instance UID
    DUPLICATE = "duplicate"  # same bytes as a recorded version: nothing written
    NEW_VERSION = "new_version"  # same SOP UID, other bytes: version n+1 recorded beside n


@dataclass(frozen=True, slots=True)
class RecordOutcome:
    """Result of recording one instance (same order as the batch)."""

    sop_uid: str
    series_uid: str
    study_uid: str
    status: RecordStatus
    version: int  # the version written, or for a duplicate the version it matched
    series_revision: int  # the series revision it arrived in (current one for duplicates)


@dataclass(frozen=True, slots=True)
class SeriesClaim:
    """A series declared stable by one claimer: the payload of ``dicom.series.stable``."""

    series_uid: str
    study_uid: str
    patient_id: str
    modality: str
    description: str
    revision: int
    instance_count: int
    expected_instance_count: int | None
    calling_ae: str
    first_received_at: dt.datetime | None
    last_received_at: dt.datetime | None
    stable_at: dt.datetime
    reason: str  # "expected_count" or "quiet"
    added_instance_count: int | None = None
    """Instance versions recorded in this revision (``None``: not computed, see ``instance_count``)."""
    added_sop_uids: tuple[str, ...] = ()
    """Revision > 1: the distinct SOP Instance UIDs it added, the first
    :data:`MAX_CLAIM_ADDED_SOP_UIDS` in UID order (empty for revision 1: it added everything)."""
    added_sop_uids_truncated: bool = False
    """True when the revision added more SOP Instance UIDs than ``added_sop_uids`` lists."""


@dataclass(frozen=True, slots=True)
class StudyReceivedClaim:
    """A study first seen, claimed by one claimer: the payload of ``dicom.study.received``.

    ``series_uids`` are in order of first receipt; ``calling_ae`` is the sender of the first.
    """

    study_uid: str
    patient_id: str
    modalities: str
    description: str
    calling_ae: str
    first_received_at: dt.datetime | None
    series_uids: tuple[str, ...]
    instance_count: int
    claimed_at: dt.datetime


@dataclass(frozen=True, slots=True)
class StudyClaim:
    """A study whose series are all stable: the payload of ``dicom.study.stable``."""

    study_uid: str
    patient_id: str
    revision: int
    series_uids: tuple[str, ...]
    instance_count: int
    modalities: str
    stable_at: dt.datetime


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


@dataclass(slots=True)
class _SeriesRow:
    """Mutable working copy of a locked series row inside record_instances."""

    id: int
    study_id: int
    revision: int
    state: str
    instance_count: int
    expected_instance_count: int | None
    first_received_at: dt.datetime | None
    last_received_at: dt.datetime | None
    calling_ae: str
    stable_at: dt.datetime | None
    claimed_by: str | None
    claimed_at: dt.datetime | None
    new_sops: int = 0
    dirty: bool = False


@dataclass(slots=True)
class _StudyRow:
    id: int
    revision: int
    state: str
    modalities: list[str]
    last_received_at: dt.datetime | None
    stable_at: dt.datetime | None
    claimed_by: str | None
    claimed_at: dt.datetime | None
    dirty: bool = False

    @classmethod
    def of(cls, r: Any) -> _StudyRow:
        """From a row of :func:`_lock_studies`."""
        modalities = [x for x in r.modalities.split("\\") if x]
        return cls(r.id, r.revision, r.state, modalities, r.last_received_at, r.stable_at, r.claimed_by, r.claimed_at)


def _lock_studies(conn: Connection, where: Any) -> Any:
    """Study rows matching ``where``, locked in study UID order (no deadlock between batches)."""
    return conn.execute(
        _for_update(
            conn,
            sa.select(
                T_STUDY.c.id,
                T_STUDY.c.study_uid,
                T_STUDY.c.revision,
                T_STUDY.c.state,
                T_STUDY.c.modalities,
                T_STUDY.c.last_received_at,
                T_STUDY.c.stable_at,
                T_STUDY.c.claimed_by,
                T_STUDY.c.claimed_at,
            )
            .where(where)
            .order_by(T_STUDY.c.study_uid),
        )
    )


@dataclass(slots=True)
class _Versions:
    latest: int = 0
    by_hash: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers


def _require_aware(value: dt.datetime, what: str) -> dt.datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware (UTC), got naive {value!r}")
    return value


def _seconds(value: float | dt.timedelta) -> dt.timedelta:
    return value if isinstance(value, dt.timedelta) else dt.timedelta(seconds=float(value))


def _patient_key(i: InstanceIn) -> str:
    """The seed's PatientUID rule: PatientID, else name::birth date::sex, else the study."""
    if i.patient_id.strip():
        basis = f"id:{i.patient_id.strip()}"
    elif i.patient_name.strip() or i.patient_birth_date.strip() or i.patient_sex.strip():
        basis = f"nbs:{i.patient_name.strip()}::{i.patient_birth_date.strip()}::{i.patient_sex.strip()}"
    else:
        basis = f"study:{i.study_uid}"
    return hashlib.sha256(basis.encode()).hexdigest()


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


def _claim_rows(conn: Connection, table: sa.Table, due: sa.Select[Any], *, now: dt.datetime, claimer: str) -> list[int]:
    """Mark the ``due`` rows of a series or study table stable for ``claimer``; their ids.

    The SELECT locks with SKIP LOCKED on PostgreSQL, so concurrent claimers take disjoint
    rows; the UPDATE re-checks ``state`` so that on SQLite (one writer at a time) a row already
    claimed since is never handed out twice.
    """
    ids = list(conn.execute(_for_update(conn, due, skip_locked=True)).scalars())
    if not ids:
        return []
    return list(
        conn.execute(
            sa.update(table)
            .where(table.c.id.in_(ids), table.c.state == RECEIVING)
            .values(state=STABLE, stable_at=now, claimed_by=claimer, claimed_at=now)
            .returning(table.c.id)
        ).scalars()
    )


def _wrap_integrity(exc: IntegrityError, what: str) -> RecordError:
    first = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
    return RecordError(f"{what}: {first}")


_SERIES_PUBLIC_COLS = [*T_SERIES.c, T_STUDY.c.study_uid]


class Repository:
    """Transactions over the record database (see the module docstring).

    Parameters
    ----------
    engine
        From :func:`storage.db.create_engine`, on a database migrated with
        :func:`storage.db.upgrade`.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # ------------------------------------------------------------------ instances

    def record_instances(self, batch: Sequence[InstanceIn]) -> list[RecordOutcome]:
        """Record a batch of received instances in one transaction.

        Upserts patients, studies and series, then inserts the instances that are new or a
        new version; a re-send with the same bytes (same SHA-256 as any recorded version of
        that SOP Instance UID) writes nothing. New instances for a stable series or study
        reopen it as revision n+1.

        Parameters
        ----------
        batch
            Instances in arrival order (100–500 per call keeps ingest fast: every call is
            a handful of bulk statements, whatever its size).

        Returns
        -------
        list of RecordOutcome
            One per input, same order.

        Raises
        ------
        InvalidKeyError
            A Study, Series or SOP Instance UID is not a valid UID; nothing is written.
        ValueError
            A ``received_at`` is naive.
        RecordError
            The database refused the batch (it is rolled back as a whole).
        """
        if not batch:
            return []
        for i in batch:
            validate_uid(i.study_uid, "Study Instance UID")
            validate_uid(i.series_uid, "Series Instance UID")
            validate_uid(i.sop_uid, "SOP Instance UID")
            _require_aware(i.received_at, "received_at")
        try:
            with write_transaction(self.engine) as conn:
                return self._record(conn, batch)
        except IntegrityError as exc:
            raise _wrap_integrity(exc, "cannot record instances") from exc

    def _record(self, conn: Connection, batch: Sequence[InstanceIn]) -> list[RecordOutcome]:
        # Patients, then studies, then series, each inserted and locked in key order so two
        # concurrent batches always take their locks in the same order (no deadlock).
        first_of_study: dict[str, InstanceIn] = {}
        first_of_series: dict[str, InstanceIn] = {}
        for i in batch:
            first_of_study.setdefault(i.study_uid, i)
            first_of_series.setdefault(i.series_uid, i)

        patient_rows: dict[str, dict[str, Any]] = {}
        study_patient: dict[str, str] = {}
        for uid, i in first_of_study.items():
            key = _patient_key(i)
            study_patient[uid] = key
            patient_rows.setdefault(
                key,
                {
                    "patient_key": key,
                    "patient_id": i.patient_id,
                    "name": i.patient_name,
                    "birth_date": i.patient_birth_date,
                    "sex": i.patient_sex,
                },
            )
        conn.execute(
            _insert(conn, T_PATIENT).on_conflict_do_nothing(index_elements=["patient_key"]),
            [patient_rows[k] for k in sorted(patient_rows)],
        )
        patient_ids = dict(
            conn.execute(
                sa.select(T_PATIENT.c.patient_key, T_PATIENT.c.id).where(T_PATIENT.c.patient_key.in_(patient_rows))
            ).all()
        )

        study_uids = sorted(first_of_study)
        conn.execute(
            _insert(conn, T_STUDY).on_conflict_do_nothing(index_elements=["study_uid"]),
            [
                {
                    "study_uid": uid,
                    "patient_id": patient_ids[study_patient[uid]],
                    "date": i.study_date,
                    "time": i.study_time,
                    "description": i.study_description,
                    "accession_number": i.accession_number,
                    "referring_physician": i.referring_physician,
                }
                for uid in study_uids
                for i in (first_of_study[uid],)
            ],
        )
        studies: dict[int, _StudyRow] = {}
        study_id_of: dict[str, int] = {}
        for r in _lock_studies(conn, T_STUDY.c.study_uid.in_(study_uids)):
            study_id_of[r.study_uid] = r.id
            studies[r.id] = _StudyRow.of(r)

        series_uids = sorted(first_of_series)
        conn.execute(
            _insert(conn, T_SERIES).on_conflict_do_nothing(index_elements=["series_uid"]),
            [
                {
                    "series_uid": uid,
                    "study_id": study_id_of[i.study_uid],
                    "modality": i.modality,
                    "number": i.series_number,
                    "description": i.series_description,
                    "body_part": i.body_part,
                    "calling_ae": i.calling_ae,
                    "expected_instance_count": i.expected_instance_count,
                }
                for uid in series_uids
                for i in (first_of_series[uid],)
            ],
        )
        series: dict[str, _SeriesRow] = {}
        for r in conn.execute(
            _for_update(
                conn,
                sa.select(
                    T_SERIES.c.id,
                    T_SERIES.c.series_uid,
                    T_SERIES.c.study_id,
                    T_SERIES.c.revision,
                    T_SERIES.c.state,
                    T_SERIES.c.instance_count,
                    T_SERIES.c.expected_instance_count,
                    T_SERIES.c.first_received_at,
                    T_SERIES.c.last_received_at,
                    T_SERIES.c.calling_ae,
                    T_SERIES.c.stable_at,
                    T_SERIES.c.claimed_by,
                    T_SERIES.c.claimed_at,
                )
                .where(T_SERIES.c.series_uid.in_(series_uids))
                .order_by(T_SERIES.c.series_uid),
            )
        ):
            series[r.series_uid] = _SeriesRow(
                r.id,
                r.study_id,
                r.revision,
                r.state,
                r.instance_count,
                r.expected_instance_count,
                r.first_received_at,
                r.last_received_at,
                r.calling_ae,
                r.stable_at,
                r.claimed_by,
                r.claimed_at,
            )
        # A series recorded earlier under another study (a sender's error) stays where it
        # is; lock that study too so its revision bookkeeping is still consistent.
        missing = sorted({s.study_id for s in series.values()} - set(studies))
        if missing:
            for r in _lock_studies(conn, T_STUDY.c.id.in_(missing)):
                studies[r.id] = _StudyRow.of(r)

        versions: dict[str, _Versions] = {}
        sops = sorted({i.sop_uid for i in batch})
        for chunk in _chunks(sops):
            for r in conn.execute(
                sa.select(T_INSTANCE.c.sop_uid, T_INSTANCE.c.version, T_INSTANCE.c.sha256).where(
                    T_INSTANCE.c.sop_uid.in_(chunk)
                )
            ):
                v = versions.setdefault(r.sop_uid, _Versions())
                v.latest = max(v.latest, r.version)
                v.by_hash.setdefault(r.sha256, r.version)

        outcomes: list[RecordOutcome] = []
        new_rows: list[dict[str, Any]] = []
        for i in batch:
            s = series[i.series_uid]
            st = studies[s.study_id]
            v = versions.setdefault(i.sop_uid, _Versions())
            if i.sha256 in v.by_hash:
                outcomes.append(
                    RecordOutcome(
                        i.sop_uid, i.series_uid, i.study_uid, RecordStatus.DUPLICATE, v.by_hash[i.sha256], s.revision
                    )
                )
                continue
            if s.state == STABLE:
                s.state, s.revision = RECEIVING, s.revision + 1
                s.stable_at = s.claimed_by = s.claimed_at = None
            if st.state == STABLE:
                st.state, st.revision = RECEIVING, st.revision + 1
                st.stable_at = st.claimed_by = st.claimed_at = None
            status = RecordStatus.NEW_VERSION if v.latest else RecordStatus.NEW
            if status is RecordStatus.NEW:
                s.new_sops += 1
            v.latest += 1
            v.by_hash[i.sha256] = v.latest
            at = i.received_at
            s.first_received_at = at if s.first_received_at is None else min(s.first_received_at, at)
            s.last_received_at = at if s.last_received_at is None else max(s.last_received_at, at)
            if i.calling_ae:
                s.calling_ae = i.calling_ae
            if i.expected_instance_count is not None:
                s.expected_instance_count = i.expected_instance_count
            s.dirty = True
            st.last_received_at = at if st.last_received_at is None else max(st.last_received_at, at)
            if i.modality and i.modality not in st.modalities:
                st.modalities.append(i.modality)
            st.dirty = True
            new_rows.append(
                {
                    "sop_uid": i.sop_uid,
                    "version": v.latest,
                    "series_id": s.id,
                    "sop_class_uid": i.sop_class_uid,
                    "transfer_syntax_uid": i.transfer_syntax_uid,
                    "instance_number": i.instance_number,
                    "size": i.size,
                    "sha256": i.sha256,
                    "object_key": i.object_key,
                    "calling_ae": i.calling_ae,
                    "received_at": at,
                    "series_revision": s.revision,
                }
            )
            outcomes.append(RecordOutcome(i.sop_uid, i.series_uid, i.study_uid, status, v.latest, s.revision))

        if new_rows:
            conn.execute(sa.insert(T_INSTANCE), new_rows)
        dirty_series = [s for s in series.values() if s.dirty]
        if dirty_series:
            conn.execute(
                sa.update(T_SERIES)
                .where(T_SERIES.c.id == sa.bindparam("b_id"))
                .values(
                    instance_count=T_SERIES.c.instance_count + sa.bindparam("b_new", type_=sa.Integer),
                    revision=sa.bindparam("b_revision"),
                    state=sa.bindparam("b_state"),
                    expected_instance_count=sa.bindparam("b_expected"),
                    first_received_at=sa.bindparam("b_first", type_=m.UTCDateTime),
                    last_received_at=sa.bindparam("b_last", type_=m.UTCDateTime),
                    calling_ae=sa.bindparam("b_ae"),
                    stable_at=sa.bindparam("b_stable_at", type_=m.UTCDateTime),
                    claimed_by=sa.bindparam("b_claimed_by"),
                    claimed_at=sa.bindparam("b_claimed_at", type_=m.UTCDateTime),
                ),
                [
                    {
                        "b_id": s.id,
                        "b_new": s.new_sops,
                        "b_revision": s.revision,
                        "b_state": s.state,
                        "b_expected": s.expected_instance_count,
                        "b_first": s.first_received_at,
                        "b_last": s.last_received_at,
                        "b_ae": s.calling_ae,
                        "b_stable_at": s.stable_at,
                        "b_claimed_by": s.claimed_by,
                        "b_claimed_at": s.claimed_at,
                    }
                    for s in sorted(dirty_series, key=lambda s: s.id)
                ],
            )
        dirty_studies = [st for st in studies.values() if st.dirty]
        if dirty_studies:
            conn.execute(
                sa.update(T_STUDY)
                .where(T_STUDY.c.id == sa.bindparam("b_id"))
                .values(
                    revision=sa.bindparam("b_revision"),
                    state=sa.bindparam("b_state"),
                    modalities=sa.bindparam("b_modalities"),
                    last_received_at=sa.bindparam("b_last", type_=m.UTCDateTime),
                    stable_at=sa.bindparam("b_stable_at", type_=m.UTCDateTime),
                    claimed_by=sa.bindparam("b_claimed_by"),
                    claimed_at=sa.bindparam("b_claimed_at", type_=m.UTCDateTime),
                ),
                [
                    {
                        "b_id": st.id,
                        "b_revision": st.revision,
                        "b_state": st.state,
                        "b_modalities": "\\".join(st.modalities),
                        "b_last": st.last_received_at,
                        "b_stable_at": st.stable_at,
                        "b_claimed_by": st.claimed_by,
                        "b_claimed_at": st.claimed_at,
                    }
                    for st in sorted(dirty_studies, key=lambda st: st.id)
                ],
            )
        return outcomes

    def list_instances(self, series_uid: str, *, all_versions: bool = False) -> list[m.InstancePublic]:
        """Instances of a series by instance number, latest version of each SOP by default."""
        newer = sa.alias(T_INSTANCE, "newer")
        stmt = (
            sa.select(T_INSTANCE)
            .join(T_SERIES, T_SERIES.c.id == T_INSTANCE.c.series_id)
            .where(T_SERIES.c.series_uid == series_uid)
            .order_by(T_INSTANCE.c.instance_number, T_INSTANCE.c.sop_uid, T_INSTANCE.c.version)
        )
        if not all_versions:
            stmt = stmt.where(
                ~sa.exists().where(newer.c.sop_uid == T_INSTANCE.c.sop_uid, newer.c.version > T_INSTANCE.c.version)
            )
        with self.engine.connect() as conn:
            return [_public(m.InstancePublic, r) for r in conn.execute(stmt)]

    def get_instance_versions(self, sop_uid: str) -> list[m.InstancePublic]:
        """Every recorded version of one SOP Instance UID, oldest first."""
        stmt = sa.select(T_INSTANCE).where(T_INSTANCE.c.sop_uid == sop_uid).order_by(T_INSTANCE.c.version)
        with self.engine.connect() as conn:
            return [_public(m.InstancePublic, r) for r in conn.execute(stmt)]

    # ------------------------------------------------------------------ readers

    def get_series(self, series_uid: str) -> m.SeriesPublic | None:
        """One series with its study UID, or ``None``."""
        stmt = (
            sa.select(*_SERIES_PUBLIC_COLS)
            .join(T_STUDY, T_STUDY.c.id == T_SERIES.c.study_id)
            .where(T_SERIES.c.series_uid == series_uid)
        )
        with self.engine.connect() as conn:
            row = conn.execute(stmt).first()
        return _public(m.SeriesPublic, row) if row is not None else None

    def list_series(
        self, limit: int = 100, offset: int = 0, *, study_uid: str | None = None, state: str | None = None
    ) -> list[m.SeriesPublic]:
        """Series, most recently received first."""
        stmt = sa.select(*_SERIES_PUBLIC_COLS).join(T_STUDY, T_STUDY.c.id == T_SERIES.c.study_id)
        if study_uid is not None:
            stmt = stmt.where(T_STUDY.c.study_uid == study_uid)
        if state is not None:
            stmt = stmt.where(T_SERIES.c.state == state)
        stmt = stmt.order_by(T_SERIES.c.last_received_at.desc(), T_SERIES.c.id.desc()).limit(limit).offset(offset)
        with self.engine.connect() as conn:
            return [_public(m.SeriesPublic, r) for r in conn.execute(stmt)]

    def get_study(self, study_uid: str) -> m.StudyPublic | None:
        """One study, or ``None``."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(T_STUDY).where(T_STUDY.c.study_uid == study_uid)).first()
        return _public(m.StudyPublic, row) if row is not None else None

    def list_studies(self, limit: int = 100, offset: int = 0) -> list[m.StudyPublic]:
        """Studies, most recently received first."""
        stmt = sa.select(T_STUDY).order_by(T_STUDY.c.last_received_at.desc(), T_STUDY.c.id.desc())
        with self.engine.connect() as conn:
            return [_public(m.StudyPublic, r) for r in conn.execute(stmt.limit(limit).offset(offset))]

    def get_patient(self, patient_pk: int) -> m.PatientPublic | None:
        """One patient by its row id (``StudyPublic.patient_id``), or ``None``."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(T_PATIENT).where(T_PATIENT.c.id == patient_pk)).first()
        return _public(m.PatientPublic, row) if row is not None else None

    def count_records(self) -> dict[str, int]:
        """How many studies, series and instance versions are recorded (``dcmflow status``)."""
        with self.engine.connect() as conn:
            return {
                name: int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())
                for name, table in (("studies", T_STUDY), ("series", T_SERIES), ("instances", T_INSTANCE))
            }

    # ------------------------------------------------------------------ completeness

    def claim_due_series(
        self,
        *,
        now: dt.datetime,
        default_stable_age: float | dt.timedelta,
        claimer: str,
        limit: int = 100,
        association_timeout: dt.timedelta = DEFAULT_ASSOCIATION_TIMEOUT,
    ) -> list[SeriesClaim]:
        """Declare due series stable and hand them to ``claimer`` (exactly one claimer each).

        A receiving series is due when no open association has touched it and either its
        expected instance count is reached, or its calling peer's ``stable_age_seconds``
        (``default_stable_age`` for other callers) has passed since its last new instance.

        Parameters
        ----------
        now
            Timezone-aware current time (a parameter so tests and replays are deterministic).
        default_stable_age
            Seconds (or a timedelta) of quiet, i.e. ``DCMFLOW_STABLE_AGE``.
        claimer
            Who claims (host:pid of a receiver), kept in ``claimed_by`` for diagnosis.
        limit
            At most this many series per call, oldest first.
        association_timeout
            Open-association rows untouched this long are ignored (their receiver died).

        Returns
        -------
        list of SeriesClaim
            The series this call (and no other) moved to stable.
        """
        _require_aware(now, "now")
        default_age = _seconds(default_stable_age)
        with write_transaction(self.engine) as conn:
            # Per-peer overrides: few peers, so one OR-branch per distinct age keeps the
            # date arithmetic in Python and the comparison on the indexed column.
            age_of_ae: dict[str, int] = {}
            for ae, age in conn.execute(
                sa.select(T_PEER.c.ae_title, T_PEER.c.stable_age_seconds).where(
                    T_PEER.c.stable_age_seconds.is_not(None)
                )
            ):
                age_of_ae[ae] = max(age, age_of_ae.get(ae, 0))
            aes_of_age: dict[int, list[str]] = {}
            for ae, age in age_of_ae.items():
                aes_of_age.setdefault(age, []).append(ae)
            last = T_SERIES.c.last_received_at
            quiet = sa.or_(
                sa.and_(T_SERIES.c.calling_ae.not_in(list(age_of_ae)), last <= now - default_age),
                *(
                    sa.and_(T_SERIES.c.calling_ae.in_(aes), last <= now - dt.timedelta(seconds=age))
                    for age, aes in aes_of_age.items()
                ),
            )
            expected_reached = sa.and_(
                T_SERIES.c.expected_instance_count.is_not(None),
                T_SERIES.c.instance_count >= T_SERIES.c.expected_instance_count,
            )
            open_association = (
                sa.select(1)
                .select_from(T_ASSOC_SERIES.join(T_ASSOC, T_ASSOC.c.id == T_ASSOC_SERIES.c.association_id))
                .where(
                    T_ASSOC_SERIES.c.series_uid == T_SERIES.c.series_uid,
                    T_ASSOC.c.touched_at >= now - association_timeout,
                )
                .exists()
            )
            due = (
                sa.select(T_SERIES.c.id)
                .where(T_SERIES.c.state == RECEIVING, sa.or_(expected_reached, quiet), ~open_association)
                .order_by(last, T_SERIES.c.id)
                .limit(limit)
            )
            claimed = _claim_rows(conn, T_SERIES, due, now=now, claimer=claimer)
            return self._series_claims(conn, claimed, stable_at=now) if claimed else []

    @staticmethod
    def _series_claims(
        conn: Connection, ids: Sequence[int], *, stable_at: dt.datetime | None = None
    ) -> list[SeriesClaim]:
        """Claims of these series rows (oldest receipt first), with what their current revision added.

        ``stable_at`` overrides the rows' own (a fresh claim); the added counts and SOP UIDs
        come from the instance rows whose ``series_revision`` is the series' current one.
        """
        rows = conn.execute(
            sa.select(T_SERIES, T_STUDY.c.study_uid, T_PATIENT.c.patient_id.label("dicom_patient_id"))
            .join(T_STUDY, T_STUDY.c.id == T_SERIES.c.study_id)
            .join(T_PATIENT, T_PATIENT.c.id == T_STUDY.c.patient_id)
            .where(T_SERIES.c.id.in_(ids))
            .order_by(T_SERIES.c.last_received_at, T_SERIES.c.id)
        ).all()
        in_revision = sa.and_(
            T_INSTANCE.c.series_id == T_SERIES.c.id, T_INSTANCE.c.series_revision == T_SERIES.c.revision
        )
        added_counts: dict[int, int] = dict(
            conn.execute(
                sa.select(T_SERIES.c.id, sa.func.count(T_INSTANCE.c.id))
                .select_from(T_SERIES.join(T_INSTANCE, in_revision))
                .where(T_SERIES.c.id.in_(ids))
                .group_by(T_SERIES.c.id)
            ).all()
        )
        added_sops: dict[int, list[str]] = {}
        for r in rows:
            if r.revision > 1:
                added_sops[r.id] = list(
                    conn.execute(
                        sa.select(T_INSTANCE.c.sop_uid)
                        .where(T_INSTANCE.c.series_id == r.id, T_INSTANCE.c.series_revision == r.revision)
                        .distinct()
                        .order_by(T_INSTANCE.c.sop_uid)
                        .limit(MAX_CLAIM_ADDED_SOP_UIDS + 1)
                    ).scalars()
                )
        claims = []
        for r in rows:
            sops = added_sops.get(r.id, [])
            claims.append(
                SeriesClaim(
                    series_uid=r.series_uid,
                    study_uid=r.study_uid,
                    patient_id=r.dicom_patient_id,
                    modality=r.modality,
                    description=r.description,
                    revision=r.revision,
                    instance_count=r.instance_count,
                    expected_instance_count=r.expected_instance_count,
                    calling_ae=r.calling_ae,
                    first_received_at=r.first_received_at,
                    last_received_at=r.last_received_at,
                    stable_at=stable_at or r.stable_at or r.claimed_at or m.utcnow(),
                    reason=(
                        "expected_count"
                        if r.expected_instance_count is not None and r.instance_count >= r.expected_instance_count
                        else "quiet"
                    ),
                    added_instance_count=added_counts.get(r.id, 0),
                    added_sop_uids=tuple(sops[:MAX_CLAIM_ADDED_SOP_UIDS]),
                    added_sop_uids_truncated=len(sops) > MAX_CLAIM_ADDED_SOP_UIDS,
                )
            )
        return claims

    def mark_series_emitted(self, series_uid: str, revision: int) -> bool:
        """Record that ``dicom.series.stable`` went out for this revision.

        Returns
        -------
        bool
            True for the first call per (series, revision); False when that revision (or a
            later one) was already marked, or the series has no such revision. The emitter
            emits only after a True, which makes the event exactly-once per revision.
        """
        return self._mark_emitted(T_SERIES, T_SERIES.c.series_uid, series_uid, revision)

    def mark_study_emitted(self, study_uid: str, revision: int) -> bool:
        """The study analogue of :meth:`mark_series_emitted` (``dicom.study.stable``)."""
        return self._mark_emitted(T_STUDY, T_STUDY.c.study_uid, study_uid, revision)

    def _mark_emitted(self, table: sa.Table, uid_col: sa.ColumnElement[str], uid: str, revision: int) -> bool:
        stmt = (
            sa.update(table)
            .where(
                uid_col == uid,
                table.c.revision >= revision,
                sa.or_(table.c.emitted_revision.is_(None), table.c.emitted_revision < revision),
            )
            .values(emitted_revision=revision)
        )
        with write_transaction(self.engine) as conn:
            return conn.execute(stmt).rowcount == 1

    def claim_due_studies(self, *, now: dt.datetime, claimer: str, limit: int = 100) -> list[StudyClaim]:
        """Declare stable the receiving studies whose series are all stable and emitted.

        A study becomes due once it has at least one series, every one of its series is
        stable with its current revision marked emitted (:meth:`mark_series_emitted`), and
        its ``dicom.study.received`` was marked emitted (:meth:`mark_study_received_emitted`).
        So it follows its series' quiet periods, expected counts and open associations, and
        ``dicom.study.stable`` is never emitted before the events of its series (a series
        event recovered after a crash included) nor before ``dicom.study.received``.

        Returns
        -------
        list of StudyClaim
            The studies this call (and no other) moved to stable.
        """
        _require_aware(now, "now")
        s = sa.alias(T_SERIES, "s")
        has_series = sa.select(1).select_from(s).where(s.c.study_id == T_STUDY.c.id).exists()
        pending_series = (
            sa.select(1)
            .select_from(s)
            .where(
                s.c.study_id == T_STUDY.c.id,
                sa.or_(s.c.state == RECEIVING, s.c.emitted_revision.is_(None), s.c.emitted_revision < s.c.revision),
            )
            .exists()
        )
        due = (
            sa.select(T_STUDY.c.id)
            .where(
                T_STUDY.c.state == RECEIVING,
                T_STUDY.c.received_emitted_at.is_not(None),
                has_series,
                ~pending_series,
            )
            .order_by(T_STUDY.c.last_received_at, T_STUDY.c.id)
            .limit(limit)
        )
        with write_transaction(self.engine) as conn:
            claimed = _claim_rows(conn, T_STUDY, due, now=now, claimer=claimer)
            return self._study_claims(conn, claimed, stable_at=now) if claimed else []

    @staticmethod
    def _study_claims(
        conn: Connection, ids: Sequence[int], *, stable_at: dt.datetime | None = None
    ) -> list[StudyClaim]:
        """Claims of these study rows (oldest receipt first); ``stable_at`` overrides the rows' own."""
        studies = conn.execute(
            sa.select(T_STUDY, T_PATIENT.c.patient_id.label("dicom_patient_id"))
            .join(T_PATIENT, T_PATIENT.c.id == T_STUDY.c.patient_id)
            .where(T_STUDY.c.id.in_(ids))
            .order_by(T_STUDY.c.last_received_at, T_STUDY.c.id)
        ).all()
        members: dict[int, list[tuple[str, int]]] = {}
        for r in conn.execute(
            sa.select(T_SERIES.c.study_id, T_SERIES.c.series_uid, T_SERIES.c.instance_count)
            .where(T_SERIES.c.study_id.in_(ids))
            .order_by(T_SERIES.c.number, T_SERIES.c.series_uid)
        ):
            members.setdefault(r.study_id, []).append((r.series_uid, r.instance_count))
        return [
            StudyClaim(
                study_uid=r.study_uid,
                patient_id=r.dicom_patient_id,
                revision=r.revision,
                series_uids=tuple(uid for uid, _ in members.get(r.id, [])),
                instance_count=sum(n for _, n in members.get(r.id, [])),
                modalities=r.modalities,
                stable_at=stable_at or r.stable_at or r.claimed_at or m.utcnow(),
            )
            for r in studies
        ]

    def list_unemitted_series(self, claimed_before: dt.datetime, limit: int = 100) -> list[SeriesClaim]:
        """Stable series whose current revision was claimed before ``claimed_before`` but never marked emitted.

        The recovery step of the monitor: their claimer died between claim and mark, or
        Prefect was unreachable. Read through the partial index ``ix_series_unemitted``, so
        the cost follows the number of such series, not the size of the archive.

        Parameters
        ----------
        claimed_before
            Timezone-aware cutoff (now minus the grace a claimer has to emit and mark).
        limit
            At most this many, oldest claim first.

        Returns
        -------
        list of SeriesClaim
            Rebuilt from the records (``stable_at`` as recorded, with what the revision
            added), ready to be emitted again with the same event ids.
        """
        _require_aware(claimed_before, "claimed_before")
        with self.engine.connect() as conn:
            ids = list(
                conn.execute(
                    sa.select(T_SERIES.c.id)
                    .where(sa.text(m.UNEMITTED_PREDICATE), T_SERIES.c.claimed_at <= claimed_before)
                    .order_by(T_SERIES.c.claimed_at, T_SERIES.c.id)
                    .limit(limit)
                ).scalars()
            )
            return self._series_claims(conn, ids) if ids else []

    def list_unemitted_studies(self, claimed_before: dt.datetime, limit: int = 100) -> list[StudyClaim]:
        """The study analogue of :meth:`list_unemitted_series` (index ``ix_study_unemitted``)."""
        _require_aware(claimed_before, "claimed_before")
        with self.engine.connect() as conn:
            ids = list(
                conn.execute(
                    sa.select(T_STUDY.c.id)
                    .where(sa.text(m.UNEMITTED_PREDICATE), T_STUDY.c.claimed_at <= claimed_before)
                    .order_by(T_STUDY.c.claimed_at, T_STUDY.c.id)
                    .limit(limit)
                ).scalars()
            )
            return self._study_claims(conn, ids) if ids else []

    def claim_received_studies(
        self,
        *,
        now: dt.datetime,
        claimer: str,
        limit: int = 100,
        reclaim_after: dt.timedelta = DEFAULT_RECLAIM_AFTER,
    ) -> list[StudyReceivedClaim]:
        """Hand the ``dicom.study.received`` of new studies to ``claimer`` (one claimer each).

        A study is due when its received event was not marked emitted and it is either
        unclaimed or its claim is older than ``reclaim_after`` (the claimer died, or could
        not send): such a claim is taken over, so the event is sent again with the same id.
        Read through the partial index ``ix_study_received_unemitted``.

        Parameters
        ----------
        now
            Timezone-aware current time.
        claimer
            Who claims (host:pid), kept in ``received_claimed_by``.
        limit
            At most this many studies per call, oldest first.
        reclaim_after
            Grace a claimer has between this claim and :meth:`mark_study_received_emitted`.

        Returns
        -------
        list of StudyReceivedClaim
            The studies this call (and no other) claimed.
        """
        _require_aware(now, "now")
        cutoff = now - reclaim_after
        claimable = sa.or_(T_STUDY.c.received_claimed_at.is_(None), T_STUDY.c.received_claimed_at <= cutoff)
        due = (
            sa.select(T_STUDY.c.id)
            .where(sa.text(m.RECEIVED_UNEMITTED_PREDICATE), claimable)
            .order_by(T_STUDY.c.received_claimed_at.nulls_first(), T_STUDY.c.id)  # new studies first
            .limit(limit)
        )
        with write_transaction(self.engine) as conn:
            ids = list(conn.execute(_for_update(conn, due, skip_locked=True)).scalars())
            if not ids:
                return []
            claimed = list(
                conn.execute(
                    sa.update(T_STUDY)
                    .where(T_STUDY.c.id.in_(ids), T_STUDY.c.received_emitted_at.is_(None), claimable)
                    .values(received_claimed_by=claimer, received_claimed_at=now)
                    .returning(T_STUDY.c.id)
                ).scalars()
            )
            if not claimed:
                return []
            studies = conn.execute(
                sa.select(T_STUDY, T_PATIENT.c.patient_id.label("dicom_patient_id"))
                .join(T_PATIENT, T_PATIENT.c.id == T_STUDY.c.patient_id)
                .where(T_STUDY.c.id.in_(claimed))
                .order_by(T_STUDY.c.id)
            ).all()
            members: dict[int, list[Any]] = {}
            for r in conn.execute(
                sa.select(
                    T_SERIES.c.study_id,
                    T_SERIES.c.series_uid,
                    T_SERIES.c.instance_count,
                    T_SERIES.c.calling_ae,
                    T_SERIES.c.first_received_at,
                ).where(T_SERIES.c.study_id.in_(claimed))
            ):
                members.setdefault(r.study_id, []).append(r)
        claims = []
        for st in studies:
            series = sorted(members.get(st.id, []), key=lambda r: (r.first_received_at or now, r.series_uid))
            firsts = [r.first_received_at for r in series if r.first_received_at is not None]
            claims.append(
                StudyReceivedClaim(
                    study_uid=st.study_uid,
                    patient_id=st.dicom_patient_id,
                    modalities=st.modalities,
                    description=st.description,
                    calling_ae=series[0].calling_ae if series else "",
                    first_received_at=min(firsts) if firsts else None,
                    series_uids=tuple(r.series_uid for r in series),
                    instance_count=sum(r.instance_count for r in series),
                    claimed_at=now,
                )
            )
        return claims

    def mark_study_received_emitted(self, study_uid: str, *, now: dt.datetime | None = None) -> bool:
        """Record that ``dicom.study.received`` went out for this study.

        Returns
        -------
        bool
            True for the first call per study; False when it was already marked or there is
            no such study. The monitor reports an event only after a True.
        """
        at = _require_aware(now, "now") if now is not None else m.utcnow()
        stmt = (
            sa.update(T_STUDY)
            .where(T_STUDY.c.study_uid == study_uid, T_STUDY.c.received_emitted_at.is_(None))
            .values(received_emitted_at=at)
        )
        with write_transaction(self.engine) as conn:
            return conn.execute(stmt).rowcount == 1

    # ------------------------------------------------------------------ associations

    def association_opened(self, assoc_id: str, calling_ae: str = "", *, now: dt.datetime | None = None) -> None:
        """An association was accepted: its series stay unclaimable until it closes."""
        at = _require_aware(now, "now") if now is not None else m.utcnow()
        with write_transaction(self.engine) as conn:
            _upsert(
                conn, T_ASSOC, [{"id": assoc_id, "calling_ae": calling_ae, "opened_at": at, "touched_at": at}], ["id"]
            )

    def association_touched_series(
        self, assoc_id: str, series_uids: Iterable[str], *, now: dt.datetime | None = None
    ) -> None:
        """The association sent instances of these series (call once per batch, not per instance)."""
        at = _require_aware(now, "now") if now is not None else m.utcnow()
        uids = sorted({validate_uid(u, "Series Instance UID") for u in series_uids})
        with write_transaction(self.engine) as conn:
            stmt = _insert(conn, T_ASSOC)
            conn.execute(
                stmt.on_conflict_do_update(index_elements=["id"], set_={"touched_at": stmt.excluded.touched_at}),
                [{"id": assoc_id, "calling_ae": "", "opened_at": at, "touched_at": at}],
            )
            if uids:
                conn.execute(
                    _insert(conn, T_ASSOC_SERIES).on_conflict_do_nothing(),
                    [{"association_id": assoc_id, "series_uid": u} for u in uids],
                )

    def association_closed(self, assoc_id: str) -> None:
        """The association was released or aborted: its series may be claimed again."""
        with write_transaction(self.engine) as conn:
            conn.execute(sa.delete(T_ASSOC_SERIES).where(T_ASSOC_SERIES.c.association_id == assoc_id))
            conn.execute(sa.delete(T_ASSOC).where(T_ASSOC.c.id == assoc_id))

    # ------------------------------------------------------------------ peers, nodes, settings

    def upsert_peer(self, peer: m.PeerBase) -> m.PeerPublic:
        """Create or replace the peer with this name."""
        with write_transaction(self.engine) as conn:
            _upsert(conn, T_PEER, [peer.model_dump(include=set(m.PeerBase.model_fields))], ["name"])
            row = conn.execute(sa.select(T_PEER).where(T_PEER.c.name == peer.name)).one()
        return _public(m.PeerPublic, row)

    def get_peer(self, name: str) -> m.PeerPublic | None:
        """The peer with this name, or ``None``."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(T_PEER).where(T_PEER.c.name == name)).first()
        return _public(m.PeerPublic, row) if row is not None else None

    def list_peers(self, *, ae_title: str | None = None) -> list[m.PeerPublic]:
        """All peers by name, or those calling with ``ae_title``."""
        stmt = sa.select(T_PEER).order_by(T_PEER.c.name)
        if ae_title is not None:
            stmt = stmt.where(T_PEER.c.ae_title == ae_title)
        with self.engine.connect() as conn:
            return [_public(m.PeerPublic, r) for r in conn.execute(stmt)]

    def remove_peer(self, name: str) -> bool:
        """Delete a peer; False if there was none."""
        with write_transaction(self.engine) as conn:
            return conn.execute(sa.delete(T_PEER).where(T_PEER.c.name == name)).rowcount > 0

    def upsert_node(self, node: m.NodeBase) -> m.NodePublic:
        """Create or replace the local listener with this name."""
        with write_transaction(self.engine) as conn:
            _upsert(conn, T_NODE, [node.model_dump(include=set(m.NodeBase.model_fields))], ["name"])
            row = conn.execute(sa.select(T_NODE).where(T_NODE.c.name == node.name)).one()
        return _public(m.NodePublic, row)

    def get_node(self, name: str) -> m.NodePublic | None:
        """The local listener with this name, or ``None``."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(T_NODE).where(T_NODE.c.name == name)).first()
        return _public(m.NodePublic, row) if row is not None else None

    def list_nodes(self) -> list[m.NodePublic]:
        """All local listeners by name."""
        with self.engine.connect() as conn:
            return [_public(m.NodePublic, r) for r in conn.execute(sa.select(T_NODE).order_by(T_NODE.c.name))]

    def remove_node(self, name: str) -> bool:
        """Delete a local listener; False if there was none."""
        with write_transaction(self.engine) as conn:
            return conn.execute(sa.delete(T_NODE).where(T_NODE.c.name == name)).rowcount > 0

    def get_setting(self, key: str, default: Any = None) -> Any:
        """An application setting's JSON value, or ``default``."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(T_SETTING.c.value).where(T_SETTING.c.key == key)).first()
        return default if row is None else row[0]

    def set_setting(self, key: str, value: Any) -> None:
        """Create or replace an application setting (any JSON value)."""
        with write_transaction(self.engine) as conn:
            _upsert(conn, T_SETTING, [{"key": key, "value": value, "updated_at": m.utcnow()}], ["key"])

    def list_settings(self) -> dict[str, Any]:
        """All application settings."""
        with self.engine.connect() as conn:
            return dict(conn.execute(sa.select(T_SETTING.c.key, T_SETTING.c.value).order_by(T_SETTING.c.key)).all())

    # ------------------------------------------------------------------ services and workers

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

    # ------------------------------------------------------------------ sessions and jobs

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
        (to now) unless given, so every caller records times the same way.

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

    # ------------------------------------------------------------------ session data and files

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
