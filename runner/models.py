"""SQLModel tables of servelab. Only `runner.store` opens sessions on them.

A change to a table is a new Alembic revision in `runner/migrations/versions/` (the head schema must
equal these models: `tests/test_migrations.py` checks it on SQLite and PostgreSQL).

Timestamps are timezone-aware UTC datetimes (stored as naive UTC where the database has no zone);
sample and phase times are float epoch seconds, cheap to chart and to down-sample.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """DateTime that always hands back aware UTC datetimes (SQLite forgets zones); naive input is taken as UTC."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # raw strings reach here when read through text() queries
            value = datetime.fromisoformat(value)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _ts(index: bool = False, default_now: bool = False) -> Any:
    if default_now:
        return Field(default_factory=utcnow, sa_type=UTCDateTime, index=index)
    return Field(default=None, sa_type=UTCDateTime, index=index)


class RunStatus(StrEnum):
    """Life cycle of a run. `cancelled` (by a user) and `interrupted` (worker died) are states of their own."""

    queued = "queued"
    starting = "starting"
    ready = "ready"
    benchmarking = "benchmarking"
    evaluating = "evaluating"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    interrupted = "interrupted"


TERMINAL: frozenset[RunStatus] = frozenset(
    {RunStatus.succeeded, RunStatus.failed, RunStatus.cancelled, RunStatus.interrupted}
)
ACTIVE: frozenset[RunStatus] = frozenset(
    {RunStatus.starting, RunStatus.ready, RunStatus.benchmarking, RunStatus.evaluating}
)
"""A worker holds the run (queued runs are neither active nor terminal)."""
LIVE: frozenset[RunStatus] = ACTIVE | {RunStatus.queued}
"""Not ended yet: queued, or held by a worker (the complement of TERMINAL)."""


class RunSource(StrEnum):
    """Where a run's results came from."""

    launched = "launched"
    imported = "imported"


class Sweep(SQLModel, table=True):
    """A named group of runs generated from one SweepSpec."""

    id: int = Field(default=None, primary_key=True)  # set by the database on insert
    name: str
    spec_json: str = "{}"
    created_at: datetime = _ts(default_now=True)


class RunBase(SQLModel):
    """Fields of a run; `Run` is the table."""

    label: str = ""
    source: RunSource = RunSource.launched
    status: RunStatus = Field(default=RunStatus.queued, index=True)
    model: str | None = Field(default=None, index=True)
    tensor_parallel_size: int | None = None
    decode_context_parallel_size: int | None = None
    pipeline_parallel_size: int | None = None
    data_parallel_size: int | None = None
    spec_json: str | None = None  # the RunSpec JSON
    serve_argv_json: str | None = None
    commands_json: str | None = None  # [{"name": "bench-0-0", "argv": [...]}, …]: the bench and eval argv as run
    env_json: str | None = None
    vllm_version: str | None = None
    host: str | None = None
    gpu_inventory_json: str | None = None
    gpu_ids_json: str | None = None
    node_name: str | None = None  # the Ray node that executed the run (hostname); None on the local worker
    node_ip: str | None = None
    ray_node_id: str | None = None
    port: int | None = None
    server_pid: int | None = None
    worker_id: str | None = None
    created_at: datetime = _ts(index=True, default_now=True)
    started_at: datetime | None = _ts()
    ready_at: datetime | None = _ts()
    finished_at: datetime | None = _ts()
    kv_cache_tokens: int | None = None
    kv_cache_gib: float | None = None
    max_concurrency: float | None = None  # vLLM's "Maximum concurrency for N tokens per request: 12.3x"
    dcp_multiplier: int | None = None
    failure_reason: str | None = None
    run_dir: str | None = None
    sweep_id: int | None = Field(default=None, foreign_key="sweep.id", index=True, ondelete="SET NULL")
    sweep_cell: str | None = None
    progress: float = 0.0  # 0..1
    phase: str = ""  # human text: "waiting for /health (42 s)"
    cancel_requested: bool = False


class Run(RunBase, table=True):
    """One vLLM serving config, launched here or imported from pasted results."""

    id: int = Field(default=None, primary_key=True)  # set by the database on insert


def _run_fk(index: bool = True) -> Any:
    return Field(foreign_key="run.id", index=index, ondelete="CASCADE")


BENCH_COLUMNS: tuple[str, ...] = (
    "completed",
    "failed",
    "duration",
    "request_throughput",
    "request_goodput",
    "output_throughput",
    "total_token_throughput",
    "max_output_tokens_per_s",
    "max_concurrent_requests",
    *(f"{stat}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for stat in ("mean", "median", "p99")),
)
"""Metrics that `BenchResult` keeps as columns (all scalars are in `metrics_json` too)."""


class BenchResult(SQLModel, table=True):
    """One `vllm bench serve` execution against a run (`repeat` counts executions of one bench spec)."""

    id: int = Field(default=None, primary_key=True)  # set by the database on insert
    run_id: int = _run_fk()
    repeat: int = 0
    bench_spec_json: str | None = None
    completed: float | None = None
    failed: float | None = None
    duration: float | None = None
    request_throughput: float | None = None
    request_goodput: float | None = None
    output_throughput: float | None = None
    total_token_throughput: float | None = None
    max_output_tokens_per_s: float | None = None
    max_concurrent_requests: float | None = None
    mean_ttft_ms: float | None = None
    median_ttft_ms: float | None = None
    p99_ttft_ms: float | None = None
    mean_tpot_ms: float | None = None
    median_tpot_ms: float | None = None
    p99_tpot_ms: float | None = None
    mean_itl_ms: float | None = None
    median_itl_ms: float | None = None
    p99_itl_ms: float | None = None
    mean_e2el_ms: float | None = None
    median_e2el_ms: float | None = None
    p99_e2el_ms: float | None = None
    metrics_json: str = "{}"
    raw_path: str | None = None
    created_at: datetime = _ts(default_now=True)


class BenchWindow(SQLModel, table=True):
    """What a bench execution's window read beside its metrics: the prefix-cache state it ran in and the
    readings behind its counter and energy metrics (start/end energy counters per GPU, their source).

    A table of its own, so that database files from before it only gain a table."""

    id: int | None = Field(default=None, primary_key=True)
    bench_result_id: int = Field(foreign_key="benchresult.id", index=True, ondelete="CASCADE")
    run_id: int = _run_fk()
    prefix_cache_state: str | None = None  # cold | warm | as-is (as-is: whatever earlier requests left)
    detail_json: str = "{}"


class OutputAnswer(SQLModel, table=True):
    """A run's greedy answer to one prompt of the fixed output-check set."""

    id: int | None = Field(default=None, primary_key=True)
    run_id: int = _run_fk()
    idx: int
    prompt: str
    token_ids_json: str
    text: str = ""
    finish_reason: str | None = None
    max_tokens: int
    seed: int


class EvalResult(SQLModel, table=True):
    """One lm-eval score (task × filter × metric) of a run."""

    id: int = Field(default=None, primary_key=True)  # set by the database on insert
    run_id: int = _run_fk()
    task: str
    filter: str = "none"
    metric: str
    value: float
    stderr: float | None = None
    n_shot: int | None = None
    samples: int | None = None
    raw_path: str | None = None


class Sample(SQLModel, table=True):
    """One telemetry tick: a row per GPU, plus one with `gpu_index` None for host and server metrics.

    Every measurement is nullable: None means not supported or not available, never zero.
    """

    # in the order every read asks for (run, time, host row then GPUs): no sort, even for a 1M-row export
    __table_args__ = (sa.Index("ix_sample_run_id_t_gpu_index", "run_id", "t", "gpu_index"),)

    id: int = Field(default=None, primary_key=True)  # set by the database on insert
    run_id: int = _run_fk(index=False)  # covered by the (run_id, t, gpu_index) index
    t: float  # epoch seconds
    gpu_index: int | None = None
    util_pct: float | None = None
    mem_used_mib: float | None = None
    mem_total_mib: float | None = None
    power_w: float | None = None
    temp_c: float | None = None
    sm_clock_mhz: float | None = None
    proc_mem_mib: float | None = None
    cpu_pct: float | None = None
    rss_mib: float | None = None
    host_mem_used_pct: float | None = None
    kv_cache_usage_perc: float | None = None
    num_requests_running: float | None = None
    num_requests_waiting: float | None = None
    num_preemptions: float | None = None
    prompt_tokens: float | None = None
    generation_tokens: float | None = None
    prefix_cache_queries: float | None = None
    prefix_cache_hits: float | None = None
    note: str | None = None
    ray_node_id: str | None = None  # the node it was taken on, for runs spanning nodes; None: the run's node


class PhaseEvent(SQLModel, table=True):
    """A moment in a run's life (launched, ready, bench_start, bench_end, eval_start, eval_end, stopped, …)."""

    id: int = Field(default=None, primary_key=True)  # set by the database on insert
    run_id: int = _run_fk()
    t: float  # epoch seconds, like Sample.t
    phase: str
    detail: str | None = None


class WorkerError(SQLModel, table=True):
    """Something a worker caught that is not a run's own failure (the database went away, a run thread
    crashed): kept so that the dashboard can say it, not only the worker's console."""

    id: int = Field(default=None, primary_key=True)  # set by the database on insert
    t: float = Field(index=True)  # epoch seconds, like Sample.t
    worker_id: str
    message: str
