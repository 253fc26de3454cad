"""Exactly one session per triggered (series or study, revision): ``session.claim_key``.

* ``session.claim_key`` (nullable): ``series/<uid>/<revision>`` or ``study/<uid>/<revision>``,
  set when a triggered run inserts its session. The unique index ``ix_session_claim_key``
  lets one insert win; a second trigger of the same revision finds the key taken. Manual
  runs, sessions from before this revision and released (crashed) sessions keep NULL, which
  both databases allow any number of times.

Existing sessions are left unclaimed: a revision processed before the upgrade may be
processed once more if its trigger fires again.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel  # noqa: F401  (autogenerate renders sqlmodel.sql.sqltypes.AutoString)
from alembic import op


revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('session', schema=None) as batch_op:
        batch_op.add_column(sa.Column('claim_key', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
    op.create_index(op.f('ix_session_claim_key'), 'session', ['claim_key'], unique=True)


def downgrade() -> None:
    op.drop_index(op.f('ix_session_claim_key'), table_name='session')
    with op.batch_alter_table('session', schema=None) as batch_op:
        batch_op.drop_column('claim_key')
