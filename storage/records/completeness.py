"""Completeness (DESIGN.md "completeness monitor"): stable and received claims, emitted marks.

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
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from storage import models as m
from storage.db import write_transaction
from storage.records._core import (
    RECEIVING,
    STABLE,
    T_ASSOC,
    T_ASSOC_SERIES,
    T_INSTANCE,
    T_PATIENT,
    T_PEER,
    T_SERIES,
    T_STUDY,
    RecordsCore,
    _for_update,
    _require_aware,
    _seconds,
)

# The subqueries of a due study, built once: the completeness monitor claims 4 times a second,
# and building the alias's column collection anew was most of an idle receiver's CPU.
_S = sa.alias(T_SERIES, "s")
_STUDY_HAS_SERIES = sa.select(1).select_from(_S).where(_S.c.study_id == T_STUDY.c.id).exists()
_STUDY_HAS_PENDING_SERIES = (
    sa.select(1)
    .select_from(_S)
    .where(
        _S.c.study_id == T_STUDY.c.id,
        sa.or_(_S.c.state == RECEIVING, _S.c.emitted_revision.is_(None), _S.c.emitted_revision < _S.c.revision),
    )
    .exists()
)

__all__ = [
    "CompletenessRecords",
    "DEFAULT_ASSOCIATION_TIMEOUT",
    "DEFAULT_RECLAIM_AFTER",
    "MAX_CLAIM_ADDED_SOP_UIDS",
    "SeriesClaim",
    "StudyReceivedClaim",
    "StudyClaim",
]


DEFAULT_ASSOCIATION_TIMEOUT = dt.timedelta(hours=1)
"""Open-association rows untouched this long stop blocking claims (a receiver died)."""

DEFAULT_RECLAIM_AFTER = dt.timedelta(seconds=60)
"""A ``dicom.study.received`` claim not marked emitted this long is handed to another claimer."""

MAX_CLAIM_ADDED_SOP_UIDS = 1000
"""SOP Instance UIDs of a revision listed in a :class:`SeriesClaim` (the first, in UID order)."""


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


def _unemitted_ids(conn: Connection, table: sa.Table, claimed_before: dt.datetime, limit: int) -> list[int]:
    """Ids of ``table``'s rows claimed stable by ``claimed_before`` but never marked emitted,
    oldest claim first (read through the partial index ``ix_series_unemitted`` / ``ix_study_unemitted``)."""
    return list(
        conn.execute(
            sa.select(table.c.id)
            .where(sa.text(m.UNEMITTED_PREDICATE), table.c.claimed_at <= claimed_before)
            .order_by(table.c.claimed_at, table.c.id)
            .limit(limit)
        ).scalars()
    )


class CompletenessRecords(RecordsCore):
    """Claims that declare series and studies stable or received, and their emitted marks."""

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
        due = (
            sa.select(T_STUDY.c.id)
            .where(
                T_STUDY.c.state == RECEIVING,
                T_STUDY.c.received_emitted_at.is_not(None),
                _STUDY_HAS_SERIES,
                ~_STUDY_HAS_PENDING_SERIES,
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
            ids = _unemitted_ids(conn, T_SERIES, claimed_before, limit)
            return self._series_claims(conn, ids) if ids else []

    def list_unemitted_studies(self, claimed_before: dt.datetime, limit: int = 100) -> list[StudyClaim]:
        """The study analogue of :meth:`list_unemitted_series` (index ``ix_study_unemitted``)."""
        _require_aware(claimed_before, "claimed_before")
        with self.engine.connect() as conn:
            ids = _unemitted_ids(conn, T_STUDY, claimed_before, limit)
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
