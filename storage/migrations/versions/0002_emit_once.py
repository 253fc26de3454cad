"""Exactly-once ``dicom.study.received`` and indexes of what is still to be emitted.

* ``study.received_claimed_by`` / ``received_claimed_at`` / ``received_emitted_at``: the
  claim/mark pair of ``dicom.study.received`` (as ``claimed_*`` / ``emitted_revision`` are
  for ``dicom.study.stable``).
* Partial indexes ``ix_series_unemitted`` and ``ix_study_unemitted`` (stable, current
  revision not marked emitted) and ``ix_study_received_unemitted`` (received event not
  marked), so the monitor reads only pending rows, however large the archive.

Existing studies whose stable event was emitted, or that are past revision 1, were announced
by the previous monitor (which announced a study before its first ``dicom.study.stable``):
they are marked received-emitted. The others are announced once more, with the same event id,
which the Prefect server de-duplicates.

The predicates are copied here as text, not imported from the models: a migration must not
change when the models do.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel  # noqa: F401  (autogenerate renders sqlmodel.sql.sqltypes.AutoString)
from alembic import op


revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNEMITTED = "state = 'stable' AND (emitted_revision IS NULL OR emitted_revision < revision)"
RECEIVED_UNEMITTED = "received_emitted_at IS NULL"


def upgrade() -> None:
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.add_column(sa.Column('received_claimed_by', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch_op.add_column(sa.Column('received_claimed_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('received_emitted_at', sa.DateTime(timezone=True), nullable=True))

    study = sa.table(
        'study',
        sa.column('revision', sa.Integer()),
        sa.column('emitted_revision', sa.Integer()),
        sa.column('stable_at', sa.DateTime(timezone=True)),
        sa.column('last_received_at', sa.DateTime(timezone=True)),
        sa.column('received_emitted_at', sa.DateTime(timezone=True)),
    )
    op.execute(
        study.update()
        .where(sa.or_(study.c.emitted_revision.is_not(None), study.c.revision > 1))
        .values(
            received_emitted_at=sa.func.coalesce(
                study.c.stable_at, study.c.last_received_at, sa.func.current_timestamp()
            )
        )
    )

    op.create_index(
        'ix_series_unemitted', 'series', ['state', 'claimed_at'], unique=False,
        postgresql_where=sa.text(UNEMITTED), sqlite_where=sa.text(UNEMITTED),
    )
    op.create_index(
        'ix_study_unemitted', 'study', ['state', 'claimed_at'], unique=False,
        postgresql_where=sa.text(UNEMITTED), sqlite_where=sa.text(UNEMITTED),
    )
    op.create_index(
        'ix_study_received_unemitted', 'study', ['received_claimed_at'], unique=False,
        postgresql_where=sa.text(RECEIVED_UNEMITTED), sqlite_where=sa.text(RECEIVED_UNEMITTED),
    )


def downgrade() -> None:
    op.drop_index('ix_study_received_unemitted', table_name='study')
    op.drop_index('ix_study_unemitted', table_name='study')
    op.drop_index('ix_series_unemitted', table_name='series')
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.drop_column('received_emitted_at')
        batch_op.drop_column('received_claimed_at')
        batch_op.drop_column('received_claimed_by')
