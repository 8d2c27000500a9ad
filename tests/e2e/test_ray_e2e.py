"""Issue 16, must-show 1: a real two-node Ray cluster on this machine (`ray.cluster_utils.Cluster`, each node
declaring one GPU), a PostgreSQL store, and two vLLM-CPU demo runs that the Ray worker places on different
nodes, at the same time. Each run records its node, and its processes and samples come from that node."""

import socket
import threading
import time

import psutil
import pytest

ray = pytest.importorskip("ray")  # the `ray` extra; ./dev.sh test installs it
from ray import cluster_utils  # noqa: E402
from ray._private import ray_constants  # noqa: E402

from runner import api  # noqa: E402
from runner.config import RunSpec, Settings  # noqa: E402
from runner.models import RunStatus  # noqa: E402
from runner.ray_worker import RayWorker  # noqa: E402
from runner.store import Store  # noqa: E402
from tests.e2e.conftest import assert_no_run_processes, wait_status  # noqa: E402


@pytest.fixture
def cluster():
    c = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "num_gpus": 0,
                                                                    "include_dashboard": False})
    nodes = [c.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="WARNING", log_to_driver=False)
    yield c, nodes
    ray.shutdown()
    c.shutdown()


@pytest.fixture
def pg_store(postgres):
    name = postgres.create_database()
    store = Store(postgres.url(name))
    yield store
    store.engine.dispose()
    postgres.drop_database(name)


def spec(model, port: int) -> RunSpec:
    return RunSpec.parse({
        "launch": {"model": str(model), "enforce-eager": True, "max-model-len": 512, "port": port},
        "bench": {"random-input-len": 32, "random-output-len": 16, "num-prompts": 8, "request-rate": 4,
                  "ignore-eos": True},
    })


def raylet_pid(node) -> int:
    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def test_two_runs_on_two_ray_nodes_at_once(env, cluster, pg_store, demo_model):
    c, nodes = cluster
    store = pg_store
    runs = [api.queue_run(store, spec(demo_model, port)) for port in (8610, 8650)]
    worker = RayWorker(store, Settings.from_env(), address=c.address, poll_s=0.5)
    t = threading.Thread(target=worker.run_forever, kwargs={"until": lambda: True}, daemon=True)
    t.start()

    # both benchmarking at once, each server a process under its own node's raylet
    by_raylet = {raylet_pid(n): n.node_id for n in nodes}
    seen: dict[int, str] = {}
    deadline = time.monotonic() + 200
    while len(seen) < 2 and time.monotonic() < deadline:
        live = {r.id: r for r in (store.get_run(x.id) for x in runs) if r.status == RunStatus.benchmarking}
        if len(live) == 2:
            for r in live.values():
                ancestors = {p.pid for p in psutil.Process(r.server_pid).parents()}
                seen[r.id] = next(node_id for pid, node_id in by_raylet.items() if pid in ancestors)
        time.sleep(0.25)
    assert len(seen) == 2, [(r.status.value, r.phase, r.failure_reason) for r in store.list_runs()]

    finals = [wait_status(store, r.id, {"succeeded"}, 200) for r in runs]
    t.join(60)
    assert not t.is_alive()
    assert {f.ray_node_id for f in finals} == {n.node_id for n in nodes}  # one run on each node
    for f in finals:
        assert f.ray_node_id == seen[f.id]  # the node it recorded is the one whose raylet held its server
        assert (f.node_name, f.node_ip) == (socket.gethostname(), ray.util.get_node_ip_address())
        assert f.gpu_ids_json == "[0]"  # each node's one (declared) GPU
        samples = store.samples_frame([f.id])
        assert len(samples) > 0
        assert len(store.bench_results(f.id)) == 1
        assert f.status == RunStatus.succeeded
    assert max(f.started_at for f in finals) < min(f.finished_at for f in finals)  # they overlapped
    assert_no_run_processes(env)
    assert ray.available_resources().get("GPU") == 2.0  # every placement group given back
