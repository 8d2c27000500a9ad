"""Load sweeps on one server: a bench field given as a list, run load by load, stopped once the server saturates.

A *load sweep* is a set of two or more benchmarks of one run that differ only in their load — `request-rate`
or `max-concurrency` — written as a list (`request-rate: [2, 8, 32, inf]`), as a sweep matrix over a bench
field, or one by one. They run in the order given, on the same server. After each load the sweep stops when
the server has saturated (`saturation`); the loads after it are skipped and the reason is kept as the run's
`load_sweep_stop` phase event.

Pure: no store, no processes. `runner.execute` asks a `LoadSweeps` which benchmark to run next.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

LOAD_FIELDS = ("request_rate", "max_concurrency")
RISE_MIN = 0.05
"""Throughput must rise by at least this share over the previous load, or the server counts as saturated.
5 %: more than the load-to-load noise of one benchmark on a busy 2-core machine (±2–4 %, docs/performance.md)
and far below the rise of a server that still has room (rate × 4 gives ≥ +50 % there)."""
TTFT_GROWTH_MAX = 10.0
"""P99 TTFT above this multiple of its value at the sweep's first load: requests queue, the server is saturated."""
STOP_PHASE = "load_sweep_stop"


def expand_load_lists(benches: Any) -> Any:
    """Bench sections (dicts, as read from a file) with `request-rate` or `max-concurrency` given as a list
    become one bench per value, in the order given; anything else is returned as it came."""
    if not isinstance(benches, list):
        return benches
    out: list[Any] = []
    for bench in benches:
        if not isinstance(bench, Mapping):
            out.append(bench)
            continue
        lists = [k for k in bench if isinstance(k, str) and k.replace("-", "_") in LOAD_FIELDS
                 and isinstance(bench[k], list)]
        if len(lists) > 1:
            raise ValueError("give a list of loads for request-rate or for max-concurrency, not both; "
                             "e.g. request-rate: [2, 8, 32, inf]")
        if not lists:
            out.append(bench)
            continue
        key = lists[0]
        if not bench[key]:
            raise ValueError(f"{key} is an empty list; give one load or several, e.g. [2, 8, 32, inf]")
        out += [{**bench, key: value} for value in bench[key]]
    return out


class _Bench(Protocol):
    request_rate: float
    max_concurrency: int | None
    stop_early: bool
    goodput: list[str]
    repeats: int

    def model_dump(self, *, exclude: set[str]) -> dict[str, Any]: ...


def load_of(request_rate: float | None, max_concurrency: float | None) -> tuple[str, float]:
    """(kind, value) of a benchmark's load: its max-concurrency when requests are sent all at once with a cap,
    else its request rate (inf when unlimited)."""
    rate = math.inf if request_rate is None else float(request_rate)
    if max_concurrency is not None and math.isinf(rate):
        return "max-concurrency", float(max_concurrency)
    return "request-rate", rate


def format_load(kind: str, value: float) -> str:
    number = "inf" if math.isinf(value) else f"{value:g}"
    return f"{number} req/s" if kind == "request-rate" else f"concurrency {number}"


PointKey = tuple[str, str, float]
"""(workload, load kind, load value): what one stored benchmark result measured. Results with equal keys are
repeats of one point and may be pooled; results with different keys are never averaged together."""


def point_key(row: Mapping[str, Any]) -> PointKey:
    """The point of one result row as `runner.api.load_rows` gives it (`workload`, `request_rate`,
    `max_concurrency`): the one definition the curves, the gain tables and the run headlines group by."""
    kind, load = load_of(row.get("request_rate"), row.get("max_concurrency"))
    return str(row.get("workload") or ""), kind, load


def point_order(key: PointKey) -> tuple[str, float]:
    """Points of one workload by load kind, then load (inf last)."""
    return key[1], key[2]


def _group_key(bench: _Bench) -> str:
    return json.dumps(bench.model_dump(exclude={*LOAD_FIELDS, "repeats"}), sort_keys=True, default=str)


def sweep_groups(benches: Sequence[_Bench]) -> list[list[int]]:
    """Indexes of the benchmarks that form load sweeps: two or more with `stop-early`, equal but for their load,
    each at a different load; in the order given."""
    groups: dict[str, list[int]] = {}
    for i, b in enumerate(benches):
        if b.stop_early:
            groups.setdefault(_group_key(b), []).append(i)
    out = []
    for members in groups.values():
        loads = [(benches[i].request_rate, benches[i].max_concurrency) for i in members]
        if len(members) > 1 and len(set(loads)) == len(loads):
            out.append(members)
    return out


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


@dataclass
class LoadPoint:
    """The mean over repeats of what the saturation check reads, at one load."""

    load: str
    throughput: float | None
    throughput_name: str
    failed: float
    completed: float
    p99_ttft_ms: float | None


def load_point(load: str, results: Sequence[Mapping[str, float | None]], use_goodput: bool) -> LoadPoint:
    name = "request_goodput" if use_goodput and any(r.get("request_goodput") is not None for r in results) \
        else "output_throughput"
    return LoadPoint(load=load, throughput=_mean(r.get(name) for r in results), throughput_name=name,
                     failed=sum(r.get("failed") or 0.0 for r in results),
                     completed=sum(r.get("completed") or 0.0 for r in results),
                     p99_ttft_ms=_mean(r.get("p99_ttft_ms") for r in results))


def saturation(points: Sequence[LoadPoint]) -> str | None:
    """Why the server counts as saturated after the last of `points` (the sweep's loads so far, in order),
    or None while it still has room. Checked in this order: failed requests, throughput that rose by less
    than RISE_MIN over the previous load, P99 TTFT above TTFT_GROWTH_MAX × its value at the first load."""
    if not points:
        return None
    last = points[-1]
    what = "goodput" if last.throughput_name == "request_goodput" else "output throughput"
    if last.failed > 0:
        total = last.failed + last.completed
        return f"{last.failed:.0f} of {total:.0f} requests failed at {last.load}"
    if len(points) > 1:
        prev = points[-2]
        if prev.throughput and last.throughput is not None and last.throughput < prev.throughput * (1 + RISE_MIN):
            rise = (last.throughput / prev.throughput - 1) * 100
            return (f"{what} {last.throughput:,.1f} at {last.load} rose {rise:+.1f} % over {prev.throughput:,.1f} "
                    f"at {prev.load} (less than +{RISE_MIN * 100:.0f} %)")
        first = points[0]
        ttft, first_ttft = last.p99_ttft_ms, first.p99_ttft_ms
        if first_ttft and ttft is not None and ttft > TTFT_GROWTH_MAX * first_ttft:
            return (f"P99 TTFT {ttft:,.1f} ms at {last.load} is over {TTFT_GROWTH_MAX:g}× its "
                    f"{first_ttft:,.1f} ms at {first.load}")
    return None


@dataclass
class LoadSweeps:
    """Which benchmarks of a run still run, as the results of its load sweeps come in.

    `skip(i)` before benchmark `i`; `record(i, metrics)` after each of its repeats, which returns the stop
    reason once the sweep of `i` stops (the loads after it are then skipped)."""

    benches: Sequence[_Bench]
    groups: list[list[int]] = field(init=False)
    _group_of: dict[int, int] = field(init=False, default_factory=dict)
    _results: dict[int, list[Mapping[str, float | None]]] = field(init=False, default_factory=dict)
    _skipped: set[int] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self.groups = sweep_groups(self.benches)
        self._group_of = {i: g for g, members in enumerate(self.groups) for i in members}

    def skip(self, index: int) -> bool:
        return index in self._skipped

    def load(self, index: int) -> str:
        b = self.benches[index]
        return format_load(*load_of(b.request_rate, b.max_concurrency))

    def record(self, index: int, metrics: Mapping[str, float | None]) -> str | None:
        g = self._group_of.get(index)
        if g is None:
            return None
        self._results.setdefault(index, []).append(metrics)
        if len(self._results[index]) < self.benches[index].repeats:
            return None  # the load's decision waits for all its repeats
        done = [i for i in self.groups[g] if len(self._results.get(i, [])) >= self.benches[i].repeats]
        points = [load_point(self.load(i), self._results[i], bool(self.benches[i].goodput)) for i in done]
        reason = saturation(points)
        if reason is not None and index != self.groups[g][-1]:
            left = [i for i in self.groups[g] if i not in done]
            self._skipped.update(left)
            return f"{reason}; skipped {', '.join(self.load(i) for i in left)}"
        return None
