"""The Ray worker's placement on a real two-node Ray cluster (`ray.cluster_utils.Cluster`, one declared GPU per
node) and a real PostgreSQL store, with an executor that starts no vLLM (tests/e2e/test_ray_e2e.py runs the real
one): each run is placed on its own node, both run at once, the node is recorded, the groups are given back."""

import json
import os
import sys
import time

import psutil
import pytest

ray = pytest.importorskip("ray")
from ray import cloudpickle, cluster_utils  # noqa: E402
from ray._private import ray_constants  # noqa: E402

from runner import api  # noqa: E402
from runner.config import RunSpec, Settings  # noqa: E402
from runner.errors import ServelabError  # noqa: E402
from runner.models import RunStatus, utcnow  # noqa: E402
from runner.ray_worker import RayWorker  # noqa: E402
from runner.store import Store  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers need not import this test module


class WaitForTheOther:
    """Stands in for RunExecutor on the node: marks its run benchmarking with the task process as its server,
    then waits (60 s at most) until every other run of the store is benchmarking too: only runs that execute
    at the same time both succeed."""

    def __init__(self, store, run_id, alloc, settings, ray_node_id=None):
        self.store, self.run_id, self.alloc = store, run_id, alloc

    def execute(self) -> RunStatus:
        self.store.update_run(self.run_id, status=RunStatus.benchmarking, started_at=utcnow(), server_pid=os.getpid(),
                              gpu_ids_json=json.dumps(self.alloc.gpu_ids), port=self.alloc.port)
        deadline = time.monotonic() + 60
        status = RunStatus.failed
        while time.monotonic() < deadline:
            others = [r for r in self.store.list_runs() if r.id != self.run_id]
            if all(r.status in (RunStatus.benchmarking, RunStatus.succeeded) for r in others):
                status = RunStatus.succeeded
                break
            time.sleep(0.2)
        self.store.update_run(self.run_id, status=status, finished_at=utcnow(), phase=status.value)
        return status


@pytest.fixture(scope="module")
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


def raylet_pid(node) -> int:
    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def test_two_runs_placed_on_two_nodes_at_once(cluster, pg_store, tmp_path):
    c, nodes = cluster
    store = pg_store
    spec = RunSpec.parse({"launch": {"model": str(tmp_path), "port": 8610}, "bench": {"num-prompts": 8}})
    runs = [api.queue_run(store, spec) for _ in range(2)]
    worker = RayWorker(store, Settings(data_dir=tmp_path), address=c.address, poll_s=0.2,
                       executor_factory=WaitForTheOther)
    worker.run_forever(until=lambda: True)  # returns once nothing is queued or running

    finals = [store.get_run(r.id) for r in runs]
    assert [(f.status, f.failure_reason) for f in finals] == [(RunStatus.succeeded, None)] * 2
    assert {f.ray_node_id for f in finals} == {n.node_id for n in nodes}  # one run on each node
    raylets = {n.node_id: raylet_pid(n) for n in nodes}
    for f in finals:
        # the task's process (Ray keeps it for reuse) is a child of the raylet of the node the run recorded
        assert raylets[f.ray_node_id] in {p.pid for p in psutil.Process(f.server_pid).parents()}
        assert (f.node_ip, f.gpu_ids_json, f.worker_id) == (ray.util.get_node_ip_address(), "[0]", worker.worker_id)
        assert f.node_name == os.uname().nodename
    assert not worker.placed
    deadline = time.monotonic() + 20  # Ray frees a removed group's resources asynchronously
    while ray.available_resources().get("GPU") != 2.0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("GPU") == 2.0  # both placement groups given back


def test_sqlite_store_refused_on_a_two_node_cluster(cluster, tmp_path):
    c, _ = cluster
    with pytest.raises(ServelabError) as err:
        RayWorker(Store(tmp_path / "servelab.db"), Settings(data_dir=tmp_path), address=c.address)
    assert str(err.value).startswith("the store is a SQLite file (sqlite:///")
    assert str(err.value).endswith("and the Ray cluster has 3 nodes: a file on one node is not shared with the "
                                   "others; set SERVELAB_DB=postgresql://… (a server every node reaches)")
