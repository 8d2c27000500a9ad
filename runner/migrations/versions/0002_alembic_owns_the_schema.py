"""Alembic owns the schema: `alembic_version` replaces `meta.schema_version`, and a store from before
the (run_id, t, gpu_index) sample index gets it in place of the (run_id, t) one it supersedes.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_table("meta")
    present = {ix["name"] for ix in sa.inspect(op.get_bind()).get_indexes("sample")}
    if "ix_sample_run_id_t" in present:
        op.drop_index("ix_sample_run_id_t", "sample")
    if "ix_sample_run_id_t_gpu_index" not in present:
        op.create_index("ix_sample_run_id_t_gpu_index", "sample", ["run_id", "t", "gpu_index"])


def downgrade() -> None:
    meta = op.create_table("meta", sa.Column("key", sa.String(), primary_key=True),
                           sa.Column("value", sa.String(), nullable=False))
    op.bulk_insert(meta, [{"key": "schema_version", "value": "1"}])
