"""Store against real databases: every test that takes `store` runs on a fresh SQLite file and on a fresh
database of a real PostgreSQL server (the session's cluster, tests/conftest.py); a few are SQLite's own."""

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from runner import migrations
from runner.errors import StoreError
from runner.models import RunSource, RunStatus
from runner.store import Store, default_db_url, resolve_url

SEED_TP8 = {
    "date": "20251106-153458", "backend": "vllm", "model_id": "moonshotai/Kimi-K2-Thinking",
    "completed": 998, "failed": 2, "request_rate": float("inf"), "duration": 800.26,
    "request_throughput": 1.25, "output_throughput": 485.78, "mean_ttft_ms": 271196.67,
    "median_ttft_ms": 227389.87, "p99_ttft_ms": 686294.46, "p90_ttft_ms": 500000.0,
    "ttfts": [1.0, 2.0], "errors": ["", ""], "std_ttft_ms": None,
}  # fmt: skip


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    """A store on each backend (the root conftest's `db_url`)."""
    s = Store(db_url)
    yield s
    s.close()


def test_run_crud_and_timestamps(store: Store) -> None:
    run = store.create_run(label="TP8", model="moonshotai/Kimi-K2-Thinking", tensor_parallel_size=8)
    assert run.id is not None and run.status is RunStatus.queued and run.source is RunSource.launched
    assert run.created_at.tzinfo is not None
    started = datetime(2025, 11, 6, 15, 34, 58, tzinfo=timezone(timedelta(hours=8)))
    updated = store.update_run(run.id, status=RunStatus.ready, started_at=started, progress=0.5, phase="ready")
    assert updated.status is RunStatus.ready and updated.progress == 0.5
    assert updated.started_at == started and updated.started_at.tzinfo == UTC
    fetched = store.get_run(run.id)
    assert fetched.created_at == run.created_at and fetched.created_at.tzinfo == UTC
    assert store.update_run(run.id, status="succeeded").status is RunStatus.succeeded  # strings work too


def test_unknown_run_and_field_say_what_to_do(store: Store) -> None:
    with pytest.raises(StoreError, match=r"no run 42; `servelab runs` lists them"):
        store.get_run(42)
    with pytest.raises(StoreError, match="no run 42"):
        store.update_run(42, label="x")
    with pytest.raises(StoreError, match="no run 42"):
        store.delete_run(42)
    with pytest.raises(StoreError, match="no run 42"):
        store.add_bench_result(42, {"completed": 1})
    with pytest.raises(StoreError, match="no run 42"):
        store.add_phase(42, "launched")
    with pytest.raises(StoreError, match="no field.*tp_size"):
        store.create_run(label="x", tp_size=8)


def test_list_runs_newest_first_and_filtered(store: Store) -> None:
    sweep = store.create_sweep("tp-vs-dcp", json.dumps({"axes": {"dcp": [1, 8]}}))
    a = store.create_run(label="a", model="m1")
    b = store.create_run(label="b", model="m2", sweep_id=sweep.id, sweep_cell="dcp=8")
    c = store.create_run(label="c", model="m1", status=RunStatus.failed, source=RunSource.imported)
    assert [r.label for r in store.list_runs()] == ["c", "b", "a"]
    assert [r.id for r in store.list_runs(model="m1")] == [c.id, a.id]
    assert [r.id for r in store.list_runs(status="queued")] == [b.id, a.id]
    assert [r.id for r in store.list_runs(status=[RunStatus.failed, RunStatus.queued], limit=2)] == [c.id, b.id]
    assert [r.id for r in store.list_runs(sweep_id=sweep.id)] == [b.id]
    assert [(s.id, s.name, s.spec_json) for s in store.list_sweeps()] == [(sweep.id, "tp-vs-dcp", '{"axes": {"dcp": [1, 8]}}')]
    frame = store.runs_frame(model="m1")
    assert list(frame["label"]) == ["c", "a"] and list(frame["status"]) == ["failed", "queued"]
    assert frame.columns[0] == "id" and "request_throughput" in frame.columns


def test_bench_results_keep_scalars_and_feed_compare(store: Store) -> None:
    run = store.create_run(label="TP8")
    store.add_bench_result(run.id, SEED_TP8, repeat=0, bench_spec_json="{}", raw_path="r0.json")
    store.add_bench_result(run.id, {**SEED_TP8, "request_throughput": 1.35}, repeat=1)
    results = store.bench_results(run.id)
    assert [r.repeat for r in results] == [0, 1]
    assert results[0].request_throughput == 1.25 and results[0].mean_ttft_ms == 271196.67
    assert results[0].request_goodput is None and results[0].raw_path == "r0.json"
    metrics = store.run_metrics(run.id)
    assert metrics[0]["p90_ttft_ms"] == 500000.0 and metrics[0]["request_rate"] == float("inf")
    assert metrics[0]["std_ttft_ms"] is None
    assert not {"date", "backend", "model_id", "ttfts", "errors"} & set(metrics[0])
    frame = store.runs_frame()
    assert frame.loc[0, "request_throughput"] == pytest.approx(1.30)

    from runner.compare import gain_table

    (row,) = gain_table(metrics, metrics, ["request_throughput"])
    assert row.n_a == 2 and row.change == 0


def test_eval_results_and_phases(store: Store) -> None:
    run = store.create_run(label="TP8")
    scores = [
        {"task": "gsm8k", "filter": "flexible-extract", "metric": "exact_match", "value": 0.9416, "stderr": 0.0065, "n_shot": 5, "version": 3},
        {"task": "gsm8k", "filter": "strict-match", "metric": "exact_match", "value": 0.9409, "stderr": 0.0065, "n_shot": 5},
    ]  # fmt: skip
    assert store.add_eval_results(run.id, scores) == 2
    assert [(e.filter, e.value, e.stderr) for e in store.eval_results(run.id)] == [
        ("flexible-extract", 0.9416, 0.0065),
        ("strict-match", 0.9409, 0.0065),
    ]
    store.add_phase(run.id, "ready", t=20.0)
    store.add_phase(run.id, "launched", t=10.0, detail="pid 666657")
    before = time.time()
    store.add_phase(run.id, "stopped")
    phases = store.phases(run.id)
    assert [p.phase for p in phases] == ["launched", "ready", "stopped"]
    assert phases[0].detail == "pid 666657" and phases[2].t >= before


def test_delete_run_cascades(store: Store) -> None:
    keep, gone = store.create_run(label="keep"), store.create_run(label="gone")
    for run in (keep, gone):
        store.add_bench_result(run.id, {"completed": 1})
        store.add_eval_results(run.id, [{"task": "t", "metric": "acc", "value": 1.0}])
        store.add_samples([{"run_id": run.id, "t": 1.0, "gpu_index": 0, "util_pct": 50.0}])
        store.add_phase(run.id, "launched")
    store.delete_run(gone.id)
    with pytest.raises(StoreError):
        store.get_run(gone.id)
    assert not store.bench_results(gone.id) and not store.eval_results(gone.id) and not store.phases(gone.id)
    assert store.samples_frame([gone.id]).empty
    assert len(store.bench_results(keep.id)) == 1 and len(store.samples_frame([keep.id])) == 1


def test_sqlite_file_uses_wal_and_pragmas(db_path: Path) -> None:
    store = Store(db_path)
    assert store.journal_mode() == "wal"
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000
    store.close()


def test_in_memory_store_works_across_sessions() -> None:
    with Store("sqlite://") as s:
        run = s.create_run(label="mem")
        s.add_samples([{"run_id": run.id, "t": float(i)} for i in range(5)])
        assert s.get_run(run.id).label == "mem" and len(s.samples_frame([run.id])) == 5
        assert s.revision() == migrations.head()


def test_claim_run_gives_each_queued_run_to_one_worker(store: Store, db_url: str) -> None:
    ids = [store.create_run(label=f"r{i}").id for i in range(60)]
    store.update_run(ids[0], status=RunStatus.cancelled)
    barrier = threading.Barrier(2)

    def work(worker: str) -> list[int]:
        with Store(db_url) as own:  # one engine per worker, as two processes would have
            barrier.wait()
            return [run_id for run_id in ids if own.claim_run(run_id, worker)]

    with ThreadPoolExecutor(max_workers=2) as pool:  # .result() re-raises a worker's exception
        futures = {w: pool.submit(work, w) for w in ("w1", "w2")}
        claimed = {w: f.result(timeout=60) for w, f in futures.items()}
    assert not set(claimed["w1"]) & set(claimed["w2"])
    assert sorted(claimed["w1"] + claimed["w2"]) == ids[1:]
    for worker, run_ids in claimed.items():
        assert {(store.get_run(i).status, store.get_run(i).worker_id) for i in run_ids} <= {(RunStatus.starting, worker)}
    assert store.claim_run(ids[1], "w3") is False  # claimed already
    assert store.claim_run(ids[0], "w3") is False and store.get_run(ids[0]).status is RunStatus.cancelled


def test_ten_thousand_samples_insert_fast(store: Store) -> None:
    run = store.create_run(label="telemetry")
    rows = [
        {"run_id": run.id, "t": 1_700_000_000.0 + i // 8, "gpu_index": i % 8, "util_pct": 90.0, "mem_used_mib": 120_000.0, "power_w": None}
        for i in range(10_000)
    ]  # fmt: skip
    start = time.perf_counter()
    assert store.add_samples(rows) == 10_000
    assert time.perf_counter() - start < 2.0
    frame = store.samples_frame([run.id])
    assert len(frame) == 10_000 and frame["power_w"].isna().all() and frame["temp_c"].isna().all()


def test_samples_downsampled_per_run_keeping_whole_ticks(store: Store) -> None:
    long, short = store.create_run(label="long"), store.create_run(label="short")
    rows = [{"run_id": long.id, "t": float(t), "gpu_index": g} for t in range(1000) for g in (0, 1)]
    rows += [{"run_id": long.id, "t": float(t), "gpu_index": None, "kv_cache_usage_perc": 0.5} for t in range(1000)]
    rows += [{"run_id": short.id, "t": float(t), "gpu_index": 0} for t in range(10)]
    store.add_samples(rows)
    frame = store.samples_frame([long.id, short.id], max_points=100)
    per_run = frame.groupby("run_id")["t"].nunique()
    assert per_run[long.id] == 100 and per_run[short.id] == 10
    assert (frame[frame.run_id == long.id].groupby("t").size() == 3).all()  # every GPU row of a kept tick
    assert frame[frame.run_id == long.id]["t"].iloc[[0, -1]].tolist() == [0.0, 990.0]
    with pytest.raises(StoreError, match="unknown column"):
        store.add_samples([{"run_id": long.id, "t": 1.0, "gpu_util": 3}])
    with pytest.raises(StoreError, match="samples rejected"):
        store.add_samples([{"run_id": 999, "t": 1.0}])


def test_default_url_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SERVELAB_DB", raising=False)
    monkeypatch.setenv("SERVELAB_DATA", str(tmp_path / "d"))
    assert default_db_url() == f"sqlite:///{tmp_path / 'd' / 'servelab.db'}"
    monkeypatch.setenv("SERVELAB_DB", str(tmp_path / "env.db"))
    with Store() as s:
        s.create_run(label="via env")
    assert (tmp_path / "env.db").exists()
    with Store(resolve_url(tmp_path / "env.db")) as s:
        assert [r.label for r in s.list_runs()] == ["via env"]
    monkeypatch.setenv("SERVELAB_DB", "sqlite://")
    assert default_db_url() == "sqlite://"
    assert resolve_url("postgresql://u@h/db") == "postgresql://u@h/db"


def test_postgresql_url_opens_with_psycopg_3(postgres) -> None:
    name = postgres.create_database()
    try:
        with Store(postgres.url(name).replace("postgresql+psycopg://", "postgresql://")) as s:
            assert s.engine.dialect.driver == "psycopg" and not s.is_sqlite and s.journal_mode() == ""
            assert [r.label for r in s.list_runs()] == []
    finally:
        postgres.drop_database(name)
