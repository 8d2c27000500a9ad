"""The fault matrix on real vLLM-CPU: every server is a real `vllm serve` of the generated tiny Llama; only the GPU
is faked, at the NVML seam (`Sampler(nvml=…)`, the named scenarios of tests/test_telemetry.py).

To keep the whole matrix within minutes on two cores, its scenarios run side by side: one in-process worker with
several CPU slots executes most runs of one store while a driver thread per scenario injects its fault at the
right moment; the worker-kill and dashboard-restart scenarios use their own stores and real subprocesses; two
writer processes and a heavy reader hammer the shared SQLite file meanwhile. Each test then waits for its own
scenario and checks it: a true state, logs and samples so far kept, no process of the run left, its port and its
worker slot (its GPUs, on a GPU machine) free.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from runner import api, execute
from runner.config import RunSpec
from runner.models import RunStatus
from runner.server import free_port, kill_group, port_is_free
from runner.store import Store
from runner.worker import Worker
from tests.conftest import LocalHTTPServer
from tests.e2e.conftest import run_processes, wait_status
from tests.reliability.conftest import REPO
from tests.test_telemetry import two_healthy_h200s

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

CLI = [sys.executable, "-m", "runner.cli"]
GSM8K = REPO / "tests" / "fixtures" / "gsm8k_mini.jsonl"
SLOTS = 4  # runs the in-process worker executes side by side (the CPU backend's default is 1)
SCENARIO_TIMEOUT_S = 800  # generous: other sessions may share the two cores
STARTUP_TIMEOUT = "700"
SAMPLE_INTERVAL = "1"  # the /metrics scrape times out after one interval: 1 s survives a loaded machine
TERMINAL = {"succeeded", "failed", "cancelled", "interrupted"}


def launch(model: Path, port: int, **kw: Any) -> dict:
    return {"model": str(model), "enforce-eager": True, "max-model-len": 2048, "port": port, **kw}


def bench(num_prompts: int, rate: float, **kw: Any) -> dict:
    return {"random-input-len": 128, "random-output-len": 64, "num-prompts": num_prompts, "request-rate": rate,
            "ignore-eos": True, **kw}


METRICS_PROMPTS = 90
LONG = bench(600, 10)  # a minute of requests: the fault lands while it runs, and it ends if a session dies


# -- helpers ----------------------------------------------------------------------------------------------
def until(predicate: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(every_s)
    raise AssertionError(f"not within {timeout_s:.0f} s: {what}")


def env_of(p: psutil.Process) -> dict[str, str]:
    try:
        return p.environ()
    except (psutil.Error, OSError):
        return {}


def procs_of_run(data: Path, run_id: int) -> list[psutil.Process]:
    return [p for p in run_processes(data) if env_of(p).get("SERVELAB_RUN_ID") == str(run_id)]


def procs_of_data(data: Path) -> list[psutil.Process]:
    """Every live process started with this data folder (dashboard, worker, Streamlit, vLLM, bench)."""
    out = []
    for p in psutil.process_iter(["pid"]):
        if p.pid != os.getpid() and env_of(p).get("SERVELAB_DATA") == str(data):
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.Error:
                continue
    return out


def logged(run: Any) -> bool:
    """vLLM has written its first log lines: it is loading."""
    log = Path(run.run_dir or "/nonexistent") / "server.log"
    return log.exists() and log.stat().st_size > 0


def alive(pid: int | None) -> bool:
    try:
        return pid is not None and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def sub_env(data: Path) -> dict[str, str]:
    env = {**os.environ, "SERVELAB_DATA": str(data), "SERVELAB_DB": str(data / "servelab.db"),
           "SERVELAB_SAMPLE_INTERVAL": SAMPLE_INTERVAL, "SERVELAB_STARTUP_TIMEOUT": STARTUP_TIMEOUT,
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("SERVELAB_PASSWORD", None)
    return env


def spawn(args: list[str], data: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([*CLI, *args], env=sub_env(data), cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def health(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def listens(pid: int, port: int) -> bool:
    """Whether process `pid` or one of its descendants listens on `port` (not another session's server)."""
    try:
        tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return False
    for p in tree:
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in p.net_connections("inet")):
                return True
        except psutil.Error:
            continue
    return False


def start_dashboard(data: Path, log: Path, first_port: int) -> tuple[subprocess.Popen, int]:
    """`servelab dashboard` on a free port of its own (another session may take the same port at once)."""
    for attempt in range(5):
        port = free_port(first_port + 7 * attempt)
        proc = spawn(["dashboard", "--port", str(port)], data, log)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if health(port) and listens(proc.pid, port):
                return proc, port
            time.sleep(0.5)
        proc.kill()
        proc.wait()
    raise AssertionError("no dashboard came up on a port of its own")


@dataclass
class Settled:
    """A run after its fault, with what was kept of it."""

    run: Any
    samples: Any  # DataFrame
    server_log: str
    files: list[str]
    slot_free: bool = True
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return self.run.status.value

    @property
    def reason(self) -> str:
        return self.run.failure_reason or ""


class MetricsProxy(LocalHTTPServer):
    """A real HTTP hop in front of vLLM's `/metrics` that can be cut: then the port refuses connections."""

    def __init__(self, upstream: str):
        self.served = 0
        self.cut_at: float | None = None

        def respond(path: str) -> tuple[int, bytes, str]:
            try:
                resp = httpx.get(upstream, timeout=5)
                answer = resp.status_code, resp.content, resp.headers.get("content-type", "text/plain")
            except httpx.HTTPError:  # vLLM not up yet
                answer = 503, b"", "text/plain"
            self.served += answer[0] == 200
            return answer

        super().__init__(respond)
        self.url = self.base_url + "/metrics"

    def cut(self) -> None:
        self.cut_at = time.time()
        self.shutdown()


WRITER = """
import json, os, sys, time
from runner.models import RunSource, RunStatus
from runner.store import Store
db, tag, stop, out = sys.argv[1:5]
store, made, samples, errors, i = Store(db), [], 0, [], 0
while not os.path.exists(stop):
    try:
        run = store.create_run(label=f"{tag}-{i}", source=RunSource.imported, status=RunStatus.succeeded)
        samples += store.add_samples([{"run_id": run.id, "t": time.time() + k / 1000, "cpu_pct": float(k)}
                                      for k in range(20)])
        store.update_run(run.id, phase=f"written by {tag}", progress=1.0)
        store.add_phase(run.id, "imported")
        made.append(run.id)
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    i += 1
    time.sleep(0.25)
json.dump({"made": made, "samples": samples, "errors": errors}, open(out, "w"))
"""

READER = """
import json, os, subprocess, sys, time
from runner import api
from runner.store import Store
db, stop, out = sys.argv[1:4]
store, reads, rows, cli, errors = Store(db), 0, 0, 0, []
while not os.path.exists(stop):
    try:
        frame = store.runs_frame()
        rows = len(store.samples_frame([int(i) for i in frame["id"]][-300:]))
        api.results_frame(store)
        reads += 1
        if reads % 25 == 1:
            p = subprocess.run([sys.executable, "-m", "runner.cli", "--db", db, "runs", "--format", "json"],
                               capture_output=True, text=True, timeout=120)
            cli += 1
            if p.returncode != 0 or "locked" in p.stderr:
                errors.append(f"servelab runs: exit {p.returncode}: {p.stderr[-300:]}")
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    time.sleep(0.5)
json.dump({"reads": reads, "sample_rows": rows, "cli_reads": cli, "errors": errors}, open(out, "w"))
"""


class Campaign:
    """Every fault scenario, started at once; `result(name)` waits for one and returns what it observed."""

    def __init__(self, root: Path, model: Path, store: Store):
        self.root, self.model, self.store = root, model, store
        self.data = root / "data"
        self.worker = Worker(store, gpu_ids=[], poll_s=0.5, tick_s=0.5)
        self.worker.allocator.cpu_slots = SLOTS
        self.runs: dict[str, int] = {}
        self.threads: dict[str, threading.Thread] = {}
        self.results: dict[str, Any] = {}
        self.errors: dict[str, BaseException] = {}
        self.proxy: MetricsProxy | None = None
        self.nvml = two_healthy_h200s()
        self.children: list[subprocess.Popen] = []
        self.mounted: Path | None = None
        self.t0 = time.monotonic()
        self.stop_file = root / "stop-sqlite-load"

    # -- plumbing ---------------------------------------------------------------------------------------
    def queue(self, name: str, spec: dict, **fields: Any) -> int:
        self.runs[name] = api.queue_run(self.store, RunSpec.parse(spec), **fields).id
        return self.runs[name]

    def scenario(self, name: str, drive: Callable[[], Any]) -> None:
        def body() -> None:
            try:
                self.results[name] = drive()
            except BaseException as exc:  # handed to the test that asks for this scenario
                self.errors[name] = exc

        self.threads[name] = threading.Thread(target=body, name=f"scenario-{name}", daemon=True)
        self.threads[name].start()

    def result(self, name: str) -> Any:
        self.threads[name].join(SCENARIO_TIMEOUT_S)
        assert not self.threads[name].is_alive(), f"scenario {name} still running after {SCENARIO_TIMEOUT_S} s"
        if name in self.errors:
            raise self.errors[name]
        return self.results[name]

    def sampler(self, run_id: int, sink: Callable, **kw: Any) -> Any:
        """Takes `runner.execute.Sampler`'s place: the metrics run scrapes through the proxy and reads the fake
        NVML; every other run gets the real sampler unchanged."""
        if run_id != self.runs.get("metrics"):
            return REAL_SAMPLER(run_id, sink, **kw)
        kw.update(nvml=self.nvml)
        sampler = REAL_SAMPLER(run_id, sink, **kw)
        real_scrape_from = sampler.scrape_from

        def scrape_from(url: str | None) -> None:  # /metrics is read once the server is proven the run's own
            if url is not None and getattr(self, "proxy", None) is None:
                self.proxy = MetricsProxy(url)
            real_scrape_from(self.proxy.url if url is not None else None)

        sampler.scrape_from = scrape_from  # type: ignore[method-assign]
        self.metrics_sampler = sampler
        return sampler

    def settle(self, run_id: int, data: Path | None = None, store: Store | None = None,
               timeout_s: float = SCENARIO_TIMEOUT_S) -> Settled:
        """Wait for the run's true end, its slot back, its processes gone and its port free; what was kept."""
        data, store = data or self.data, store or self.store
        run = wait_status(store, run_id, TERMINAL, timeout_s)
        slot_free = True
        if store is self.store:
            slot_free = until(lambda: run_id not in self.worker.allocator.held, 30, "the worker slot back")
        until(lambda: not procs_of_run(data, run_id), 30, f"no process of run {run_id}")
        if run.port:
            until(lambda: port_is_free(run.port), 30, f"port {run.port} free")
        run = store.get_run(run_id)
        run_dir = Path(run.run_dir) if run.run_dir else None
        log = run_dir / "server.log" if run_dir else None
        return Settled(run=run, samples=store.samples_frame([run_id]),
                       server_log=log.read_text(errors="replace") if log and log.exists() else "",
                       files=sorted(p.name for p in run_dir.iterdir()) if run_dir and run_dir.exists() else [],
                       slot_free=slot_free)

    # -- the scenarios ----------------------------------------------------------------------------------
    def start(self) -> None:
        models = self.root / "models"
        corrupt = models / "corrupt"
        shutil.copytree(self.model, corrupt)
        (corrupt / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_')
        self.disk = self.mount_tmpfs(self.root / "disk", "24m")

        m = self.model
        self.queue("queued", {"launch": launch(m, 8811), "bench": bench(8, 4)})
        self.queue("corrupt", {"launch": launch(corrupt, 8812), "bench": bench(8, 4)})
        self.queue("killload", {"launch": launch(m, 8813), "bench": bench(8, 4)})
        self.queue("cancelstart", {"launch": launch(m, 8814), "bench": bench(8, 4)})
        self.queue("metrics", {"launch": launch(m, 8815), "bench": bench(METRICS_PROMPTS, 6)})
        self.queue("killbench", {"launch": launch(m, 8816), "bench": LONG})
        self.queue("cancelbench", {"launch": launch(m, 8817), "bench": LONG})
        self.queue("benchfail", {"launch": launch(m, 8818),
                                 "bench": [bench(4, "inf", **{"random-output-len": 16}),
                                           bench(4, "inf", **{"extra-args": ["--no-such-flag"]})]})
        if self.disk is not None:
            self.queue("diskfull", {"launch": launch(m, 8819), "bench": bench(60, 6)},
                       run_dir=str(self.disk / "run"))
        self.queue("canceleval", {"launch": launch(m, 8820), "bench": [],
                                  "eval": {"dataset-path": str(GSM8K), "limit": 4, "num-fewshot": 1,
                                           "num-concurrent": 1, "max-gen-toks": 16}})
        self.cancelled_queued = api.cancel(self.store, self.runs["queued"])  # before any worker could claim it

        self.start_sqlite_load()
        self.scenario("workerkill", self.drive_worker_kill)
        self.scenario("dashboard", self.drive_dashboard_restart)
        self.worker_thread = threading.Thread(target=self.worker.run_forever, daemon=True)
        self.worker_thread.start()
        self.scenario("queued", self.drive_cancel_queued)
        self.scenario("corrupt", lambda: self.settle(self.runs["corrupt"]))
        self.scenario("killload", self.drive_kill_while_loading)
        self.scenario("cancelstart", lambda: self.drive_cancel("cancelstart", "starting", "waiting for vLLM",
                                                               ready=lambda r: logged(r)))
        self.scenario("metrics", self.drive_metrics_outage_and_gpu_loss)
        self.scenario("killbench", self.drive_kill_during_benchmark)
        self.scenario("cancelbench", lambda: self.drive_cancel("cancelbench", "benchmarking", "requests"))
        self.scenario("benchfail", lambda: self.settle(self.runs["benchfail"]))
        if self.disk is not None:
            self.scenario("diskfull", self.drive_disk_full)
        self.scenario("canceleval", lambda: self.drive_cancel("canceleval", "evaluating", "",
                                                              ready=lambda r: (Path(r.run_dir) / "eval.log").exists()))
        self.scenario("sqlite", self.drive_sqlite_load)

    def drive_cancel_queued(self) -> Settled:
        run_id = self.runs["queued"]
        assert self.cancelled_queued.status == RunStatus.cancelled
        for name in ("corrupt", "killload", "cancelstart"):  # the worker has long started the runs behind it
            wait_status(self.store, self.runs[name], TERMINAL, SCENARIO_TIMEOUT_S)
        return self.settle(run_id)

    def drive_cancel(self, name: str, status: str, phase_has: str, ready: Callable[[Any], bool] = lambda r: True):
        run_id = self.runs[name]
        run = wait_status(self.store, run_id, {status}, SCENARIO_TIMEOUT_S, phase_has=phase_has)
        until(lambda: ready(self.store.get_run(run_id)), 120, f"run {run_id} {status} far enough to cancel")
        seen = self.store.get_run(run_id).status.value
        api.cancel(self.store, run_id)
        out = self.settle(run_id)
        out.notes.update(cancelled_in=seen, phase=run.phase)
        return out

    def drive_kill_while_loading(self) -> Settled:
        run_id = self.runs["killload"]
        run = wait_status(self.store, run_id, {"starting"}, SCENARIO_TIMEOUT_S, phase_has="waiting for vLLM")
        until(lambda: logged(run), 120, "vLLM's first log lines")  # loading, not yet ready
        os.kill(run.server_pid, signal.SIGKILL)
        out = self.settle(run_id)
        out.notes["loading"] = self.store.get_run(run_id).ready_at is None
        return out

    def drive_kill_during_benchmark(self) -> Settled:
        run_id = self.runs["killbench"]
        run = wait_status(self.store, run_id, {"benchmarking"}, SCENARIO_TIMEOUT_S, phase_has="requests")
        time.sleep(1)
        os.kill(run.server_pid, signal.SIGKILL)
        return self.settle(run_id)

    def drive_metrics_outage_and_gpu_loss(self) -> Settled:
        run_id = self.runs["metrics"]
        wait_status(self.store, run_id, {"benchmarking"}, SCENARIO_TIMEOUT_S, phase_has="requests")
        served = self.proxy.served
        until(lambda: self.proxy.served >= served + 3, 180, "three scrapes during the benchmark")
        self.proxy.cut()  # /metrics stops answering: connection refused from now on
        self.nvml.gpus[1].lost = True  # and GPU 1 falls off the bus ("GPU is lost")
        out = self.settle(run_id)
        out.notes.update(cut_at=self.proxy.cut_at, served=self.proxy.served)
        return out

    def mount_tmpfs(self, where: Path, size: str) -> Path | None:
        where.mkdir(parents=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            self.mount_error = proc.stderr.strip() or f"mount exited {proc.returncode}"
            return None
        self.mounted = where
        return where

    def drive_disk_full(self) -> Settled:
        run_id = self.runs["diskfull"]
        wait_status(self.store, run_id, {"benchmarking"}, SCENARIO_TIMEOUT_S, phase_has="requests")
        log_before = (self.disk / "run" / "server.log").read_text(errors="replace")
        filled_at = time.time()
        written = 0
        with open(self.disk / "filler", "wb") as f:  # the disk of the run folder fills up
            try:
                while True:
                    written += f.write(b"\0" * (1 << 20))
                    f.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
        out = self.settle(run_id)
        out.notes.update(filled_at=filled_at, filler_mib=written / 2**20, log_before=log_before,
                         free_kib=shutil.disk_usage(self.disk).free // 1024)
        return out

    def drive_worker_kill(self) -> dict:
        data = self.root / "wk"
        data.mkdir()
        store = Store(str(data / "servelab.db"))
        try:
            run_id = api.queue_run(store, RunSpec.parse({"launch": launch(self.model, 8840), "bench": LONG})).id
            w1 = spawn(["worker", "--poll", "0.5"], data, data / "worker1.log")
            self.children.append(w1)
            run = wait_status(store, run_id, {"starting"}, SCENARIO_TIMEOUT_S, phase_has="waiting for vLLM")
            # loading, and a first batch of samples stored: what a SIGKILL must not lose
            until(lambda: logged(run) and len(store.samples_frame([run_id])), 120, "log lines and stored samples")
            flushed = len(store.samples_frame([run_id]))
            w1.kill()  # SIGKILL: no cleanup at all
            w1.wait()
            killed = time.monotonic()
            stale = store.get_run(run_id)
            # vLLM does not outlive its worker: its process group's guard ends it (runner/guard.py)
            until(lambda: not alive(run.server_pid), 60, "the killed worker's vLLM ended by its group's guard")
            ended_s = time.monotonic() - killed
            w2 = spawn(["worker", "--poll", "0.5"], data, data / "worker2.log")
            self.children.append(w2)
            out = self.settle(run_id, data=data, store=store)
            w2.send_signal(signal.SIGTERM)
            w2_exit = w2.wait(timeout=60)
            until(lambda: not procs_of_data(data), 30, "no process of the worker-kill store")
            return {"settled": out, "stale_status": stale.status.value, "ended_s": ended_s,
                    "w2_exit": w2_exit, "server_pid": run.server_pid, "flushed": flushed}
        finally:
            store.close()

    def drive_dashboard_restart(self) -> dict:
        data = self.root / "dash"
        data.mkdir()
        store = Store(str(data / "servelab.db"))
        try:
            d1, port = start_dashboard(data, data / "dashboard1.log", 8860)
            self.children.append(d1)
            run_id = api.queue_run(store, RunSpec.parse({"launch": launch(self.model, 8850), "bench": LONG})).id
            run = wait_status(store, run_id, {"starting"}, SCENARIO_TIMEOUT_S, phase_has="waiting for vLLM")
            until(lambda: logged(run), 120, "vLLM's first log lines")
            d1_children = [p.pid for p in psutil.Process(d1.pid).children()]
            d1.kill()  # SIGKILL of the dashboard process alone: its children get no say from it
            d1.wait()
            out = self.settle(run_id, data=data, store=store, timeout_s=120)
            until(lambda: not any(alive(pid) for pid in d1_children), 60, "the first dashboard's children gone")
            until(lambda: port_is_free(port), 30, f"dashboard port {port} free")
            d2 = spawn(["dashboard", "--port", str(port)], data, data / "dashboard2.log")
            self.children.append(d2)
            until(lambda: health(port) and listens(d2.pid, port), 180, "the restarted dashboard answering")
            page = httpx.get(f"http://127.0.0.1:{port}/", timeout=10).status_code
            after_restart = store.get_run(run_id).status.value
            d2_children = [p.pid for p in psutil.Process(d2.pid).children()]
            d2.send_signal(signal.SIGTERM)
            d2_exit = d2.wait(timeout=90)
            until(lambda: not procs_of_data(data), 60, "no process of the dashboard store")
            return {"settled": out, "after_restart": after_restart, "page": page, "d2_exit": d2_exit,
                    "d1_children": d1_children, "d2_children": d2_children, "server_pid": run.server_pid,
                    "port_free": port_is_free(port)}
        finally:
            store.close()

    def start_sqlite_load(self) -> None:
        db = str(self.data / "servelab.db")
        env = sub_env(self.data)
        env.pop("SERVELAB_DATA")  # not a run process: kept out of the run-process checks
        for tag in ("writer-a", "writer-b"):
            out = self.root / f"{tag}.json"
            self.children.append(subprocess.Popen([sys.executable, "-c", WRITER, db, tag, str(self.stop_file),
                                                   str(out)], env=env, cwd=REPO))
        self.children.append(subprocess.Popen([sys.executable, "-c", READER, db, str(self.stop_file),
                                               str(self.root / "reader.json")], env=env, cwd=REPO))
        self.load_procs = self.children[-3:]

    def drive_sqlite_load(self) -> dict:
        for name in ("metrics", "killbench", "cancelbench"):  # the busiest writers of the campaign
            self.threads[name].join(SCENARIO_TIMEOUT_S)
        self.stop_file.touch()
        codes = [p.wait(timeout=120) for p in self.load_procs]
        reports = {tag: json.loads((self.root / f"{tag}.json").read_text())
                   for tag in ("writer-a", "writer-b", "reader")}
        return {"codes": codes, **reports}

    def close(self) -> None:
        """Stop everything the campaign started, whatever state a failure left it in."""
        self.stop_file.touch()
        self.worker.interrupt()
        self.worker_thread.join(120)
        self.worker.join(120)  # the runs' own threads: each stops its processes
        for proc in self.children:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for data in (self.data, self.root / "wk", self.root / "dash"):
            for p in procs_of_data(data):  # what a failed scenario may have left: only this campaign's
                try:
                    kill_group(os.getpgid(p.pid), grace_s=5)
                except (ProcessLookupError, OSError):
                    pass
        if self.mounted is not None:
            subprocess.run(["umount", "-l", str(self.mounted)], check=False)


REAL_SAMPLER = execute.Sampler


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt("SIGTERM")


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory, demo_model: Path):
    root = tmp_path_factory.mktemp("faults")
    data = root / "data"
    data.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SERVELAB_DATA", str(data))
        mp.setenv("SERVELAB_DB", str(data / "servelab.db"))
        mp.setenv("SERVELAB_SAMPLE_INTERVAL", SAMPLE_INTERVAL)
        mp.setenv("SERVELAB_STARTUP_TIMEOUT", STARTUP_TIMEOUT)
        mp.delenv("SERVELAB_PASSWORD", raising=False)
        store = Store(str(data / "servelab.db"))
        c = Campaign(root, demo_model, store)
        mp.setattr(execute, "Sampler", c.sampler)
        # a session stopped with SIGTERM (`timeout`, CI) unwinds through the `finally` below instead of
        # leaving the campaign's vLLM servers behind
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            c.start()
            yield c
        finally:
            c.close()
            store.close()
            signal.signal(signal.SIGTERM, previous)


# -- assertions shared by every fault -----------------------------------------------------------------------
def kept(s: Settled, server: bool = True) -> int:
    """Data lost: what a run that started must keep whatever happened (server log, samples, its row)."""
    lost = 0
    if server:
        lost += 0 if s.server_log.strip() else 1
        lost += 0 if len(s.samples) else 1
    return lost


def summary(s: Settled, extra: str = "") -> str:
    lines = [" ".join(line.split()) for line in s.reason.splitlines() if line.strip()]
    parts = [f"{s.status}: {' / '.join(lines[:2])[:200] if lines else '—'}"]
    if extra:
        parts.append(extra)
    if s.run.started_at is None:
        parts.append("nothing was started, nothing written but the run's row")
    else:
        parts.append(f"server.log {len(s.server_log.encode()) / 1024:.1f} KiB, {len(s.samples)} samples kept; "
                     f"no process left, port {s.run.port} free, slot free")
    return "; ".join(parts)


def test_cancel_while_queued(campaign: Campaign, record) -> None:
    s: Settled = campaign.result("queued")
    assert s.status == "cancelled" and s.reason == "cancelled while queued"
    assert s.run.worker_id is None and s.run.started_at is None and s.run.server_pid is None  # never claimed
    assert s.run.run_dir is None and not s.files and s.samples.empty
    record("fault", "cancel while queued", "cancelled at once; never claimed, nothing started",
           summary(s, "never claimed by the worker that ran the runs queued behind it"), data_lost=kept(s, False))


def test_vllm_exits_during_load(campaign: Campaign, record) -> None:
    s: Settled = campaign.result("corrupt")
    assert s.status == "failed"
    assert not s.reason.startswith("internal error") and "not ready after" not in s.reason
    assert "config" in s.reason.lower() or "json" in s.reason.lower(), s.reason
    assert s.slot_free and kept(s) == 0
    record("fault", "vLLM exits during load (model folder with a corrupt config.json)",
           "failed with vLLM's own reason; log and samples kept", summary(s), data_lost=kept(s))


def test_vllm_killed_while_loading(campaign: Campaign, record) -> None:
    s: Settled = campaign.result("killload")
    assert s.status == "failed" and s.reason and not s.reason.startswith("internal error")
    assert s.run.ready_at is None and s.slot_free and kept(s) == 0
    record("fault", "vLLM killed (SIGKILL) while loading", "failed with the last log lines; nothing left",
           summary(s), data_lost=kept(s))


def test_vllm_killed_during_the_benchmark(campaign: Campaign, record) -> None:
    s: Settled = campaign.result("killbench")
    assert s.status == "failed" and s.reason.startswith("vLLM server exited during the benchmark")
    assert "bench-0-0.log" in s.files and s.slot_free and kept(s) == 0
    assert [p.phase for p in campaign.store.phases(s.run.id)][-1] == "stopped"
    record("fault", "vLLM killed (SIGKILL) during the benchmark", "failed: vLLM exited during the benchmark; "
           "bench log kept; benchmark process stopped", summary(s), data_lost=kept(s))


def test_the_benchmark_process_fails(campaign: Campaign, record) -> None:
    s: Settled = campaign.result("benchfail")
    assert s.status == "failed" and s.reason.startswith("vllm bench serve failed (exit 2)")
    assert "unrecognized arguments: --no-such-flag" in s.reason
    kept_results = campaign.store.run_metrics(s.run.id)
    assert len(kept_results) == 1 and kept_results[0]["completed"] == 4  # the first benchmark's result stays
    assert {"bench-0-0.json", "bench-1-0.log"} <= set(s.files) and s.slot_free and kept(s) == 0
    record("fault", "the benchmark process fails (second benchmark has an unknown flag)",
           "failed with the benchmark's own error; the first benchmark's result kept",
           summary(s, "…unrecognized arguments: --no-such-flag; result of benchmark 1 kept (4/4 requests)"),
           data_lost=kept(s))


def test_metrics_stop_answering(campaign: Campaign, record) -> None:
    s: Settled = campaign.result("metrics")
    assert s.status == "succeeded", s.reason
    [metrics] = campaign.store.run_metrics(s.run.id)
    assert metrics["completed"] == METRICS_PROMPTS
    cut = s.notes["cut_at"]
    host = s.samples[s.samples.gpu_index.isna()]
    before, after = host[host.t < cut], host[host.t > cut + 1]
    assert before.kv_cache_usage_perc.notna().any() and before.num_requests_running.notna().any()
    assert len(after) >= 3 and after.note.fillna("").str.startswith("/metrics unavailable").all()
    assert after.kv_cache_usage_perc.isna().all() and after.rss_mib.notna().all()  # the rest is still sampled
    sampler = campaign.metrics_sampler
    assert sampler.errors == 0, "a sample or a batch of samples was lost"
    assert len(host) == sampler.samples_taken  # every tick's host row reached the store
    assert s.slot_free and kept(s) == 0
    record("fault", "/metrics stops answering mid-benchmark", "the run still succeeds; later samples carry the "
           "note, host sampling goes on",
           summary(s, f"{len(before)} samples with /metrics before the cut, {len(after)} after it noted "
                      f"'{after.note.iloc[0]}', {sampler.samples_taken} ticks all stored"), data_lost=kept(s))


def test_gpu_disappears(campaign: Campaign, record) -> None:
    s: Settled = campaign.result("metrics")  # the same run: GPU 1 fell off the bus when /metrics was cut
    cut = s.notes["cut_at"]
    gpu0, gpu1 = s.samples[s.samples.gpu_index == 0], s.samples[s.samples.gpu_index == 1]
    lost = gpu1[gpu1.t > cut + 1]
    assert len(lost) >= 3 and (lost.note == "GPU 1 lost: GPU is lost").all() and lost.mem_used_mib.isna().all()
    # a tick under way at the cut may see either: a sample is stamped when its tick starts, and on a loaded machine
    # one tick (blocked on the /metrics being cut) started 1.4 s before the cut and read GPU 1 after it was lost
    before = gpu1[gpu1.t < cut]
    assert len(before) >= 3 and before.mem_used_mib.isna().sum() <= 1 and before.iloc[:-1].mem_used_mib.notna().all()
    assert gpu0[gpu0.t > cut + 1].mem_used_mib.notna().all() and len(gpu0[gpu0.t > cut + 1]) >= 3
    assert s.status == "succeeded" and kept(s) == 0
    record("fault", "the machine's GPU disappears (NVML 'GPU is lost', faked at the NVML seam)",
           "no crash: the lost GPU's samples are flagged, the other GPU and the run go on",
           summary(s, f"{len(lost)} GPU 1 samples noted '{lost.note.iloc[0]}', GPU 0 still read"), data_lost=kept(s))


def test_worker_killed_and_restarted(campaign: Campaign, record) -> None:
    r = campaign.result("workerkill")
    s: Settled = r["settled"]
    assert r["stale_status"] == "starting"  # what the kill leaves until a worker returns (its vLLM ended: its guard)
    assert s.status == "interrupted"
    assert s.reason == "the worker stopped while the run was starting; queue it again to rerun"
    assert not alive(r["server_pid"]) and r["w2_exit"] == 0 and kept(s) == 0
    assert len(s.samples) >= r["flushed"]  # what was stored before the kill is all there
    record("fault", "the worker killed (SIGKILL) while vLLM loads, then restarted",
           "vLLM ends with its worker (its process group's guard); the new worker marks the run interrupted; "
           "samples stored before the kill kept (a SIGKILL loses only the sampler's unflushed last seconds)",
           summary(s, f"vLLM ended {r['ended_s']:.1f} s after the kill, by its guard; the restarted worker marked the "
                      f"run interrupted; {r['flushed']} samples "
                      "stored before the kill all there; the new worker stopped cleanly on SIGTERM"),
           data_lost=kept(s) + max(0, r["flushed"] - len(s.samples)))


def test_dashboard_restarted_during_a_run(campaign: Campaign, record) -> None:
    r = campaign.result("dashboard")
    s: Settled = r["settled"]
    assert s.status == "interrupted", s.reason
    assert s.reason == "the worker was stopped by SIGTERM while the run was starting; queue it again to rerun"
    assert not alive(r["server_pid"]) and len(r["d1_children"]) == 2  # Streamlit and the worker, both gone
    assert r["after_restart"] == "interrupted" and r["page"] == 200 and r["port_free"] and kept(s) == 0
    record("fault", "the dashboard killed (SIGKILL) during a run and restarted",
           "the dashboard's worker goes with it and ends the run interrupted at once (vLLM stopped); "
           "the restarted dashboard serves; stopping it leaves nothing",
           summary(s, "Streamlit and the worker of the killed dashboard gone, the restart served HTTP 200, "
                      f"SIGTERM stopped it (exit {r['d2_exit']})"), data_lost=kept(s))


def test_two_writers_and_a_heavy_reader_on_the_sqlite_file(campaign: Campaign, record) -> None:
    r = campaign.result("sqlite")
    assert r["codes"] == [0, 0, 0]
    problems = [e for tag in ("writer-a", "writer-b", "reader") for e in r[tag]["errors"]]
    assert problems == []
    made = r["writer-a"]["made"] + r["writer-b"]["made"]
    lost = 0
    for tag in ("writer-a", "writer-b"):
        runs = [x for x in campaign.store.list_runs() if x.label.startswith(f"{tag}-")]
        lost += len(r[tag]["made"]) - sum(1 for x in runs if x.phase == f"written by {tag}")
    assert lost == 0 and len(made) >= 20 and r["reader"]["reads"] >= 5 and r["reader"]["cli_reads"] >= 1
    reasons = [x.failure_reason or "" for x in campaign.store.list_runs()]
    assert not any("locked" in x for x in reasons)
    record("fault", "two writers and a heavy reader on the SQLite file during the campaign",
           "no 'database is locked' reaches anyone; every committed row is there",
           f"{len(made)} runs (+{r['writer-a']['samples'] + r['writer-b']['samples']} samples) written by two "
           f"processes beside the worker's own writes, {r['reader']['reads']} full reads "
           f"(+{r['reader']['cli_reads']} `servelab runs`), 0 errors, 0 rows missing", data_lost=lost)


def test_the_run_folders_disk_fills(campaign: Campaign, record) -> None:
    if campaign.disk is None:
        pytest.skip(f"cannot mount a tmpfs here ({campaign.mount_error}); run as root where mount is allowed")
    s: Settled = campaign.result("diskfull")
    n = s.notes
    assert s.status == "failed", s.reason
    assert "The run folder's disk is full" in s.reason and str(campaign.disk / "run") in s.reason
    assert s.server_log.startswith(n["log_before"][:1000]) and "startup complete" in n["log_before"]
    assert len(s.samples[s.samples.t > n["filled_at"]]) > 0  # the samples live elsewhere and go on
    assert s.slot_free and kept(s) == 0
    record("fault", "the disk of the run folder fills during the benchmark (24 MiB tmpfs)",
           "failed, the reason says the disk is full; the log so far and the samples kept",
           summary(s, "reason ends: " + s.reason.splitlines()[-1] + "; log up to the fill intact, samples still "
                      "stored after it"), data_lost=kept(s))


@pytest.mark.parametrize("name,status,reason", [
    ("cancelstart", "starting", "cancelled during startup"),
    ("cancelbench", "benchmarking", "cancelled during the benchmark"),
    ("canceleval", "evaluating", "cancelled during the evaluation"),
])
def test_cancel_in_each_phase(campaign: Campaign, record, name: str, status: str, reason: str) -> None:
    s: Settled = campaign.result(name)
    assert s.notes["cancelled_in"] == status
    assert s.status == "cancelled" and s.reason == reason
    assert [p.phase for p in campaign.store.phases(s.run.id)][-1] == "stopped"
    if name == "canceleval":
        assert "eval.log" in s.files and (Path(s.run.run_dir) / "eval.log").stat().st_size > 0
    assert s.slot_free and kept(s) == 0
    record("fault", f"cancel while {status}", f"cancelled ('{reason}'); processes stopped", summary(s),
           data_lost=kept(s))


def test_the_campaign_left_nothing(campaign: Campaign) -> None:
    for name in campaign.threads:
        campaign.result(name)
    assert not campaign.worker.allocator.held
    assert not run_processes(campaign.data)
    assert all(not procs_of_data(campaign.root / d) for d in ("wk", "dash"))
    statuses = {name: campaign.store.get_run(r).status.value for name, r in campaign.runs.items()}
    assert all(v in TERMINAL for v in statuses.values()), statuses
