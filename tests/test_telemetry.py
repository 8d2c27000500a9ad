"""Telemetry: NVML read field by field, the process tree through psutil, vLLM's `/metrics` over real HTTP.

GPUs are the one thing this machine cannot provide, so NVML is a fake with named scenarios (two healthy
H200s, power not supported, a GPU lost mid-run, no driver). Everything else is real: a local HTTP server
serving a captured vLLM `/metrics`, real subprocesses, and a real SQLite store that must accept every row.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from runner.store import Store
from runner.telemetry import GpuReader, Sampler, gpu_memory_used_mib, load_nvml
from tests.conftest import LocalHTTPServer

FIXTURES = Path(__file__).parent / "fixtures" / "cpu_0.32"
MIB = 1024 * 1024
FOREIGN_PID = 4_000_001  # a process of someone else on the GPU (never in the run's tree)


# -- a fake NVML: only what cannot be caused for real here -------------------------------------------------
class NVMLError(Exception):
    """pynvml's error; its text is the driver's ("Not Supported", "GPU is lost", ...)."""


@dataclass
class FakeGpu:
    name: str | bytes = "NVIDIA H200"
    total_mib: int = 143_771
    used_mib: int = 0
    util_pct: int = 0
    power_mw: int | None = 70_000  # None: the board does not report power ("Not Supported")
    temp_c: int = 30
    sm_clock_mhz: int = 1_980
    procs: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, used bytes or None)
    lost_after_reads: int | None = None  # memory-info reads that succeed before the GPU falls off the bus
    mem_reads: int = 0
    lost: bool = False


class FakeNvml:
    """Quacks like the `pynvml` module for `GpuReader`; counts init/shutdown to check they pair up."""

    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1
    NVMLError = NVMLError

    def __init__(self, gpus: list[FakeGpu], *, init_error: str | None = None):
        self.gpus, self.init_error = gpus, init_error
        self.inits = self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.init_error:
            raise NVMLError(self.init_error)
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeGpu:
        return self.gpus[i]

    @staticmethod
    def _alive(h: FakeGpu) -> FakeGpu:
        if h.lost:
            raise NVMLError("GPU is lost")
        return h

    def nvmlDeviceGetName(self, h: FakeGpu) -> str | bytes:
        return self._alive(h).name

    def nvmlDeviceGetMemoryInfo(self, h: FakeGpu) -> SimpleNamespace:
        h.mem_reads += 1
        if h.lost_after_reads is not None and h.mem_reads > h.lost_after_reads:
            h.lost = True
        self._alive(h)
        return SimpleNamespace(total=h.total_mib * MIB, used=h.used_mib * MIB, free=(h.total_mib - h.used_mib) * MIB)

    def nvmlDeviceGetUtilizationRates(self, h: FakeGpu) -> SimpleNamespace:
        return SimpleNamespace(gpu=self._alive(h).util_pct, memory=0)

    def nvmlDeviceGetPowerUsage(self, h: FakeGpu) -> int:
        if self._alive(h).power_mw is None:
            raise NVMLError("Not Supported")
        return h.power_mw

    def nvmlDeviceGetTemperature(self, h: FakeGpu, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self._alive(h).temp_c

    def nvmlDeviceGetClockInfo(self, h: FakeGpu, clock: int) -> int:
        assert clock == self.NVML_CLOCK_SM
        return self._alive(h).sm_clock_mhz

    def nvmlDeviceGetComputeRunningProcesses(self, h: FakeGpu) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in self._alive(h).procs]


# -- the named scenarios -------------------------------------------------------------------------------
def two_healthy_h200s(run_pids: tuple[int, ...] = (), lost_after_reads: int | None = None) -> FakeNvml:
    """GPU 0 busy with the run (its processes use 60 000 + 20 000 MiB, someone else's 10 000 MiB);
    GPU 1 idle but for a foreign process. GPU 0's name comes back as bytes, as older pynvml returns it."""
    run_procs = [(pid, mib * MIB) for pid, mib in zip(run_pids, (60_000, 20_000))]
    return FakeNvml([
        FakeGpu(name=b"NVIDIA H200", used_mib=100_000, util_pct=87, power_mw=512_345, temp_c=61,
                sm_clock_mhz=1_980, procs=[*run_procs, (FOREIGN_PID, 10_000 * MIB)]),
        FakeGpu(used_mib=1_024, util_pct=0, power_mw=75_000, temp_c=29, sm_clock_mhz=345,
                procs=[(FOREIGN_PID, 1_024 * MIB)], lost_after_reads=lost_after_reads),
    ])  # fmt: skip


def power_not_supported() -> FakeNvml:
    """A board that reports everything but power."""
    return FakeNvml([FakeGpu(used_mib=2_048, util_pct=5, power_mw=None, temp_c=40, sm_clock_mhz=1_500)])


def gpu_lost_mid_run(after_reads: int) -> FakeNvml:
    """Two H200s; GPU 1 falls off the bus after `after_reads` memory reads (NVML then says "GPU is lost")."""
    return two_healthy_h200s(lost_after_reads=after_reads)


def no_driver() -> FakeNvml:
    """nvidia-ml-py installed, no driver loaded: nvmlInit fails."""
    return FakeNvml([], init_error="Driver Not Loaded")


# -- real helpers --------------------------------------------------------------------------------------
@pytest.fixture
def run_id(store: Store) -> int:
    return store.create_run(label="x").id


def assert_storable(store: Store, run_id: int, rows: list[dict[str, Any]]) -> None:
    """Every row has only `Sample` columns: the real store accepts the whole batch."""
    assert rows, "the sampler produced no rows"
    assert store.add_samples(rows) == len(rows)
    assert len(store.samples_frame([run_id])) == len(rows)


class MetricsServer(LocalHTTPServer):
    """A captured vLLM `/metrics` (optionally slow once)."""

    def __init__(self, text: str, slow_request: int | None = None, slow_s: float = 0.0):
        def respond(path: str) -> tuple[int, bytes, str]:
            if self.requests == slow_request:
                time.sleep(slow_s)
            return (200 if path == "/metrics" else 404), text.encode(), "text/plain; version=0.0.4"

        super().__init__(respond)
        self.url = self.base_url + "/metrics"


@pytest.fixture
def busy_metrics() -> Iterator[MetricsServer]:
    server = MetricsServer((FIXTURES / "metrics_busy.txt").read_text())
    yield server
    server.shutdown()


@pytest.fixture
def server_tree() -> Iterator[tuple[int, int]]:
    """A real process tree standing in for vLLM: bash (the "server") and one child (a "worker")."""
    proc = subprocess.Popen(["bash", "-c", "sleep 5 & wait"], start_new_session=True)
    deadline = time.monotonic() + 2
    children: list[psutil.Process] = []
    while not children and time.monotonic() < deadline:
        children = psutil.Process(proc.pid).children()
        time.sleep(0.01)
    assert children, "bash did not start its child"
    yield proc.pid, children[0].pid
    for p in (*children, psutil.Process(proc.pid)):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=2)


def run_sampler(sampler: Sampler, rows: list[dict[str, Any]], seconds: float = 0.5, midway: Any = None):
    """Run a real Sampler for `seconds` (calling `midway()` half way) and return the rows its sink got."""
    sampler.start()
    time.sleep(seconds / 2)
    if midway is not None:
        midway()
    ticks = sampler.samples_taken
    time.sleep(seconds / 2)
    assert sampler.samples_taken >= ticks + 2, "the sampler stopped ticking"
    sampler.stop()
    return rows


def make_sampler(run_id: int, **kw: Any) -> tuple[Sampler, list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    return Sampler(run_id, rows.extend, interval_s=0.05, **kw), rows


def host_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if "host_mem_used_pct" in r]


# -- GpuReader on the named scenarios ------------------------------------------------------------------
def test_two_healthy_h200s_read_field_by_field_with_units() -> None:
    run_pid, child_pid = 1001, 1002
    nvml = two_healthy_h200s(run_pids=(run_pid, child_pid))
    reader = GpuReader(nvml)
    assert reader.note is None and list(reader.handles) == [0, 1]

    rows = reader.read({run_pid, child_pid, 4242})  # 4242: in the tree, not on any GPU

    assert rows == [
        {"gpu_index": 0, "util_pct": 87.0, "mem_used_mib": 100_000.0, "mem_total_mib": 143_771.0, "power_w": 512.345,
         "temp_c": 61.0, "sm_clock_mhz": 1_980.0, "proc_mem_mib": 80_000.0},  # the run's two pids, not the foreign one
        {"gpu_index": 1, "util_pct": 0.0, "mem_used_mib": 1_024.0, "mem_total_mib": 143_771.0, "power_w": 75.0,
         "temp_c": 29.0, "sm_clock_mhz": 345.0, "proc_mem_mib": 0.0},  # only someone else's process there
    ]  # fmt: skip
    assert reader.inventory() == [
        {"index": 0, "name": "NVIDIA H200", "mem_total_mib": 143_771.0, "mem_free_mib": 43_771.0},
        {"index": 1, "name": "NVIDIA H200", "mem_total_mib": 143_771.0, "mem_free_mib": 142_747.0},
    ]
    reader.close()
    assert (nvml.inits, nvml.shutdowns) == (1, 1)


def test_only_the_requested_gpus_are_read() -> None:
    reader = GpuReader(two_healthy_h200s(), indices=[1, 7])  # 7 does not exist on a 2-GPU box
    assert list(reader.handles) == [1]
    assert [r["gpu_index"] for r in reader.read(set())] == [1]


def test_power_not_supported_becomes_none_and_the_rest_is_read() -> None:
    (row,) = GpuReader(power_not_supported()).read(set())
    assert row == {"gpu_index": 0, "util_pct": 5.0, "mem_used_mib": 2_048.0, "mem_total_mib": 143_771.0,
                   "power_w": None, "temp_c": 40.0, "sm_clock_mhz": 1_500.0, "proc_mem_mib": None}  # fmt: skip


def test_gpu_lost_mid_run_becomes_a_flagged_row_and_gpu_0_is_still_read() -> None:
    reader = GpuReader(gpu_lost_mid_run(after_reads=2))  # one tick reads memory twice per GPU
    first = reader.read(set())
    assert [r["gpu_index"] for r in first] == [0, 1] and first[1]["mem_used_mib"] == 1_024.0

    second = reader.read(set())

    assert second[0]["gpu_index"] == 0 and second[0]["mem_used_mib"] == 100_000.0
    assert second[1] == {"gpu_index": 1, "note": "GPU 1 lost: GPU is lost"}
    assert reader.read(set())[1]["note"].startswith("GPU 1 lost")  # and stays flagged, no exception


def test_no_driver_sets_the_note_and_reads_nothing() -> None:
    nvml = no_driver()
    reader = GpuReader(nvml)
    assert reader.note is not None and "no NVIDIA GPU or driver" in reader.note and "Driver Not Loaded" in reader.note
    assert reader.handles == {} and reader.read({1}) == [] and reader.inventory() == []
    reader.close()
    assert nvml.shutdowns == 0


def test_real_pynvml_on_a_machine_without_a_driver() -> None:
    nvml = load_nvml()
    assert nvml is not None, "nvidia-ml-py, a dependency of servelab, is not installed"
    reader = GpuReader(nvml)
    try:
        if reader.handles:
            pytest.skip("this machine has an NVIDIA driver; the no-driver path cannot be caused for real")
        assert reader.note and "GPU sampling is off" in reader.note
        assert reader.read(set()) == []
    finally:
        reader.close()


def test_without_nvidia_ml_py_the_note_says_so() -> None:
    reader = GpuReader(None)
    assert reader.note == "nvidia-ml-py is not installed: GPU sampling is off" and reader.read(set()) == []


def test_gpu_memory_used_mib() -> None:
    nvml = two_healthy_h200s()
    assert gpu_memory_used_mib([0, 1], nvml) == {0: 100_000.0, 1: 1_024.0}
    assert gpu_memory_used_mib([1], nvml) == {1: 1_024.0}
    assert (nvml.inits, nvml.shutdowns) == (2, 2)
    assert gpu_memory_used_mib([0, 1], gpu_lost_mid_run(after_reads=0)) == {0: 100_000.0}
    assert gpu_memory_used_mib([0, 1], no_driver()) == {}
    assert gpu_memory_used_mib([0], None) == {}


# -- the Sampler, running for real ---------------------------------------------------------------------
def test_sampler_scrapes_a_real_metrics_endpoint(store: Store, run_id: int, busy_metrics: MetricsServer) -> None:
    s, sink = make_sampler(run_id, metrics_url=busy_metrics.url, nvml=None, flush_every_s=0.1)
    rows = run_sampler(s, sink)

    hosts = host_rows(rows)
    assert len(hosts) >= 5 and s.errors == 0
    for row in hosts:
        assert row["run_id"] == run_id and row["gpu_index"] is None
        assert row["kv_cache_usage_perc"] == pytest.approx(0.02930045171529727)
        assert (row["num_requests_running"], row["num_requests_waiting"]) == (40.0, 0.0)
        assert (row["prompt_tokens"], row["generation_tokens"]) == (15_390.0, 23_305.0)
        assert (row["prefix_cache_queries"], row["prefix_cache_hits"]) == (15_390.0, 1_536.0)
        assert row["num_preemptions"] == 0.0
    assert_storable(store, run_id, rows)


def test_sampler_goes_on_when_metrics_stops_answering(store: Store, run_id: int) -> None:
    server = MetricsServer((FIXTURES / "metrics_busy.txt").read_text())
    s, sink = make_sampler(run_id, metrics_url=server.url, nvml=None)
    rows = run_sampler(s, sink, midway=server.shutdown)  # vLLM died: the port now refuses connections

    hosts = host_rows(rows)
    notes = [r.get("note") for r in hosts]
    first_gone = next(i for i, n in enumerate(notes) if n)
    assert first_gone >= 1 and hosts[0]["num_requests_running"] == 40.0
    after = hosts[first_gone:]
    assert len(after) >= 3, "sampling stopped with /metrics"
    assert all(r["note"].startswith("/metrics unavailable") and "num_requests_running" not in r for r in after)
    assert all(r["host_mem_used_pct"] > 0 for r in after)
    assert s.errors == 0
    assert_storable(store, run_id, rows)


def test_sampler_measures_the_server_process_tree(store: Store, run_id: int, server_tree: tuple[int, int]) -> None:
    server_pid, child_pid = server_tree
    s, sink = make_sampler(run_id, server_pid=server_pid, nvml=two_healthy_h200s(run_pids=(child_pid,)))
    rows = run_sampler(s, sink)

    hosts = host_rows(rows)
    assert len(hosts) >= 5
    assert all(0 < r["rss_mib"] < 100 for r in hosts)
    assert all(r["cpu_pct"] >= 0 for r in hosts[1:])  # the first tick may say None: nothing measured yet
    gpu0 = [r for r in rows if r.get("gpu_index") == 0]
    assert gpu0 and all(r["proc_mem_mib"] == 60_000.0 for r in gpu0)  # the child's, not the foreign process's
    assert all(r["proc_mem_mib"] == 0.0 for r in rows if r.get("gpu_index") == 1)
    assert {r["t"] for r in gpu0} <= {r["t"] for r in hosts}  # one timestamp per tick
    assert_storable(store, run_id, rows)


def test_sampler_of_a_real_sleep(store: Store, run_id: int) -> None:
    proc = subprocess.Popen(["sleep", "5"])
    try:
        rows = run_sampler(*make_sampler(run_id, server_pid=proc.pid, nvml=None))
    finally:
        proc.kill()
        proc.wait()
    hosts = host_rows(rows)
    assert len(hosts) >= 5 and all(r["rss_mib"] > 0 for r in hosts)
    assert all(isinstance(r["cpu_pct"], float) for r in hosts[1:])
    assert_storable(store, run_id, rows)


def test_sampler_with_a_gpu_lost_mid_run_keeps_running(store: Store, run_id: int) -> None:
    s, sink = make_sampler(run_id, nvml=gpu_lost_mid_run(after_reads=4))  # two ticks, then GPU 1 is gone
    rows = run_sampler(s, sink)

    lost = [i for i, r in enumerate(rows) if r.get("gpu_index") == 1 and r.get("note")]
    assert lost and all(rows[i]["note"].startswith("GPU 1 lost") for i in lost)
    assert len([r for r in rows if r.get("gpu_index") == 1 and "mem_used_mib" in r]) == 2
    gpu0_after = [r for r in rows[lost[0]:] if r.get("gpu_index") == 0]
    assert len(gpu0_after) >= 3 and all(r["mem_used_mib"] == 100_000.0 for r in gpu0_after)
    assert s.errors == 0 and s.samples_taken >= 5
    assert_storable(store, run_id, rows)


def test_sampler_without_a_driver_records_one_note_and_samples_the_host(store: Store, run_id: int) -> None:
    s, sink = make_sampler(run_id, nvml=no_driver(), server_pid=None)
    rows = run_sampler(s, sink)

    notes = [r for r in rows if "no NVIDIA GPU or driver" in (r.get("note") or "")]
    assert len(notes) == 1 and rows[0] is notes[0]
    assert len(host_rows(rows)) >= 5
    assert not [r for r in rows if r.get("gpu_index") is not None]
    assert_storable(store, run_id, rows)


def test_sampler_does_not_burst_after_a_slow_tick(run_id: int) -> None:
    server = MetricsServer((FIXTURES / "metrics_busy.txt").read_text(), slow_request=3, slow_s=0.4)
    try:
        rows = run_sampler(*make_sampler(run_id, metrics_url=server.url, nvml=None), seconds=0.8)
    finally:
        server.shutdown()
    ts = [r["t"] for r in host_rows(rows)]
    gaps = [b - a for a, b in zip(ts, ts[1:])]
    assert any(r.get("note") for r in rows), "the slow request did not time out"
    # After one tick that took 0.2 s (the scrape timeout) the next ticks should keep the 0.05 s pace,
    # not fire the four missed ones back to back.
    assert min(gaps) >= 0.025, f"ticks {min(gaps) * 1000:.1f} ms apart"


def test_cpu_of_a_busy_server_is_unmeasured_first_then_its_load(run_id: int) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    s, _ = make_sampler(run_id, server_pid=proc.pid, nvml=None)
    try:
        first = s.sample()[0]
        time.sleep(0.5)  # it is spinning at up to 100 % of a core
        second = s.sample()[0]
    finally:
        proc.kill()
        proc.wait()
        s.stop()
    # the first tick has nothing to measure against: None ("not measured yet"), not 0.0 ("idle", which is false)
    assert first["cpu_pct"] is None
    assert second["cpu_pct"] > 10, second


# -- the filtered scrape: `/metrics/?name[]=…`, served by prometheus_client's own app as vLLM mounts it --------
class PrometheusEndpoint:
    """vLLM's two `/metrics`: the exact path is a route that renders the whole registry and ignores the
    query (prometheus-fastapi-instrumentator's); `/metrics/…` reaches prometheus_client's own app
    (`make_asgi_app` there, its WSGI twin here: the same `_bake_output`, which honors `name[]`)."""

    def __init__(self, registry: Any):
        import wsgiref.simple_server

        from prometheus_client import generate_latest, make_wsgi_app

        own_app, self.paths = make_wsgi_app(registry), []

        def app(environ: dict, start_response: Any) -> list[bytes]:
            self.paths.append(environ["PATH_INFO"] + "?" + environ.get("QUERY_STRING", ""))
            if environ["PATH_INFO"] == "/metrics":
                start_response("200 OK", [("Content-Type", "text/plain")])
                return [generate_latest(registry)]
            return own_app(environ, start_response)

        class Quiet(wsgiref.simple_server.WSGIRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = wsgiref.simple_server.make_server("127.0.0.1", 0, app, handler_class=Quiet)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/metrics"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def vllm_like_registry() -> Any:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    registry = CollectorRegistry()
    labels = {"engine": "0", "model_name": "tiny"}
    Gauge("vllm:kv_cache_usage_perc", "KV", list(labels), registry=registry).labels(**labels).set(0.25)
    Gauge("vllm:num_requests_running", "running", list(labels), registry=registry).labels(**labels).set(7)
    Counter("vllm:generation_tokens", "gen", list(labels), registry=registry).labels(**labels).inc(1234)
    ttft = Histogram("vllm:time_to_first_token_seconds", "TTFT", list(labels), registry=registry,
                     buckets=[0.001 * 2**i for i in range(20)])
    for i in range(50):
        ttft.labels(**labels).observe(0.01 * i)
    return registry


def test_scrape_asks_for_the_sampled_metrics_only_and_reads_the_same_values() -> None:
    from runner.parsers import parse_prometheus
    from runner.telemetry import METRIC_COLUMNS, MetricsReader

    endpoint = PrometheusEndpoint(vllm_like_registry())
    try:
        full = MetricsReader(endpoint.url, timeout_s=2).get()
        reader = MetricsReader(endpoint.url, timeout_s=2, names=METRIC_COLUMNS)
        body = reader.get()
        assert reader.filtered is True and endpoint.paths[-1].startswith("/metrics/?name%5B%5D=vllm%3Akv_cache")
        assert "time_to_first_token" not in body and len(body) * 4 < len(full)
        values = parse_prometheus(body)
        assert values == {k: v for k, v in parse_prometheus(full).items() if k in METRIC_COLUMNS}
        assert (values["vllm:kv_cache_usage_perc"], values["vllm:num_requests_running"]) == (0.25, 7.0)
        assert values["vllm:generation_tokens_total"] == 1234.0
        reader.get()
        assert len(endpoint.paths) == 3 and endpoint.paths[-1] == endpoint.paths[-2]  # one GET a scrape
    finally:
        endpoint.shutdown()


def test_scrape_falls_back_to_the_whole_page_when_the_filter_finds_nothing_or_fails(busy_metrics) -> None:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import GaugeMetricFamily

    from runner.telemetry import METRIC_COLUMNS, MetricsReader

    class Unnamed:  # as vLLM's multi-process registry: a collector that describes no names
        def collect(self):
            yield GaugeMetricFamily("vllm:num_requests_running", "running", value=3)

    registry = CollectorRegistry()
    registry.register(Unnamed())
    endpoint = PrometheusEndpoint(registry)
    try:
        reader = MetricsReader(endpoint.url, timeout_s=2, names=METRIC_COLUMNS)
        assert "vllm:num_requests_running 3.0" in reader.get() and reader.filtered is False
        reader.get()
        assert [p.split("?")[0] for p in endpoint.paths] == ["/metrics/", "/metrics", "/metrics"]  # asked once
    finally:
        endpoint.shutdown()

    reader = MetricsReader(busy_metrics.url, timeout_s=2, names=METRIC_COLUMNS)  # 404 on /metrics/
    assert "vllm:kv_cache_usage_perc" in reader.get() and reader.filtered is False


def test_scrape_decides_on_the_first_answer_not_on_a_refused_connection() -> None:
    from runner.server import free_port
    from runner.telemetry import METRIC_COLUMNS, MetricsReader

    port = free_port(18_500)
    reader = MetricsReader(f"http://127.0.0.1:{port}/metrics", timeout_s=1, names=METRIC_COLUMNS)
    with pytest.raises(OSError):
        reader.get()  # vLLM not up yet
    assert reader.filtered is None


# -- failures are said where they are caught ------------------------------------------------------------
def test_a_batch_the_store_refuses_is_logged_with_its_size(run_id: int, caplog) -> None:
    def refusing_sink(rows: list[dict[str, Any]]) -> None:
        raise OSError("disk full")

    s = Sampler(run_id, refusing_sink, interval_s=0.05, nvml=None)
    for _ in range(3):
        s._buffer.extend(s.sample())
    with caplog.at_level(logging.ERROR, logger="runner.telemetry"):
        s.flush()
    assert s.errors == 1
    assert [(r.levelname, r.getMessage(), r.exc_info[0]) for r in caplog.records] == [
        ("ERROR", f"run {run_id}: 3 telemetry rows could not be stored and are dropped", OSError)]


def test_an_nvml_no_becomes_none_but_a_bug_in_a_field_read_is_raised() -> None:
    nvml = two_healthy_h200s()
    reader = GpuReader(nvml)
    try:
        assert [row["power_w"] for row in reader.read(set())] == [512.345, 75.0]
        nvml.gpus[1].power_mw = None  # the board says "Not Supported": an NVMLError
        assert [row["power_w"] for row in reader.read(set())] == [512.345, None]

        def broken(h: FakeGpu) -> int:
            raise TypeError("a bug, not NVML")

        nvml.nvmlDeviceGetPowerUsage = broken  # type: ignore[method-assign]
        with pytest.raises(TypeError, match="a bug, not NVML"):
            reader.read(set())
    finally:
        reader.close()
