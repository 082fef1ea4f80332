"""jobs.delivered_at: when the bot posted a job's outcome to Discord (None: still owed).

Jobs that had already finished before this revision were delivered by the bot of the time (which
kept no record), so they are backfilled with their finish time; unfinished ones stay NULL, so the
bot posts their outcome once they end, also after a restart.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 11:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True))
    op.execute(
        "UPDATE jobs SET delivered_at = COALESCE(finished_at, created_at) "
        "WHERE status IN ('done', 'failed', 'cancelled')"
    )


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("delivered_at")
