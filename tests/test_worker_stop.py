"""A worker stopped with SIGTERM or SIGINT: its runs in flight stop their processes and end `interrupted` with a
reason naming the signal, before the worker exits (not left `active` until a restarted worker finds them).

Real `servelab worker` / `servelab run` processes on a real store; the one stand-in is vLLM: a `vllm` package put
first on the worker's PYTHONPATH whose `serve` answers /health and /v1/models (the executor's readiness proof) and
whose `bench serve` prints vLLM's main-run line and waits, so the run is benchmarking when the signal comes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from runner import api
from runner.config import RunSpec
from runner.server import free_port, port_is_free
from runner.store import Store
from tests.e2e.conftest import assert_no_run_processes, run_processes, wait_status

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "runner.cli"]
STAND_IN = """
import http.server, json, sys, time


def main():
    args = sys.argv[1:]
    if args[0] != "serve":  # bench serve: the measured requests start, and take their time
        print("Starting main benchmark run", flush=True)
        time.sleep(600)
        return
    port = int(args[args.index("--port") + 1])
    name = args[args.index("--served-model-name") + 1] if "--served-model-name" in args else args[1]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"data": [{"id": name}]}).encode() if self.path.startswith("/v1/models") else b""
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever(0.05)
"""


@pytest.fixture
def data(tmp_path: Path) -> Path:
    cli = tmp_path / "stand-in" / "vllm" / "entrypoints" / "cli"
    cli.mkdir(parents=True)
    for package in (cli, cli.parent, cli.parent.parent):
        (package / "__init__.py").write_text("")
    (cli / "main.py").write_text(STAND_IN)
    folder = tmp_path / "data"
    folder.mkdir()
    return folder


def environment(data: Path) -> dict[str, str]:
    return {**os.environ, "SERVELAB_DATA": str(data), "SERVELAB_DB": str(data / "servelab.db"),
            "SERVELAB_BENCH_CLIENT": "0", "SERVELAB_SAMPLE_INTERVAL": "0.5",
            "PYTHONPATH": f"{data.parent / 'stand-in'}:{REPO}"}


@pytest.mark.parametrize(("command", "sig", "exit_code"), [
    ("worker", signal.SIGTERM, 0),
    ("worker", signal.SIGINT, 0),
    ("run", signal.SIGTERM, 1),  # `servelab run` executes in a worker of its own; it fails when its run did
], ids=["worker-SIGTERM", "worker-SIGINT", "run-SIGTERM"])
def test_a_stopped_worker_ends_its_runs_interrupted_naming_the_signal(data: Path, command: str, sig: signal.Signals,
                                                                      exit_code: int) -> None:
    store = Store(str(data / "servelab.db"))
    spec = {"launch": {"model": "org/model", "port": free_port(18700)}, "bench": {"num-prompts": 4}}
    if command == "worker":
        run_id = api.queue_run(store, RunSpec.parse(spec)).id
        argv = [*CLI, "worker", "--poll", "0.2"]
    else:
        (data / "run.yaml").write_text(yaml.safe_dump(spec))
        run_id, argv = 1, [*CLI, "run", str(data / "run.yaml")]
    proc = subprocess.Popen(argv, env=environment(data), cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not store.list_runs() and time.monotonic() < deadline:  # `servelab run` queues it first
            time.sleep(0.1)
        run = wait_status(store, run_id, {"benchmarking"}, 60)
        deadline = time.monotonic() + 30
        while len(run_processes(data)) < 2 and time.monotonic() < deadline:  # the server and the benchmark
            time.sleep(0.1)
        server_pid, members = run.server_pid, run_processes(data)
        assert server_pid is not None and len(members) == 2, [p.cmdline() for p in members]
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == exit_code
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # decided before the worker exited: no restarted worker is needed to find it
    after = store.get_run(run_id)
    assert after.status.value == "interrupted"
    assert after.failure_reason == (f"the worker was stopped by {sig.name} while the run was benchmarking; "
                                    "queue it again to rerun")
    assert after.finished_at is not None and after.phase == "interrupted"
    assert [p.phase for p in store.phases(run_id)][-1] == "stopped"  # the executor's teardown ran
    assert_no_run_processes(data, within_s=0)  # stopped by the worker, not left for the groups' guards
    assert not psutil.pid_exists(server_pid) or psutil.Process(server_pid).status() == psutil.STATUS_ZOMBIE
    assert port_is_free(after.port)
    store.close()
