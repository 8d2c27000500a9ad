"""Sampler cost: CPU seconds the telemetry sampler spends per second of sampling, at 1 Hz and 10 Hz.

Everything is the product's own code path (`runner.telemetry.Sampler` writing to a real SQLite store
through `Store.add_samples`), with one fake: NVML, since this machine has no GPU (8 fake H200s, so a
tick writes the 9 rows a GPU node writes). `/metrics` is scraped for real over HTTP:

    python benchmarks/sampler_cost.py           # from a real vLLM-CPU server (the generated tiny Llama)
    python benchmarks/sampler_cost.py --quick   # from a local HTTP server (another process) serving a
                                                # captured vLLM-CPU 0.32 /metrics of a busy server
                                                # (to `/metrics/?name[]=…` its named samples, as vLLM)

The cost is the sampler thread's own CPU time (`time.thread_time` around its loop), checked against
the process's CPU time over the same window. Target: < 0.5 % of a core at 1 Hz.

With a real server it also prints the other side of a scrape: the CPU vLLM's own processes spend
rendering the sampler's scrape and a whole `/metrics` page (scrapes back to back for 5 s, against
5 s without, the idle server's own use subtracted), a cost the sampler puts on the server it measures.

Last line: `sampler_cost ratio=<x>`, CPU seconds per second at 1 Hz (0.005 is 0.5 % of a core).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from _common import ROOT, TimedSampler, cpu_speed_ms, demo_launch, demo_model, figure, free_bench_port, say, spread, tree_pids

from runner.commands import serve_argv, vllm_prefix
from runner.execute import server_env
from runner.server import VllmServer
from runner.store import Store
from runner.telemetry import METRIC_COLUMNS, MetricsReader
from tests.test_telemetry import FakeGpu, FakeNvml

FIXTURE = ROOT / "tests/fixtures/cpu_0.32/metrics_busy.txt"
TARGET = 0.005

_FIXTURE_SERVER = """
import http.server, re, sys, urllib.parse
full = open(sys.argv[1], "rb").read()
def only(names):  # what vLLM's /metrics/?name[]=... answers: the named samples with their HELP and TYPE
    keep = lambda line: re.split(r"[{ ]", line.split(" ", 3)[2] if line.startswith("#") else line, 1)[0]
    families = {n.removesuffix("_total") for n in names}
    return "".join(l for l in full.decode().splitlines(True) if keep(l) in names | families).encode()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        path, _, query = self.path.partition("?")
        names = set(urllib.parse.parse_qs(query).get("name[]", []))
        body = only(names) if path == "/metrics/" and names else full
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), H).serve_forever()
"""


def measure(store: Store, run_id: int, url: str, pid: int, hz: float, seconds: float) -> tuple[float, float, int]:
    """(thread CPU s per s, process CPU s per s, ticks) of one sampler at `hz` for `seconds`."""
    gpus = [FakeGpu(used_mib=70_000, util_pct=97, procs=[(pid, 69_000 * 2**20)]) for _ in range(8)]
    sampler = TimedSampler(run_id, store.add_samples, interval_s=1 / hz, metrics_url=url, server_pid=pid,
                           nvml=FakeNvml(gpus))
    cpu0, t0 = time.process_time(), time.perf_counter()
    sampler.start()
    time.sleep(seconds)
    sampler.stop()
    wall = time.perf_counter() - t0
    process = (time.process_time() - cpu0) / wall
    return sampler.thread_cpu_s / wall, process, sampler.samples_taken


def server_cost_per_scrape(url: str, pids: list[int], window_s: float = 5.0) -> float:
    """CPU seconds the server's processes spend per `/metrics` GET (their idle use subtracted)."""
    def cpu() -> float:
        total = 0.0
        for pid in pids:
            try:
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    c0, t0 = cpu(), time.perf_counter()
    time.sleep(window_s)
    idle_rate = (cpu() - c0) / (time.perf_counter() - t0)
    n, c0, t0 = 0, cpu(), time.perf_counter()
    with httpx.Client() as client:
        while time.perf_counter() - t0 < window_s:
            client.get(url).raise_for_status()
            n += 1
    busy = cpu() - c0 - idle_rate * (time.perf_counter() - t0)
    return busy / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="captured /metrics from a local HTTP server")
    ap.add_argument("--seconds", type=float, help="sampling time per measurement (default 60, quick 15)")
    ap.add_argument("--repeat", type=int, default=3, help="measurements per rate")
    args = ap.parse_args()
    seconds = args.seconds or (15.0 if args.quick else 60.0)
    speed0 = cpu_speed_ms()
    work = Path(tempfile.mkdtemp(prefix="servelab-sampler-"))
    port = free_bench_port()

    if args.quick:
        say(f"/metrics: {FIXTURE.name} served by a local HTTP server on port {port}")
        server = subprocess.Popen([sys.executable, "-c", _FIXTURE_SERVER, str(FIXTURE), str(port)])
        pid, stop = server.pid, server.terminate
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                httpx.get(base + "/metrics").raise_for_status()
                break
            except httpx.HTTPError:
                time.sleep(0.1)
    else:
        launch = demo_launch(demo_model(work), port)
        vllm = VllmServer(serve_argv(launch, prefix=vllm_prefix()), server_env(launch, [], cpu=True),
                          work / "server.log", port)
        say(f"/metrics: a real vLLM-CPU server on port {port} (tiny Llama) …")
        pid, stop = vllm.start(), vllm.stop
        vllm.wait_ready(600)
        base = vllm.base_url
        # a few requests, so the histograms /metrics reports are filled as in a busy run
        for _ in range(4):
            httpx.post(base + "/v1/completions", json={"model": str(launch.model), "prompt": "hello", "max_tokens": 8},
                       timeout=60).raise_for_status()
    size = len(httpx.get(base + "/metrics").content)
    probe = MetricsReader(base + "/metrics", timeout_s=2, names=METRIC_COLUMNS)
    scraped = len(probe.get())
    filtered_url = base + (probe.filtered_path if probe.filtered else "/metrics")
    say(f"  /metrics is {size / 1024:.0f} KiB; the sampler's scrape "
        + (f"asks for its {len(METRIC_COLUMNS)} metrics only: {scraped} bytes" if probe.filtered else "reads it all"))

    store = Store(work / "servelab.db")
    run_id = store.create_run(label="sampler cost").id
    results: dict[float, list[tuple[float, float, int]]] = {1.0: [], 10.0: []}
    try:
        # the first sampler of a process pays one-time costs (imports, first connection, compiled SQL)
        # that no later run pays again: a short warm-up, dropped
        row = measure(store, run_id, base + "/metrics", pid, 10.0, 3.0)
        say(f"  warm-up: sampler thread {row[0] * 100:.3f} % of a core at 10 Hz for 3 s (dropped)")
        for _ in range(args.repeat):
            for hz in results:
                row = measure(store, run_id, base + "/metrics", pid, hz, seconds)
                results[hz].append(row)
                say(f"  {hz:>4g} Hz: sampler thread {row[0] * 100:.3f} % of a core, process {row[1] * 100:.3f} %, "
                    f"{row[2]} ticks in {seconds:.0f} s")
        if not args.quick:
            for what, url in (("the sampler's scrape", filtered_url), ("a whole /metrics page", base + "/metrics")):
                per = [server_cost_per_scrape(url, tree_pids(pid)) for _ in range(3)]
                say(f"vLLM's side, {what}: {spread([x * 1000 for x in per])} ms of server CPU a scrape, "
                    f"i.e. {statistics.median(per) * 100:.2f} % of a core at 1 Hz")
    finally:
        stop()
        store.close()
    for hz, rows in results.items():
        say(f"{hz:g} Hz: thread CPU s/s {spread([r[0] for r in rows])}; process CPU s/s {spread([r[1] for r in rows])}")
        figure(f"sampler_cost_{hz:g}hz", ratio=statistics.median(r[0] for r in rows))
    one_hz = statistics.median(r[0] for r in results[1.0])
    say(f"target < {TARGET} at 1 Hz: {'met' if one_hz < TARGET else 'NOT met'}")
    say(f"CPU speed at the end: reference loop {cpu_speed_ms():.1f} ms (at the start {speed0:.1f} ms; lower is faster)")
    figure("sampler_cost", ratio=one_hz)


if __name__ == "__main__":
    main()
