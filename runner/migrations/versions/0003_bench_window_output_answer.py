"""Benchmark windows and the output check: `benchwindow` keeps what each bench execution's window read
(prefix-cache state, energy counters, notes) and `outputanswer` each run's answers to the fixed prompts.
Both are new tables; no existing row changes.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _run_id() -> sa.Column:
    return sa.Column("run_id", sa.Integer(), sa.ForeignKey("run.id", ondelete="CASCADE"), nullable=False)


def upgrade() -> None:
    op.create_table(
        "benchwindow",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("bench_result_id", sa.Integer(), sa.ForeignKey("benchresult.id", ondelete="CASCADE"),
                  nullable=False),
        _run_id(),
        sa.Column("prefix_cache_state", sa.String(), nullable=True),
        sa.Column("detail_json", sa.String(), nullable=False),
    )
    op.create_index("ix_benchwindow_bench_result_id", "benchwindow", ["bench_result_id"])
    op.create_index("ix_benchwindow_run_id", "benchwindow", ["run_id"])
    op.create_table(
        "outputanswer",
        sa.Column("id", sa.Integer(), primary_key=True),
        _run_id(),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("prompt", sa.String(), nullable=False),
        sa.Column("token_ids_json", sa.String(), nullable=False),
        sa.Column("text", sa.String(), nullable=False),
        sa.Column("finish_reason", sa.String(), nullable=True),
        sa.Column("max_tokens", sa.Integer(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
    )
    op.create_index("ix_outputanswer_run_id", "outputanswer", ["run_id"])


def downgrade() -> None:
    op.drop_table("outputanswer")
    op.drop_table("benchwindow")
