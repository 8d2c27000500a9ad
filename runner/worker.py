"""The queue worker: claims queued runs that fit on free GPUs, executes them side by side, and on
start reconciles what an earlier worker left behind (interrupted runs, orphan vLLM processes)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

from runner.config import Host, RunSpec, Settings
from runner.execute import (
    RUN_ENV_MARK,
    STORE_ENV_MARK,
    Allocation,
    RunExecutor,
    bench_env,
    cpu_backend,
    run_dir_of,
    run_env,
    store_mark,
)
from runner.models import ACTIVE, Run, RunStatus, utcnow
from runner.prestart import Prestarts, prestart_wanted, successors
from runner.server import free_port, kill_group
from runner.store import Store
from runner.telemetry import GpuReader, load_nvml

log = logging.getLogger(__name__)


@dataclass
class Allocator:
    """Gives each run a disjoint set of GPUs and its own port. On the CPU backend (no GPUs) runs take
    one of `cpu_slots` slots instead, since the cores are shared."""

    gpu_ids: list[int]
    cpu_slots: int = 1
    held: dict[int, list[int]] = field(default_factory=dict)  # run id → GPUs
    allocs: dict[int, Allocation] = field(default_factory=dict)  # run id → what it was given (its port may move)

    @property
    def ports(self) -> dict[int, int]:
        return {run_id: a.port for run_id, a in list(self.allocs.items())}

    @property
    def free_gpus(self) -> list[int]:
        busy = {g for gpus in self.held.values() for g in gpus}
        return [g for g in self.gpu_ids if g not in busy]

    def take(self, run_id: int, gpus_needed: int, port_wanted: int) -> Allocation | None:
        """GPUs (lowest free first) and a free port for `run_id`, or None if it does not fit now."""
        if not self.gpu_ids:
            if len(self.held) >= self.cpu_slots:
                return None
            gpus: list[int] = []
        else:
            free = self.free_gpus
            if gpus_needed > len(free):
                return None
            gpus = free[:gpus_needed]
        port = free_port(port_wanted, taken=set(self.ports.values()))
        alloc = Allocation(gpus, port, ports_in_use=lambda: {p for r, p in self.ports.items() if r != run_id})
        self.held[run_id], self.allocs[run_id] = gpus, alloc
        return alloc

    def release(self, run_id: int) -> None:
        self.held.pop(run_id, None)
        self.allocs.pop(run_id, None)


def this_worker_id() -> str:
    me = psutil.Process()
    return f"{socket.gethostname()}:{me.pid}:{int(me.create_time())}"


def worker_alive(worker_id: str | None) -> bool:
    """Whether the worker process named by `worker_id` (host:pid:start) still runs on this host."""
    if not worker_id:
        return False
    try:
        host, pid, started = worker_id.rsplit(":", 2)
        if host != socket.gethostname():
            return True  # another host's worker: not ours to judge
        proc = psutil.Process(int(pid))
        return int(proc.create_time()) == int(started)
    except (ValueError, psutil.Error):
        return False


def orphan_servers(live_runs: set[int], store: Store) -> list[psutil.Process]:
    """Processes servelab started for runs of `store` (marked in their environment) whose run no
    live worker holds. Processes of other stores on the same host are never touched."""
    out, mine = [], store_mark(store)
    for proc in psutil.process_iter(["pid"]):
        try:
            env = proc.environ()
            if env.get(STORE_ENV_MARK) != mine or RUN_ENV_MARK not in env:
                continue
            run_id = int(env[RUN_ENV_MARK])
        except (psutil.Error, OSError, ValueError):
            continue
        if run_id not in live_runs and proc.pid != os.getpid():
            out.append(proc)
    return out


class Worker:
    """Executes queued runs until stopped. Several fit side by side when their GPU sets are disjoint."""

    def __init__(
        self,
        store: Store,
        settings: Settings | None = None,
        *,
        gpu_ids: list[int] | None = None,
        poll_s: float = 1.0,
        executor_factory: Callable[..., RunExecutor] = RunExecutor,
        **executor_kw,
    ):
        self.store = store
        self.settings = settings or Settings.from_env()
        if gpu_ids is None:
            gpu_ids = [] if cpu_backend(self.settings) else list(GpuReader(load_nvml()).handles)
        # no GPU given: vLLM's CPU backend, one rank per core
        self.host = Host(gpus=len(gpu_ids)) if gpu_ids else Host(cpu_backend=True, cores=len(os.sched_getaffinity(0)))
        self.allocator = Allocator(gpu_ids)
        self.poll_s = poll_s
        self.executor_factory = executor_factory
        self.executor_kw = executor_kw
        self.worker_id = this_worker_id()
        self.threads: dict[int, threading.Thread] = {}
        self._lock = threading.Lock()
        self.stopping = threading.Event()
        self.errors: list[str] = []  # the last errors this worker caught, newest last (also in the store)
        self.interrupted_by: str | None = None  # set by `interrupt`: what stopped the worker ("" if unnamed)
        self._wake = threading.Event()  # a run ended or stop was asked: schedule now, not at the next poll
        self.prestarts = self._prestarts()

    # -- reconcile ------------------------------------------------------------------------------
    def reconcile(self) -> list[int]:
        """Mark runs whose worker is gone as interrupted and stop vLLM processes nobody tracks.
        Returns the ids of the runs marked interrupted."""
        interrupted, live = [], set()
        for run in self.store.list_runs(status=ACTIVE):
            if run.worker_id == self.worker_id or worker_alive(run.worker_id):
                live.add(run.id)
                continue
            self.store.update_run(
                run.id, status=RunStatus.interrupted, finished_at=utcnow(), phase="interrupted",
                failure_reason=f"the worker stopped while the run was {run.status.value}; queue it again to rerun",
            )
            self.store.add_phase(run.id, "interrupted", detail=f"found by worker {self.worker_id}")
            interrupted.append(run.id)
        for proc in orphan_servers(live, self.store):
            try:
                kill_group(os.getpgid(proc.pid), grace_s=15)
            except (ProcessLookupError, OSError):
                continue
        return interrupted

    # -- scheduling -----------------------------------------------------------------------------
    def step(self) -> list[int]:
        """Start every queued run that fits now (oldest first; a run that does not fit does not block
        smaller ones behind it). Returns the ids started."""
        self._reap()
        started = []
        for run in reversed(self.store.list_runs(status=RunStatus.queued)):
            try:
                spec = RunSpec.model_validate_json(run.spec_json or "")
            except ValueError as exc:  # a row written by another version, or by hand
                self.store.update_run(run.id, status=RunStatus.failed, finished_at=utcnow(), phase="failed",
                                      failure_reason=f"its stored spec is unreadable: {exc}")
                continue
            if refused := self.host.problems(spec.launch):  # never launched where it cannot run
                if not spec.other_worker:  # meant for here: say why it cannot run; else leave it to its worker
                    self.store.update_run(run.id, status=RunStatus.failed, finished_at=utcnow(), phase="failed",
                                          failure_reason="cannot run on this machine: " + " ".join(refused))
                continue
            needed = 0 if not self.allocator.gpu_ids else spec.launch.gpus_needed
            with self._lock:
                alloc = self.allocator.take(run.id, needed, spec.launch.port)
            if alloc is None:
                continue
            if not self.store.claim_run(run.id, self.worker_id):
                self.allocator.release(run.id)
                continue
            t = threading.Thread(target=self._execute, args=(run.id, alloc), name=f"run-{run.id}", daemon=True)
            self.threads[run.id] = t
            t.start()
            started.append(run.id)
        self._prestart_next()
        return started

    def _execute(self, run_id: int, alloc: Allocation) -> None:
        try:
            prestarts = {"prestarts": self.prestarts} if self.prestarts is not None else {}
            executor = self.executor_factory(self.store, run_id, alloc, self.settings,
                                             interrupted=lambda: self.interrupted_by, **prestarts, **self.executor_kw)
            executor.execute()
        except Exception as exc:  # never lose a run silently
            self._caught(f"run {run_id} crashed its executor: {type(exc).__name__}: {exc}")
            self.store.update_run(run_id, status=RunStatus.failed, finished_at=utcnow(), phase="failed",
                                  failure_reason=f"internal error: {type(exc).__name__}: {exc}")
        finally:
            if self.prestarts is not None:  # one its executor did not take (it failed before its launch)
                self.prestarts.end(run_id, f"run {run_id} ended without adopting it")
            with self._lock:
                self.allocator.release(run_id)
            self._wake.set()

    def _reap(self) -> None:
        for run_id, t in list(self.threads.items()):
            with self._lock:
                ended = run_id not in self.allocator.held  # released as the last step of `_execute`
            if ended:
                t.join()  # at most the few instructions after the release
            if not t.is_alive():
                del self.threads[run_id]

    def busy(self) -> bool:
        self._reap()
        return bool(self.threads)

    def run_forever(self, until: Callable[[], bool] = lambda: False) -> None:
        """Reconcile, then schedule every `poll_s` until `until()` is true (or stop() was called) and
        nothing runs any more."""
        self.reconcile()
        while not self.stopping.is_set():
            self._wake.clear()
            try:
                self.step()
                if until() and not self.busy():
                    break
            except Exception as exc:  # a database hiccup must not end the worker; try again next tick
                self._caught(f"scheduling failed: {type(exc).__name__}: {exc}")
            self._wake.wait(self.poll_s)
        self.end_prestarts("the worker is stopping")
        for t in list(self.threads.values()):
            t.join()

    # -- prestart (runner/prestart.py) ------------------------------------------------------------
    def _prestarts(self) -> Prestarts | None:
        """The worker's prestarted servers, when `Settings.prestart_next` asks for them here."""
        return Prestarts() if prestart_wanted(self.settings.prestart_next, cpu_backend(self.settings)) else None

    def _prestart_next(self) -> None:
        """While a run of this worker benchmarks, start the server (and benchmark client) of the queued run that
        will take its GPUs when it ends; end the prestarts no longer predicted. Never fails the scheduling."""
        if self.prestarts is None or self.stopping.is_set():
            return
        try:
            self._match_prestarts()
        except Exception as exc:
            self._caught(f"prestart failed: {type(exc).__name__}: {exc}")

    def _match_prestarts(self) -> None:
        prestarts = self.prestarts
        if prestarts is None:
            return
        with self._lock:
            running = {r: list(g) for r, g in self.allocator.held.items() if r in self.threads}
            free = self.allocator.free_gpus
        queued: list[tuple[Run, RunSpec]] = []
        for run in reversed(self.store.list_runs(status=RunStatus.queued)):  # oldest first, as `step` walks them
            try:
                spec = RunSpec.model_validate_json(run.spec_json or "")
            except ValueError:
                continue
            if not self.host.problems(spec.launch):
                queued.append((run, spec))
        gpu_host = bool(self.allocator.gpu_ids)
        predicted = successors(running, free, [(r.id, s.launch.gpus_needed if gpu_host else 0) for r, s in queued],
                               gpu_host)
        by_id = {r.id: (r, s) for r, s in queued}
        cpu = cpu_backend(self.settings)
        wanted = {j: (k, run_env(self.store, j, by_id[j][1], gpus, cpu)) for k, (j, gpus) in predicted.items()}
        for j in prestarts.run_ids():
            if j in self.threads:
                continue  # claimed by this worker: its executor adopts or ends it
            if j not in by_id:
                prestarts.end(j, f"run {j} is no longer queued (cancelled, or taken by another worker)")
            elif j not in wanted:
                prestarts.end(j, f"run {j} is no longer the next run on the GPUs of a run of this worker")
            elif prestarts.env_of(j) != wanted[j][1]:
                prestarts.end(j, f"run {j} will start with another environment (its GPUs changed)")
        benchmarking = {r.id for r in self.store.list_runs(status=RunStatus.benchmarking) if r.id in running}
        for j, (k, env) in wanted.items():
            if j in prestarts or k not in benchmarking:
                continue
            run, spec = by_id[j]
            prestarts.start(j, env, run_dir_of(run.run_dir, j, self.settings),
                            bench_env(env) if spec.bench and self.settings.bench_client else None, beside=k)

    def end_prestarts(self, why: str) -> None:
        """End every prestarted process of this worker (it stops, or its caller is done with it)."""
        if self.prestarts is not None:
            self.prestarts.end_all(why)

    def _caught(self, message: str) -> None:
        """Say what was caught (called from an `except` block): the console's log with the traceback, this
        worker's last errors, and the store, where the dashboard shows it (when the store answers)."""
        log.exception("worker %s: %s", self.worker_id, message)
        self.errors.append(message)
        del self.errors[:-20]
        try:
            self.store.add_worker_error(self.worker_id, message)
        except Exception:  # the database is what failed: the console has it
            log.exception("worker %s: the error could not be stored", self.worker_id)

    def stop(self) -> None:
        self.stopping.set()
        self._wake.set()

    def interrupt(self, by: str = "") -> None:
        """Stop now: claim nothing more; runs in flight stop their processes and end `interrupted`, their reason
        naming what stopped the worker (`by`: a signal's name, say). A second call changes nothing."""
        if self.interrupted_by is None:
            log.info("worker %s: stopping%s; the runs in flight stop their processes", self.worker_id,
                     f" on {by}" if by else "")
            self.interrupted_by = by
        self.stopping.set()
        self._wake.set()

    def join(self, timeout_s: float = 120.0) -> None:
        """Wait for the runs in flight to end (after `interrupt()`, that is their teardown)."""
        deadline = time.monotonic() + timeout_s
        for t in list(self.threads.values()):
            t.join(max(0.0, deadline - time.monotonic()))

