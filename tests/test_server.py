"""Process lifecycle with real processes (bash, sleep, small Python servers) and real sockets; no vLLM."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from runner.errors import Cancelled, PortConflict, RunError
from runner.server import GroupGuard, ManagedProcess, VllmServer, free_port, listeners, port_is_free, tail

# A stand-in for `vllm serve`: answers /health 200 and /v1/models with the model named on its command line.
# With --child, a child process serves and the root only waits: the port's owner is deeper in the tree.
FAKE_VLLM = """
import http.server, json, subprocess, sys
port, model = int(sys.argv[1]), sys.argv[2]
if sys.argv[3:] == ["--child"]:
    sys.exit(subprocess.call([sys.executable, __file__, str(port), model]))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"object": "list", "data": [{"id": model, "object": "model"}]}).encode()
        if self.path == "/health":
            self.send_response(200)
            self.end_headers()
        elif self.path == "/v1/models" and model != "-":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_response(404)
            self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
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


def bound() -> socket.socket:
    """A socket bound to a port of the kernel's choosing on 127.0.0.1 (listen on it to hold the port)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


@pytest.fixture
def held_port() -> Iterator[int]:
    with bound() as s:
        s.listen()
        yield s.getsockname()[1]


def startup_error(server: VllmServer) -> RunError:
    """Start `server` and return the error its start-up ends with (the server stopped either way)."""
    server.start()
    try:
        with pytest.raises(RunError) as exc:
            server.wait_ready(timeout_s=10, tick_s=0.05)
    finally:
        server.stop(grace_s=2)
    return exc.value


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


def test_a_process_tree_ends_when_its_owner_dies_without_stopping_it(tmp_path: Path) -> None:
    """The owner (a Ray task, a worker) killed with SIGKILL runs no `finally`: the group's guard ends the tree."""
    owner = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from runner.server import ManagedProcess\n"
        f"p = ManagedProcess(['bash', '-c', 'sleep 60 & sleep 60 & wait'], {{}}, Path({str(tmp_path)!r}) / 'p.log')\n"
        "print(p.start(), flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    pgid = int(owner.stdout.readline())
    tree = [psutil.Process(pgid), *wait_children(pgid, 2)]
    owner.kill()
    owner.wait(5)
    deadline = time.monotonic() + 5
    while live_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_members(pgid) == [] and all(gone(p) for p in tree)


def test_a_guard_kills_what_ignores_its_sigterm_after_the_grace(tmp_path: Path) -> None:
    proc = subprocess.Popen(["bash", "-c", 'trap "" TERM; sleep 60 & wait'], start_new_session=True)
    wait_ignoring_sigterm(proc.pid)
    guard = GroupGuard(proc.pid, grace_s=1)
    os.close(guard._write)  # what the owner's death does: the pipe ends without the release byte
    t0 = time.monotonic()
    assert proc.wait(5) == -signal.SIGKILL
    assert 1 <= time.monotonic() - t0 < 2.5
    deadline = time.monotonic() + 2
    while live_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_members(proc.pid) == []


def guards(pgid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if len(cmd) >= 3 and cmd[-3].endswith("runner/guard.py") and cmd[-2] == str(pgid) and not gone(p):
            out.append(p)
    return out


def test_a_stopped_process_lets_its_guard_go(tmp_path: Path) -> None:
    proc = ManagedProcess(["sleep", "60"], {}, tmp_path / "p.log")
    pid = proc.start()
    [guard] = guards(pid)
    assert guard.ppid() != os.getpid()  # not a child of the owner: a supervisor that kills those leaves it
    proc.stop(grace_s=5)
    guard.wait(5)  # released: it exits without signalling anything


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
    assert str(startup_error(server)) == DCP_GQA_REASON
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
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_VLLM)
    ticks: list[float] = []
    server = VllmServer([sys.executable, str(script), str(free), "demo"], {}, tmp_path / "server.log", free,
                        host="0.0.0.0", model_name="demo")
    assert server.base_url == f"http://127.0.0.1:{free}"  # a wildcard bind is polled on loopback
    server.start()
    try:
        waited = server.wait_ready(timeout_s=10, on_tick=lambda: ticks.append(time.monotonic()), tick_s=0.05)
        assert 0 <= waited < 10 and server.alive()
        assert not port_is_free(free) and server.owns_port()
    finally:
        seconds = server.stop(grace_s=2)
    assert seconds < 2 and port_is_free(free)


def test_the_port_may_be_owned_deeper_in_the_tree(tmp_path: Path, free: int) -> None:
    """vLLM's API server may be a child of the process servelab started (several API servers, wrappers)."""
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_VLLM)
    server = VllmServer([sys.executable, str(script), str(free), "demo", "--child"], {}, tmp_path / "server.log",
                        free, model_name="demo")
    server.start()
    try:
        server.wait_ready(timeout_s=10, tick_s=0.05)
        [child] = psutil.Process(server.pid).children()
        assert server.owns_port() and listeners(free) == {child.pid: child.name()}
    finally:
        server.stop(grace_s=2)
    assert not listeners(free)


class Decoy:
    """Another process's HTTP server on the run's port, here in a thread of the test process: answers
    /health 200, /v1/models with `models`, /metrics with a decoy value; counts what it was asked."""

    def __init__(self, port: int, models: list[str]):
        self.asked: list[str] = []
        decoy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                decoy.asked.append(self.path)
                body = json.dumps({"data": [{"id": m} for m in models]}).encode() if self.path == "/v1/models" else b""
                self.send_response(200)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_decoy_answering_health_and_models_is_never_taken_for_ready(tmp_path: Path, free: int) -> None:
    """The run's own process never listens; a foreign server on its port answers everything, even the
    right model name: it is not this run's server, so the run is never ready."""
    server = VllmServer([sys.executable, "-c", "import time; time.sleep(30)"], {}, tmp_path / "server.log", free,
                        model_name="demo")
    server.start()
    decoy = Decoy(free, ["demo"])
    try:
        with pytest.raises(RunError) as exc:
            server.wait_ready(timeout_s=1.5, tick_s=0.25)
        me = psutil.Process()
        assert str(exc.value).startswith(
            f"vLLM was not ready after 2 s; port {free} answers, but pid {me.pid} ({me.name()}) listens on it, "
            "not this run's vLLM; raise the startup timeout"
        )
        assert "/v1/models" not in decoy.asked  # the port's owner is looked at first
        assert 3 <= decoy.asked.count("/health") <= 8  # once a tick while a stranger answers, not every 0.1 s
        assert server.alive()
    finally:
        decoy.close()
        server.stop(grace_s=2)


@pytest.mark.parametrize(
    ("served", "problem"),
    [("other", "/v1/models on port {port} lists other, not demo"), ("-", "/v1/models on port {port} lists no model")],
)
def test_health_alone_is_not_ready_without_the_model_listed(tmp_path: Path, free: int, served: str,
                                                            problem: str) -> None:
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_VLLM)
    server = VllmServer([sys.executable, str(script), str(free), served], {}, tmp_path / "server.log", free,
                        model_name="demo")
    server.start()
    try:
        with pytest.raises(RunError) as exc:
            server.wait_ready(timeout_s=1.5, tick_s=0.25)
        assert f"vLLM was not ready after 2 s; {problem.format(port=free)}; raise" in str(exc.value)
        assert server.owns_port()
    finally:
        server.stop(grace_s=2)


def test_vllm_exiting_on_a_taken_port_raises_port_conflict_naming_the_holder(tmp_path: Path, free: int) -> None:
    """A stand-in replays what vLLM 0.32 printed when its port was taken before it could bind (captured)."""
    captured = Path(__file__).parent / "fixtures" / "cpu_0.32" / "port_conflict.log"
    script = f"import sys, time; time.sleep(1); sys.stdout.write(open({str(captured)!r}).read()); sys.exit(1)"
    server = VllmServer([sys.executable, "-c", script], {}, tmp_path / "server.log", free, model_name="demo")
    server.start()
    decoy = Decoy(free, ["demo"])  # takes the port after servelab chose it, before "vLLM" binds
    try:
        with pytest.raises(PortConflict) as exc:
            server.wait_ready(timeout_s=20, tick_s=0.05)
    finally:
        decoy.close()
        server.stop(grace_s=2)
    me = psutil.Process()
    assert str(exc.value) == "OSError: [Errno 98] Address already in use"
    assert (exc.value.port, exc.value.holder) == (free, f"pid {me.pid} ({me.name()})")
    assert decoy.asked.count("/v1/models") == 0


def test_a_second_launch_reads_only_its_own_lines_of_the_shared_log(tmp_path: Path, free: int) -> None:
    log = tmp_path / "server.log"
    log.write_text("OSError: [Errno 98] Address already in use\n")  # the first launch's end
    error = startup_error(VllmServer([sys.executable, "-c", DCP_GQA_FAILURE], {}, log, free))
    assert type(error) is RunError and str(error) == DCP_GQA_REASON


def test_stop_does_not_wait_for_a_port_that_a_stranger_holds(tmp_path: Path, free: int) -> None:
    server = VllmServer([sys.executable, "-c", "import time; time.sleep(30)"], {}, tmp_path / "server.log", free)
    server.start()
    decoy = Decoy(free, [])
    try:
        assert server.stop(grace_s=2) < 1.5  # not the 30 s a port of its own may take to come free
    finally:
        decoy.close()


def test_start_refuses_a_taken_port(tmp_path: Path, held_port: int) -> None:
    server = VllmServer(["sleep", "60"], {}, tmp_path / "server.log", held_port)
    with pytest.raises(RunError) as exc:
        server.start()
    me = psutil.Process()
    assert str(exc.value) == (f"Port {held_port} is already in use; stop what holds it or choose another port. "
                              f"It is held by pid {me.pid} ({me.name()}).")
    assert server.proc is None and not (tmp_path / "server.log").exists()


# -- ports and logs -------------------------------------------------------------------------------------
def test_port_is_free(held_port: int) -> None:
    assert not port_is_free(held_port)
    with bound() as s:
        port = s.getsockname()[1]
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
