"""Records of received DICOM: patients, studies, series and instances.

Recording a batch of instances also moves the completeness state of their series and studies
(a new instance reopens a stable series as revision n+1); the claims that close them live in
:mod:`storage.records.completeness`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from storage import models as m
from storage.db import write_transaction
from storage.keys import validate_uid
from storage.records._core import (
    RECEIVING,
    STABLE,
    T_INSTANCE,
    T_PATIENT,
    T_SERIES,
    T_STUDY,
    RecordsCore,
    _chunks,
    _for_update,
    _insert,
    _public,
    _require_aware,
    _wrap_integrity,
)

__all__ = ["DicomRecords", "InstanceIn", "RecordStatus", "RecordOutcome"]


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


def _patient_key(i: InstanceIn) -> str:
    """The seed's PatientUID rule: PatientID, else name::birth date::sex, else the study."""
    if i.patient_id.strip():
        basis = f"id:{i.patient_id.strip()}"
    elif i.patient_name.strip() or i.patient_birth_date.strip() or i.patient_sex.strip():
        basis = f"nbs:{i.patient_name.strip()}::{i.patient_birth_date.strip()}::{i.patient_sex.strip()}"
    else:
        basis = f"study:{i.study_uid}"
    return hashlib.sha256(basis.encode()).hexdigest()


_SERIES_PUBLIC_COLS = [*T_SERIES.c, T_STUDY.c.study_uid]

class DicomRecords(RecordsCore):
    """Patients, studies, series and instances: recording received instances and reading them."""

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
