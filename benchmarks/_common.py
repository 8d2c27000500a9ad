"""Helpers shared by the benchmark scripts: timing, the figure line, a demo vLLM-CPU server.

Each script prints its figure as its last line, `<name> ratio=<x>` or `<name> seconds=<x>`.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from a checkout
    sys.path.insert(0, str(ROOT))

from runner.telemetry import Sampler  # noqa: E402  (after the path is set)

PORTS = range(8900, 9000)  # benchmark servers keep off the ports the tests use


def say(*parts: Any) -> None:
    print(*parts, flush=True)


def figure(name: str, **value: float) -> None:
    """The last line of a benchmark: `<name> ratio=<x>` or `<name> seconds=<x>`."""
    ((key, x),) = value.items()
    say(f"{name} {key}={x:.4g}")


def spread(values: list[float]) -> str:
    """`median (min–max, n=N)` of repeated measurements."""
    if not values:
        return "n/a"
    return f"{statistics.median(values):.4g} (min {min(values):.4g}, max {max(values):.4g}, n={len(values)})"


@contextmanager
def timed(label: str, into: dict[str, float] | None = None):
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    if into is not None:
        into[label] = seconds
    say(f"  {label}: {seconds:.3f} s")


def best_of(n: int, fn: Callable[[], Any]) -> tuple[float, list[float]]:
    """Run `fn` n times; the fastest wall time (the one least disturbed by other work) and all of them."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), times


def free_bench_port(start: int = PORTS.start) -> int:
    from runner.server import free_port

    port = free_port(start)
    if port not in PORTS:
        raise SystemExit(f"no free port in {PORTS.start}–{PORTS.stop - 1}")
    return port


def demo_model(workdir: Path) -> Path:
    from runner.demo_model import write_demo_model

    path = workdir / "demo-model"
    if not (path / "config.json").exists():
        write_demo_model(path, num_kv_heads=2)
    return path


def demo_launch(model: Path, port: int, **kw: Any):
    """The launch the e2e tests use: the generated tiny Llama, eager mode, 2k context."""
    from runner.config import LaunchSpec

    return LaunchSpec.parse({"model": str(model), "enforce-eager": True, "max-model-len": 2048, "port": port, **kw})


# -- other people's work on the machine ----------------------------------------------------------------
def _busy_cpu_s() -> float:
    """CPU seconds all cores have been busy since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _live_cpu_s(pids: Iterable[int]) -> float:
    """CPU seconds of the live processes `pids` (with the children they waited for)."""
    total = 0.0
    for pid in pids:
        try:
            c = psutil.Process(pid).cpu_times()
            total += c.user + c.system + c.children_user + c.children_system
        except psutil.Error:
            pass
    return total


class Foreign:
    """How many cores other people's work kept busy during a `with` block: the machine's busy CPU time
    minus ours. Ours is this process, the children it waited for, and `live()` (processes of ours that
    outlive the block, such as a vLLM server's tree); with `track=True`, instead of waited children,
    every descendant seen by a 0.2 s poll (servers that start and die inside the block, whose engine
    processes nobody waits for). Above ~0.25 cores a latency figure is disturbed."""

    def __init__(self, live: Callable[[], list[int]] = list, track: bool = False):
        self.live = live
        self.track = track
        self.cores = float("nan")
        self._seen: dict[tuple[int, float], list[float]] = {}  # (pid, start time) → [first, last] CPU s
        self._done = threading.Event()

    def _poll(self) -> None:
        me = psutil.Process()
        while True:
            for p in me.children(recursive=True):
                try:
                    key, t = (p.pid, p.create_time()), p.cpu_times()
                except psutil.Error:
                    continue
                cpu = t.user + t.system
                first = 0.0 if p.create_time() >= self._t0 else cpu  # born inside the block: all of it is ours
                self._seen.setdefault(key, [first, cpu])[1] = cpu
            if self._done.wait(0.2):
                return

    def _own(self) -> float:
        t = os.times()
        total = t.user + t.system + (0.0 if self.track else t.children_user + t.children_system)
        return total + _live_cpu_s(self._pids)

    def __enter__(self) -> Foreign:
        self._pids = self.live()
        self._t0 = time.time()
        self._t, self._busy, self._own0 = time.perf_counter(), _busy_cpu_s(), self._own()
        if self.track:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.track:
            self._done.set()
            self._thread.join()
        wall = time.perf_counter() - self._t
        ours = self._own() - self._own0 + sum(last - first for first, last in self._seen.values())
        self.cores = max(0.0, ((_busy_cpu_s() - self._busy) - ours) / wall) if wall > 0 else float("nan")


def wait_quiet(max_wait_s: float, below_cores: float = 0.25, window_s: float = 2.0,
               live: Callable[[], list[int]] = list) -> float:
    """Wait (at most `max_wait_s`) until other work keeps fewer than `below_cores` busy over a window;
    return the last window's figure. `live`: our own processes, not counted as other work."""
    deadline = time.monotonic() + max_wait_s
    while True:
        with Foreign(live) as f:
            time.sleep(window_s)
        if f.cores < below_cores or time.monotonic() >= deadline:
            return f.cores
        say(f"  (machine busy with other work: {f.cores:.2f} cores; waiting)")


def tree_pids(pid: int | None) -> list[int]:
    """`pid` and its descendants, alive now."""
    if pid is None:
        return []
    try:
        root = psutil.Process(pid)
        return [root.pid, *(c.pid for c in root.children(recursive=True))]
    except psutil.Error:
        return []


def pin(pids: Iterable[int], cpus: set[int]) -> None:
    """Pin every thread of `pids` to `cpus` (threads started later inherit their creator's pinning)."""
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:
                pass


class TimedSampler(Sampler):
    """The product's sampler, with its thread's CPU time read around its loop."""

    thread_cpu_s = 0.0

    def _loop(self) -> None:
        start = time.thread_time()
        try:
            super()._loop()
        finally:
            self.thread_cpu_s = time.thread_time() - start


def cpu_speed_ms() -> float:
    """Milliseconds a fixed pure-Python loop takes, best of 5: how fast this machine's CPU is right now.
    Other virtual machines on the same host slow it without showing as load here; the scripts print
    it at start and end so that a figure taken on a slowed machine can be recognised as such."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        total = 0
        for i in range(300_000):
            total += i * i % 7
        best = min(best, time.perf_counter() - start)
    return best * 1000
