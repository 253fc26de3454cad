"""SQLModel records of dcmflow: the seed's db-provider contract plus our own.

Every entity follows the SQLModel tutorial pattern: ``XBase`` (shared fields), ``X(XBase,
table=True)`` (the table) and, where callers need a read-only view, ``XPublic``. The
:class:`~storage.repository.Repository` returns only ``*Public`` models or frozen
dataclasses, never attached table rows, so nothing lazy-loads after a transaction ended.

Conventions
-----------
* Datetimes are timezone-aware UTC (:class:`UTCDateTime`); naive values are refused, because
  a naive local time stored as UTC is a silent, hours-long error in a stability timer.
* DICOM DA/TM values (birth date, study date/time) are kept as the raw strings received:
  parsing them would fail on the malformed dates real modalities send, and we only display them.
* Enumerated states are plain strings (constants in :class:`SeriesState`, :class:`JobState`,
  …), not database enums: adding a state then needs no enum migration on PostgreSQL.
* Everything works on SQLite and PostgreSQL; the schema is created only by the Alembic
  migrations in ``storage/migrations`` (never ``create_all`` outside tests).
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlmodel import Field, SQLModel

from storage.priority import DEFAULT_PRIORITY, DEFAULT_PRIORITY_RANK

__all__ = [
    "UTCDateTime",
    "utcnow",
    "UNEMITTED_PREDICATE",
    "RECEIVED_UNEMITTED_PREDICATE",
    "SeriesState",
    "JobState",
    "SessionState",
    "session_claim_key",
    "SourceKind",
    "WorkerKind",
    "JobLevel",
    "AppSetting",
    "PeerBase",
    "Peer",
    "PeerPublic",
    "NodeBase",
    "Node",
    "NodePublic",
    "ServiceBase",
    "Service",
    "ServicePublic",
    "ServiceJobBase",
    "ServiceJob",
    "ServiceJobPublic",
    "WorkerBase",
    "Worker",
    "WorkerPublic",
    "SessionBase",
    "Session",
    "SessionPublic",
    "JobBase",
    "Job",
    "JobPublic",
    "SessionData",
    "SessionFileBase",
    "SessionFile",
    "SessionFilePublic",
    "PatientBase",
    "Patient",
    "PatientPublic",
    "StudyBase",
    "Study",
    "StudyPublic",
    "SeriesBase",
    "Series",
    "SeriesPublic",
    "InstanceBase",
    "Instance",
    "InstancePublic",
    "Association",
    "AssociationSeries",
]

# Named constraints make Alembic diffs and SQLite batch migrations deterministic.
SQLModel.metadata.naming_convention = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(sa.types.TypeDecorator[dt.datetime]):
    """A timezone-aware UTC datetime on every backend.

    PostgreSQL stores ``timestamptz``; SQLite stores the UTC wall time as text, which sorts
    and compares correctly because every value is converted to UTC before binding.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        """Refuse naive datetimes, convert aware ones to UTC."""
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: dcmflow stores timezone-aware UTC only")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        """Attach UTC to the naive values SQLite returns; normalise PostgreSQL's to UTC."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


def utcnow() -> dt.datetime:
    """Current time, timezone-aware UTC (the default of every ``*_at`` column)."""
    return dt.datetime.now(dt.UTC)


def _at(*, nullable: bool = True, index: bool = False, **kw: Any) -> Any:
    """A UTC datetime field."""
    return Field(sa_type=UTCDateTime, nullable=nullable, index=index, **kw)


class SeriesState(StrEnum):
    """Completeness state of a series or study."""

    RECEIVING = "receiving"
    STABLE = "stable"


UNEMITTED_PREDICATE = (
    f"state = '{SeriesState.STABLE.value}' AND (emitted_revision IS NULL OR emitted_revision < revision)"
)
"""SQL of "stable, but its current revision's stable event was not marked emitted" (series and study).

The WHERE of the partial indexes ``ix_series_unemitted`` / ``ix_study_unemitted``; queries
that want those indexes include this text verbatim.
"""

RECEIVED_UNEMITTED_PREDICATE = "received_emitted_at IS NULL"
"""SQL of "``dicom.study.received`` not marked emitted" (WHERE of ``ix_study_received_unemitted``)."""


class JobState(StrEnum):
    """Life cycle of one job run."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"
    CRASHED = "crashed"  # running when its flow run died (``Repository.release_claim``)


class SessionState(StrEnum):
    """Life cycle of one processing session."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    CRASHED = "crashed"  # its flow run died (kill -9, machine lost); claim released


def session_claim_key(level: str, uid: str, revision: int) -> str:
    """``series/<uid>/<revision>`` (or ``study/…``): the key a triggered run claims.

    At most one session holds a key (unique index ``ix_session_claim_key``), so a
    (series or study, revision) is processed once however often its trigger fires.
    """
    return f"{level}/{uid}/{int(revision)}"


class SourceKind(StrEnum):
    """Where a registered service came from."""

    FOLDER = "folder"  # dcm-processor registry/ + module/ folder
    PYTHON = "python"  # registered from Python code
    ENTRYPOINT = "entrypoint"  # an installed package's entry point


class WorkerKind(StrEnum):
    """Execution environment of a worker."""

    PYTHON = "python"
    VENV = "venv"


class JobLevel(StrEnum):
    """Granularity a service job runs at."""

    SERIES = "series"
    STUDY = "study"


# --------------------------------------------------------------------------- settings


class AppSetting(SQLModel, table=True):
    """One application setting (the seed's app-level settings.json, as key/value rows)."""

    __tablename__ = "app_setting"

    key: str = Field(primary_key=True)
    value: Any = Field(default=None, sa_type=sa.JSON)
    updated_at: dt.datetime = _at(nullable=False, default_factory=utcnow)


# --------------------------------------------------------------------------- network


class PeerBase(SQLModel):
    """A remote AE we exchange DICOM with."""

    name: str = Field(unique=True)
    ae_title: str = Field(index=True)
    host: str
    port: int
    allow_send: bool = True  # it may send to us
    receive_results: bool = False  # we send results to it
    description: str = ""
    stable_age_seconds: int | None = None  # overrides DCMFLOW_STABLE_AGE for its series
    tls: bool = False  # TLS only, both ways: it is refused over plain TCP, and results go to it over TLS


class Peer(PeerBase, table=True):
    """Table of peers."""

    id: int | None = Field(default=None, primary_key=True)
    created_at: dt.datetime = _at(nullable=False, default_factory=utcnow)


class PeerPublic(PeerBase):
    """Read-only view of a peer."""

    id: int
    created_at: dt.datetime


class NodeBase(SQLModel):
    """A local DICOM listener of ours."""

    name: str = Field(unique=True)
    ae_title: str
    host: str = "0.0.0.0"  # bind address
    port: int = 11112


class Node(NodeBase, table=True):
    """Table of local listeners."""

    id: int | None = Field(default=None, primary_key=True)


class NodePublic(NodeBase):
    """Read-only view of a node."""

    id: int


# --------------------------------------------------------------------------- services


class ServiceBase(SQLModel):
    """One installed version of a processing service."""

    name: str = Field(index=True)
    version: int = 1
    content_hash: str
    source_kind: str = SourceKind.FOLDER.value
    install_path: str | None = None
    bundle_key: str | None = None  # object key of the zipped registry/ + module/
    summary: str = ""


class Service(ServiceBase, table=True):
    """Table of service versions; unique (name, version)."""

    __table_args__ = (sa.UniqueConstraint("name", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    installed_at: dt.datetime = _at(nullable=False, default_factory=utcnow)
    active: bool = True


class ServiceJobBase(SQLModel):
    """The job spec of a service version, in dcm-processor's terms (snake_case here).

    ``priority`` keeps what the spec said (``"default"``, ``"low"``, ``5``) as text;
    ``priority_rank`` is the number planners sort by (see :func:`storage.priority.priority_rank`).
    Unknown fields of a spec are kept in ``extra`` so nothing a service author wrote is lost.
    """

    job_name: str
    worker: str
    callback: str
    depends_on: list[str] = Field(default_factory=list, sa_type=sa.JSON)
    priority: str = DEFAULT_PRIORITY
    priority_rank: int = DEFAULT_PRIORITY_RANK
    timeout_seconds: int = 3600  # dcm-processor's default "1h"
    params: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)
    sort_position: int = 999
    description: str = ""
    channel: str | None = None
    disabled: bool = False
    retries: int = 0
    retry_delay_seconds: int = 0
    level: str = JobLevel.SERIES.value
    extra: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)


class ServiceJob(ServiceJobBase, table=True):
    """Table of job specs; unique (service_id, job_name)."""

    __tablename__ = "service_job"
    __table_args__ = (sa.UniqueConstraint("service_id", "job_name"),)

    id: int | None = Field(default=None, primary_key=True)
    service_id: int = Field(foreign_key="service.id", index=True, ondelete="CASCADE")


class ServiceJobPublic(ServiceJobBase):
    """Read-only view of a job spec."""

    id: int
    service_id: int


class ServicePublic(ServiceBase):
    """Read-only view of a service version with its job specs."""

    id: int
    installed_at: dt.datetime
    active: bool
    jobs: list[ServiceJobPublic] = []


class WorkerBase(SQLModel):
    """An execution environment jobs run in."""

    name: str = Field(unique=True)
    kind: str = WorkerKind.PYTHON.value
    python: str | None = None  # interpreter path; None = the one running dcmflow
    requirements_hash: str | None = None


class Worker(WorkerBase, table=True):
    """Table of worker environments."""

    id: int | None = Field(default=None, primary_key=True)
    created_at: dt.datetime = _at(nullable=False, default_factory=utcnow)


class WorkerPublic(WorkerBase):
    """Read-only view of a worker environment."""

    id: int
    created_at: dt.datetime


# --------------------------------------------------------------------------- runs


class SessionBase(SQLModel):
    """One processing run over one series or study revision (dcm-processor G2's session)."""

    series_uid: str | None = Field(default=None, index=True)
    study_uid: str | None = Field(default=None, index=True)
    revision: int = 1
    trigger: str = ""  # e.g. "dicom.series.stable", "manual", "reprocess"
    flow_run_id: str | None = None
    state: str = SessionState.RUNNING.value
    # session_claim_key() of a triggered run; NULL for manual runs and once released
    claim_key: str | None = Field(default=None, unique=True, index=True)


class Session(SessionBase, table=True):
    """Table of processing sessions."""

    id: int | None = Field(default=None, primary_key=True)
    created_at: dt.datetime = _at(nullable=False, default_factory=utcnow)
    finished_at: dt.datetime | None = _at(default=None)


class SessionPublic(SessionBase):
    """Read-only view of a session."""

    id: int
    created_at: dt.datetime
    finished_at: dt.datetime | None


class JobBase(SQLModel):
    """One run of one service job on one series/study revision."""

    service_name: str
    service_version: int
    job_name: str
    series_uid: str | None = Field(default=None, index=True)
    study_uid: str | None = None
    revision: int = 1
    state: str = Field(default=JobState.PENDING.value, index=True)
    priority_rank: int = DEFAULT_PRIORITY_RANK
    timeout_seconds: int = 3600
    attempts: int = 0
    max_retries: int = 0
    exit_code: int | None = None
    error: str | None = None
    log_key: str | None = None  # object key of the captured log
    flow_run_id: str | None = None
    task_run_id: str | None = None


class Job(JobBase, table=True):
    """Table of job runs."""

    id: int | None = Field(default=None, primary_key=True)
    session_id: int = Field(foreign_key="session.id", index=True, ondelete="CASCADE")
    created_at: dt.datetime = _at(nullable=False, default_factory=utcnow)
    started_at: dt.datetime | None = _at(default=None)
    finished_at: dt.datetime | None = _at(default=None)


class JobPublic(JobBase):
    """Read-only view of a job run."""

    id: int
    session_id: int
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None


class SessionData(SQLModel, table=True):
    """A named JSON value of a session, scoped to one job or to the whole session.

    ``job_name`` is ``""`` (not NULL) for session-wide values: both databases treat NULLs as
    distinct in a unique constraint, so NULL would allow duplicates and defeat the upsert.
    The repository maps ``job_name=None`` to ``""``.
    """

    __tablename__ = "session_data"
    __table_args__ = (sa.UniqueConstraint("session_id", "job_name", "name"),)

    id: int | None = Field(default=None, primary_key=True)
    session_id: int = Field(foreign_key="session.id", ondelete="CASCADE")
    job_name: str = ""
    name: str
    value: Any = Field(default=None, sa_type=sa.JSON)
    updated_at: dt.datetime = _at(nullable=False, default_factory=utcnow)


class SessionFileBase(SQLModel):
    """A file a job stored for its session (bytes in the object store)."""

    job_name: str = ""  # "" = session-wide, as in SessionData
    name: str
    object_key: str
    size: int = Field(sa_type=sa.BigInteger)
    sha256: str
    content_type: str = "application/octet-stream"


class SessionFile(SessionFileBase, table=True):
    """Table of session files; unique (session_id, job_name, name)."""

    __tablename__ = "session_file"
    __table_args__ = (sa.UniqueConstraint("session_id", "job_name", "name"),)

    id: int | None = Field(default=None, primary_key=True)
    session_id: int = Field(foreign_key="session.id", ondelete="CASCADE")
    created_at: dt.datetime = _at(nullable=False, default_factory=utcnow)


class SessionFilePublic(SessionFileBase):
    """Read-only view of a session file."""

    id: int
    session_id: int
    created_at: dt.datetime


# --------------------------------------------------------------------------- DICOM records


class PatientBase(SQLModel):
    """A patient as the modality described it (PS3.3 C.7.1.1 Patient Module)."""

    patient_id: str = Field(default="", index=True)
    name: str = ""
    birth_date: str = ""  # raw DA
    sex: str = ""


class Patient(PatientBase, table=True):
    """Table of patients.

    ``patient_key`` is the SHA-256 of PatientID, or of name::birth date::sex when the ID is
    empty, or of the Study UID when all are empty: the seed's ``PatientUID`` rule, so two
    anonymous studies never merge into one patient.
    """

    id: int | None = Field(default=None, primary_key=True)
    patient_key: str = Field(unique=True)


class PatientPublic(PatientBase):
    """Read-only view of a patient."""

    id: int
    patient_key: str


class StudyBase(SQLModel):
    """A study (PS3.3 C.7.2.1 General Study Module) and its completeness state."""

    study_uid: str = Field(unique=True)
    date: str = ""  # raw DA
    time: str = ""  # raw TM
    description: str = ""
    accession_number: str = ""
    referring_physician: str = ""
    modalities: str = ""  # backslash-joined, as ModalitiesInStudy
    revision: int = 1
    state: str = Field(default=SeriesState.RECEIVING.value, index=True)
    expected_series_count: int | None = None
    emitted_revision: int | None = None  # last revision a dicom.study.stable event went out for
    claimed_by: str | None = None
    received_claimed_by: str | None = None  # who claimed its dicom.study.received event


class Study(StudyBase, table=True):
    """Table of studies.

    Two partial indexes keep the completeness monitor's work proportional to what is
    pending, not to the size of the archive: ``ix_study_unemitted`` holds only stable
    studies whose current revision was not marked emitted (recovery), and
    ``ix_study_received_unemitted`` only studies whose ``dicom.study.received`` was not
    marked emitted. Their predicates are repeated verbatim by the repository's queries
    (SQLite uses a partial index only when the query's WHERE contains its terms).
    """

    __table_args__ = (
        sa.Index(
            "ix_study_unemitted",
            "state",
            "claimed_at",
            postgresql_where=sa.text(UNEMITTED_PREDICATE),
            sqlite_where=sa.text(UNEMITTED_PREDICATE),
        ),
        sa.Index(
            "ix_study_received_unemitted",
            "received_claimed_at",
            postgresql_where=sa.text(RECEIVED_UNEMITTED_PREDICATE),
            sqlite_where=sa.text(RECEIVED_UNEMITTED_PREDICATE),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    patient_id: int = Field(foreign_key="patient.id", index=True)
    last_received_at: dt.datetime | None = _at(default=None)
    stable_at: dt.datetime | None = _at(default=None)
    claimed_at: dt.datetime | None = _at(default=None)
    received_claimed_at: dt.datetime | None = _at(default=None)
    received_emitted_at: dt.datetime | None = _at(default=None)  # dicom.study.received went out


class StudyPublic(StudyBase):
    """Read-only view of a study."""

    id: int
    patient_id: int
    last_received_at: dt.datetime | None
    stable_at: dt.datetime | None
    claimed_at: dt.datetime | None
    received_claimed_at: dt.datetime | None
    received_emitted_at: dt.datetime | None


class SeriesBase(SQLModel):
    """A series (PS3.3 C.7.3.1 General Series Module) and its completeness state.

    ``revision`` starts at 1 and grows each time an instance arrives after the series was
    declared stable; ``emitted_revision`` is the last revision a ``dicom.series.stable``
    event was emitted for, which makes that event exactly-once per revision.
    """

    series_uid: str = Field(unique=True)
    modality: str = ""
    number: int | None = None
    description: str = ""
    body_part: str = ""
    revision: int = 1
    state: str = SeriesState.RECEIVING.value
    instance_count: int = 0  # distinct SOP Instance UIDs
    expected_instance_count: int | None = None
    calling_ae: str = ""  # of the last association that sent to it
    emitted_revision: int | None = None
    claimed_by: str | None = None


class Series(SeriesBase, table=True):
    """Table of series; ``(state, last_received_at)`` indexed for the completeness scan.

    ``ix_series_unemitted`` is partial: only stable series whose current revision was not
    marked emitted are in it, so the monitor's recovery step reads only those. Its leading
    ``state`` column (constant inside it) lets SQLite's planner prefer it over
    ``ix_series_state_last_received_at`` for the same ``state = 'stable'`` term.
    """

    __table_args__ = (
        sa.Index("ix_series_state_last_received_at", "state", "last_received_at"),
        sa.Index(
            "ix_series_unemitted",
            "state",
            "claimed_at",
            postgresql_where=sa.text(UNEMITTED_PREDICATE),
            sqlite_where=sa.text(UNEMITTED_PREDICATE),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    study_id: int = Field(foreign_key="study.id", index=True)
    first_received_at: dt.datetime | None = _at(default=None)
    last_received_at: dt.datetime | None = _at(default=None)
    stable_at: dt.datetime | None = _at(default=None)
    claimed_at: dt.datetime | None = _at(default=None)


class SeriesPublic(SeriesBase):
    """Read-only view of a series, with its study UID."""

    id: int
    study_id: int
    study_uid: str
    first_received_at: dt.datetime | None
    last_received_at: dt.datetime | None
    stable_at: dt.datetime | None
    claimed_at: dt.datetime | None


class InstanceBase(SQLModel):
    """One stored version of a SOP instance (PS3.3 C.12.1 SOP Common Module).

    Version 1 is the first bytes received; a re-send with different bytes becomes version
    n+1 beside it, never an overwrite. The latest version of a SOP is the one with no higher
    version, which is why no "latest" flag is kept: older rows are never touched again.
    """

    sop_uid: str
    version: int = 1
    sop_class_uid: str = ""
    transfer_syntax_uid: str = ""
    instance_number: int | None = None
    size: int = Field(sa_type=sa.BigInteger)  # enhanced multi-frame objects exceed 2 GiB
    sha256: str
    object_key: str
    calling_ae: str = ""
    series_revision: int = 1  # the series revision it arrived in


class Instance(InstanceBase, table=True):
    """Table of instance versions; unique (sop_uid, version)."""

    __table_args__ = (sa.UniqueConstraint("sop_uid", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    series_id: int = Field(foreign_key="series.id", index=True)
    received_at: dt.datetime = _at(nullable=False)


class InstancePublic(InstanceBase):
    """Read-only view of an instance version."""

    id: int
    series_id: int
    received_at: dt.datetime


# --------------------------------------------------------------------------- associations


class Association(SQLModel, table=True):
    """An open DICOM association (PS3.8 §7.1) that may still send instances.

    Rows exist only while the association is open; ``association_closed`` deletes them. A
    receiver that dies leaves rows behind, so the completeness scan ignores rows not touched
    for longer than its ``association_timeout``.
    """

    id: str = Field(primary_key=True)
    calling_ae: str = ""
    opened_at: dt.datetime = _at(nullable=False, default_factory=utcnow)
    touched_at: dt.datetime = _at(nullable=False, default_factory=utcnow)


class AssociationSeries(SQLModel, table=True):
    """A series an open association has sent to (no FK: the series row may not exist yet)."""

    __tablename__ = "association_series"

    association_id: str = Field(foreign_key="association.id", primary_key=True, ondelete="CASCADE")
    series_uid: str = Field(primary_key=True, index=True)
