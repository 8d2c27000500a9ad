"""Telemetry beside a run: NVML per GPU, psutil for the server's process tree, vLLM's `/metrics`.

The sampler runs in its own thread, never blocks the benchmark and never crashes the run: a source
that fails becomes a note on the sample, and the other sources go on. NVML is injectable, so the
"GPU vanished" scenario can be tested at that seam only.
"""

from __future__ import annotations

import http.client
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

import psutil

from runner.errors import ParseError
from runner.parsers import parse_prometheus

# `/metrics` sample name → Sample column.
METRIC_COLUMNS = {
    "vllm:kv_cache_usage_perc": "kv_cache_usage_perc",
    "vllm:num_requests_running": "num_requests_running",
    "vllm:num_requests_waiting": "num_requests_waiting",
    "vllm:num_preemptions_total": "num_preemptions",
    "vllm:prompt_tokens_total": "prompt_tokens",
    "vllm:generation_tokens_total": "generation_tokens",
    "vllm:prefix_cache_queries_total": "prefix_cache_queries",
    "vllm:prefix_cache_hits_total": "prefix_cache_hits",
}
log = logging.getLogger(__name__)

MIB = 1024 * 1024
TREE_REFRESH_S = 5.0
"""How often the sampler re-walks the server's process tree at first (a walk reads every process of
the host); each walk that finds the same processes doubles that, up to TREE_REFRESH_MAX_S."""
TREE_REFRESH_MAX_S = 60.0


def load_nvml() -> ModuleType | None:
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


class GpuReader:
    """Reads NVML field by field; "not supported" becomes None, a lost GPU a flagged row."""

    def __init__(self, nvml: ModuleType | None, indices: list[int] | None = None):
        self.nvml = nvml
        self._nvml_error: tuple[type[BaseException], ...] = (nvml.NVMLError,) if nvml is not None else ()
        self.note: str | None = None
        self.handles: dict[int, Any] = {}
        if nvml is None:
            self.note = "nvidia-ml-py is not installed: GPU sampling is off"
            return
        try:
            nvml.nvmlInit()
            count = nvml.nvmlDeviceGetCount()
            wanted = indices if indices is not None else list(range(count))
            self.handles = {i: nvml.nvmlDeviceGetHandleByIndex(i) for i in wanted if i < count}
        except nvml.NVMLError as exc:  # no GPU, no driver (NVMLError_LibraryNotFound), …
            self.note = f"no NVIDIA GPU or driver ({exc}): GPU sampling is off"
            self.handles = {}

    def inventory(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        nv = self.nvml
        if nv is None:
            return out
        for i, h in self.handles.items():
            row: dict[str, Any] = {"index": i}
            name = self._field(nv.nvmlDeviceGetName, h)
            row["name"] = _text(name) if name is not None else None
            mem = self._field(nv.nvmlDeviceGetMemoryInfo, h)
            row["mem_total_mib"] = mem.total / MIB if mem else None
            row["mem_free_mib"] = mem.free / MIB if mem else None
            out.append(row)
        return out

    def _field(self, read: Callable[..., Any], *args: Any) -> Any:
        """One NVML read; None when NVML says no (not supported on this GPU, no permission, …).
        Anything else is a bug and is raised."""
        try:
            return read(*args)
        except self._nvml_error:
            return None

    def read(self, pids: set[int]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        nv = self.nvml
        if nv is None:
            return rows
        for i, h in self.handles.items():
            try:
                nv.nvmlDeviceGetMemoryInfo(h)  # a lost GPU fails here first
            except nv.NVMLError as exc:
                rows.append({"gpu_index": i, "note": f"GPU {i} lost: {exc}"})
                continue
            util = self._field(nv.nvmlDeviceGetUtilizationRates, h)
            mem = self._field(nv.nvmlDeviceGetMemoryInfo, h)
            power = self._field(nv.nvmlDeviceGetPowerUsage, h)
            temp = self._field(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU)
            sm_clock = self._field(nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_SM)
            procs = self._field(nv.nvmlDeviceGetComputeRunningProcesses, h) or []
            proc_mem = sum((p.usedGpuMemory or 0) for p in procs if p.pid in pids)
            rows.append(
                {
                    "gpu_index": i,
                    "util_pct": float(util.gpu) if util else None,
                    "mem_used_mib": mem.used / MIB if mem else None,
                    "mem_total_mib": mem.total / MIB if mem else None,
                    "power_w": power / 1000.0 if power is not None else None,
                    "temp_c": float(temp) if temp is not None else None,
                    "sm_clock_mhz": float(sm_clock) if sm_clock is not None else None,
                    "proc_mem_mib": proc_mem / MIB if procs else None,
                }
            )
        return rows

    def close(self) -> None:
        if self.handles and self.nvml is not None:
            self._field(self.nvml.nvmlShutdown)


def gpu_memory_used_mib(indices: list[int], nvml: ModuleType | None | bool = True) -> dict[int, float]:
    """Memory used on each of `indices` now (empty without NVML): the idle level before a launch
    and the check that a stopped run gave its memory back."""
    reader = GpuReader(load_nvml() if nvml is True else (nvml or None), indices)
    try:
        rows = reader.read(set())
        return {row["gpu_index"]: row["mem_used_mib"] for row in rows if row.get("mem_used_mib") is not None}
    finally:
        reader.close()


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class MetricsReader:
    """GETs a Prometheus endpoint over one kept-alive HTTP/1.1 connection.

    The stdlib client, not httpx: the sampler pays for a scrape every tick, and http.client costs
    0.43 ms of CPU a GET against httpx.Client's 1.5 ms; swapped in, httpx doubled the whole sampler's
    CPU (`benchmarks/sampler_cost.py`, docs/performance.md, "httpx and Core inserts").

    With `names`, it asks for those samples only (`/metrics/?name[]=…`): vLLM's `/metrics/` is
    prometheus_client's own app, which renders only the collectors named, so the server spends a
    seventh of a full scrape's CPU and sends under 2 KB instead of 50–60 KiB. (Plain
    `/metrics` is a route that ignores the query.) A server that answers the filtered request with
    none of the names — another exporter, or vLLM's multi-process registry, which names no
    collectors — or with an error is read in full from then on; `filtered` says which it is
    (None until the first answer).
    """

    def __init__(self, url: str, timeout_s: float, names: Iterable[str] = ()):
        parts = urllib.parse.urlsplit(url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.https else 80)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.names = tuple(names)
        query = urllib.parse.urlencode([*urllib.parse.parse_qsl(parts.query), *(("name[]", n) for n in self.names)])
        self.filtered_path = parts.path.rstrip("/") + "/?" + query
        self.filtered: bool | None = None if self.names else False
        self.timeout_s = timeout_s
        self._conn: http.client.HTTPConnection | None = None
        self._reused = False

    def get(self) -> str:
        """The body as text; OSError or http.client.HTTPException when the endpoint does not answer 200."""
        if self.filtered is False:
            return self._get(self.path)
        try:
            body = self._get(self.filtered_path)
        except _HttpStatus:
            if self.filtered:
                raise
            body = ""
        if self.filtered is None:
            self.filtered = any(name in body for name in self.names)
        return body if self.filtered else self._get(self.path)

    def _get(self, path: str) -> str:
        while True:
            if self._conn is None:
                kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
                self._conn, self._reused = kind(self.host, self.port, timeout=self.timeout_s), False
            try:
                self._conn.request("GET", path)
                resp = self._conn.getresponse()
                body = resp.read()
            except (OSError, http.client.HTTPException):
                retry = self._reused  # the server may have closed an idle kept-alive connection: once more, fresh
                self.close()
                if retry:
                    continue
                raise
            self._reused = True
            if resp.status != 200:
                raise _HttpStatus(f"HTTP {resp.status} from {path}")
            return body.decode("utf-8", "replace")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class _HttpStatus(http.client.HTTPException):
    """The endpoint answered, with another status than 200."""


def process_tree(pid: int | None) -> list[psutil.Process]:
    if pid is None:
        return []
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


class Sampler:
    """Samples at `interval_s` in a daemon thread and hands rows to `sink` in batches."""

    def __init__(
        self,
        run_id: int,
        sink: Callable[[list[dict[str, Any]]], Any],
        *,
        interval_s: float = 1.0,
        metrics_url: str | None = None,
        server_pid: Callable[[], int | None] | int | None = None,
        gpu_indices: list[int] | None = None,
        nvml: ModuleType | None | bool = True,
        flush_every_s: float = 5.0,
    ):
        self.run_id = run_id
        self.sink = sink
        self.interval_s = interval_s
        self.metrics_url = metrics_url
        self._pid = server_pid if callable(server_pid) else (lambda: server_pid)
        self.gpus = GpuReader(load_nvml() if nvml is True else (nvml or None), gpu_indices)
        self.flush_every_s = flush_every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"sampler-{run_id}", daemon=True)
        self._buffer: list[dict[str, Any]] = []
        self._buffer_lock = threading.Lock()  # flush() may come from another thread than the loop's
        self._metrics: MetricsReader | None = None
        self.scrape_from(metrics_url)
        self._cpu_seen: dict[int, psutil.Process] = {}
        self._tree: list[psutil.Process] = []
        self._tree_key: tuple[int | None, float] = (None, 0.0)  # (root pid, when walked)
        self._tree_every, self._tree_stale = TREE_REFRESH_S, False
        self._clock = time.monotonic
        self.samples_taken = 0
        self.errors = 0

    def scrape_from(self, metrics_url: str | None) -> None:
        """Read vLLM's `/metrics` at `metrics_url` from the next tick on; None stops reading it.

        The executor calls it only once the server's identity is proven, and with None when that server is
        gone: what another process answers on the port is never stored.
        """
        self.metrics_url = metrics_url
        timeout_s = min(2.0, max(0.2, self.interval_s))
        # the old reader's connection closes when it is collected (the sampler thread may be using it now)
        self._metrics = MetricsReader(metrics_url, timeout_s, names=METRIC_COLUMNS) if metrics_url else None

    def start(self) -> Sampler:
        if self.gpus.note:
            self._buffer.append({"run_id": self.run_id, "t": time.time(), "note": self.gpus.note})
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=max(5.0, 3 * self.interval_s))
        self._flush()
        if (reader := self._metrics) is not None:
            reader.close()
        self.gpus.close()

    def _loop(self) -> None:
        last_flush = time.monotonic()
        next_tick = time.monotonic()
        while not self._stop.is_set():
            try:
                rows = self.sample()
                self.samples_taken += 1
            except Exception as exc:  # the sampler never crashes the run
                log.exception("run %s: a telemetry sample failed; a note row stands in for it", self.run_id)
                self.errors += 1
                rows = [{"run_id": self.run_id, "t": time.time(), "note": f"sampler error: {exc}"}]
            with self._buffer_lock:
                self._buffer.extend(rows)
            if time.monotonic() - last_flush >= self.flush_every_s:
                self._flush()
                last_flush = time.monotonic()
            next_tick = max(next_tick + self.interval_s, time.monotonic())  # no burst after a slow tick
            self._stop.wait(max(0.0, next_tick - time.monotonic()))

    def flush(self) -> None:
        """Hand the buffered rows to the sink now (a benchmark window reads them back)."""
        self._flush()

    def _flush(self) -> None:
        with self._buffer_lock:
            rows, self._buffer = self._buffer, []
        if rows:
            try:
                self.sink(rows)
            except Exception:
                log.exception("run %s: %d telemetry rows could not be stored and are dropped", self.run_id, len(rows))
                self.errors += 1

    def sample(self) -> list[dict[str, Any]]:
        """One tick: a host/server row plus one row per GPU, all with the same timestamp."""
        t = time.time()
        tree = self._process_tree()
        host: dict[str, Any] = {"run_id": self.run_id, "t": t, "gpu_index": None}
        host.update(self._process_stats(tree))
        host["host_mem_used_pct"] = psutil.virtual_memory().percent
        reader, pid = self._metrics, self._pid()
        if reader is not None and (pid is None or pid in self._cpu_seen):  # the server's root process is alive
            host.update(self._scrape(reader))
        rows = [host]
        for g in self.gpus.read({p.pid for p in tree}):
            rows.append({"run_id": self.run_id, "t": t, **g})
        return rows

    def _process_tree(self) -> list[psutil.Process]:
        """The server's process tree, re-walked when its root changes, one of its processes is gone, or
        the walk is due: vLLM starts its engine and workers once, so the interval between walks doubles
        from TREE_REFRESH_S while they find the same processes, up to TREE_REFRESH_MAX_S."""
        pid, now = self._pid(), self._clock()
        root_pid, walked = self._tree_key
        if pid != root_pid or self._tree_stale or now - walked >= self._tree_every:
            tree = process_tree(pid)
            same = (bool(tree) and pid == root_pid and not self._tree_stale
                    and [p.pid for p in tree] == [p.pid for p in self._tree])
            self._tree_every = min(2 * self._tree_every, TREE_REFRESH_MAX_S) if same else TREE_REFRESH_S
            self._tree, self._tree_key, self._tree_stale = tree, (pid, now), False
        return self._tree

    def _process_stats(self, tree: list[psutil.Process]) -> dict[str, Any]:
        if not tree:
            self._cpu_seen = {}
            return {}
        cpu, rss, measured = 0.0, 0.0, False
        alive = {}
        for p in tree:
            seen = p.pid in self._cpu_seen
            proc = self._cpu_seen.get(p.pid, p)  # cpu_percent needs the same object across ticks
            try:
                pct = proc.cpu_percent(None)  # the first call of a process always says 0.0
                rss += proc.memory_info().rss
                alive[p.pid] = proc
            except psutil.Error:
                self._tree_stale = True  # gone (or no longer ours): walk again next tick
                continue
            if seen:
                cpu += pct
                measured = True
        self._cpu_seen = alive
        return {"cpu_pct": cpu if measured else None, "rss_mib": rss / MIB}

    @staticmethod
    def _scrape(metrics: MetricsReader) -> dict[str, Any]:
        try:
            values = parse_prometheus(metrics.get())
        except (OSError, http.client.HTTPException, ParseError) as exc:
            return {"note": f"/metrics unavailable: {type(exc).__name__}"}
        return {col: values[name] for name, col in METRIC_COLUMNS.items() if name in values}
