"""Launches larger than one node, on a real two-node Ray cluster (`ray.cluster_utils.Cluster`, each node declaring
8 GPUs) with a real PostgreSQL store: the plan's argv, environment and placement group (really reserved across
both nodes), the Ray worker's dispatch of a TP16 run (head task, one sampler per node), the refusal of what does
not fit, the cluster's state as the dashboard reads it, and the CLI's refusal (exit 2).

vLLM is not started: a cross-node TP needs GPUs, and vLLM's CPU build refuses the Ray executor ("current platform
cpu does not support ray": its platform has no Ray device key), see docs/scale-out.md."""

import json
import os
import subprocess
import sys
import time

import pytest

ray = pytest.importorskip("ray")
from ray import cloudpickle  # noqa: E402
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group  # noqa: E402

from runner import api, cluster  # noqa: E402
from runner.config import ClusterShape, RunSpec, Settings  # noqa: E402
from runner.models import RunStatus, utcnow  # noqa: E402
from runner.ray_worker import RayWorker  # noqa: E402
from runner.store import Store  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers need not import this test module
pytestmark = pytest.mark.ray_cluster(nodes=2, gpus_per_node=8)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def two_nodes(ray_cluster):
    """The module's cluster and its two 8-GPU nodes."""
    return ray_cluster.cluster, ray_cluster.refill()


@pytest.mark.parametrize("sizes, flags", [
    ({"tensor-parallel-size": 16}, ["--tensor-parallel-size", "16"]),
    ({"tensor-parallel-size": 8, "pipeline-parallel-size": 2},
     ["--tensor-parallel-size", "8", "--pipeline-parallel-size", "2"]),
])
def test_plan_reserves_a_group_vllm_accepts_across_both_nodes(ray_cluster, two_nodes, tmp_path, sizes, flags):
    c, nodes = two_nodes
    gcs = ray.get_runtime_context().gcs_address
    launch = RunSpec.parse({"launch": {"model": str(tmp_path), "port": 8700, **sizes}}).launch
    shape = ClusterShape((0, 8, 8))
    plan = cluster.plan_multi_node(7, launch, shape, gcs)

    assert (plan.nodes, plan.ranks, plan.strategy, plan.name) == (2, 16, "PACK", "servelab-run-7")
    assert plan.bundles == ({"CPU": 1.0}, *[{"GPU": 1.0}] * 16)
    assert plan.argv(launch, prefix=["vllm"]) == ["vllm", "serve", str(tmp_path), "--host", "127.0.0.1", "--port",
                                                  "8700", *flags, "--distributed-executor-backend", "ray"]
    assert plan.env == {"RAY_ADDRESS": gcs}

    pg = placement_group(list(plan.bundles), strategy=plan.strategy, name=plan.name)
    try:
        ray.get(pg.ready(), timeout=60)
        table = placement_group_table(pg)
        per_node = cluster.node_bundles(table)
        gpu_bundles = {node: sum(1 for i in idx if table["bundles"][i].get("GPU")) for node, idx in per_node.items()}
        assert gpu_bundles == {n.node_id: 8 for n in nodes}  # 8 GPU bundles on each node, none on the head
        assert ray.available_resources().get("GPU", 0) == 0  # the group holds all 16
        # vLLM's initialize_ray_cluster checks: no bundle with more than one GPU, a GPU bundle per rank
        assert all(b.get("GPU", 0) <= 1 for b in pg.bundle_specs) and sum("GPU" in b for b in pg.bundle_specs) == 16

        # vLLM's processes find the group as "the current placement group" (runner/vllm_entry.py), after their
        # own ray.init(RAY_ADDRESS); a plain driver has none
        probe = ("import runner.vllm_entry, ray; ray.init(logging_level='ERROR', log_to_driver=False); "
                 "pg = ray.util.get_current_placement_group(); print(pg and pg.id.hex(), len(pg.bundle_specs) if pg "
                 "else 0)")
        head = plan.on_head(pg.id.hex(), "10.0.0.1")
        assert head.env == {"RAY_ADDRESS": gcs, "SERVELAB_RAY_GROUP": pg.id.hex(), "VLLM_HOST_IP": "10.0.0.1"}
        env = {**os.environ, **head.env, "PYTHONPATH": ROOT, "RAY_USAGE_STATS_ENABLED": "0"}
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        assert out.stdout.split() == [pg.id.hex(), "17"], out.stderr[-2000:]
        env.pop("SERVELAB_RAY_GROUP")  # a plain driver has no current group
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        assert out.stdout.split() == ["None", "0"], out.stderr[-2000:]
    finally:
        remove_placement_group(pg)
    assert ray_cluster.gpus_free(16.0) == 16.0


class RecordThePlan:
    """Stands in for MultiNodeExecutor on the head node (vLLM is not started): records the argv and environment
    it would start vLLM with, stays benchmarking for 3 s while the node samplers sample, then succeeds."""

    def __init__(self, store, run_id, alloc, settings, *, plan):
        self.store, self.run_id, self.alloc, self.plan = store, run_id, alloc, plan

    def execute(self) -> RunStatus:
        launch = RunSpec.model_validate_json(self.store.get_run(self.run_id).spec_json).launch
        launch = launch.model_copy(update={"port": self.alloc.port})
        self.store.update_run(self.run_id, status=RunStatus.benchmarking, started_at=utcnow(), port=self.alloc.port,
                              serve_argv_json=json.dumps(self.plan.argv(launch, prefix=["vllm"])),
                              env_json=json.dumps(self.plan.env))
        time.sleep(3)
        self.store.update_run(self.run_id, status=RunStatus.succeeded, finished_at=utcnow(), phase="succeeded")
        return RunStatus.succeeded


def test_worker_runs_a_tp16_launch_over_two_nodes_and_refuses_tp32(ray_cluster, two_nodes, pg_store, tmp_path):
    c, nodes = two_nodes
    store = pg_store
    shape = api.cluster_state(c.address, max_age_s=0).shape()
    assert shape.node_gpus == (0, 8, 8) or sorted(shape.node_gpus) == [0, 8, 8]
    tp16 = api.queue_run(store, RunSpec.parse({"launch": {"model": str(tmp_path), "tensor-parallel-size": 16,
                                                          "port": 8710}, "bench": {"num-prompts": 8}}), shape)
    # TP32 passes no check here (queued for another worker): the Ray worker refuses it with the shape
    tp32 = api.queue_run(store, RunSpec.parse({"launch": {"model": str(tmp_path), "tensor-parallel-size": 32},
                                               "bench": {"num-prompts": 8}}))
    worker = RayWorker(store, Settings(data_dir=tmp_path, sample_interval_s=0.5), address=c.address, poll_s=0.2,
                       multi_node_factory=RecordThePlan)
    worker.run_forever(until=lambda: True)

    run = store.get_run(tp16.id)
    assert (run.status, run.failure_reason) == (RunStatus.succeeded, None)
    assert run.ray_node_id in {n.node_id for n in nodes} and run.node_ip == ray.util.get_node_ip_address()
    argv, env = json.loads(run.serve_argv_json), json.loads(run.env_json)
    assert argv == ["vllm", "serve", str(tmp_path), "--host", "127.0.0.1", "--port", str(run.port),
                    "--tensor-parallel-size", "16", "--distributed-executor-backend", "ray"]
    assert env.keys() == {"SERVELAB_RAY_GROUP", "RAY_ADDRESS", "VLLM_HOST_IP"}
    assert (env["RAY_ADDRESS"], env["VLLM_HOST_IP"]) == (ray.get_runtime_context().gcs_address, run.node_ip)
    assert len(env["SERVELAB_RAY_GROUP"]) == 36  # the id (hex) of the group the worker reserved
    placed = [p.detail for p in store.phases(run.id) if p.phase == "placed"]
    assert len(placed) == 1 and placed[0].startswith(f"group servelab-run-{run.id} over 2 nodes: ")
    samples = store.samples_frame([run.id])
    assert set(samples["ray_node_id"].dropna()) == {n.node_id for n in nodes}  # a sampler on each node
    assert samples.groupby("ray_node_id")["host_mem_used_pct"].count().min() >= 2

    refused = store.get_run(tp32.id)
    assert refused.status == RunStatus.failed
    assert refused.failure_reason == ("cannot run on this Ray cluster: The Ray cluster has 2 nodes × 8 GPUs; TP 32 "
                                      "needs 4 such nodes: add nodes or lower the sizes to fit 16 GPUs.")
    assert not worker.placed and ray_cluster.gpus_free(16.0) == 16.0


def test_cluster_state_as_the_dashboard_reads_it(two_nodes, pg_store, tmp_path):
    c, nodes = two_nodes
    run = api.queue_run(pg_store, RunSpec.parse({"launch": {"model": str(tmp_path), "tensor-parallel-size": 8},
                                                 "label": "eight"}))
    pg = placement_group([{"GPU": 1.0}] * 8, strategy="STRICT_PACK", name=f"servelab-run-{run.id}")
    ray.get(pg.ready(), timeout=60)
    other = placement_group([{"GPU": 1.0}] * 8, strategy="STRICT_PACK", name="servelab-run-999")  # another store's
    ray.get(other.ready(), timeout=60)
    worker = RayWorker(pg_store, Settings(data_dir=tmp_path), address=c.address)
    worker._write_card()
    assert ray.get(worker.card.read.remote(), timeout=60)["worker_id"] == worker.worker_id  # the card's actor is up
    try:
        state = cluster.snapshot(c.address)  # a child process, as the dashboard reads it
    finally:
        remove_placement_group(pg)
        remove_placement_group(other)
    assert state.error is None and state.address == c.address
    alive = {n.node_id: n for n in state.alive}
    assert set(alive) == {c.head_node.node_id, *(n.node_id for n in nodes)}
    gpu_nodes = [alive[n.node_id] for n in nodes]
    assert sorted((n.gpus_total, n.gpus_free, n.gpus_busy, n.runs) for n in gpu_nodes) == [
        (8, 0, 8, (run.id,)), (8, 0, 8, (999,))]
    assert alive[c.head_node.node_id].gpus_total == 0
    assert all(n.ip == ray.util.get_node_ip_address() and n.name == os.uname().nodename for n in state.alive)
    assert worker.worker_id in {w.worker_id for w in state.workers}
    assert state.shape() == ClusterShape(tuple(n.gpus_total for n in state.alive))

    frame = api.cluster_nodes_frame(pg_store, state)  # the Cluster page's table
    rows = {r["Ray node id"]: r for r in frame.to_dict("records")}
    assert sorted((r["GPUs"], r["GPUs free"], r["GPUs busy"], r["Runs"]) for r in rows.values()) == sorted([
        (0, 0, 0, ""), (8, 0, 8, "#999 (not in this store)"), (8, 0, 8, f"#{run.id} eight (queued)")])

    gone = cluster.snapshot("127.0.0.1:1", timeout_s=60)
    assert gone.nodes == () and gone.error is not None and gone.error.startswith(
        "the Ray cluster at 127.0.0.1:1 cannot be reached: ")


def test_cli_refuses_what_the_cluster_cannot_hold(two_nodes, tmp_path):
    c, _ = two_nodes
    spec = tmp_path / "tp32.yaml"
    spec.write_text(f"launch:\n  model: {tmp_path}\n  tensor-parallel-size: 32\nbench:\n  num-prompts: 8\n")
    env = {**os.environ, "PYTHONPATH": ROOT, "SERVELAB_RAY_ADDRESS": c.address, "SERVELAB_DATA": str(tmp_path),
           "RAY_USAGE_STATS_ENABLED": "0"}
    out = subprocess.run([sys.executable, "-m", "runner.cli", "--db", str(tmp_path / "s.db"), "run", str(spec)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip() == ("error: The Ray cluster has 2 nodes × 8 GPUs; TP 32 needs 4 such nodes: add nodes "
                                  "or lower the sizes to fit 16 GPUs.")
    assert api.list_runs(Store(tmp_path / "s.db")) == []
