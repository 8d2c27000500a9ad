"""The queue worker on a Ray cluster: each queued run reserves its GPUs through a placement group of one bundle,
and runs the same `RunExecutor` on the node that holds them (vLLM, the benchmark client and the sampler all run
there). The run records its node (name, IP, Ray node id) and GPU ids.

The executor runs in a `NodeExecutor`, one long-lived Ray actor per node that keeps the runner imported and
executes each run handed to it in a thread, as the local worker does: a Ray task per run would start a fresh
process (Ray's `max_calls=1` for GPU tasks) and import the runner, seconds per run (docs/performance.md). The
actor holds no GPU; the group does, and a probe task in the group reads their ids (`runner.ray_gpus`).

Cancel needs no Ray call: the executor on the node polls the store and stops its own process group. The actors
are owned by this driver, so when it dies Ray ends them, and with them the guards' pipes (runner/guard.py ends
each run's processes); a node that dies takes its actor along. A restarted worker marks such runs interrupted
and stops, on every node, the vLLM processes of this store that no live run holds (as the local worker does).
Runs larger than one node still run as a task in their group (`cluster.execute_multi_node`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from runner import cluster, ray_gpus
from runner.config import ClusterShape, RunSpec, Settings
from runner.errors import ServelabError
from runner.execute import Allocation, RunExecutor
from runner.models import ACTIVE, Run, RunStatus, utcnow
from runner.server import free_port, kill_group
from runner.store import Store
from runner.worker import orphan_servers, this_worker_id, worker_alive

log = logging.getLogger(__name__)

RENEW_WAIT_S = 1.0  # how long a release waits for Ray to show its resources free (~0.1 s seen)
NODE_CHECK_S = 2.0  # how long a lost actor's node has to answer on its raylet's port


def sqlite_refusal(store_url: str, nodes: int) -> str | None:
    """Why a Ray worker cannot use this store on a cluster of `nodes` nodes, or None."""
    if nodes > 1 and str(store_url).startswith("sqlite"):
        return (f"the store is a SQLite file ({store_url}) and the Ray cluster has {nodes} nodes: a file on one node "
                "is not shared with the others; set SERVELAB_DB=postgresql://… (a server every node reaches)")
    return None


def where(run: Run) -> str:
    """The node a run recorded, as a failure reason names it: its hostname, IP and Ray node id (the one Ray's
    own messages and `ray list nodes` show: nodes of one host share the first two)."""
    return f"node {run.node_name or '?'} ({run.node_ip or '?'}, Ray node {run.ray_node_id or '?'})"


def bundle(gpus: int) -> dict[str, float]:
    """The one placement-group bundle of a single-node run: its GPUs and one CPU for the executor."""
    return {"GPU": float(gpus), "CPU": 1.0} if gpus else {"CPU": 1.0}


class NodeExecutor:
    """The Ray actor on one node that executes the runs placed there, each in a thread of its own (a threaded
    actor). Owned by the Ray worker: when the worker or the node dies, Ray ends it, and the guards of its runs'
    process groups end those. It holds no Ray resource of its own: the run's placement group holds its GPUs
    and a CPU."""

    def __init__(self, store_url: str, settings: Settings, executor_factory: Callable[..., RunExecutor]):
        self.store = Store(store_url)
        self.settings = settings
        self.executor_factory = executor_factory
        self.node_id = ray.get_runtime_context().get_node_id()
        self._lock = threading.Lock()
        self._allocs: dict[int, Allocation] = {}  # runs executing here: a new run's port avoids theirs

    def _ports(self) -> set[int]:
        with self._lock:
            return {a.port for a in self._allocs.values()}

    def execute(self, run_id: int, gpu_ids: list[int], port_wanted: int) -> str:
        """Record where the run executes, then execute it here. Returns the final status."""
        self.store.update_run(run_id, node_name=socket.gethostname(), node_ip=ray.util.get_node_ip_address(),
                              ray_node_id=self.node_id)
        with self._lock:
            taken = {a.port for a in self._allocs.values()}
            alloc = Allocation(list(gpu_ids), free_port(port_wanted, taken=taken), ports_in_use=self._ports)
            self._allocs[run_id] = alloc
        try:
            status = self.executor_factory(self.store, run_id, alloc, self.settings, ray_node_id=self.node_id).execute()
            return str(getattr(status, "value", status))
        finally:
            with self._lock:
                self._allocs.pop(run_id, None)

    def sweep(self, live_runs: list[int]) -> int:
        """On this node: stop the vLLM processes of this store that no live run holds. Returns how many."""
        n = 0
        for proc in orphan_servers(set(live_runs), self.store):
            try:
                kill_group(os.getpgid(proc.pid), grace_s=15)
                n += 1
            except (ProcessLookupError, OSError):
                continue
        return n


@dataclass
class _Placed:
    pg: PlacementGroup
    ref: Any = None  # the run's ObjectRef (its NodeExecutor call, or its task) once claimed and submitted
    plan: cluster.MultiNodePlan | None = None  # a run larger than one node
    node_id: str | None = None  # the node whose NodeExecutor executes it
    gpus: int = 0  # a single-node run's GPUs
    ready: Any = field(init=False)  # the group's ready ObjectRef

    def __post_init__(self) -> None:
        self.ready = self.pg.ready()


def reserve(run_id: int, gpus: int, plan: cluster.MultiNodePlan | None) -> PlacementGroup:
    """Create a run's placement group: one bundle on one node, or the plan's bundles over several."""
    if plan is not None:
        return placement_group(list(plan.bundles), strategy=plan.strategy, name=plan.name)
    return placement_group([bundle(gpus)], strategy="STRICT_PACK", name=cluster.group_name(run_id))


def needs(placed: _Placed) -> Counter[str]:
    """What a group holds once placed: its bundles' CPUs and GPUs, summed."""
    out: Counter[str] = Counter()
    for b in placed.pg.bundle_specs:
        out.update({k: v for k, v in b.items() if k in ("CPU", "GPU")})
    return out


class RayWorker:
    """Executes queued runs on the nodes of a Ray cluster until stopped; the same loop as `Worker`."""

    def __init__(self, store: Store, settings: Settings | None = None, *, address: str | None = None,
                 poll_s: float = 1.0, executor_factory: Callable[..., RunExecutor] = RunExecutor,
                 multi_node_factory: Callable[..., Any] = cluster.MultiNodeExecutor):
        self.store = store
        self.executor_factory = executor_factory
        self.multi_node_factory = multi_node_factory
        self.settings = settings or Settings.from_env()
        self.address = address or self.settings.ray_address or "auto"
        if not ray.is_initialized():
            ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=False)
        nodes = self.alive_nodes()
        if refused := sqlite_refusal(store.url, len(nodes)):
            raise ServelabError(refused)
        self.poll_s = poll_s
        self.worker_id = this_worker_id()
        self.placed: dict[int, _Placed] = {}
        self.errors: list[str] = []
        self.stopping = threading.Event()
        self._node_executor = ray.remote(max_restarts=0)(NodeExecutor)  # a run is never silently re-executed
        self.executors: dict[str, Any] = {}  # Ray node id → its NodeExecutor
        # reused (max_calls=0): it touches no GPU, so no process needs to end to give GPU memory back
        self._gpu_probe = ray.remote(max_retries=0, max_calls=0)(ray_gpus.held_gpu_ids)
        self._remote_multi = ray.remote(max_retries=0)(cluster.execute_multi_node)
        self.card = cluster.create_card(self.worker_id)  # what the dashboard's Cluster page shows of this worker
        self._card_said: tuple[Any, ...] = ()

    @staticmethod
    def alive_nodes() -> list[dict[str, Any]]:
        return [n for n in ray.nodes() if n.get("Alive")]

    def max_node_gpus(self) -> int:
        return self.shape().node_size

    def shape(self) -> ClusterShape:
        return ClusterShape(tuple(int(n.get("Resources", {}).get("GPU", 0)) for n in self.alive_nodes()))

    # -- reconcile ------------------------------------------------------------------------------
    def reconcile(self) -> list[int]:
        """Runs whose Ray task is gone (their worker died, so Ray ended its tasks) → interrupted; then every
        node stops the processes of this store that no live run holds. Returns the ids marked interrupted."""
        interrupted, live = [], []
        for run in self.store.list_runs(status=ACTIVE):
            if run.id in self.placed or run.worker_id == self.worker_id or worker_alive(run.worker_id):
                live.append(run.id)
                continue
            self.store.update_run(
                run.id, status=RunStatus.interrupted, finished_at=utcnow(), phase="interrupted",
                failure_reason=f"the Ray worker stopped while the run was {run.status.value} on {where(run)}; "
                "queue it again to rerun")
            self.store.add_phase(run.id, "interrupted", detail=f"found by Ray worker {self.worker_id}")
            interrupted.append(run.id)
        # also starts every node's NodeExecutor, so that the first run placed there finds the runner imported
        nodes = self.alive_nodes()
        ray.get([self.executor_on(n["NodeID"], nodes).sweep.remote(live) for n in nodes], timeout=120)
        return interrupted

    def executor_on(self, node_id: str, nodes: list[dict[str, Any]] | None = None) -> Any:
        """The NodeExecutor of a node, started on first use (`nodes`: `alive_nodes()`, when known)."""
        if (actor := self.executors.get(node_id)) is None:
            node = next((n for n in nodes or self.alive_nodes() if n["NodeID"] == node_id), {})
            # runs on a node: at most one per CPU (each bundle holds one); two more threads for sweeps
            concurrency = int(node.get("Resources", {}).get("CPU", 0)) + 2
            actor = self._node_executor.options(
                num_cpus=0, max_concurrency=concurrency,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(str(self.store.url), self.settings, self.executor_factory)
            self.executors[node_id] = actor
        return actor

    # -- scheduling -----------------------------------------------------------------------------
    def step(self) -> list[int]:
        """Reserve a placement group for each queued run; claim and start the runs whose group is ready.
        Returns the ids started."""
        self._reap()
        started = []
        for run in reversed(self.store.list_runs(status=RunStatus.queued)):
            if run.id in self.placed:
                continue
            try:
                spec = RunSpec.model_validate_json(run.spec_json or "")
            except ValueError as exc:
                self._fail(run.id, f"its stored spec is unreadable: {exc}")
                continue
            if spec.other_worker:
                continue
            gpus, shape = spec.launch.gpus_needed, self.shape()
            nodes = shape.nodes_for(spec.launch)
            if nodes is None:
                self._fail(run.id, "cannot run on this Ray cluster: " + " ".join(shape.problems(spec.launch)))
                continue
            if nodes > 1:
                plan = cluster.plan_multi_node(run.id, spec.launch, shape, ray.get_runtime_context().gcs_address)
                self.placed[run.id] = _Placed(reserve(run.id, 0, plan), plan=plan)
                continue
            self.placed[run.id] = _Placed(reserve(run.id, gpus, None), gpus=gpus)
        for run_id, placed in list(self.placed.items()):
            if placed.ref is not None:
                continue
            ready, _ = ray.wait([placed.ready], timeout=0)
            if not ready:
                continue
            if not self.store.claim_run(run_id, self.worker_id):  # cancelled meanwhile, or another worker took it
                self._give_back([run_id])
                continue
            try:
                spec = RunSpec.model_validate_json(self.store.get_run(run_id).spec_json or "")
                if placed.plan is not None:  # the head task on bundle 0; vLLM's workers take the GPU bundles
                    placed.ref = self._remote_multi.options(num_cpus=1, num_gpus=0, scheduling_strategy=(
                        PlacementGroupSchedulingStrategy(placed.pg, placement_group_bundle_index=0,
                                                         placement_group_capture_child_tasks=True)),
                    ).remote(str(self.store.url), run_id, spec.launch.port, self.settings, placed.plan,
                             self.multi_node_factory)
                    started.append(run_id)
                    continue
                placed.ref = self._submit(run_id, placed, spec)
            except Exception as exc:  # claimed but never started: say so, never leave it `starting`
                self._fail(run_id, f"internal error: its Ray task could not be submitted: {type(exc).__name__}: {exc}")
                self._give_back([run_id])
                raise
            started.append(run_id)
        return started

    def _submit(self, run_id: int, placed: _Placed, spec: RunSpec) -> Any:
        """Hand a single-node run whose group is ready to the NodeExecutor of the group's node, with the ids of
        the GPUs the group holds there (a probe task in the group reads them; the actor waits for its answer)."""
        placed.node_id = node_id = placement_group_table(placed.pg)["bundles_to_node_id"][0]
        gpus: Any = []
        if needed := spec.launch.gpus_needed:
            gpus = self._gpu_probe.options(num_gpus=needed, num_cpus=0, scheduling_strategy=(
                PlacementGroupSchedulingStrategy(placed.pg, placement_group_bundle_index=0))).remote()
        return self.executor_on(node_id).execute.remote(run_id, gpus, spec.launch.port)

    def _reap(self) -> None:
        """Release the groups of runs whose task ended; a task that died (its node went away, its process was
        killed) leaves its run failed with the reason, unless the run already ended."""
        ended = []
        for run_id, placed in list(self.placed.items()):
            if placed.ref is None:
                if self.store.get_run(run_id).status != RunStatus.queued:  # cancelled before it was placed
                    self._release(run_id)
                continue
            done, _ = ray.wait([placed.ref], timeout=0)
            if not done:
                continue
            try:
                ray.get(placed.ref)
            except RayError as exc:
                said = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                if isinstance(exc, RayActorError) and placed.node_id is not None:  # its node's executor is gone
                    self.executors.pop(placed.node_id, None)
                    if gone := self.node_gone(placed.node_id):
                        said = f"{gone} (Ray said {said})"
                run = self.store.get_run(run_id)
                if run.status in ACTIVE:
                    self._fail(run_id, f"its Ray task on {where(run)} died: {said}")
            ended.append(run_id)
        if ended:
            self._give_back(ended)

    @staticmethod
    def node_gone(node_id: str) -> str | None:
        """Why a node is gone ("its node is dead…"), or None while its raylet answers. An actor call cut by its
        node's death fails at once as "temporarily unavailable", while Ray marks the node dead only after its
        health checks (seconds later): the raylet, which is the node, is asked directly."""
        node = next((n for n in ray.nodes() if n["NodeID"] == node_id), None)
        if node is None or not node.get("Alive"):
            return "its node is dead"
        host, port = node["NodeManagerAddress"], int(node["NodeManagerPort"])
        try:
            with socket.create_connection((host, port), timeout=NODE_CHECK_S):
                return None
        except ConnectionRefusedError:
            return f"its node is dead: its raylet ({host}:{port}) refuses connections"
        except OSError as exc:
            return f"its node is unreachable: its raylet ({host}:{port}): {exc}"

    def _give_back(self, run_ids: list[int]) -> None:
        """Release the groups of runs that ended, and hand what they held to the groups waiting for it. Ray
        retries a group created while the cluster was full about once a second; one created when its resources
        are free is placed in milliseconds (docs/performance.md). So once the released resources show as
        available (~0.1 s after), each waiting group that now fits is created anew, oldest first."""
        freed: Counter[str] = Counter()
        for run_id in run_ids:
            freed.update(needs(self.placed[run_id]))
        before = ray.available_resources()
        for run_id in run_ids:
            self._release(run_id)
        waiting = sorted(r for r, p in self.placed.items() if p.ref is None)
        if not waiting:
            return
        deadline = time.monotonic() + RENEW_WAIT_S
        while True:
            free = Counter({k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")})
            if all(free[k] >= before.get(k, 0) + v - 1e-6 for k, v in freed.items()):
                break
            if time.monotonic() > deadline:  # taken meanwhile, or Ray is slow: its own retries place them
                return
            time.sleep(0.01)
        for run_id in waiting:
            placed = self.placed[run_id]
            want = needs(placed)
            if ray.wait([placed.ready], timeout=0)[0] or any(free[k] < v for k, v in want.items()):
                continue
            free.subtract(want)
            remove_placement_group(placed.pg)
            placed.pg = reserve(run_id, placed.gpus, placed.plan)
            placed.ready = placed.pg.ready()

    def _release(self, run_id: int) -> None:
        placed = self.placed.pop(run_id)
        try:
            remove_placement_group(placed.pg)
        except Exception:  # the group's node is gone: nothing to give back
            log.exception("placement group of run %s could not be removed", run_id)

    def _fail(self, run_id: int, reason: str) -> None:
        self.store.update_run(run_id, status=RunStatus.failed, finished_at=utcnow(), phase="failed",
                              failure_reason=reason)

    def busy(self) -> bool:
        self._reap()
        return bool(self.placed)  # running, or holding a group that waits for its node's GPUs

    def run_forever(self, until: Callable[[], bool] = lambda: False) -> None:
        self.reconcile()
        while not self.stopping.is_set():
            try:
                self.step()
                self._write_card()
                if until() and not self.busy():
                    return
            except Exception as exc:  # a database hiccup must not end the worker
                log.exception("Ray worker %s: scheduling failed", self.worker_id)
                self.errors.append(f"scheduling failed: {type(exc).__name__}: {exc}")
                del self.errors[:-20]
                self.stopping.wait(self.poll_s)
                continue
            self._wait()

    def _wait(self) -> None:
        """Until a run ends or a group becomes ready (then at once), at most `poll_s` (the queue is polled)."""
        pending = [p.ready if p.ref is None else p.ref for p in self.placed.values()]
        if pending:
            ray.wait(pending, num_returns=1, timeout=self.poll_s)
        else:
            self.stopping.wait(self.poll_s)

    def _write_card(self) -> None:
        said = (tuple(self.placed), tuple(self.errors), int(time.monotonic() // 10))  # on change, else every 10 s
        if said != self._card_said:
            self.card.write.remote(list(self.placed), self.errors[-5:])
            self._card_said = said

    def stop(self) -> None:
        self.stopping.set()
