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
from ray import cloudpickle  # noqa: E402

from runner import api  # noqa: E402
from runner.config import RunSpec, Settings  # noqa: E402
from runner.errors import ServelabError  # noqa: E402
from runner.models import RunStatus, utcnow  # noqa: E402
from runner.ray_worker import RayWorker  # noqa: E402
from runner.store import Store  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers need not import this test module
pytestmark = pytest.mark.ray_cluster(nodes=2, gpus_per_node=1)


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


def test_two_runs_placed_on_two_nodes_at_once(ray_cluster, pg_store, tmp_path):
    nodes, store = ray_cluster.refill(), pg_store
    spec = RunSpec.parse({"launch": {"model": str(tmp_path), "port": 8610}, "bench": {"num-prompts": 8}})
    runs = [api.queue_run(store, spec) for _ in range(2)]
    worker = RayWorker(store, Settings(data_dir=tmp_path), address=ray_cluster.address, poll_s=0.2,
                       executor_factory=WaitForTheOther)
    worker.run_forever(until=lambda: True)  # returns once nothing is queued or running

    finals = [store.get_run(r.id) for r in runs]
    assert [(f.status, f.failure_reason) for f in finals] == [(RunStatus.succeeded, None)] * 2
    assert {f.ray_node_id for f in finals} == {n.node_id for n in nodes}  # one run on each node
    raylets = {n.node_id: ray_cluster.raylet_pid(n) for n in nodes}
    for f in finals:
        # the executor's process (its node's NodeExecutor) is a child of the raylet of the node the run recorded
        assert raylets[f.ray_node_id] in {p.pid for p in psutil.Process(f.server_pid).parents()}
        assert (f.node_ip, f.gpu_ids_json, f.worker_id) == (ray.util.get_node_ip_address(), "[0]", worker.worker_id)
        assert f.node_name == os.uname().nodename
    assert not worker.placed
    assert ray_cluster.gpus_free(2.0) == 2.0  # both placement groups given back


def test_sqlite_store_refused_on_a_two_node_cluster(ray_cluster, tmp_path):
    with pytest.raises(ServelabError) as err:
        RayWorker(Store(tmp_path / "servelab.db"), Settings(data_dir=tmp_path), address=ray_cluster.address)
    assert str(err.value).startswith("the store is a SQLite file (sqlite:///")
    assert str(err.value).endswith("and the Ray cluster has 3 nodes: a file on one node is not shared with the "
                                   "others; set SERVELAB_DB=postgresql://… (a server every node reaches)")
