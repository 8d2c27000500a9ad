"""The benchmark client process without a server: vLLM's own parser refuses bad arguments with the command's
exit code, the client survives it for the next job, and a vLLM without the entry point falls back to a process."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

from runner.bench_client import BenchClients, ClientJob, bench_args
from runner.commands import vllm_prefix
from runner.server import ManagedProcess

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM")


def wait(job, timeout_s: float = 240) -> int:
    deadline = time.monotonic() + timeout_s
    while (code := job.wait(1.0)) is None:
        assert time.monotonic() < deadline, "the benchmark client did not answer"
    return code


def test_bench_args_after_bench_serve():
    assert bench_args([sys.executable, "-m", "runner.vllm_entry", "bench", "serve", "--model", "m"]) == ["--model", "m"]
    with pytest.raises(ValueError, match="not a `vllm bench serve` command"):
        bench_args(["vllm", "serve", "m"])


def test_one_client_answers_jobs_in_turn_with_the_commands_exit_codes(tmp_path: Path):
    clients = BenchClients(tmp_path / "bench-client.log", use_client=True)
    try:
        clients.prestart({})  # as the executor does at launch: the import overlaps the server's startup
        assert clients.current is not None
        prestarted = clients.current.proc.pid
        bad = clients.job([*vllm_prefix(), "bench", "serve", "--no-such-flag"], {}, tmp_path / "a.log")
        assert isinstance(bad, ClientJob)
        pid = bad.start()
        assert pid == prestarted  # the first job goes to the client started before it
        assert wait(bad) == 2  # argparse's exit code, as `vllm bench serve --no-such-flag` exits
        log = (tmp_path / "a.log").read_text()
        assert "unrecognized arguments: --no-such-flag" in log and "[servelab] ran in the benchmark client" in log
        # the same process takes the next job: vLLM imported once
        refused = clients.job([*vllm_prefix(), "bench", "serve", "--model", "m", "--base-url", "http://127.0.0.1:9",
                               "--max-concurrency", "0"], {}, tmp_path / "b.log")
        assert refused.start() == pid
        assert wait(refused) == 1  # vLLM's main raised, as the command would (exit 1)
        log = (tmp_path / "b.log").read_text()
        assert "Namespace(" in log and "ValueError: --max-concurrency must be greater than 0" in log
        assert clients.current is not None and clients.current.import_s and clients.current.import_s > 0
    finally:
        clients.close()
    assert clients.current is None


def test_a_vllm_without_the_entry_point_falls_back_to_a_process(tmp_path: Path, monkeypatch):
    """Scenario that cannot be caused with the vLLM installed here: an old vLLM whose `vllm.benchmarks`
    has no `serve` module. A stand-in package on PYTHONPATH plays it; the job then runs as a process."""
    old = tmp_path / "old" / "vllm"
    (old / "benchmarks").mkdir(parents=True)
    (old / "__init__.py").write_text("")
    (old / "benchmarks" / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'old'}:{Path(__file__).resolve().parents[1]}")
    clients = BenchClients(tmp_path / "bench-client.log", use_client=True)
    job = clients.job([sys.executable, "-c", "print('ran as a process')"] + ["bench", "serve"], {},
                      tmp_path / "c.log")
    job.start()
    assert wait(job, 60) == 0
    assert clients.unsupported and "benchmarks.serve" in clients.unsupported
    assert "ran as a process" in (tmp_path / "c.log").read_text()
    assert isinstance(clients.job(["x", "bench", "serve"], {}, tmp_path / "d.log"), ManagedProcess)
    clients.prestart({})  # benchmarks run as processes now: nothing to start
    assert clients.current is None


def test_the_gate_holds_the_main_run_until_the_executor_says_go(tmp_path: Path):
    """The window opens before the first measured request: at vLLM's main-run line the client says so and waits
    for the go (a window opened by polling the log missed a request that finished first: 23 of 24 counted)."""
    import io
    import threading

    from runner.bench_client import _Gate
    from runner.commands import MAIN_RUN_LINE

    out = io.StringIO()
    gate = _Gate(out)
    gate.print("Warmup run completed.")  # other lines pass straight through
    assert out.getvalue() == ""
    gate.arm(7)
    done = threading.Event()
    threading.Thread(target=lambda: (gate.print(MAIN_RUN_LINE + "..."), done.set()), daemon=True).start()
    assert not done.wait(0.5)  # held at the line
    assert out.getvalue() == '{"id": 7, "main_run": true}\n'
    gate.go.put(6)  # a go for another job does not release it
    assert not done.wait(0.3)
    gate.go.put(7)
    assert done.wait(2.0)
    gate.print(MAIN_RUN_LINE + "...")  # once per job: the line again (no armed job) does not wait
    assert out.getvalue().count("main_run") == 1


def test_a_client_still_importing_vllm_is_ended_at_once(tmp_path: Path):
    """The executor starts the client at launch; a run whose server fails or is cancelled during startup closes it
    while it is still importing vLLM (it reads no EOF then): it must not hold the teardown for its grace period."""
    clients = BenchClients(tmp_path / "bench-client.log", use_client=True)
    clients.prestart({})
    assert clients.current is not None
    proc = clients.current.proc
    t0 = time.monotonic()
    clients.close()
    assert time.monotonic() - t0 < 3.0  # not the 5 s grace
    assert proc.poll() is not None and clients.current is None
