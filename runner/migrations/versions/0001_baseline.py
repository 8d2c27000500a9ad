"""Baseline: the schema of the stores servelab wrote before it used Alembic (their `meta` table says
`schema_version` 1). A store of that schema is stamped with this revision, not migrated through it.

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BENCH_METRICS = (
    "completed", "failed", "duration", "request_throughput", "request_goodput", "output_throughput",
    "total_token_throughput", "max_output_tokens_per_s", "max_concurrent_requests",
    *(f"{stat}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for stat in ("mean", "median", "p99")),
)  # fmt: skip
SAMPLE_MEASURES = (
    "util_pct", "mem_used_mib", "mem_total_mib", "power_w", "temp_c", "sm_clock_mhz", "proc_mem_mib", "cpu_pct",
    "rss_mib", "host_mem_used_pct", "kv_cache_usage_perc", "num_requests_running", "num_requests_waiting",
    "num_preemptions", "prompt_tokens", "generation_tokens", "prefix_cache_queries", "prefix_cache_hits",
)  # fmt: skip
RUN_STATUSES = ("queued", "starting", "ready", "benchmarking", "evaluating", "succeeded", "failed", "cancelled",
                "interrupted")


def _id() -> sa.Column:
    return sa.Column("id", sa.Integer(), primary_key=True)


def _run_id() -> sa.Column:
    return sa.Column("run_id", sa.Integer(), sa.ForeignKey("run.id", ondelete="CASCADE"), nullable=False)


def _text(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.String(), nullable=nullable)


def _when(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table("meta", sa.Column("key", sa.String(), primary_key=True), _text("value", nullable=False))
    op.create_table("sweep", _id(), _text("name", False), _text("spec_json", False), _when("created_at", False))
    op.create_table(
        "run",
        _text("label", False),
        sa.Column("source", sa.Enum("launched", "imported", name="runsource"), nullable=False),
        sa.Column("status", sa.Enum(*RUN_STATUSES, name="runstatus"), nullable=False, index=True),
        sa.Column("model", sa.String(), index=True),
        *(sa.Column(f"{kind}_parallel_size", sa.Integer())
          for kind in ("tensor", "decode_context", "pipeline", "data")),
        *(_text(name) for name in ("spec_json", "serve_argv_json", "env_json", "vllm_version", "host",
                                   "gpu_inventory_json", "gpu_ids_json")),
        sa.Column("port", sa.Integer()),
        sa.Column("server_pid", sa.Integer()),
        _text("worker_id"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
        _when("started_at"),
        _when("ready_at"),
        _when("finished_at"),
        sa.Column("kv_cache_tokens", sa.Integer()),
        sa.Column("kv_cache_gib", sa.Float()),
        sa.Column("max_concurrency", sa.Float()),
        sa.Column("dcp_multiplier", sa.Integer()),
        _text("failure_reason"),
        _text("run_dir"),
        sa.Column("sweep_id", sa.Integer(), sa.ForeignKey("sweep.id", ondelete="SET NULL"), index=True),
        _text("sweep_cell"),
        sa.Column("progress", sa.Float(), nullable=False),
        _text("phase", False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        _id(),
    )
    op.create_table(
        "benchresult",
        _id(),
        _run_id(),
        sa.Column("repeat", sa.Integer(), nullable=False),
        _text("bench_spec_json"),
        *(sa.Column(name, sa.Float()) for name in BENCH_METRICS),
        _text("metrics_json", False),
        _text("raw_path"),
        _when("created_at", False),
    )
    op.create_table(
        "evalresult",
        _id(),
        _run_id(),
        _text("task", False),
        _text("filter", False),
        _text("metric", False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("stderr", sa.Float()),
        sa.Column("n_shot", sa.Integer()),
        sa.Column("samples", sa.Integer()),
        _text("raw_path"),
    )
    op.create_table("phaseevent", _id(), _run_id(), sa.Column("t", sa.Float(), nullable=False),
                    _text("phase", False), _text("detail"))
    op.create_table(
        "sample",
        _id(),
        _run_id(),
        sa.Column("t", sa.Float(), nullable=False),
        sa.Column("gpu_index", sa.Integer()),
        *(sa.Column(name, sa.Float()) for name in SAMPLE_MEASURES),
        _text("note"),
    )
    for table in ("benchresult", "evalresult", "phaseevent"):
        op.create_index(f"ix_{table}_run_id", table, ["run_id"])
    op.create_index("ix_sample_run_id_t_gpu_index", "sample", ["run_id", "t", "gpu_index"])


def downgrade() -> None:
    for table in ("sample", "phaseevent", "evalresult", "benchresult", "run", "sweep", "meta"):
        op.drop_table(table)
    sa.Enum(name="runstatus").drop(op.get_bind(), checkfirst=True)
    sa.Enum(name="runsource").drop(op.get_bind(), checkfirst=True)
