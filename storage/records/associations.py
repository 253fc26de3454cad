"""Open DICOM associations, as the receiver's notification handlers report them.

Open associations are rows in ``association`` / ``association_series``, written by the
receiver's notification handlers (:meth:`~Repository.association_opened`,
:meth:`~Repository.association_touched_series`, :meth:`~Repository.association_closed`). A
receiver that crashes cannot close its rows, so rows untouched for ``association_timeout``
(default one hour) no longer block anything.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

import sqlalchemy as sa

from storage import models as m
from storage.db import write_transaction
from storage.keys import validate_uid
from storage.records._core import (
    T_ASSOC,
    T_ASSOC_SERIES,
    RecordsCore,
    _insert,
    _require_aware,
    _upsert,
)

__all__ = ["AssociationRecords"]


class AssociationRecords(RecordsCore):
    """Open DICOM associations, which keep the series they touched from being claimed."""

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
