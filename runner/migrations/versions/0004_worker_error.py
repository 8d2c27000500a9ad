"""Worker errors: `workererror` keeps what a worker caught outside a run's own failure (the database went
away, a run thread crashed), so the dashboard can show it. A new table; no existing row changes.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "workererror",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("t", sa.Float(), nullable=False),
        sa.Column("worker_id", sa.String(), nullable=False),
        sa.Column("message", sa.String(), nullable=False),
    )
    op.create_index("ix_workererror_t", "workererror", ["t"])


def downgrade() -> None:
    op.drop_table("workererror")
