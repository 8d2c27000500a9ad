"""Run placement on a Ray cluster: the node a run executed on (name, IP, Ray node id). Nullable columns;
runs of the local worker keep them empty.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = ("node_name", "node_ip", "ray_node_id")


def upgrade() -> None:
    with op.batch_alter_table("run") as batch:
        for name in _COLUMNS:
            batch.add_column(sa.Column(name, sa.String(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("run") as batch:
        for name in _COLUMNS:
            batch.drop_column(name)
