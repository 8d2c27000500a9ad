"""Process lifecycle with real processes (bash, sleep, small Python servers) and real sockets; no vLLM."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from runner.errors import Cancelled, RunError
from runner.server import ManagedProcess, VllmServer, free_port, port_is_free, tail

HEALTH_200 = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""

DCP_GQA_FAILURE = """
print("INFO 11-06 15:34:59 [api_server.py:1234] vLLM API server version 0.32.0", flush=True)
def create_engine_config():
    raise ValueError("Decode context parallelism for GQA/MQA requires `--tensor-parallel-size` (2) to be greater "
                     "than the model's total number of KV heads (2).")
create_engine_config()
"""
DCP_GQA_REASON = ("ValueError: Decode context parallelism for GQA/MQA requires `--tensor-parallel-size` (2) to be "
                  "greater than the model's total number of KV heads (2).")


def live_members(pgid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, psutil.Error):
            continue
    return out


def wait_children(pid: int, n: int) -> list[psutil.Process]:
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        children = psutil.Process(pid).children(recursive=True)
        if len(children) >= n:
            return children
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not start {n} children")


def wait_ignoring_sigterm(pid: int) -> None:
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status").read_text()
        ignored = int(next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16)
        if ignored & (1 << (signal.SIGTERM - 1)):
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never ignored SIGTERM")


def gone(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def free() -> int:
    return free_port(20000 + os.getpid() % 20000)


@pytest.fixture
def held_port() -> Iterator[int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s.getsockname()[1]
    s.close()


# -- ManagedProcess.stop --------------------------------------------------------------------------------
def test_a_process_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    proc = ManagedProcess(["bash", "-c", 'trap "" TERM; sleep 60'], {}, tmp_path / "p.log")
    pid = proc.start()
    wait_ignoring_sigterm(pid)  # bash may exec sleep in its place; either way TERM is ignored from then on

    t0 = time.monotonic()
    proc.stop(grace_s=1)
    elapsed = time.monotonic() - t0

    assert 1 <= elapsed < 1.9
    assert proc.poll() == -signal.SIGKILL
    assert live_members(pid) == []


def test_a_process_tree_is_stopped_entirely(tmp_path: Path) -> None:
    proc = ManagedProcess(["bash", "-c", "sleep 60 & sleep 60 & wait"], {}, tmp_path / "p.log")
    pid = proc.start()
    children = wait_children(pid, 2)

    proc.stop(grace_s=5)

    assert proc.poll() is not None and all(gone(c) for c in children)
    assert live_members(pid) == []


def test_a_plain_sleep_stops_at_once_though_its_zombie_lingers(tmp_path: Path) -> None:
    proc = ManagedProcess(["sleep", "60"], {}, tmp_path / "p.log")
    proc.start()
    t0 = time.monotonic()
    proc.stop(grace_s=30)  # the dead sleep stays a zombie until reaped: stop must not wait the grace out
    assert time.monotonic() - t0 < 2
    assert proc.poll() == -signal.SIGTERM


def test_managed_process_gets_its_env_log_and_group(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "p.log"
    proc = ManagedProcess([sys.executable, "-c", "import os; print(os.environ['MARK'], os.getpgid(0) == os.getpid())"],
                          {"MARK": "hello"}, log)
    proc.start()
    assert proc.proc.wait(timeout=5) == 0
    assert log.read_text() == "hello True\n"


def test_starting_a_missing_program_says_so(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="Could not start no-such-program-here: .*; is it installed?"):
        ManagedProcess(["no-such-program-here"], {}, tmp_path / "p.log").start()


# -- VllmServer.wait_ready ------------------------------------------------------------------------------
def test_a_server_that_never_gets_healthy_times_out(tmp_path: Path, free: int) -> None:
    log = tmp_path / "server.log"
    server = VllmServer([sys.executable, "-m", "http.server", str(free), "--bind", "127.0.0.1"], {}, log, free)
    server.start()
    try:
        deadline = time.monotonic() + 5
        while port_is_free(free) and time.monotonic() < deadline:  # listening, so /health gets its 404
            time.sleep(0.02)
        with pytest.raises(RunError, match="vLLM was not ready after 1 s; raise the startup timeout") as exc:
            server.wait_ready(timeout_s=1, tick_s=0.1)
        assert '"GET /health HTTP/1.1" 404' in str(exc.value)  # it answered, just not 200
    finally:
        server.stop(grace_s=2)
    assert port_is_free(free)


def test_a_server_that_exits_fails_with_its_root_cause(tmp_path: Path, free: int) -> None:
    script = tmp_path / "fake_vllm.py"
    script.write_text(DCP_GQA_FAILURE)
    server = VllmServer([sys.executable, str(script)], {}, tmp_path / "server.log", free)
    server.start()
    try:
        with pytest.raises(RunError) as exc:
            server.wait_ready(timeout_s=10, tick_s=0.05)
    finally:
        server.stop(grace_s=2)
    assert str(exc.value) == DCP_GQA_REASON
    assert server.poll() == 1 and "Traceback" in (tmp_path / "server.log").read_text()


def test_cancel_during_startup(tmp_path: Path, free: int) -> None:
    server = VllmServer([sys.executable, "-c", "import time; time.sleep(30)"], {}, tmp_path / "server.log", free)
    server.start()
    try:
        with pytest.raises(Cancelled, match="cancelled during startup"):
            server.wait_ready(timeout_s=30, cancelled=lambda: True, tick_s=0.05)
        assert server.alive()
    finally:
        server.stop(grace_s=2)
    assert not server.alive()


def test_a_healthy_server_is_ready_and_stops_freeing_its_port(tmp_path: Path, free: int) -> None:
    script = tmp_path / "health.py"
    script.write_text(HEALTH_200)
    ticks: list[float] = []
    server = VllmServer([sys.executable, str(script), str(free)], {}, tmp_path / "server.log", free, host="0.0.0.0")
    assert server.base_url == f"http://127.0.0.1:{free}"  # a wildcard bind is polled on loopback
    server.start()
    try:
        waited = server.wait_ready(timeout_s=10, on_tick=lambda: ticks.append(time.monotonic()), tick_s=0.05)
        assert 0 <= waited < 10 and server.alive()
        assert not port_is_free(free)
    finally:
        seconds = server.stop(grace_s=2)
    assert seconds < 2 and port_is_free(free)


def test_start_refuses_a_taken_port(tmp_path: Path, held_port: int) -> None:
    server = VllmServer(["sleep", "60"], {}, tmp_path / "server.log", held_port)
    with pytest.raises(RunError, match=f"Port {held_port} is already in use"):
        server.start()
    assert server.proc is None and not (tmp_path / "server.log").exists()


# -- ports and logs -------------------------------------------------------------------------------------
def test_port_is_free(held_port: int) -> None:
    assert not port_is_free(held_port)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    assert port_is_free(port)


def test_free_port_skips_held_and_taken_ports(held_port: int) -> None:
    first = free_port(held_port)
    assert first > held_port and port_is_free(first)
    second = free_port(held_port, taken={first})
    assert second > first and port_is_free(second)


def test_free_port_says_what_to_do_when_none_is_free() -> None:
    with pytest.raises(RunError, match="No free port in 65535"):
        free_port(65535, taken={65535})


def test_tail_splits_carriage_return_progress(tmp_path: Path) -> None:
    log = tmp_path / "bench.log"
    bars = "".join(f"\r{i * 10:3d}%|{'#' * i:<10}| {i}/10" for i in range(11))
    log.write_text("INFO starting benchmark\n" + bars + "\nINFO done\n")
    assert tail(log, lines=3) == " 90%|######### | 9/10\n100%|##########| 10/10\nINFO done"
    assert tail(log, lines=1, max_bytes=10) == "INFO done"
    assert tail(tmp_path / "missing.log") == ""


def test_tail_of_a_cut_multibyte_character(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_bytes(("é" * 10 + "\nend\n").encode())  # 8 bytes from the end start inside an "é"
    assert tail(log, lines=2, max_bytes=8) == "\ufffdé\nend"


def test_tail_of_crlf_lines(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_bytes(b"one\r\ntwo\r\nthree\r\n")
    assert tail(log, lines=2) == "two\nthree"
