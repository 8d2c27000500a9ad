"""Guards for the changes behind docs/performance.md: each fails if the thing that bought a figure is undone.

Structural where possible (an index, a query plan, a default), with timings only where the margin is
wide (a 2,000-run table that takes ~0.05 s must take under 1 s). The figures themselves are measured by
the scripts in benchmarks/, not here.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

from runner import api
from runner.config import BenchSpec, LaunchSpec, RunSpec, Settings
from runner.models import Run, RunStatus, utcnow
from runner.parsers import parse_prometheus
from runner.server import ManagedProcess, VllmServer, free_port
from runner.store import Store, samples_query
from runner.telemetry import TREE_REFRESH_MAX_S, TREE_REFRESH_S, MetricsReader, Sampler
from runner.worker import Worker
from tests.conftest import LocalHTTPServer

FIXTURES = Path(__file__).parent / "fixtures" / "cpu_0.32"
INDEX = "ix_sample_run_id_t_gpu_index"


def plan(store: Store, q: sa.Select) -> str:
    sql = str(q.compile(dialect=store.engine.dialect, compile_kwargs={"literal_binds": True}))
    with store.engine.connect() as conn:
        return "\n".join(row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))


# -- scale: the sample index and the queries that use it -------------------------------------------------------
def test_sample_index_serves_the_samples_queries_without_a_sort(store: Store) -> None:
    with store.engine.connect() as conn:
        names = {row[0] for row in conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert INDEX in names and "ix_sample_run_id_t" not in names

    full = plan(store, samples_query([1, 2]))
    assert f"USING INDEX {INDEX}" in full and "TEMP B-TREE" not in full, full
    everything = plan(store, samples_query(None))  # the CSV export of every run
    assert f"USING INDEX {INDEX}" in everything and "TEMP B-TREE" not in everything, everything

    down = plan(store, samples_query([1, 2], max_points=600))
    # one covering-index seek a time slice, the kept ticks fetched by (run_id, t): no scan of the runs' rows
    assert f"COVERING INDEX {INDEX} (run_id=? AND t>? AND t<?)" in down, down
    assert f"USING INDEX {INDEX} (run_id=? AND t=?)" in down, down


def test_downsampling_keeps_whole_ticks_evenly_in_time(store: Store) -> None:
    run = store.create_run(label="long")
    rows = [{"run_id": run.id, "t": 1000.0 + t, "gpu_index": g} for t in range(5000) for g in (None, 0, 1)]
    store.add_samples(rows)
    frame = store.samples_frame([run.id], max_points=50)
    ticks = sorted(frame["t"].unique())
    assert len(ticks) == 50 and ticks[0] == 1000.0 and (frame.groupby("t").size() == 3).all()
    gaps = {round(b - a) for a, b in zip(ticks, ticks[1:])}
    assert gaps == {100}
    assert store.samples_frame([run.id], max_points=10_000)["t"].nunique() == 5000  # fewer ticks than points: all
    assert store.samples_frame([], max_points=10).empty and store.samples_frame([]).empty


def _bulk_runs(store: Store, n: int) -> None:
    t0 = datetime(2025, 1, 1)
    spec = RunSpec(launch=LaunchSpec(model="org/model"), bench=[BenchSpec()]).model_dump_json()
    runs = [dict(label=f"run {i}", status=RunStatus.succeeded, source="launched", model="org/model",
                 tensor_parallel_size=1, decode_context_parallel_size=1, spec_json=spec, created_at=t0 + timedelta(minutes=i),
                 started_at=t0, finished_at=t0, progress=1.0, phase="succeeded", cancel_requested=False)
            for i in range(n)]
    with store.engine.begin() as conn:
        conn.execute(Run.__table__.insert(), runs)
    for run_id in (1, n // 2, n):
        store.add_bench_result(run_id, {"output_throughput": 100.0 + run_id, "completed": 10})


def test_runs_table_of_2000_runs_is_quick(store: Store) -> None:
    _bulk_runs(store, 2000)
    start = time.process_time()  # this process's CPU: other work on a shared machine does not count
    table = api.runs_table(store)
    frame = store.runs_frame()
    assert time.process_time() - start < 1.0
    assert len(table) == len(frame) == 2000 and "spec_json" not in table.columns and "spec_json" in frame.columns
    assert table["id"].iloc[0] == 2000  # newest first
    assert frame.set_index("id").loc[1000, "output_throughput"] == 1100.0
    assert frame["output_throughput"].notna().sum() == 3


def test_samples_export_streams_without_a_dataframe(store: Store, tmp_path: Path, monkeypatch) -> None:
    run = store.create_run(label="r")
    store.add_samples([{"run_id": run.id, "t": float(t), "gpu_index": 0, "util_pct": 50.5, "note": 'a "b", c'}
                       for t in range(3)])

    def no_frames(*a, **k):
        raise AssertionError("the export built a DataFrame")

    monkeypatch.setattr(Store, "samples_frame", no_frames)
    out = tmp_path / "samples.csv"
    assert api.export_csv(store, "samples", None, out) == 3
    lines = out.read_text().splitlines()
    assert lines[0].startswith("id,run_id,t,gpu_index,util_pct") and len(lines) == 4
    assert lines[1].startswith(f"1,{run.id},0.0,0,50.5,")
    rows = list(csv.DictReader(io.StringIO(out.read_text())))  # a note with quotes and a comma survives as one field
    assert len(rows) == 3 and rows[0]["note"] == 'a "b", c'


# -- overhead: /health polled often, finished runs wake the worker ------------------------------------------
STAND_IN = """
import http.server, os, sys
flag, port = sys.argv[1], int(sys.argv[2])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = os.path.exists(flag)
        body = b'{"data": [{"id": "stand-in"}]}' if self.path.startswith("/v1/models") else b""
        self.send_response(200 if ok else 503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever(0.05)
"""


def test_wait_ready_notices_health_within_a_quarter_second(tmp_path: Path) -> None:
    flag, port = tmp_path / "ready", free_port(18900)
    # the stand-in for vLLM is the run's own process and owns its port, as identity requires
    server = VllmServer([sys.executable, "-c", STAND_IN, str(flag), str(port)], dict(os.environ), tmp_path / "log", port)
    ManagedProcess.start(server)
    flipped: list[float] = []

    def flip() -> None:
        time.sleep(3.0)  # the stand-in is listening by then
        flipped.append(time.monotonic())
        flag.touch()

    try:
        threading.Thread(target=flip).start()
        server.wait_ready(20, tick_s=1.0)  # the store-writing tick stays at 1 s; /health is polled faster
        assert time.monotonic() - flipped[0] < 0.25
    finally:
        ManagedProcess.stop(server, grace_s=2)


def test_a_finished_run_wakes_the_worker_at_once(store: Store, tmp_path: Path) -> None:
    class Instant:
        def __init__(self, store: Store, run_id: int, *a: object, **k: object):
            self.store, self.run_id = store, run_id

        def execute(self) -> RunStatus:
            self.store.update_run(self.run_id, status=RunStatus.succeeded, finished_at=utcnow())
            return RunStatus.succeeded

    spec = RunSpec(launch=LaunchSpec(model="org/model"), bench=[BenchSpec()])
    ids = [api.queue_run(store, spec).id for _ in range(3)]
    worker = Worker(store, Settings(data_dir=tmp_path), gpu_ids=[], poll_s=30.0, executor_factory=Instant)
    start = time.monotonic()
    worker.run_forever(until=lambda: all(store.get_run(r).status == RunStatus.succeeded for r in ids))
    assert time.monotonic() - start < 5  # one at a time on the CPU backend, none waiting for the 30 s poll


# -- sampler cost: a cheap /metrics parse, a kept-alive connection, a cached process tree ----------------------
def test_prometheus_parse_is_cheap() -> None:
    """The sampler parses the page of its 8 metrics (`/metrics/?name[]=…`) every tick: ~0.1 ms. vLLM's whole
    page, read only where the filter is not honoured, ~10 ms (prometheus_client's parser, the only one)."""
    from runner.telemetry import METRIC_COLUMNS

    full = (FIXTURES / "metrics_busy.txt").read_text()
    families = {*METRIC_COLUMNS, *(n.removesuffix("_total") for n in METRIC_COLUMNS)}
    page, family = [], None
    for line in full.splitlines(keepends=True):  # the families the sampler names, as vLLM's app renders them
        if line.startswith("# HELP "):
            family = line.split()[2]
        if family in families:
            page.append(line)
    start = time.process_time()
    for _ in range(100):
        values = parse_prometheus("".join(page))
    assert time.process_time() - start < 0.1  # ~10 ms for 100
    assert values["vllm:num_requests_running"] == 40.0 and set(values) >= set(METRIC_COLUMNS)
    start = time.process_time()
    for _ in range(10):
        parse_prometheus(full)
    assert time.process_time() - start < 0.5  # ~0.1 s for 10


def test_sampler_keeps_one_connection_and_walks_the_tree_rarely(tmp_path: Path) -> None:
    body = (FIXTURES / "metrics_busy.txt").read_bytes()
    metrics = LocalHTTPServer(lambda path: (200, body, "text/plain"), keep_alive=True)
    proc = subprocess.Popen(["sleep", "30"])
    try:
        reader = MetricsReader(metrics.base_url + "/metrics", timeout_s=2)
        assert all(reader.get() == body.decode() for _ in range(5)) and metrics.connections == 1
        reader.close()

        sampler = Sampler(1, lambda rows: None, server_pid=proc.pid, nvml=None)
        first = sampler._process_tree()
        assert sampler._process_tree() is first  # no new walk before TREE_REFRESH_S
    finally:
        proc.kill()
        proc.wait()
        metrics.shutdown()


def test_a_stable_process_tree_is_walked_ever_more_rarely_and_again_at_once_when_it_changes(monkeypatch) -> None:
    from types import SimpleNamespace

    from runner import telemetry

    walks: list[float] = []
    tree = [SimpleNamespace(pid=10), SimpleNamespace(pid=11)]
    monkeypatch.setattr(telemetry, "process_tree", lambda pid: walks.append(now[0]) or list(tree))
    now = [0.0]
    sampler = Sampler(1, lambda rows: None, server_pid=10, nvml=None)
    sampler._clock = lambda: now[0]
    for t in range(200):
        now[0] = float(t)
        sampler._process_tree()
    assert walks[:5] == [0, 5, 15, 35, 75] and all(b - a == TREE_REFRESH_MAX_S for a, b in zip(walks[5:], walks[6:]))
    assert len(walks) < 10  # against 200 ticks, 40 walks at a fixed 5 s
    tree.append(SimpleNamespace(pid=12))  # vLLM started a worker: seen at the next due walk, then 5 s again
    walks.clear()
    for t in range(200, 300):
        now[0] = float(t)
        sampler._process_tree()
    assert walks[1] - walks[0] == TREE_REFRESH_S and [p.pid for p in sampler._tree] == [10, 11, 12]
    sampler._tree_stale = True  # a process of the tree was gone when its CPU was read
    walks.clear()
    sampler._process_tree()
    assert walks == [now[0]]


def test_a_process_gone_from_the_tree_makes_the_next_tick_walk_it_again() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    sampler = Sampler(1, lambda rows: None, server_pid=proc.pid, nvml=None)
    assert [p.pid for p in sampler._process_tree()] == [proc.pid]
    sampler._process_stats(sampler._tree)
    proc.kill()
    proc.wait()
    assert sampler._process_stats(sampler._tree) == {"cpu_pct": None, "rss_mib": 0.0} and sampler._tree_stale
    assert sampler._process_tree() == [] and not sampler._tree_stale  # walked at once, not in 5 s
