"""The queue worker on a Ray cluster: each queued run becomes a Ray task that holds the run's GPUs through a
placement group of one bundle, and runs the same `RunExecutor` on the node that holds them (vLLM, the benchmark
client and the sampler all run there). The run records its node (name, IP, Ray node id) and GPU ids.

Cancel needs no Ray call: the executor on the node polls the store and stops its own process group. Tasks
are owned by this driver, so when it dies Ray ends them; a restarted worker marks such runs interrupted and
stops, on every node, the vLLM processes of this store that no live run holds (as the local worker does).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from runner import cluster
from runner.config import ClusterShape, RunSpec, Settings
from runner.errors import ServelabError
from runner.execute import Allocation, RunExecutor
from runner.models import ACTIVE, Run, RunStatus, utcnow
from runner.server import free_port
from runner.store import Store
from runner.worker import orphan_servers, this_worker_id, worker_alive

log = logging.getLogger(__name__)


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


def execute_on_node(store_url: str, run_id: int, port_wanted: int, settings: Settings,
                    executor_factory: Callable[..., RunExecutor] = RunExecutor) -> str:
    """The body of a run's Ray task: record where it runs, then execute it here. Returns the final status."""
    ctx = ray.get_runtime_context()
    node_id = ctx.get_node_id()
    gpu_ids = [int(g) for g in ray.get_gpu_ids()]
    store = Store(store_url)
    try:
        store.update_run(run_id, node_name=socket.gethostname(), node_ip=ray.util.get_node_ip_address(),
                         ray_node_id=node_id)
        status = executor_factory(store, run_id, Allocation(gpu_ids, free_port(port_wanted)), settings,
                                  ray_node_id=node_id).execute()
        return status.value
    finally:
        store.engine.dispose()


def sweep_orphans(store_url: str, live_runs: list[int]) -> int:
    """On this node: stop the vLLM processes of this store that no live run holds. Returns how many."""
    from runner.server import kill_group

    store = Store(store_url)
    n = 0
    for proc in orphan_servers(set(live_runs), store):
        try:
            kill_group(os.getpgid(proc.pid), grace_s=15)
            n += 1
        except (ProcessLookupError, OSError):
            continue
    store.engine.dispose()
    return n


@dataclass
class _Placed:
    pg: PlacementGroup
    ref: Any = None  # the task's ObjectRef once claimed and submitted
    plan: cluster.MultiNodePlan | None = None  # a run larger than one node


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
        self._remote = ray.remote(max_retries=0)(execute_on_node)  # a run is never silently re-executed
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
        sweep = ray.remote(sweep_orphans)
        refs = [sweep.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(self.store.url), live) for n in self.alive_nodes()]
        ray.get(refs, timeout=120)
        return interrupted

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
                self.placed[run.id] = _Placed(placement_group(list(plan.bundles), strategy=plan.strategy,
                                                              name=plan.name), plan=plan)
                continue
            self.placed[run.id] = _Placed(placement_group([bundle(gpus)], strategy="STRICT_PACK",
                                                          name=cluster.group_name(run.id)))
        for run_id, placed in list(self.placed.items()):
            if placed.ref is not None:
                continue
            ready, _ = ray.wait([placed.pg.ready()], timeout=0)
            if not ready:
                continue
            if not self.store.claim_run(run_id, self.worker_id):  # cancelled meanwhile, or another worker took it
                self._release(run_id)
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
                placed.ref = self._remote.options(
                    num_gpus=bundle(spec.launch.gpus_needed).get("GPU", 0), num_cpus=1,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(placed.pg, placement_group_bundle_index=0),
                ).remote(str(self.store.url), run_id, spec.launch.port, self.settings, self.executor_factory)
            except Exception as exc:  # claimed but never started: say so, never leave it `starting`
                self._fail(run_id, f"internal error: its Ray task could not be submitted: {type(exc).__name__}: {exc}")
                self._release(run_id)
                raise
            started.append(run_id)
        return started

    def _reap(self) -> None:
        """Release the groups of runs whose task ended; a task that died (its node went away, its process was
        killed) leaves its run failed with the reason, unless the run already ended."""
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
                run = self.store.get_run(run_id)
                if run.status in ACTIVE:
                    self._fail(run_id, f"its Ray task on {where(run)} died: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}")
            self._release(run_id)

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

    def _write_card(self) -> None:
        said = (tuple(self.placed), tuple(self.errors), int(time.monotonic() // 10))  # on change, else every 10 s
        if said != self._card_said:
            self.card.write.remote(list(self.placed), self.errors[-5:])
            self._card_said = said

    def stop(self) -> None:
        self.stopping.set()
