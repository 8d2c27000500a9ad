"""Prestart: the next run's vLLM server and benchmark client start while the run before it benchmarks.

A vLLM server spends its first seconds importing vLLM before it reads its arguments (~13 s on this 2-core
machine, ~30 s of the ~75 s a warm H200 server start takes). While a run benchmarks, the worker predicts the
queued run that will take that run's GPUs when it ends (`successors`) and starts `python -m runner.vllm_entry
--servelab-gate` for it: the next run's own environment (`runner.execute.run_env`, its marks included), its own
process group and guard, its server.log; it imports vLLM's CLI and waits at its gate (stdin). Its benchmark
client starts the same way (`runner.bench_client` waits on stdin for its first job anyway).

When the next run launches, its executor adopts the waiting process if its environment is the same, key for key
(`Waiting.mismatch`), and sends the `vllm serve` arguments (its port included) through stdin; from there on it is
the run's server as if started then. Anything else ends it, group and guard: a run cancelled or taken by
another worker, a prediction that no longer holds, a mismatch, a worker that stops.

`prestart_wanted`: on vLLM's CPU backend the cores are the accelerator, so an import beside a benchmark
disturbs the measurement; there `auto` is off. On a GPU host it runs on otherwise idle host cores.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from runner.bench_client import BenchClients
from runner.server import ManagedProcess

log = logging.getLogger(__name__)

# runner/vllm_entry.py's (not imported here: it patches importlib.metadata in the importing process)
GATE_FLAG = "--servelab-gate"
GATE_LINE = "[servelab] prestart: vLLM's CLI imported in"
_IMPORTED = re.compile(re.escape(GATE_LINE) + r" ([0-9.]+) s")


def prestart_wanted(setting: str, cpu: bool) -> bool:
    """`Settings.prestart_next` (auto, on, off) for a worker on vLLM's CPU backend (`cpu`) or on GPUs."""
    return setting == "on" or (setting == "auto" and not cpu)


def successors(running: dict[int, list[int]], free_gpus: list[int], queued: list[tuple[int, int]],
               gpu_host: bool = True) -> dict[int, tuple[int, list[int]]]:
    """For each running run (id → its GPUs), the queued run that the worker will start when that run ends, and
    the GPUs it will get: the first of `queued` ((id, GPUs needed), oldest first, as `Worker.step` walks them)
    that fits in the free GPUs plus the ended run's, lowest first as `Allocator.take` gives them. Without GPUs
    (`gpu_host` false, the CPU backend) an ended run frees its slot for the first queued run. A queued run is
    predicted for one running run at most."""
    out: dict[int, tuple[int, list[int]]] = {}
    taken: set[int] = set()
    for run_id, gpus in sorted(running.items()):
        pool = sorted({*free_gpus, *gpus}) if gpu_host else []
        for queued_id, needed in queued:
            if queued_id in taken or (gpu_host and needed > len(pool)):
                continue
            out[run_id] = (queued_id, pool[:needed] if gpu_host else [])
            taken.add(queued_id)
            break
    return out


def env_difference(had: dict[str, str], wanted: dict[str, str], most: int = 3) -> str:
    """The variables in which two environments differ, as `NAME 'had' → 'wanted'` ('unset' where absent)."""
    names = sorted(k for k in {*had, *wanted} if had.get(k) != wanted.get(k))
    parts = [f"{k} {had.get(k, 'unset')!r} → {wanted.get(k, 'unset')!r}" for k in names[:most]]
    return ", ".join(parts) + (f" and {len(names) - most} more" if len(names) > most else "")


class GatedServer(ManagedProcess):
    """`python -m runner.vllm_entry --servelab-gate`: a vLLM server importing its CLI, then waiting for its
    arguments on stdin."""

    STDIN = subprocess.PIPE
    ARGV = (sys.executable, "-m", "runner.vllm_entry", GATE_FLAG)

    def __init__(self, env: dict[str, str], log_path: Path, argv: list[str] | None = None):
        super().__init__(argv or list(self.ARGV), env, log_path)

    def go(self, args: list[str]) -> None:
        """Send the arguments after the CLI's prefix (`serve`, the model, …): vLLM's CLI runs with them."""
        if self.proc is None or self.proc.stdin is None:
            raise RuntimeError("the prestarted server has no stdin")
        self.proc.stdin.write(json.dumps({"argv": args}).encode() + b"\n")
        self.proc.stdin.close()

    def imported_s(self) -> float | None:
        """Seconds its imports took, once its gate line is in the log; None before."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_start)
                match = _IMPORTED.search(f.read(1 << 20).decode("utf-8", "replace"))
        except OSError:
            return None
        return float(match.group(1)) if match else None


@dataclass
class Waiting:
    """A prestarted server (and benchmark client) waiting for run `run_id`."""

    run_id: int
    env: dict[str, str]
    server: GatedServer
    clients: BenchClients
    beside: int | None  # the run that was benchmarking when it started
    started_t: float  # epoch seconds
    started_mono: float

    def mismatch(self, env: dict[str, str], log_path: Path) -> str | None:
        """Why this server cannot be the one a run with `env` and `log_path` would start; None when it can."""
        if (code := self.server.poll()) is not None:
            return f"the prestarted server exited ({code}) before its go"
        if self.server.log_path != Path(log_path):
            return f"it logs to {self.server.log_path}, not {log_path}"
        if self.env != env:
            return "its environment differs: " + env_difference(self.env, env)
        return None

    def client_mismatch(self, bench_env: dict[str, str]) -> str | None:
        client = self.clients.current
        if client is None:
            return "no benchmark client was prestarted"
        if (code := client.proc.poll()) is not None:
            return f"the prestarted benchmark client exited ({code})"
        if client.env != bench_env:
            return "the benchmark client's environment differs: " + env_difference(client.env, bench_env)
        return None

    def end(self, why: str) -> None:
        """End both processes, groups and guards, and say why in the server's log."""
        self.clients.close()
        self.server.stop(grace_s=5)
        with contextlib.suppress(OSError), open(self.server.log_path, "a") as f:
            f.write(f"[servelab] prestart ended, not adopted: {why}\n")
        log.info("prestart of run %s ended: %s", self.run_id, why)


class Prestarts:
    """The waiting processes of one worker, by run id. The worker starts and ends them; a run's executor takes
    its own (`take`). Thread-safe. `gate_argv`: another gated program (a stand-in in tests)."""

    def __init__(self, gate_argv: list[str] | None = None) -> None:
        self.gate_argv = gate_argv
        self._waiting: dict[int, Waiting] = {}
        self._lock = threading.Lock()

    def __contains__(self, run_id: int) -> bool:
        with self._lock:
            return run_id in self._waiting

    def run_ids(self) -> list[int]:
        with self._lock:
            return list(self._waiting)

    def env_of(self, run_id: int) -> dict[str, str] | None:
        with self._lock:
            waiting = self._waiting.get(run_id)
        return waiting.env if waiting else None

    def start(self, run_id: int, env: dict[str, str], run_dir: Path, bench_env: dict[str, str] | None = None,
              beside: int | None = None) -> Waiting:
        """Start run `run_id`'s server at its gate (and its benchmark client, given `bench_env`)."""
        run_dir.mkdir(parents=True, exist_ok=True)
        server = GatedServer(env, run_dir / "server.log", self.gate_argv)
        clients = BenchClients(run_dir / "bench-client.log")
        waiting = Waiting(run_id, dict(env), server, clients, beside, time.time(), time.monotonic())
        server.start()
        if bench_env is not None:
            clients.prestart(bench_env)
        with self._lock:
            self._waiting[run_id] = waiting
        log.info("prestarted run %s beside run %s (pid %s)", run_id, beside, server.pid)
        return waiting

    def take(self, run_id: int) -> Waiting | None:
        """The process waiting for `run_id`, now the caller's to adopt or end."""
        with self._lock:
            return self._waiting.pop(run_id, None)

    def end(self, run_id: int, why: str) -> None:
        if (waiting := self.take(run_id)) is not None:
            waiting.end(why)

    def end_all(self, why: str) -> None:
        for run_id in self.run_ids():
            self.end(run_id, why)
