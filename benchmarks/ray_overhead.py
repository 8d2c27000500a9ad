"""Scheduling overhead per run: the Ray worker (`servelab worker --ray`) against the local worker.

N trivial runs (TP1, an executor that starts no vLLM: it records when it started and ends at once) are queued
in a fresh SQLite store and executed one after another — the local worker with one GPU id, the Ray worker on a
real one-node Ray cluster (`ray.cluster_utils.Cluster`, 1 CPU and 1 declared GPU) — so each run waits for the
one before it. Per run:

- *gap*: from the previous run's executor ending (the first run: the worker's loop starting) to this run's
  executor starting: noticing the end, giving back and reserving the GPU (a placement group on Ray), claiming
  the run in the store, and starting the executor (a thread here; a Ray task on the node);
- *wall*: the worker's whole loop divided by N.

On Ray the gap is split in three (each from the worker's own marks): *notice* (the previous run's executor
ending → the worker giving back its placement group), *place* (→ the next run handed to Ray: its group ready,
the run claimed, submitted), *start* (→ the executor starting on the node: Ray's dispatch, and a process start
with imports when a task gets a fresh worker process).

    python benchmarks/ray_overhead.py            # 20 runs per arm
    python benchmarks/ray_overhead.py --quick    # 6 runs per arm

Last line: `ray_overhead ratio=<x>`, the median gap on Ray over the median gap of the local worker.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from _common import figure, say, spread

from runner import api
from runner.config import RunSpec, Settings
from runner.models import RunStatus, utcnow
from runner.store import Store


class Trivial:
    """Stands in for RunExecutor: records its start and end, starts nothing."""

    def __init__(self, store, run_id, alloc, settings, **_):
        self.store, self.run_id = store, run_id

    def execute(self) -> RunStatus:
        self.store.update_run(self.run_id, status=RunStatus.benchmarking, started_at=utcnow())
        self.store.update_run(self.run_id, status=RunStatus.succeeded, finished_at=utcnow(), phase="succeeded")
        return RunStatus.succeeded


def _epoch(t: datetime) -> float:
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


def marking(worker_cls):
    """`worker_cls` that notes when each run was handed to Ray (`submitted`) and its group given back (`released`)."""

    class Marking(worker_cls):
        marks: dict[str, dict[int, float]] = {"submitted": {}, "released": {}, "reconciled": {}}

        def reconcile(self):
            t0 = time.time()
            out = super().reconcile()
            self.marks["reconciled"][0] = time.time() - t0
            return out

        def step(self):
            started = super().step()
            for run_id in started:
                self.marks["submitted"][run_id] = time.time()
            return started

        def _release(self, run_id):
            self.marks["released"][run_id] = time.time()
            super()._release(run_id)

    return Marking


def breakdown(store: Store, ids: list[int], marks: dict[str, dict[int, float]]) -> dict[str, list[float]]:
    """Per run after the first: notice, place, start (seconds), from the worker's marks and the run's times."""
    runs = sorted((store.get_run(i) for i in ids), key=lambda r: _epoch(r.started_at))
    out: dict[str, list[float]] = {"notice": [], "place": [], "start": []}
    for prev, run in zip(runs, runs[1:]):
        out["notice"].append(marks["released"][prev.id] - _epoch(prev.finished_at))
        out["place"].append(marks["submitted"][run.id] - marks["released"][prev.id])
        out["start"].append(_epoch(run.started_at) - marks["submitted"][run.id])
    return out


def arm(name: str, n: int, folder: Path, make_worker) -> dict[str, list[float]]:
    store = Store(folder / f"{name}.db")
    spec = RunSpec.parse({"launch": {"model": str(folder)}, "bench": {"num-prompts": 1}})
    ids = [api.queue_run(store, spec).id for _ in range(n)]
    worker = make_worker(store, Settings(data_dir=folder / name))
    t0 = time.time()
    worker.run_forever(until=lambda: True)
    wall = time.time() - t0
    runs = [store.get_run(i) for i in ids]
    assert all(r.status == RunStatus.succeeded for r in runs), [(r.id, r.status, r.failure_reason) for r in runs]
    spans = sorted((_epoch(r.started_at), _epoch(r.finished_at)) for r in runs)
    gaps = [spans[0][0] - t0] + [b[0] - a[1] for a, b in zip(spans, spans[1:])]
    say(f"{name}: wall {wall:.2f} s for {n} runs ({wall / n * 1000:.0f} ms a run); gap (ms) "
        f"{spread([g * 1000 for g in gaps])}; first {gaps[0] * 1000:.0f} ms")
    if marks := getattr(worker, "marks", None):
        say(f"  first run: the worker's start (reconcile: every node's orphans swept) "
            f"{marks['reconciled'][0] * 1000:.0f} ms of its {gaps[0] * 1000:.0f} ms")
        for part, values in breakdown(store, ids, marks).items():
            say(f"  {part} (ms): {spread([v * 1000 for v in values])}")
    store.engine.dispose()
    return {"gaps": gaps, "wall": [wall / n]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 runs per arm instead of 20")
    parser.add_argument("--runs", type=int, default=None)
    args = parser.parse_args()
    n = args.runs or (6 if args.quick else 20)

    import ray
    from ray import cluster_utils

    from runner.ray_worker import RayWorker
    from runner.worker import Worker

    say(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        local = arm("local", n, folder, lambda store, settings: Worker(
            store, settings, gpu_ids=[0], poll_s=1.0, executor_factory=Trivial))
        c = cluster_utils.Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "num_gpus": 1, "include_dashboard": False})
        try:
            ray.init(address=c.address, logging_level="ERROR", log_to_driver=False)
            on_ray = arm("ray", n, folder, lambda store, settings: marking(RayWorker)(
                store, settings, address=c.address, poll_s=1.0, executor_factory=Trivial))
        finally:
            ray.shutdown()
            c.shutdown()
    gap_local, gap_ray = statistics.median(local["gaps"]), statistics.median(on_ray["gaps"])
    say(f"median gap: local {gap_local * 1000:.1f} ms, Ray {gap_ray * 1000:.1f} ms; "
        f"wall a run: local {local['wall'][0] * 1000:.0f} ms, Ray {on_ray['wall'][0] * 1000:.0f} ms")
    say(f"max gap: local {max(local['gaps']) * 1000:.1f} ms, Ray {max(on_ray['gaps']) * 1000:.1f} ms; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    figure("ray_overhead", ratio=gap_ray / gap_local)


if __name__ == "__main__":
    sys.exit(main())
