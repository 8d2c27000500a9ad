"""The only module that touches the database: SQLite by default (WAL, short sessions), any SQLAlchemy URL.

The worker writes and the dashboard reads through the query functions of `Store`; callers get
detached model instances, plain dicts or DataFrames, never a session.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.pool import StaticPool
from sqlmodel import Session, SQLModel, col, select

from runner import migrations
from runner.config import Settings
from runner.errors import StoreError
from runner.models import (
    BENCH_COLUMNS,
    BenchResult,
    BenchWindow,
    EvalResult,
    OutputAnswer,
    PhaseEvent,
    Run,
    RunStatus,
    Sample,
    Sweep,
    WorkerError,
)

BUSY_TIMEOUT_MS = 15_000
_M = TypeVar("_M", bound=SQLModel)


def resolve_url(url_or_path: str | os.PathLike[str]) -> str:
    """A SQLAlchemy URL as is; a plain file path as `sqlite:///<absolute path>`; ":memory:" as in-memory SQLite."""
    text = os.fspath(url_or_path)
    if "://" in text:
        return text
    if text in (":memory:", ""):
        return "sqlite://"
    return f"sqlite:///{Path(text).expanduser().resolve()}"


def default_db_url(settings: Settings | None = None) -> str:
    """`settings.db` (a path or any SQLAlchemy URL; SERVELAB_DB) if set, else `<data dir>/servelab.db`."""
    settings = settings or Settings.from_env()
    return resolve_url(settings.db or settings.data_dir / "servelab.db")


def _is_memory(url: sa.URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    """The numeric scalars of a bench result (lists like `ttfts` and strings like `model_id` are dropped)."""
    out: dict[str, float | None] = {}
    for key, value in metrics.items():
        if value is None:
            out[key] = None
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = None if math.isnan(value) else float(value)
    return out


def _as_dict(item: Any) -> dict[str, Any]:
    if isinstance(item, Mapping):
        return dict(item)
    if is_dataclass(item) and not isinstance(item, type):
        return asdict(item)
    if hasattr(item, "model_dump"):
        return dict(item.model_dump())
    raise StoreError(f"cannot store {type(item).__name__!r}; pass a dict")


SAMPLE_COLUMNS = [c.name for c in Sample.__table__.columns]  # type: ignore[attr-defined]
SAMPLE_INSERT_COLUMNS = [c for c in SAMPLE_COLUMNS if c != "id"]
_SAMPLE_ALLOWED = frozenset(SAMPLE_INSERT_COLUMNS)


class Store:
    """A database of runs, results, telemetry and sweeps. Every method opens and closes its own session."""

    def __init__(self, url: str | os.PathLike[str] | None = None) -> None:
        self.url = resolve_url(url) if url is not None else default_db_url()
        try:
            parsed = sa.make_url(self.url)
        except sa.exc.ArgumentError as exc:
            raise StoreError(
                f"database URL {self.url!r} is not valid: {exc}; pass a file path or a SQLAlchemy URL"
            ) from exc
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")  # psycopg 3 (the `postgres` extra), not psycopg2
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000}
            if _is_memory(parsed):
                kwargs["poolclass"] = StaticPool  # one shared connection, or each would see its own empty DB
            elif parsed.database:
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        self.engine = sa.create_engine(parsed, **kwargs)
        if self.is_sqlite:
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        migrations.upgrade(self.engine, self.engine.url.render_as_string(hide_password=True))

    def __repr__(self) -> str:
        return f"Store({self.engine.url.render_as_string(hide_password=True)!r})"

    def close(self) -> None:
        """Release the engine's connections."""
        self.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing -----------------------------------------------------------------------------

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    def revision(self) -> str | None:
        """The schema revision (Alembic's) recorded in the database."""
        with self.engine.connect() as conn:
            return migrations.current(conn)

    def journal_mode(self) -> str:
        """SQLite's journal mode (`wal` for files); empty for other databases."""
        if not self.is_sqlite:
            return ""
        with self.engine.connect() as conn:
            return str(conn.exec_driver_sql("PRAGMA journal_mode").scalar()).lower()

    @staticmethod
    def _check_fields(model: type[SQLModel], fields: Iterable[str]) -> None:
        unknown = sorted(set(fields) - set(model.model_fields))
        if unknown:
            raise StoreError(
                f"{model.__name__} has no field(s) {', '.join(unknown)}; known: {', '.join(model.model_fields)}"
            )

    def _get(self, model: type[_M], key: Any, what: str, hint: str) -> _M:
        with self._session() as s:
            obj = s.get(model, key)
        if obj is None:
            raise StoreError(f"no {what} {key}; {hint}")
        return obj

    # --- runs ---------------------------------------------------------------------------------

    def create_run(self, **fields: Any) -> Run:
        """Insert a run (status `queued` unless given) and return it with its id."""
        self._check_fields(Run, fields)
        run = Run(**fields)
        with self._session() as s:
            s.add(run)
            s.commit()
            s.refresh(run)
        return run

    def get_run(self, run_id: int) -> Run:
        """The run with this id, or StoreError."""
        return self._get(Run, run_id, "run", "`servelab runs` lists them")

    def update_run(self, run_id: int, **fields: Any) -> Run:
        """Set fields of a run and return it. One UPDATE statement, so concurrent writers serialize cleanly."""
        self._check_fields(Run, fields)
        fields.pop("id", None)
        if fields:
            with self._session() as s:
                result = s.execute(sa.update(Run).where(col(Run.id) == run_id).values(**fields))
                s.commit()
            if result.rowcount == 0:  # type: ignore[attr-defined]
                raise StoreError(f"no run {run_id}; `servelab runs` lists them")
        return self.get_run(run_id)

    def _runs_query(
        self,
        status: RunStatus | str | Iterable[RunStatus | str] | None,
        model: str | None,
        sweep_id: int | None,
        limit: int | None,
        columns: Sequence[Any] = (),
    ) -> Any:
        q = select(*columns) if columns else select(Run)
        if status is not None:
            wanted = [status] if isinstance(status, str) else list(status)
            q = q.where(col(Run.status).in_([RunStatus(x) for x in wanted]))
        if model is not None:
            q = q.where(Run.model == model)
        if sweep_id is not None:
            q = q.where(Run.sweep_id == sweep_id)
        q = q.order_by(col(Run.created_at).desc(), col(Run.id).desc())
        return q.limit(limit) if limit is not None else q

    def list_runs(
        self,
        status: RunStatus | str | Iterable[RunStatus | str] | None = None,
        model: str | None = None,
        sweep_id: int | None = None,
        limit: int | None = None,
    ) -> list[Run]:
        """Runs, newest first, filtered by status (one or several), model and sweep."""
        with self._session() as s:
            return list(s.exec(self._runs_query(status, model, sweep_id, limit)).all())

    def delete_run(self, run_id: int) -> None:
        """Delete a run with its results, samples and phase events."""
        with self._session() as s:
            for model in (Sample, PhaseEvent, EvalResult, BenchWindow, OutputAnswer, BenchResult):
                s.execute(sa.delete(model).where(col(model.run_id) == run_id))
            result = s.execute(sa.delete(Run).where(col(Run.id) == run_id))
            if result.rowcount == 0:  # type: ignore[attr-defined]
                s.rollback()
                raise StoreError(f"no run {run_id}; `servelab runs` lists them")
            s.commit()

    def claim_run(self, run_id: int, worker_id: str) -> bool:
        """Atomically move run `run_id` from `queued` to `starting` for `worker_id`; False if another
        worker claimed it first or it is no longer queued.

        One UPDATE whose WHERE re-checks `status = 'queued'`. SQLite runs one writer at a time; PostgreSQL
        (read committed) makes a second worker's UPDATE wait for the first's row lock, then re-check the
        WHERE on the committed row, which no longer matches: exactly one worker gets True."""
        stmt = (
            sa.update(Run)
            .where(col(Run.id) == run_id, col(Run.status) == RunStatus.queued)
            .values(status=RunStatus.starting, worker_id=worker_id)
        )
        with self.engine.begin() as conn:
            return conn.execute(stmt).rowcount == 1

    def runs_frame(
        self,
        status: RunStatus | str | Iterable[RunStatus | str] | None = None,
        model: str | None = None,
        sweep_id: int | None = None,
        limit: int | None = None,
        with_metrics: bool = True,
        columns: Iterable[str] | None = None,
    ) -> pd.DataFrame:
        """Runs as a table (newest first); with `with_metrics`, the mean of each bench column over executions
        (over every load of a load sweep: `runner.api.runs_frame` shows one load's instead).

        `columns` (run fields and bench columns) reads only those: a table of thousands of runs then
        skips the spec, argv and env texts it does not show.
        """
        run_cols = ["id", *(f for f in Run.model_fields if f != "id")]
        metric_cols = list(BENCH_COLUMNS) if with_metrics else []
        if columns is not None:
            wanted = set(columns)
            if unknown := sorted(wanted - set(run_cols) - set(BENCH_COLUMNS)):
                raise StoreError(f"runs have no column(s) {', '.join(unknown)}; known: {', '.join(run_cols)}")
            run_cols = [c for c in run_cols if c in wanted]
            metric_cols = [c for c in metric_cols if c in wanted]
        q = self._runs_query(status, model, sweep_id, limit, columns=[getattr(Run, c) for c in run_cols])
        if metric_cols:
            # one query: the per-run means joined on, not an IN list of every run id
            means = (
                select(col(BenchResult.run_id), *(sa.func.avg(getattr(BenchResult, c)).label(c) for c in metric_cols))
                .group_by(col(BenchResult.run_id))
                .subquery()
            )
            q = q.outerjoin(means, means.c.run_id == col(Run.id)).add_columns(*(means.c[c] for c in metric_cols))
        with self.engine.connect() as conn:
            frame = pd.DataFrame(conn.execute(q).all(), columns=[*run_cols, *metric_cols])
        for name in ("status", "source"):
            if name in frame:
                frame[name] = frame[name].map(lambda v: getattr(v, "value", v))
        return frame

    # --- results ------------------------------------------------------------------------------

    def add_bench_result(
        self,
        run_id: int,
        metrics: Mapping[str, Any],
        repeat: int = 0,
        bench_spec_json: str | None = None,
        raw_path: str | None = None,
    ) -> BenchResult:
        """Store one bench execution: known metrics as columns, every numeric scalar in `metrics_json`."""
        self.get_run(run_id)
        scalars = _scalars(metrics)
        columns: dict[str, Any] = {c: scalars.get(c) for c in BENCH_COLUMNS}
        row = BenchResult(
            run_id=run_id,
            repeat=repeat,
            bench_spec_json=bench_spec_json,
            raw_path=raw_path,
            metrics_json=json.dumps(scalars),
            **columns,
        )
        with self._session() as s:
            s.add(row)
            s.commit()
            s.refresh(row)
        return row

    def bench_results(self, run_id: int) -> list[BenchResult]:
        """A run's bench executions, in repeat order."""
        q = (
            select(BenchResult)
            .where(BenchResult.run_id == run_id)
            .order_by(col(BenchResult.repeat), col(BenchResult.id))
        )
        with self._session() as s:
            return list(s.exec(q).all())

    def bench_results_of(self, run_ids: Iterable[int] | None = None) -> list[BenchResult]:
        """The bench executions of `run_ids` (every run's when None) in one query, by run, then repeat order."""
        q = select(BenchResult).order_by(col(BenchResult.run_id), col(BenchResult.repeat), col(BenchResult.id))
        if run_ids is not None:
            q = q.where(col(BenchResult.run_id).in_(list(run_ids)))
        with self._session() as s:
            return list(s.exec(q).all())

    def run_metrics(self, run_id: int) -> list[dict[str, float | None]]:
        """One dict of canonical metrics per bench execution: the input of `compare.gain_table`."""
        return [json.loads(r.metrics_json) for r in self.bench_results(run_id)]

    def add_bench_window(self, bench_result_id: int, prefix_cache_state: str | None, detail: Mapping[str, Any]) -> None:
        """Keep what a bench execution's window read (see `runner.window`) beside its result."""
        with self._session() as s:
            br = s.get(BenchResult, bench_result_id)
            if br is None:
                raise StoreError(f"no bench result {bench_result_id}")
            s.add(BenchWindow(bench_result_id=bench_result_id, run_id=br.run_id,
                              prefix_cache_state=prefix_cache_state, detail_json=json.dumps(detail)))
            s.commit()

    def bench_windows(self, run_id: int) -> dict[int, BenchWindow]:
        """A run's bench windows by bench result id (results from before windows, or imported, have none)."""
        with self._session() as s:
            rows = s.exec(select(BenchWindow).where(BenchWindow.run_id == run_id)).all()
        return {w.bench_result_id: w for w in rows}

    def add_output_answers(self, run_id: int, answers: Iterable[Mapping[str, Any]], max_tokens: int, seed: int) -> int:
        """Store a run's output-check answers (index, prompt, token_ids, text, finish_reason). Returns the count."""
        self.get_run(run_id)
        rows = [OutputAnswer(run_id=run_id, idx=a["index"], prompt=a["prompt"], text=a.get("text") or "",
                             token_ids_json=json.dumps(a["token_ids"]), finish_reason=a.get("finish_reason"),
                             max_tokens=max_tokens, seed=seed) for a in answers]
        with self._session() as s:
            s.add_all(rows)
            s.commit()
        return len(rows)

    def output_answers(self, run_id: int) -> list[OutputAnswer]:
        """A run's output-check answers in prompt order."""
        with self._session() as s:
            return list(s.exec(select(OutputAnswer).where(OutputAnswer.run_id == run_id)
                               .order_by(col(OutputAnswer.idx))).all())

    def add_eval_results(self, run_id: int, scores: Iterable[Mapping[str, Any] | Any]) -> int:
        """Store lm-eval scores (dicts, dataclasses or pydantic models; unknown keys are ignored). Returns the count."""
        self.get_run(run_id)
        known = set(EvalResult.model_fields) - {"id", "run_id"}
        rows = [EvalResult(run_id=run_id, **{k: v for k, v in _as_dict(sc).items() if k in known}) for sc in scores]
        with self._session() as s:
            s.add_all(rows)
            s.commit()
        return len(rows)

    def eval_results(self, run_id: int) -> list[EvalResult]:
        """A run's lm-eval scores, in insertion order."""
        with self._session() as s:
            return list(
                s.exec(select(EvalResult).where(EvalResult.run_id == run_id).order_by(col(EvalResult.id))).all()
            )

    # --- telemetry and phases -----------------------------------------------------------------

    def add_samples(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Bulk-insert telemetry rows in one transaction. Missing columns become None. Returns the count."""
        batch = []
        for row in rows:
            if not row.keys() <= _SAMPLE_ALLOWED:
                extra = sorted(set(row) - _SAMPLE_ALLOWED)
                known = ", ".join(SAMPLE_INSERT_COLUMNS)
                raise StoreError(f"sample has unknown column(s) {', '.join(extra)}; known: {known}")
            batch.append({name: row.get(name) for name in SAMPLE_INSERT_COLUMNS})
        if batch:
            try:
                with self.engine.begin() as conn:
                    conn.execute(sa.insert(Sample.__table__), batch)  # type: ignore[attr-defined]
            except sa.exc.IntegrityError as exc:
                raise StoreError(
                    f"samples rejected ({exc.orig}); each needs `t` and the id of an existing run"
                ) from exc
        return len(batch)

    def samples_frame(self, run_ids: Iterable[int], max_points: int | None = None) -> pd.DataFrame:
        """Telemetry of runs, ordered by run and time.

        With `max_points`, each run keeps at most that many ticks, all rows of a kept tick: its time
        span is cut into `max_points` equal slices and the first tick of each slice is kept, so long
        runs stay light to chart and runs of different lengths stay comparable in time. The ticks are
        chosen in the database, one index seek a slice: a run of a million rows sends only those it keeps.
        """
        if max_points is not None and max_points < 1:
            raise StoreError(f"max_points must be at least 1, got {max_points}")
        rows = [row for batch in self._raw_batches(samples_query(run_ids, max_points)) for row in batch]
        return pd.DataFrame.from_records(rows, columns=self.sample_columns())

    def sample_columns(self) -> list[str]:
        """The columns of `sample_batches` rows, in order."""
        return list(SAMPLE_COLUMNS)

    def sample_batches(
        self, run_ids: Iterable[int] | None = None, size: int = 20_000
    ) -> Iterator[list[tuple[Any, ...]]]:
        """Telemetry rows as plain tuples (`sample_columns` order), by run and time, in lists of `size`:
        for exports of millions of rows that need no DataFrame. `run_ids` None reads every run."""
        yield from self._raw_batches(samples_query(run_ids), size)

    def _raw_batches(self, q: sa.Select, size: int = 20_000) -> Iterator[list[tuple[Any, ...]]]:
        """Run `q` on the driver's own cursor: plain tuples, a third cheaper than SQLAlchemy rows.
        Only for columns that need no conversion (numbers and text, as every Sample column)."""
        compiled = q.compile(dialect=self.engine.dialect, compile_kwargs={"render_postcompile": True})
        params: Any = compiled.params
        if compiled.positiontup is not None:
            params = tuple(params[name] for name in compiled.positiontup)
        with self.engine.connect() as conn:
            cursor: Any = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                cursor.execute(str(compiled), params)
                while batch := cursor.fetchmany(size):
                    yield batch
            finally:
                cursor.close()

    def add_phase(self, run_id: int, phase: str, t: float | None = None, detail: str | None = None) -> PhaseEvent:
        """Record a moment in a run's life; `t` defaults to now (epoch seconds)."""
        event = PhaseEvent(run_id=run_id, phase=phase, t=time.time() if t is None else t, detail=detail)
        with self._session() as s:
            s.add(event)
            try:
                s.commit()
            except sa.exc.IntegrityError as exc:
                raise StoreError(f"no run {run_id}; `servelab runs` lists them") from exc
            s.refresh(event)
        return event

    def phases(self, run_id: int) -> list[PhaseEvent]:
        """A run's phase events in time order."""
        q = select(PhaseEvent).where(PhaseEvent.run_id == run_id).order_by(col(PhaseEvent.t), col(PhaseEvent.id))
        with self._session() as s:
            return list(s.exec(q).all())

    # --- worker errors ------------------------------------------------------------------------
    def add_worker_error(self, worker_id: str, message: str, t: float | None = None) -> WorkerError:
        """Record what a worker caught outside a run's own failure; `t` defaults to now (epoch seconds)."""
        row = WorkerError(worker_id=worker_id, message=message, t=time.time() if t is None else t)
        with self._session() as s:
            s.add(row)
            s.commit()
            s.refresh(row)
        return row

    def worker_errors(self, since: float = 0.0, limit: int = 20) -> list[WorkerError]:
        """The newest worker errors at or after `since` (epoch seconds), newest first."""
        q = (select(WorkerError).where(col(WorkerError.t) >= since)
             .order_by(col(WorkerError.t).desc(), col(WorkerError.id).desc()).limit(limit))
        with self._session() as s:
            return list(s.exec(q).all())

    # --- sweeps -------------------------------------------------------------------------------

    def create_sweep(self, name: str, spec_json: str) -> Sweep:
        """Insert a sweep and return it with its id."""
        sweep = Sweep(name=name, spec_json=spec_json)
        with self._session() as s:
            s.add(sweep)
            s.commit()
            s.refresh(sweep)
        return sweep

    def list_sweeps(self, limit: int | None = None) -> list[Sweep]:
        """Sweeps, newest first."""
        q = select(Sweep).order_by(col(Sweep.created_at).desc(), col(Sweep.id).desc())
        with self._session() as s:
            return list(s.exec(q.limit(limit) if limit is not None else q).all())


def samples_query(run_ids: Iterable[int] | None, max_points: int | None = None) -> sa.Select:
    """The SELECT behind `samples_frame` and `sample_batches`: rows of `run_ids` (None: every run) in
    (run, time, GPU) order, which is the order of the sample index, so nothing is sorted."""
    table = Sample.__table__  # type: ignore[attr-defined]
    q = sa.select(table)
    if max_points is not None:
        kept = _kept_ticks([int(r) for r in run_ids or []], max_points)
        q = q.join(kept, sa.and_(table.c.run_id == kept.c.run_id, table.c.t == kept.c.t))
    elif run_ids is not None:
        q = q.where(table.c.run_id.in_([int(r) for r in run_ids]))
    return q.order_by(table.c.run_id, table.c.t, table.c.gpu_index)


def _kept_ticks(run_ids: list[int], max_points: int) -> Any:
    """(run_id, t) of the ticks `samples_frame` keeps: per run, the first tick of each of `max_points`
    equal slices of its time span. Each slice is one seek on the (run_id, t, …) index; the CTEs are
    materialized so the database walks the few kept ticks, not the million rows."""
    table = Sample.__table__  # type: ignore[attr-defined]
    run = Run.__table__  # type: ignore[attr-defined]
    ends = table.alias("ends")
    span = (
        sa.select(
            run.c.id.label("run_id"),
            sa.select(sa.func.min(ends.c.t)).where(ends.c.run_id == run.c.id).scalar_subquery().label("lo"),
            sa.select(sa.func.max(ends.c.t)).where(ends.c.run_id == run.c.id).scalar_subquery().label("hi"),
        )
        .where(run.c.id.in_(run_ids))
        .cte("span")
    )
    span = _materialized(span)
    slices = sa.select(sa.literal(0).label("k")).cte("slice", recursive=True)
    slices = slices.union_all(sa.select((slices.c.k + 1).label("k")).where(slices.c.k + 1 < max_points))
    width = (span.c.hi - span.c.lo) / max_points
    lower = span.c.lo + width * slices.c.k
    upper = sa.case((slices.c.k == max_points - 1, span.c.hi + 1.0), else_=span.c.lo + width * (slices.c.k + 1))
    probe = table.alias("probe")
    first = sa.select(sa.func.min(probe.c.t)).where(
        probe.c.run_id == span.c.run_id, probe.c.t >= lower, probe.c.t < upper
    )
    kept = sa.select(span.c.run_id, first.scalar_subquery().label("t")).select_from(span.join(slices, sa.true()))
    return _materialized(kept.cte("kept"))


def _materialized(cte: sa.CTE) -> sa.CTE:
    """Ask SQLite (3.35+) and PostgreSQL (12+) to compute a CTE once, as a table, instead of folding it into the
    outer query (PostgreSQL folded in, a 3,000-row down-sampling took 15 s)."""
    cte = cte.prefix_with("MATERIALIZED", dialect="postgresql")
    return cte.prefix_with("MATERIALIZED", dialect="sqlite") if sqlite3.sqlite_version_info >= (3, 35) else cte


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer; no-op for :memory:
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")  # safe with WAL, much faster commits
    cur.close()
