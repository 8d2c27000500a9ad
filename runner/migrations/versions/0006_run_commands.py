"""The command lines a run executed, stored as it ran them: `commands_json` holds every `vllm bench serve`
(warm-ups included) and the `lm_eval` argv, in order (`vllm serve`'s was already in `serve_argv_json`).
Nullable: runs stored before it keep it empty, and their commands are shown re-rendered, marked as such.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("run") as batch:
        batch.add_column(sa.Column("commands_json", sa.String(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("run") as batch:
        batch.drop_column("commands_json")
