"""One class owns the life of a subprocess: vLLM's server (and, reused, the benchmark and lm-eval).

Start in its own process group with a copied environment, logs to a file (never a pipe nobody
drains), poll `/health` and `proc.poll()` on every tick, fail fast with vLLM's own reason, and stop
with SIGTERM → wait → SIGKILL of the whole group.

A `/health` 200 alone proves nothing: another server may answer on the port (one that took it while
vLLM was loading). vLLM is ready when a process of the tree servelab started listens on the port and
`/v1/models` lists the served model name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Protocol

import httpx
import psutil

from runner import guard
from runner.errors import Cancelled, PortConflict, RunError
from runner.parsers import find_failure_reason, meaningful_tail, port_conflict

log = logging.getLogger(__name__)

CPU_BACKEND_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}
HEALTH_POLL_S = 0.1
"""How often `wait_ready` asks `/health`: the benchmark starts at most this long after vLLM is ready."""
STOP_POLL_S = 0.05
"""How often a stop looks whether the process group is gone and the port free."""


class GroupGuard:
    """Ends process group `pgid` if this process dies without stopping it (runner/guard.py: a watcher in a
    session of its own, not a child of this process, that sees the end of a pipe whose write end only this
    process holds). Tied to the process, not to the thread that started it, unlike prctl's PR_SET_PDEATHSIG;
    and the direct children that Ray kills when its worker process exits would not include vLLM's engine."""

    SCRIPT = Path(guard.__file__)

    def __init__(self, pgid: int, grace_s: float = 10.0):
        read, self._write = os.pipe()  # neither end is inherited by other children (close_fds, non-inheritable)
        try:
            subprocess.run([sys.executable, "-I", str(self.SCRIPT), str(pgid), str(grace_s)], stdin=read,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, timeout=10,
                           check=True)  # returns once the guard has forked away
        except (OSError, subprocess.SubprocessError):  # no guard: the group is still stopped by its owner
            log.exception("no guard for process group %s", pgid)
        finally:
            os.close(read)

    def release(self) -> None:
        """The owner stopped the group itself: the guard exits without touching it."""
        if self._write < 0:
            return
        with contextlib.suppress(OSError):
            os.write(self._write, b"x")
        os.close(self._write)
        self._write = -1


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(start: int, taken: Collection[int] = frozenset(), host: str = "127.0.0.1") -> int:
    """The first free port at or above `start` that is not in `taken`."""
    end = min(start + 1000, 65536)
    for port in range(start, end):
        if port not in taken and port_is_free(port, host):
            return port
    raise RunError(f"No free port in {start}–{end - 1}; stop other servers or choose another port.")


def listeners(port: int) -> dict[int, str]:
    """The processes listening on TCP `port` (any address), pid → name. Reads every process's sockets:
    for the rare moment a port is found taken, not for every tick."""
    out: dict[int, str] = {}
    try:
        conns = psutil.net_connections(kind="inet")
    except psutil.Error:
        return out
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid is not None:
            try:
                out[c.pid] = psutil.Process(c.pid).name()
            except psutil.Error:
                out[c.pid] = "exited"
    return out


def port_holder(port: int) -> str | None:
    """`pid 123 (python3)` for each process listening on `port`, or None when none can be seen."""
    return ", ".join(f"pid {pid} ({name})" for pid, name in sorted(listeners(port).items())) or None


def _listens_on(p: psutil.Process, port: int) -> bool:
    try:
        conns = p.net_connections(kind="inet")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns)


def _model_ids(body: object) -> list[str]:
    """The `id`s of an OpenAI `/v1/models` body (`{"data": [{"id": …}, …]}`); [] for anything else."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        return []
    return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]


def tail(path: Path, lines: int = 30, max_bytes: int = 64_000, since: int = 0) -> str:
    """The last `lines` lines of a log file (reads at most `max_bytes` from its end, nothing before byte `since`)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(since, size - max_bytes))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.replace("\r\n", "\n").replace("\r", "\n").splitlines()[-lines:])


class ManagedProcess:
    """A subprocess in its own process group, logging to a file."""

    STDIN: int = subprocess.DEVNULL  # a process that reads its instructions gets a pipe (runner/prestart.py)

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path, cwd: Path | None = None):
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = Path(log_path)
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.log_start = 0  # where this process's lines begin in a log that an earlier one wrote to
        self.guard: GroupGuard | None = None

    def start(self) -> int:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        full_env = {**os.environ, **self.env}
        with open(self.log_path, "ab") as log:
            self.log_start = log.tell()
            try:
                self.proc = subprocess.Popen(
                    self.argv,
                    env=full_env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=self.STDIN,
                    start_new_session=True,
                    cwd=self.cwd,
                )
            except OSError as exc:
                raise RunError(f"Could not start {self.argv[0]}: {exc.strerror}; is it installed?") from None
        self.guard = GroupGuard(self.proc.pid)
        return self.proc.pid

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def poll(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def wait(self, timeout_s: float) -> int | None:
        """The exit code once the process has exited, waiting at most `timeout_s`; None if it still runs.
        A loop that waits here instead of sleeping notices the exit at once."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace_s: float = 30.0) -> float:
        """SIGTERM to the group, wait up to `grace_s`, then SIGKILL whatever of the group is left;
        return the seconds it took."""
        start = time.monotonic()
        if self.proc is None:
            return 0.0
        kill_group(self.proc.pid, grace_s)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        if self.guard is not None:
            self.guard.release()
        return time.monotonic() - start


class Supervised(Protocol):
    """What `supervise` needs of a process: a `ManagedProcess`, or a job with its face."""

    def start(self) -> int: ...
    def poll(self) -> int | None: ...
    def wait(self, timeout_s: float) -> int | None: ...
    def stop(self, grace_s: float = 30.0) -> object: ...


def supervise(proc: Supervised, during: str, server_gone: Callable[[], str | None], cancelled: Callable[[], bool],
              tick: Callable[[], float], grace_s: float = 10.0) -> int | None:
    """Start `proc` and wait for its exit, the loop every phase beside a vLLM server runs: stop it (its
    whole group) and raise `RunError` when the server goes (`server_gone()` says why, None while it lives),
    `Cancelled` when `cancelled()`. Between checks `tick()` runs (progress, say) and returns how long to
    wait for the exit. Returns the exit code."""
    proc.start()
    try:
        while proc.poll() is None:
            if (gone := server_gone()) is not None:
                raise RunError(f"vLLM server exited during {during}{gone}")
            if cancelled():
                raise Cancelled(f"cancelled during {during}")
            proc.wait(tick())
    finally:
        proc.stop(grace_s)
    return proc.poll()


def _group_members(pgid: int) -> list[psutil.Process]:
    """Live processes of the group; zombies are left out (an init that does not reap leaves them)."""
    members = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                members.append(p)
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return members


def kill_group(pgid: int, grace_s: float = 30.0) -> None:
    """Terminate the process group `pgid` (and every process in it), then kill what remains and wait (≤ 10 s)
    for it to go. The guard's `end_group`, asking psutil whether the group lives."""
    if not guard.end_group(pgid, grace_s, alive=lambda g: bool(_group_members(g)), poll_s=STOP_POLL_S):
        return
    deadline = time.monotonic() + 10
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)


class VllmServer(ManagedProcess):
    """`vllm serve` from a built argv; ready when its own process tree listens on `port`, `/health`
    answers 200 and `/v1/models` lists `model_name` (None: any model list, for stand-ins in tests)."""

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        log_path: Path,
        port: int,
        host: str = "127.0.0.1",
        model_name: str | None = None,
    ):
        super().__init__(argv, env, log_path)
        self.port = port
        # a wildcard bind address is reached on the loopback
        self.host = "127.0.0.1" if host in {"0.0.0.0", "::"} else host  # noqa: S104
        self.model_name = model_name

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _check_port(self) -> None:
        if not port_is_free(self.port):  # taken before anything started: said at once, not retried
            held = f" It is held by {holder}." if (holder := port_holder(self.port)) else ""
            raise RunError(f"Port {self.port} is already in use; stop what holds it or choose another port.{held}")

    def start(self) -> int:
        self._check_port()
        return super().start()

    def adopt(self, waiting: ManagedProcess, go: Callable[[], None]) -> int:
        """Become `waiting`, a process already started with this server's log (a prestarted server at its gate,
        runner/prestart.py), then `go()` sends it on: from here on it is this server, as if `start` had made it."""
        self._check_port()
        if waiting.proc is None:
            raise RunError("internal error: a prestarted server was adopted before it was started")
        self.proc, self.guard, self.log_start = waiting.proc, waiting.guard, waiting.log_start
        go()
        return waiting.proc.pid

    def _own_log(self, lines: int = 400) -> str:
        return tail(self.log_path, lines=lines, max_bytes=400_000, since=self.log_start)

    def failure_reason(self) -> str:
        text = self._own_log()
        return find_failure_reason(text) or ("vLLM exited; last log lines:\n" + meaningful_tail(text, 8))

    def exit_error(self) -> RunError:
        """The error for a server that exited: `PortConflict` (with who holds the port now) when vLLM says
        its port was taken, else `RunError` with vLLM's own reason."""
        if port_conflict(self._own_log()):
            return PortConflict(self.failure_reason(), self.port, port_holder(self.port))
        return RunError(self.failure_reason())

    def tree(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def owns_port(self) -> bool:
        """True when a process of this server's tree listens on its port."""
        return any(_listens_on(p, self.port) for p in self.tree())

    def identity_problem(self, client: httpx.Client) -> str | None:
        """Why what answers on the port is not proven to be this server; None once it is."""
        if not self.owns_port():
            holder = port_holder(self.port)
            return (f"port {self.port} answers, but {holder or 'no process of this run'} listens on it, "
                    "not this run's vLLM")
        try:
            resp = client.get(self.base_url + "/v1/models")
            ids = _model_ids(resp.json()) if resp.status_code == 200 else []
        except (httpx.HTTPError, ValueError):
            ids = []
        if not ids:
            return f"/v1/models on port {self.port} lists no model"
        if self.model_name is not None and self.model_name not in ids:
            return f"/v1/models on port {self.port} lists {', '.join(ids)}, not {self.model_name}"
        return None

    def wait_ready(
        self,
        timeout_s: float,
        cancelled: Callable[[], bool] = lambda: False,
        on_tick: Callable[[], None] = lambda: None,
        tick_s: float = 1.0,
        poll_s: float = HEALTH_POLL_S,
    ) -> float:
        """Block until this server is ready (see the class); return seconds waited.

        `/health` and the process are checked every `poll_s`, so the run goes on within `poll_s` of
        vLLM being ready; `cancelled()` and `on_tick()` (which may write to the store) every `tick_s`.
        While something that is not this server answers, it looks every `tick_s` only. Raises
        `PortConflict` when vLLM exits saying its port is taken, `RunError` with vLLM's own reason when
        it exits otherwise, or on timeout; `Cancelled` when `cancelled()` turns true.
        """
        start = time.monotonic()
        next_tick = start + tick_s
        problem: str | None = None
        with httpx.Client(timeout=2.0) as client:
            while True:
                if self.poll() is not None:
                    raise self.exit_error()
                try:
                    healthy = client.get(self.base_url + "/health").status_code == 200
                except httpx.HTTPError:
                    healthy = False
                if healthy:
                    problem = self.identity_problem(client)
                    if problem is None:
                        return time.monotonic() - start
                now = time.monotonic()
                if now - start > timeout_s:
                    why = f"; {problem}" if problem else ""
                    raise RunError(
                        f"vLLM was not ready after {timeout_s:.0f} s{why}; raise the startup timeout or check the "
                        "log:\n" + meaningful_tail(self._own_log(200), 8)
                    )
                if now >= next_tick:
                    if cancelled():
                        raise Cancelled("cancelled during startup")
                    on_tick()
                    next_tick = now + tick_s
                time.sleep(tick_s if problem else min(poll_s, tick_s))

    def alive(self) -> bool:
        return self.poll() is None

    def stop(self, grace_s: float = 30.0) -> float:
        """Stop the server and wait for its port to be free (unless another process listens on it);
        return the seconds it took."""
        start = time.monotonic()
        super().stop(grace_s)
        if not port_is_free(self.port) and listeners(self.port):
            return time.monotonic() - start  # held by someone else: it will not come free by waiting
        deadline = time.monotonic() + 30
        while not port_is_free(self.port) and time.monotonic() < deadline:
            time.sleep(STOP_POLL_S)
        return time.monotonic() - start
