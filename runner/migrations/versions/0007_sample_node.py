"""Telemetry of multi-node runs: the Ray node a sample row was taken on (a run on a group spanning nodes has a
sampler on each). Nullable; rows of single-node runs keep it empty (their node is the run's).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("sample") as batch:
        batch.add_column(sa.Column("ray_node_id", sa.String(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sample") as batch:
        batch.drop_column("ray_node_id")
