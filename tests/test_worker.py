"""The queue worker and the API over a real store (SQLite and PostgreSQL), with real processes and sockets.

The one stand-in is the executor: `RunExecutor` launches vLLM, which a unit test cannot; the recording
executor below takes its place at the worker's `executor_factory` seam.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from sqlalchemy import exc as sa_exc

from runner import api
from runner.config import CPU_DCP, BenchSpec, Host, LaunchSpec, RunSpec, Settings, SweepSpec
from runner.errors import ParseError, SpecError, StoreError
from runner.execute import Allocation, RunExecutor
from runner.models import RunStatus, utcnow
from runner.server import port_is_free
from runner.store import Store
from runner.worker import Allocator, Worker, orphan_servers, this_worker_id

FIXTURES = Path(__file__).parent / "fixtures"
DEAD_WORKER = f"{socket.gethostname()}:999999:0"


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    """The worker over each backend: a SQLite file, and a database of a real PostgreSQL server (the store
    several workers share)."""
    s = Store(db_url)
    yield s
    s.close()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


def spec(tp: int = 1, dcp: int = 1, label: str | None = None) -> RunSpec:
    return RunSpec(label=label, launch=LaunchSpec(model="org/model", tensor_parallel_size=tp,
                                                  decode_context_parallel_size=dcp), bench=[BenchSpec(num_prompts=4)])


def listening_socket() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


# -- Allocator -----------------------------------------------------------------------------------------
def test_allocator_packs_gpus() -> None:
    alloc = Allocator(list(range(8)))
    a = alloc.take(1, 4, 8000)
    b = alloc.take(2, 4, 8000)
    assert (a.gpu_ids, b.gpu_ids) == ([0, 1, 2, 3], [4, 5, 6, 7])
    assert alloc.take(3, 1, 8000) is None  # waits: nothing free
    alloc.release(1)
    assert alloc.free_gpus == [0, 1, 2, 3]
    assert alloc.take(3, 2, 8000).gpu_ids == [0, 1]
    alloc.release(2)
    alloc.release(3)
    assert alloc.take(4, 8, 8000).gpu_ids == list(range(8))  # TP=8 on 8 GPUs
    assert alloc.take(5, 1, 8000) is None


def test_allocator_on_cpu_runs_one_at_a_time() -> None:
    alloc = Allocator([])
    assert alloc.take(1, 0, 8000).gpu_ids == []
    assert alloc.take(2, 0, 8000) is None
    alloc.release(1)
    assert alloc.take(2, 0, 8000) is not None


def test_allocator_ports_are_distinct_and_free() -> None:
    held = listening_socket()
    busy = held.getsockname()[1]
    try:
        alloc = Allocator(list(range(8)))
        ports = [alloc.take(r, 2, busy).port for r in (1, 2, 3)]
        assert len(set(ports)) == 3 and busy not in ports
        assert all(p > busy and port_is_free(p) for p in ports)
    finally:
        held.close()


# -- Worker.step with a recording executor --------------------------------------------------------------
class RecordingExecutor:
    """Takes RunExecutor's place: records (run id, allocation), holds the run until `finish` is set,
    then marks it succeeded through the store as the real executor would."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, Allocation]] = []
        self.finish = threading.Event()

    def __call__(self, store: Store, run_id: int, alloc: Allocation, settings: Settings, **kw: object):
        self.calls.append((run_id, alloc))
        outer = self

        class _Exec:
            def execute(self) -> RunStatus:
                assert outer.finish.wait(5), "the test never let the run finish"
                store.update_run(run_id, status=RunStatus.succeeded, finished_at=utcnow(), phase="succeeded")
                return RunStatus.succeeded

        return _Exec()


@pytest.fixture
def recorder() -> Iterator[RecordingExecutor]:
    rec = RecordingExecutor()
    yield rec
    rec.finish.set()


def finish_all(worker: Worker, recorder: RecordingExecutor) -> None:
    recorder.finish.set()
    for t in list(worker.threads.values()):
        t.join(timeout=5)


def test_two_tp4_runs_start_together_on_disjoint_gpus(store: Store, settings: Settings, recorder: RecordingExecutor):
    a, b = api.queue_run(store, spec(tp=4)), api.queue_run(store, spec(tp=4))
    worker = Worker(store, settings, gpu_ids=range(8), executor_factory=recorder)

    assert worker.step() == [a.id, b.id]
    deadline = time.monotonic() + 2
    while len(recorder.calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    gpus = {run_id: alloc.gpu_ids for run_id, alloc in recorder.calls}
    assert gpus == {a.id: [0, 1, 2, 3], b.id: [4, 5, 6, 7]}
    assert {store.get_run(r).status for r in (a.id, b.id)} == {RunStatus.starting}
    assert store.get_run(a.id).worker_id == worker.worker_id

    finish_all(worker, recorder)
    assert {store.get_run(r).status for r in (a.id, b.id)} == {RunStatus.succeeded}
    assert worker.allocator.free_gpus == list(range(8)) and not worker.busy()


def test_a_run_larger_than_the_machine_fails_with_the_reason(store: Store, settings: Settings, recorder):
    run = api.queue_run(store, spec(tp=16))
    worker = Worker(store, settings, gpu_ids=range(8), executor_factory=recorder)

    assert worker.step() == []
    failed = store.get_run(run.id)
    assert failed.status is RunStatus.failed and recorder.calls == []
    assert failed.failure_reason == (
        "cannot run on this machine: TP×PP×DP = 16×1×1 = 16 ranks, but this machine has 8 GPUs; lower the sizes to "
        "fit 8, or queue it for a worker on a machine with 16 GPUs.")


def test_the_cpu_worker_refuses_tp8_and_dcp_at_claim_instead_of_launching(store: Store, settings: Settings,
                                                                        recorder):
    """A CPU-only machine: a TP=8 run (queued by an older version, or by hand) and a DCP run fail with
    their reason before anything starts; a run that fits starts."""
    big, dcp, fits = api.queue_run(store, spec(tp=8)), api.queue_run(store, spec(tp=2, dcp=2)), \
        api.queue_run(store, spec(tp=1))
    worker = Worker(store, settings, gpu_ids=[], executor_factory=recorder)
    worker.host = Host(cpu_backend=True, cores=2)  # this machine's cores, whatever runs the test

    assert worker.step() == [fits.id]
    assert [(store.get_run(r.id).status, store.get_run(r.id).failure_reason) for r in (big, dcp)] == [
        (RunStatus.failed, "cannot run on this machine: TP×PP×DP = 8×1×1 = 8 ranks, but this machine has no GPU "
                           "and vLLM's CPU backend runs one rank per core on its 2 cores; lower the sizes to fit 2, "
                           "or queue it for a worker on a machine with 8 GPUs."),
        (RunStatus.failed, f"cannot run on this machine: {CPU_DCP}")]
    assert [run_id for run_id, _ in recorder.calls] == [fits.id]
    finish_all(worker, recorder)


def test_a_run_queued_for_another_worker_waits_for_it(store: Store, settings: Settings, recorder):
    cpu_only = Host(cpu_backend=True, cores=2)
    run = api.queue_run(store, spec(tp=8).model_copy(update={"other_worker": True}), cpu_only)
    here = Worker(store, settings, gpu_ids=[], executor_factory=recorder)
    here.host = cpu_only
    assert here.step() == [] and store.get_run(run.id).status is RunStatus.queued  # left for its worker
    there = Worker(store, settings, gpu_ids=range(8), executor_factory=recorder)
    assert there.step() == [run.id]
    finish_all(there, recorder)
    assert store.get_run(run.id).status is RunStatus.succeeded


def test_a_run_that_does_not_fit_does_not_block_a_smaller_one(store: Store, settings: Settings, recorder):
    first, big, small = (api.queue_run(store, spec(tp=tp)) for tp in (4, 8, 2))
    worker = Worker(store, settings, gpu_ids=range(8), executor_factory=recorder)

    assert worker.step() == [first.id, small.id]
    assert store.get_run(big.id).status is RunStatus.queued
    assert worker.step() == []  # still no room for TP=8

    finish_all(worker, recorder)
    recorder.finish.clear()
    assert worker.step() == [big.id]
    deadline = time.monotonic() + 2
    while len(recorder.calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert recorder.calls[-1][1].gpu_ids == list(range(8))
    finish_all(worker, recorder)


def test_an_executor_that_raises_fails_the_run_and_frees_its_gpus(store: Store, settings: Settings):
    def broken(*args: object, **kw: object):
        raise RuntimeError("boom")

    run = api.queue_run(store, spec(tp=2))
    worker = Worker(store, settings, gpu_ids=range(2), executor_factory=broken)
    worker.step()
    worker.threads[run.id].join(timeout=5)
    failed = store.get_run(run.id)
    assert failed.status is RunStatus.failed and failed.failure_reason == "internal error: RuntimeError: boom"
    assert worker.allocator.free_gpus == [0, 1]


# -- reconcile ------------------------------------------------------------------------------------------
@pytest.fixture
def alone_on_this_host(store) -> None:
    """reconcile() stops processes marked with this store's identity and a run id it does not hold;
    skip if, against all odds, such processes exist already."""
    others = orphan_servers(set(), store)
    if others:
        pytest.skip(f"servelab-marked processes of others are running ({[p.pid for p in others]}); "
                    "reconcile would stop them")


def marked_sleep(store: Store, run_id: int, settings: Settings) -> subprocess.Popen:
    """A stand-in for a vLLM server of `run_id`, carrying the environment the real executor gives it."""
    env = RunExecutor(store, run_id, Allocation([], 8000), settings).env
    return subprocess.Popen(["sleep", "60"], env={**os.environ, **env}, start_new_session=True)


def active_run(store: Store, worker_id: str, status: RunStatus = RunStatus.benchmarking) -> int:
    run = api.queue_run(store, spec())
    store.update_run(run.id, status=status, worker_id=worker_id)
    return run.id


def test_reconcile_interrupts_runs_of_a_dead_worker_and_keeps_its_own(store, settings, alone_on_this_host):
    dead = active_run(store, DEAD_WORKER)
    mine = active_run(store, this_worker_id(), RunStatus.starting)
    other_host = active_run(store, "elsewhere.example:123:456")

    assert Worker(store, settings, gpu_ids=[]).reconcile() == [dead]

    run = store.get_run(dead)
    assert run.status is RunStatus.interrupted and run.finished_at is not None
    assert "benchmarking" in run.failure_reason and "queue it again" in run.failure_reason
    assert [p.phase for p in store.phases(dead)] == ["interrupted"]
    assert store.get_run(mine).status is RunStatus.starting
    assert store.get_run(other_host).status is RunStatus.benchmarking


def test_reconcile_stops_the_orphan_server_of_an_interrupted_run(store, settings, alone_on_this_host):
    dead = active_run(store, DEAD_WORKER)
    orphan = marked_sleep(store, dead, settings)
    try:
        t0 = time.monotonic()
        Worker(store, settings, gpu_ids=[]).reconcile()
        assert orphan.wait(timeout=2) != 0
        assert time.monotonic() - t0 < 2
    finally:
        orphan.kill()
        orphan.wait()


def test_reconcile_spares_the_server_of_a_run_it_holds(store, settings, alone_on_this_host):
    mine = active_run(store, this_worker_id())
    server = marked_sleep(store, mine, settings)
    try:
        Worker(store, settings, gpu_ids=[]).reconcile()
        time.sleep(0.1)
        assert server.poll() is None
    finally:
        server.kill()
        server.wait()


def test_reconcile_spares_servers_of_another_database(tmp_path, settings, alone_on_this_host):
    ours, theirs = Store(str(tmp_path / "ours.db")), Store(str(tmp_path / "theirs.db"))
    try:
        finished = api.queue_run(ours, spec())  # run 1 here: long done
        ours.update_run(finished.id, status=RunStatus.succeeded)
        live = active_run(theirs, this_worker_id())  # run 1 there: benchmarking under a live worker
        assert live == finished.id
        server = marked_sleep(theirs, live, settings)
        try:
            Worker(ours, settings, gpu_ids=[]).reconcile()
            time.sleep(0.1)
            assert server.poll() is None, "reconcile of one database killed another database's live server"
        finally:
            server.kill()
            server.wait()
    finally:
        ours.close()
        theirs.close()


def test_reconcile_ignores_a_malformed_run_mark(store, settings, alone_on_this_host):
    stranger = subprocess.Popen(["sleep", "60"], env={**os.environ, "SERVELAB_RUN_ID": "dev"}, start_new_session=True)
    try:
        assert Worker(store, settings, gpu_ids=[]).reconcile() == []
    finally:
        stranger.kill()
        stranger.wait()


# -- api: queue, cancel, delete ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("run_spec", "host", "message"),
    [
        (spec(tp=8, dcp=3), None, "DCP size 3 does not divide TP size 8; pick one of 1, 2, 4, 8."),
        (spec(tp=8), Host(gpus=4), "TP×PP×DP = 8×1×1 = 8 ranks, but this machine has 4 GPUs; lower the sizes to fit "
                                   "4, or queue it for a worker on a machine with 8 GPUs."),
        (spec(tp=2, dcp=2), Host(cpu_backend=True, cores=2), CPU_DCP),
    ],
)
def test_queue_run_validates_before_writing(store: Store, run_spec: RunSpec, host, message: str) -> None:
    with pytest.raises(SpecError) as err:
        api.queue_run(store, run_spec, host)
    assert err.value.problems == [message]
    assert store.list_runs() == []


def test_queue_run_stores_the_spec(store: Store) -> None:
    run = api.queue_run(store, spec(tp=8, dcp=8))
    assert (run.status, run.label, run.tensor_parallel_size, run.decode_context_parallel_size) == (
        RunStatus.queued, "TP8+DCP8", 8, 8)
    assert RunSpec.model_validate_json(run.spec_json) == spec(tp=8, dcp=8)


def test_cancel_in_each_state(store: Store) -> None:
    queued = api.queue_run(store, spec())
    running = active_run(store, this_worker_id())
    done = api.queue_run(store, spec())
    store.update_run(done.id, status=RunStatus.succeeded)

    cancelled = api.cancel(store, queued.id)
    assert cancelled.status is RunStatus.cancelled and cancelled.finished_at is not None

    requested = api.cancel(store, running)
    assert requested.status is RunStatus.benchmarking and requested.cancel_requested

    with pytest.raises(StoreError, match="already ended"):
        api.cancel(store, done.id)
    with pytest.raises(StoreError, match="already ended"):
        api.cancel(store, queued.id)


def test_delete_run_removes_its_folder(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVELAB_DATA", str(tmp_path))  # a folder inside the data folder (outside: test_security)
    folder = tmp_path / "runs" / "1"
    folder.mkdir(parents=True)
    (folder / "server.log").write_text("log")
    run = store.create_run(label="x", status=RunStatus.failed, run_dir=str(folder))

    api.delete_run(store, run.id)

    assert not folder.exists()
    with pytest.raises(StoreError):
        store.get_run(run.id)


def test_delete_of_an_active_run_is_refused_and_keeps_its_folder(store: Store, tmp_path: Path) -> None:
    folder = tmp_path / "runs" / "1"
    folder.mkdir(parents=True)
    run = store.create_run(label="x", status=RunStatus.benchmarking, run_dir=str(folder))
    with pytest.raises(StoreError, match="cancel it before deleting"):
        api.delete_run(store, run.id)
    assert folder.is_dir() and store.get_run(run.id)


# -- api: sweeps resume ---------------------------------------------------------------------------------
def dcp_sweep(*dcps: int) -> SweepSpec:
    return SweepSpec.parse({"name": "dcp", "launch": {"model": "org/model", "tensor-parallel-size": 8},
                            "bench": {"num-prompts": 4}, "matrix": {"decode-context-parallel-size": list(dcps)}})


def test_queue_sweep_resumes(store: Store) -> None:
    sweep_id, runs = api.queue_sweep(store, dcp_sweep(1, 2, 8))
    assert [r.sweep_cell for r in runs] == [f"decode_context_parallel_size={d}" for d in (1, 2, 8)]
    assert [r.label for r in runs] == ["dcp: TP8", "dcp: TP8+DCP2", "dcp: TP8+DCP8"]
    dcp1, dcp2, dcp8 = runs
    store.update_run(dcp1.id, status=RunStatus.succeeded)
    store.update_run(dcp2.id, status=RunStatus.failed)

    again_id, requeued = api.queue_sweep(store, dcp_sweep(1, 2, 8))
    assert again_id == sweep_id
    assert [r.sweep_cell for r in requeued] == [dcp2.sweep_cell]  # failed: again; succeeded and queued: kept

    for r in (dcp8, *requeued):
        store.update_run(r.id, status=RunStatus.succeeded)
    assert api.queue_sweep(store, dcp_sweep(1, 2, 8)) == (sweep_id, [])
    assert len(store.list_runs(sweep_id=sweep_id)) == 4


def test_sweep_cells_are_labelled_with_every_launch_value_they_vary(store: Store) -> None:
    sweep = SweepSpec.parse({"name": "pack", "launch": {"model": "org/model"}, "bench": {"num-prompts": 4},
                             "matrix": {"tensor-parallel-size": [1, 2], "max-num-seqs": [128, 256],
                                        "num-prompts": [4, 8]}})  # a bench key: one run holds both
    _, runs = api.queue_sweep(store, sweep)
    assert [r.label for r in runs] == ["pack: TP1 max-num-seqs=128", "pack: TP1 max-num-seqs=256",
                                       "pack: TP2 max-num-seqs=128", "pack: TP2 max-num-seqs=256"]


def test_a_sweep_labels_its_runs_and_one_stored_before_labels_existed_resumes(store: Store) -> None:
    labelled = dcp_sweep(1, 2).model_copy(update={"label": "kimi"})
    _, runs = api.queue_sweep(store, labelled)
    assert [r.label for r in runs] == ["kimi: TP8", "kimi: TP8+DCP2"]
    # a sweep row written before SweepSpec had `label` (its JSON lacks the key) is still the same sweep
    old = dcp_sweep(8)
    row = store.create_sweep(old.name, old.model_dump_json(exclude={"label"}))
    assert '"label"' not in row.spec_json
    assert api.queue_sweep(store, old)[0] == row.id


def test_queue_sweep_with_a_bad_cell_writes_nothing(store: Store) -> None:
    with pytest.raises(SpecError, match="DCP size 3 does not divide TP size 8"):
        api.queue_sweep(store, dcp_sweep(1, 3))
    assert store.list_runs() == [] and store.list_sweeps() == []


# -- api: import ----------------------------------------------------------------------------------------
def test_import_with_a_bad_file_creates_nothing(store: Store, settings: Settings) -> None:
    good = (FIXTURES / "cpu_0.32" / "bench.json").read_bytes()
    with pytest.raises(ParseError, match="notes.txt"):
        api.import_files(store, [("tp8.json", good), ("notes.txt", b"just some notes"), ("tp4.json", good)],
                         settings=settings)
    assert store.list_runs() == []
    assert not (settings.data_dir / "runs").exists()


def test_import_stores_results_in_the_run_folder(store: Store, settings: Settings) -> None:
    (run_id,) = api.import_files(store, [("tp8.json", (FIXTURES / "cpu_0.32" / "bench.json").read_bytes())],
                                 settings=settings)
    run = store.get_run(run_id)
    assert (run.status, run.source.value, run.label) == (RunStatus.succeeded, "imported", "tp8")
    (result,) = store.bench_results(run_id)
    assert Path(result.raw_path) == settings.data_dir / "runs" / str(run_id) / "imported-tp8.json"
    assert json.loads(result.metrics_json)["completed"] > 0


@pytest.mark.parametrize("name", ["../../etc/passwd", "..\\..\\windows\\evil.json", "/abs/bench.json", "...",
                                  "../", "a b?*.json"])
def test_upload_names_stay_inside_the_run_folder(store: Store, settings: Settings, name: str) -> None:
    (run_id,) = api.import_files(store, [(name, (FIXTURES / "cpu_0.32" / "bench.json").read_text())],
                                 settings=settings)
    run_dir = (settings.data_dir / "runs" / str(run_id)).resolve()
    (result,) = store.bench_results(run_id)
    raw = Path(result.raw_path).resolve()
    assert raw.parent == run_dir and raw.is_file() and raw.name.startswith("imported-")
    written = [p for p in settings.data_dir.rglob("*") if p.is_file()]
    assert written == [raw]


def test_orphan_servers_finds_only_marked_processes_not_held(store, settings) -> None:
    run = active_run(store, DEAD_WORKER)
    marked = marked_sleep(store, run, settings)
    plain = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        found = {p.pid for p in orphan_servers(set(), store)}
        assert marked.pid in found and plain.pid not in found
        assert marked.pid not in {p.pid for p in orphan_servers({run}, store)}
        assert psutil.Process(marked.pid).environ()["SERVELAB_RUN_ID"] == str(run)
    finally:
        for p in (marked, plain):
            p.kill()
            p.wait()


def test_a_scheduling_error_does_not_end_the_worker(store, settings, monkeypatch, caplog) -> None:
    worker = Worker(store, settings, gpu_ids=[], poll_s=0.01)
    calls = {"n": 0}
    locked = sa_exc.OperationalError("UPDATE run", {}, Exception("database is locked"))

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 1:
            raise locked
        return []

    monkeypatch.setattr(worker, "step", flaky_step)
    with caplog.at_level(logging.ERROR, logger="runner.worker"):
        worker.run_forever(until=lambda: calls["n"] >= 3)
    message = f"scheduling failed: OperationalError: {locked}"
    assert "database is locked" in message
    assert calls["n"] >= 3 and worker.errors == [message]
    # said on the console with its traceback, and kept in the store for the dashboard
    assert [(r.levelname, r.getMessage(), r.exc_info is not None) for r in caplog.records] == [
        ("ERROR", f"worker {worker.worker_id}: {message}", True)]
    assert [(e.worker_id, e.message) for e in api.worker_errors(store)] == [(worker.worker_id, worker.errors[0])]
