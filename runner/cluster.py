"""The Ray cluster as servelab sees it, and the plan of a launch that spans nodes.

- `ClusterState`: the cluster's nodes (alive, GPUs total/free), servelab's placement groups (which run holds
  which node) and the Ray worker's card, read from Ray. `snapshot()` reads it in a short child process, so a
  dashboard never becomes a Ray driver (a driver whose cluster goes away is ended by Ray).
- `MultiNodePlan`: vLLM's own multi-node path. vLLM's Ray executor wants one bundle per rank holding one GPU
  (`initialize_ray_cluster` refuses a bundle of more than one) and the driver's node inside the group; it uses
  an existing group when `ray.util.get_current_placement_group()` returns one. servelab reserves the group
  (a CPU bundle for the run's head task, then TP×PP×DP `{"GPU": 1}` bundles, PACK as vLLM's own), runs
  `vllm serve … --distributed-executor-backend ray` from the head task with RAY_ADDRESS (the cluster vLLM
  joins), VLLM_HOST_IP (the head node's address) and the group's id, which `runner.vllm_entry` makes the current
  group in vLLM's processes. One sampler task per node of the group.

Ray is imported inside the functions: importing this module costs nothing to a process that never uses Ray.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from runner.commands import serve_argv
from runner.config import ClusterShape, LaunchSpec, Settings
from runner.execute import Allocation, RunExecutor
from runner.models import TERMINAL
from runner.store import Store
from runner.telemetry import Sampler

log = logging.getLogger(__name__)

GROUP_PREFIX = "servelab-run-"  # the placement group of run N is `servelab-run-N`
RAY_GROUP_ENV = "SERVELAB_RAY_GROUP"  # read by runner.vllm_entry in vLLM's processes: the id of vLLM's group
CARD_PREFIX, NAMESPACE = "servelab-worker-", "servelab"  # a Ray worker's card: a named actor that dies with it
SNAPSHOT_TIMEOUT_S = 30.0


def group_name(run_id: int) -> str:
    return f"{GROUP_PREFIX}{run_id}"


# -- the cluster's state ---------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeState:
    node_id: str
    name: str  # hostname
    ip: str
    alive: bool
    gpus_total: int
    gpus_free: int  # not reserved by any placement group or task
    cpus_total: float
    cpus_free: float
    runs: tuple[int, ...] = ()  # runs whose placement group holds a bundle on this node

    @property
    def gpus_busy(self) -> int:
        return self.gpus_total - self.gpus_free


@dataclass(frozen=True)
class WorkerCard:
    """What the Ray worker says of itself: its id, since when, its last scheduling pass, the runs it holds."""

    worker_id: str
    started_at: float
    last_step_at: float
    runs: tuple[int, ...] = ()
    errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class ClusterState:
    address: str
    nodes: tuple[NodeState, ...] = ()
    workers: tuple[WorkerCard, ...] = ()  # none: no Ray worker is connected to this cluster
    error: str | None = None  # the cluster could not be read: why
    read_at: float = field(default_factory=time.time)

    @property
    def alive(self) -> tuple[NodeState, ...]:
        return tuple(n for n in self.nodes if n.alive)

    def shape(self, cpu_backend: bool = False) -> ClusterShape:
        return ClusterShape(tuple(n.gpus_total for n in self.alive), cpu_backend=cpu_backend)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ClusterState:
        data = json.loads(text)
        nodes = tuple(NodeState(**{**n, "runs": tuple(n["runs"])}) for n in data.pop("nodes"))
        cards = tuple(WorkerCard(**{**w, "runs": tuple(w["runs"]), "errors": tuple(w["errors"])})
                      for w in data.pop("workers"))
        return cls(nodes=nodes, workers=cards, **data)


def read_state(address: str) -> ClusterState:
    """The state of the cluster this process is connected to (`ray.init` done)."""
    import ray
    from ray._private.state import available_resources_per_node

    free = available_resources_per_node()
    runs: dict[str, set[int]] = {}
    for pg in ray.util.placement_group_table().values():
        name = pg.get("name") or ""
        if name.startswith(GROUP_PREFIX) and pg.get("state") == "CREATED" and name[len(GROUP_PREFIX):].isdigit():
            for node_id in pg.get("bundles_to_node_id", {}).values():
                runs.setdefault(node_id, set()).add(int(name[len(GROUP_PREFIX):]))
    nodes = []
    for n in ray.nodes():
        total, avail = n.get("Resources", {}), free.get(n["NodeID"], {})
        nodes.append(NodeState(
            node_id=n["NodeID"], name=n.get("NodeManagerHostname", ""), ip=n.get("NodeManagerAddress", ""),
            alive=bool(n.get("Alive")), gpus_total=int(total.get("GPU", 0)),
            gpus_free=int(avail.get("GPU", 0)) if n.get("Alive") else 0, cpus_total=float(total.get("CPU", 0)),
            cpus_free=float(avail.get("CPU", 0)) if n.get("Alive") else 0.0,
            runs=tuple(sorted(runs.get(n["NodeID"], ())))))
    nodes.sort(key=lambda n: (not n.alive, n.name, n.ip, n.node_id))
    return ClusterState(address=address, nodes=tuple(nodes), workers=_read_cards())


def _read_cards() -> tuple[WorkerCard, ...]:
    """The cards of the Ray workers connected now (a card ends with its worker)."""
    import ray

    cards: list[WorkerCard] = []
    for name in ray.util.list_named_actors(all_namespaces=True):
        if not (isinstance(name, dict) and name.get("namespace") == NAMESPACE
                and str(name.get("name", "")).startswith(CARD_PREFIX)):
            continue
        try:
            found: Any = ray.get(ray.get_actor(name["name"], namespace=NAMESPACE).read.remote(), timeout=10)
        except (ValueError, ray.exceptions.RayError):  # its worker ended meanwhile
            continue
        cards.append(WorkerCard(**{**found, "runs": tuple(found["runs"]), "errors": tuple(found["errors"])}))
    return tuple(sorted(cards, key=lambda c: c.started_at))


def snapshot(address: str, timeout_s: float = SNAPSHOT_TIMEOUT_S) -> ClusterState:
    """The cluster's state read by a child process (`python -m runner.cluster ADDRESS`); never raises: a
    cluster that cannot be read gives a state with `error` saying why."""
    if refused := _unreachable(address):  # Ray itself retries an address for a minute before it gives up
        return ClusterState(address, error=f"the Ray cluster at {address} cannot be reached: {refused}")
    argv = [sys.executable, "-m", "runner.cluster", address]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return ClusterState(address, error=f"no answer from the Ray cluster at {address} within {timeout_s:.0f} s")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return ClusterState(address, error=f"the Ray cluster at {address} cannot be reached: {last}")
    return ClusterState.from_json(done.stdout.strip().splitlines()[-1])


def _unreachable(address: str) -> str | None:
    """Why nothing answers at `address` (`host:port`), or None (it answers, or the address is `auto`)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


# -- the Ray worker's card -------------------------------------------------------------------------
class _Card:
    """A named actor that the Ray worker creates and updates; Ray ends it with the worker (its owner)."""

    def __init__(self, worker_id: str):
        self.card = WorkerCard(worker_id, time.time(), time.time())

    def write(self, runs: list[int], errors: list[str]) -> None:
        self.card = WorkerCard(self.card.worker_id, self.card.started_at, time.time(), tuple(runs), tuple(errors))

    def read(self) -> dict[str, Any]:  # plain data: the reader may know this module as __main__
        return asdict(self.card)


def create_card(worker_id: str) -> Any:
    """A Ray worker's card: a named actor (unique name; several workers may share a process in tests) that its
    worker owns, so Ray ends it with the worker."""
    import ray

    return ray.remote(_Card).options(name=f"{CARD_PREFIX}{uuid.uuid4().hex[:12]}", namespace=NAMESPACE,
                                     num_cpus=0, max_restarts=0).remote(worker_id)


# -- multi-node launches ---------------------------------------------------------------------------
@dataclass(frozen=True)
class MultiNodePlan:
    """How a launch larger than one node runs: the placement group to reserve, and what the head task adds to
    the run's `vllm serve` (flags and environment)."""

    run_id: int
    nodes: int
    ranks: int  # TP×PP×DP: one {"GPU": 1} bundle each
    bundles: tuple[dict[str, float], ...]
    strategy: str
    extra_args: tuple[str, ...]
    env: dict[str, str]

    @property
    def name(self) -> str:
        return group_name(self.run_id)

    def launch(self, launch: LaunchSpec) -> LaunchSpec:
        """The run's launch with what the plan adds (the user's own extra args and env first)."""
        return launch.model_copy(update={"extra_args": [*launch.extra_args, *self.extra_args],
                                         "env": {**launch.env, **self.env}})

    def on_head(self, group_id: str, ip: str) -> MultiNodePlan:
        """The plan as the head task runs it: vLLM's address on this node, and the group it is in."""
        return replace(self, env={**self.env, RAY_GROUP_ENV: group_id, "VLLM_HOST_IP": ip})

    def argv(self, launch: LaunchSpec, prefix: list[str] | None = None) -> list[str]:
        """The head task's `vllm serve` argv for `launch`."""
        return serve_argv(self.launch(launch), prefix=prefix)


HEAD_BUNDLE = {"CPU": 1.0}  # the head task: servelab's executor, vLLM's API server and engine core (no GPU)


def plan_multi_node(run_id: int, launch: LaunchSpec, shape: ClusterShape, ray_address: str = "") -> MultiNodePlan:
    """The plan of `launch` on a cluster of `shape` (which `shape.nodes_for` says needs more than one node).
    `ray_address`: the GCS address vLLM joins (RAY_ADDRESS); the head task adds VLLM_HOST_IP and the group's id
    once the group exists (`on_head`)."""
    ranks = launch.gpus_needed
    nodes = shape.nodes_for(launch) or 0
    env = {"RAY_ADDRESS": ray_address} if ray_address else {}
    return MultiNodePlan(
        run_id=run_id, nodes=nodes, ranks=ranks,
        # bundle 0: the head task's CPU; then one GPU per rank, as vLLM's initialize_ray_cluster builds them
        bundles=(dict(HEAD_BUNDLE), *({"GPU": 1.0} for _ in range(ranks))),
        strategy="PACK",  # vLLM's own strategy for its group: as few nodes as possible
        extra_args=("--distributed-executor-backend", "ray"),
        env=env)


class MultiNodeExecutor(RunExecutor):
    """A `RunExecutor` on the head node of a multi-node run: the same life cycle, with the plan's flags and
    environment, and no GPU of its own (vLLM's Ray workers hold the group's GPUs)."""

    def __init__(self, store: Store, run_id: int, alloc: Allocation, settings: Settings | None = None, *,
                 plan: MultiNodePlan, **kw: Any):
        super().__init__(store, run_id, alloc, settings, **kw)
        self.plan = plan
        self.launch = plan.launch(self.launch)
        self.env.update(plan.env)
        self.env.pop("CUDA_VISIBLE_DEVICES", None)  # Ray sets each vLLM worker's own


def sample_node(store_url: str, run_id: int, interval_s: float, poll_s: float = 2.0) -> int:
    """Body of a run's sampler task on one node of its group: this node's GPUs and host, each row marked with
    the node's Ray id, until the run ends. Returns the ticks taken."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    store = Store(store_url)
    sampler = Sampler(run_id, lambda rows: store.add_samples([{**r, "ray_node_id": node_id} for r in rows]),
                      interval_s=interval_s).start()
    try:
        while store.get_run(run_id).status not in TERMINAL:
            time.sleep(poll_s)
    finally:
        sampler.stop()
        store.engine.dispose()
    return sampler.samples_taken


def execute_multi_node(store_url: str, run_id: int, port_wanted: int, settings: Settings, plan: MultiNodePlan,
                       executor_factory: Callable[..., Any] = MultiNodeExecutor) -> str:
    """Body of a multi-node run's head task (bundle 0 of its group): record the node, start a sampler on every
    node of the group, execute the run with the plan (VLLM_HOST_IP: this node). Returns the final status."""
    import ray
    from ray.util.placement_group import placement_group_table
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from runner.server import free_port

    ctx = ray.get_runtime_context()
    ip = ray.util.get_node_ip_address()
    pg = ray.util.get_current_placement_group()
    if pg is None:
        raise RuntimeError(f"run {run_id}: the head task was scheduled outside its placement group {plan.name}")
    store = Store(store_url)
    try:
        store.update_run(run_id, node_name=socket.gethostname(), node_ip=ip, ray_node_id=ctx.get_node_id())
        per_node = node_bundles(placement_group_table(pg))
        store.add_phase(run_id, "placed", detail=f"group {plan.name} over {len(per_node)} nodes: " + ", ".join(
            f"{node[:12]} bundles {idx[0]}–{idx[-1]}" for node, idx in per_node.items()))
        sampler = ray.remote(sample_node)
        refs = [sampler.options(num_cpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=idx[0])).remote(store_url, run_id, settings.sample_interval_s)
                for idx in per_node.values()]
        here = plan.on_head(pg.id.hex(), ip)
        status = executor_factory(store, run_id, Allocation([], free_port(port_wanted)), settings, plan=here).execute()
        ray.get(refs, timeout=120)  # each ends once the run has ended
        return str(getattr(status, "value", status))
    finally:
        store.engine.dispose()


def node_bundles(table: dict[str, Any]) -> dict[str, list[int]]:
    """Node id → the bundle indices of a placement group on it (`placement_group_table(pg)`)."""
    out: dict[str, list[int]] = {}
    for index, node_id in sorted(table.get("bundles_to_node_id", {}).items()):
        out.setdefault(node_id, []).append(int(index))
    return out


def main() -> None:
    """`python -m runner.cluster ADDRESS`: print the cluster's state as one JSON line."""
    import ray

    address = sys.argv[1]
    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False, namespace=NAMESPACE)
    try:
        print(read_state(address).to_json())
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
