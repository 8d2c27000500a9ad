"""One class owns the life of a subprocess: vLLM's server (and, reused, the benchmark and lm-eval).

Start in its own process group with a copied environment, logs to a file (never a pipe nobody
drains), poll `/health` and `proc.poll()` on every tick, fail fast with vLLM's own reason, and stop
with SIGTERM → wait → SIGKILL of the whole group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Protocol

import httpx
import psutil

from runner.errors import Cancelled, RunError
from runner.parsers import find_failure_reason

CPU_BACKEND_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}
HEALTH_POLL_S = 0.1
"""How often `wait_ready` asks `/health`: the benchmark starts at most this long after vLLM is ready."""
STOP_POLL_S = 0.05
"""How often a stop looks whether the process group is gone and the port free."""


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


def tail(path: Path, lines: int = 30, max_bytes: int = 64_000) -> str:
    """The last `lines` lines of a log file (reads at most `max_bytes` from its end)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.replace("\r\n", "\n").replace("\r", "\n").splitlines()[-lines:])


class ManagedProcess:
    """A subprocess in its own process group, logging to a file."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path, cwd: Path | None = None):
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = Path(log_path)
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None

    def start(self) -> int:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        full_env = {**os.environ, **self.env}
        with open(self.log_path, "ab") as log:
            try:
                self.proc = subprocess.Popen(
                    self.argv,
                    env=full_env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    cwd=self.cwd,
                )
            except OSError as exc:
                raise RunError(f"Could not start {self.argv[0]}: {exc.strerror}; is it installed?") from None
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
    """Terminate the process group `pgid` (and every process in it), then kill what remains."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not _group_members(pgid):
            return
        time.sleep(STOP_POLL_S)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + 10
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)


class VllmServer(ManagedProcess):
    """`vllm serve` from a built argv; ready when `/health` answers 200."""

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        log_path: Path,
        port: int,
        host: str = "127.0.0.1",
    ):
        super().__init__(argv, env, log_path)
        self.port = port
        # a wildcard bind address is reached on the loopback
        self.host = "127.0.0.1" if host in {"0.0.0.0", "::"} else host  # noqa: S104

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> int:
        if not port_is_free(self.port):
            raise RunError(f"Port {self.port} is already in use; stop what holds it or choose another port.")
        return super().start()

    def failure_reason(self) -> str:
        text = tail(self.log_path, lines=400, max_bytes=400_000)
        return find_failure_reason(text) or ("vLLM exited; last log lines:\n" + "\n".join(text.splitlines()[-8:]))

    def wait_ready(
        self,
        timeout_s: float,
        cancelled: Callable[[], bool] = lambda: False,
        on_tick: Callable[[], None] = lambda: None,
        tick_s: float = 1.0,
        poll_s: float = HEALTH_POLL_S,
    ) -> float:
        """Block until `/health` answers 200; return seconds waited.

        `/health` and the process are checked every `poll_s`, so the run goes on within `poll_s` of
        vLLM being ready; `cancelled()` and `on_tick()` (which may write to the store) every `tick_s`.
        Raises `RunError` with vLLM's own reason when the process exits, or on timeout; `Cancelled`
        when `cancelled()` turns true.
        """
        start = time.monotonic()
        next_tick = start + tick_s
        with httpx.Client(timeout=2.0) as client:
            while True:
                code = self.poll()
                if code is not None:
                    raise RunError(self.failure_reason())
                try:
                    if client.get(self.base_url + "/health").status_code == 200:
                        return time.monotonic() - start
                except httpx.HTTPError:
                    pass
                now = time.monotonic()
                if now - start > timeout_s:
                    raise RunError(
                        f"vLLM was not ready after {timeout_s:.0f} s; raise the startup timeout or check the log:\n"
                        + tail(self.log_path, 8)
                    )
                if now >= next_tick:
                    if cancelled():
                        raise Cancelled("cancelled during startup")
                    on_tick()
                    next_tick = now + tick_s
                time.sleep(min(poll_s, tick_s))

    def alive(self) -> bool:
        return self.poll() is None

    def stop(self, grace_s: float = 30.0) -> float:
        """Stop the server and wait for its port to be free; return the seconds it took."""
        start = time.monotonic()
        super().stop(grace_s)
        deadline = time.monotonic() + 30
        while not port_is_free(self.port) and time.monotonic() < deadline:
            time.sleep(STOP_POLL_S)
        return time.monotonic() - start
