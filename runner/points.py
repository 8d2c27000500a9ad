"""Benchmark results grouped by what they measured: one point per workload and load.

A run's stored results are repeats only when they share a point (`runner.loads.point_key`: the bench fields
other than the load, and the load). A load sweep's results are several points; they are never averaged into
one number. Gain tables pair the two runs' points one by one (`pair_points`), and a run's headline is one
point (`headline`): the only one, or the one of peak output throughput with the count of loads beside it.

Pure: rows in (dicts of metrics, keyed by point), value objects out. No store.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from runner import compare as cmp
from runner.loads import PointKey, format_load, point_order

Metrics = dict[str, float | None]


def point_text(key: PointKey, workloads: Iterable[str] = ()) -> str:
    """`4 req/s`, or `4 req/s (prefix-cache cold)` when other workloads of the same results need telling apart."""
    workload, kind, load = key
    what = workload_text(workload, workloads)
    return format_load(kind, load) + (f" ({what})" if what else "")


def _fields(workload: str) -> dict[str, Any]:
    return json.loads(workload) if workload else {}


def _value(v: Any) -> str:
    if isinstance(v, list):
        return " ".join(map(str, v)) or "[]"
    return "unset" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def workload_text(workload: str, workloads: Iterable[str]) -> str:
    """The fields that tell `workload` apart from the others in `workloads` (`prefix-cache cold`); empty when
    it is the only one."""
    mine, others = _fields(workload), [_fields(w) for w in set(workloads) if w != workload]
    keys = sorted({k for o in others for k in set(o) | set(mine) if o.get(k) != mine.get(k)})
    return ", ".join(f"{k.replace('_', '-')} {_value(mine.get(k))}" for k in keys)


def settings_diff(a: str, b: str, limit: int = 4) -> str:
    """How two workloads differ, baseline first: `num-prompts 200 vs 100`; an imported result's settings
    (no bench spec stored) are unknown."""
    fa, fb = _fields(a), _fields(b)
    if not fa or not fb:
        side = "baseline's" if not fa else "candidate's"
        return f"the {side} benchmark settings are unknown (imported results)"
    keys = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
    text = "; ".join(f"{k.replace('_', '-')} {_value(fa.get(k))} vs {_value(fb.get(k))}" for k in keys[:limit])
    return text + (f"; and {len(keys) - limit} more" if len(keys) > limit else "")


def ordered(keys: Iterable[PointKey]) -> list[PointKey]:
    """Points by workload (in the order first seen), then load kind and load."""
    keys = list(dict.fromkeys(keys))
    first = {w: i for i, w in reversed(list(enumerate(k[0] for k in keys)))}
    return sorted(keys, key=lambda k: (first[k[0]], *point_order(k)))


@dataclass
class LoadGain:
    """The gain table of one point both runs measured: its load, what tells its workload apart from the
    others compared (empty when there is one), the rows, and the flaws of the two benchmarks at this load."""

    load_kind: str
    load: float
    workload: str
    rows: list[cmp.GainRow]
    flags: list[str]
    n_a: int  # results (repeats) on each side at this point
    n_b: int
    baseline_load: str = ""  # set when two single-load runs measured different loads (then `load` is the candidate's)

    @property
    def load_text(self) -> str:
        return format_load(self.load_kind, self.load)

    @property
    def title(self) -> str:
        load = (f"{self.baseline_load} (baseline) vs {self.load_text} (candidate)" if self.baseline_load
                else self.load_text)
        return load + (f" ({self.workload})" if self.workload else "")


def pair_points(a: Mapping[PointKey, cmp.Side], b: Mapping[PointKey, cmp.Side]) -> tuple[list[LoadGain], list[str]]:
    """One gain table per point both sides measured (repeats pooled within it, never across points), and
    notes: the points only one side has, by name, and how the settings differ where each side ran one
    workload and they are not the same (then the loads are paired by load alone)."""
    notes: list[str] = []
    wa, wb = {k[0] for k in a}, {k[0] for k in b}
    if not wa & wb and len(wa) == 1 and len(wb) == 1:
        (only_a,), (only_b,) = wa, wb
        notes.append(f"benchmark settings differ ({settings_diff(only_a, only_b)}); results paired by load")
        b = {(only_a, kind, load): side for (_, kind, load), side in b.items()}
    common = [k for k in ordered([*a, *b]) if k in a and k in b]
    if not common and len(a) == 1 and len(b) == 1:
        # two single-load runs (the seed's recipe: one rate each, imports whose settings are unknown): compared,
        # never silently — each row carries the flag, the table's title both loads
        (ka, sa), (kb, sb) = next(iter(a.items())), next(iter(b.items()))
        text_a, text_b = format_load(ka[1], ka[2]), format_load(kb[1], kb[2])
        flag = f"different loads: baseline at {text_a}, candidate at {text_b}"
        notes.append(f"the two runs measured one load each, not the same one ({text_a} vs {text_b}): compared "
                     "anyway, every row flagged — throughput and latency at different loads are not like for like")
        rows = [replace(r, flags=(*r.flags, flag)) for r in cmp.gain_table(sa, sb)]
        return [LoadGain(kb[1], kb[2], "", rows, [*cmp.run_flags(sa, sb), flag], len(sa.metrics), len(sb.metrics),
                         baseline_load=text_a)], notes
    workloads = {k[0] for k in common}
    gains = [LoadGain(k[1], k[2], workload_text(k[0], workloads), cmp.gain_table(a[k], b[k]),
                      cmp.run_flags(a[k], b[k]), len(a[k].metrics), len(b[k].metrics)) for k in common]
    named = {*workloads, *(k[0] for k in a), *(k[0] for k in b)}
    for name, side in (("baseline", a), ("candidate", b)):
        alone = [point_text(k, named) for k in ordered(side) if k not in common]
        if alone:
            notes.append(f"only the {name} has {', '.join(alone)}: not compared")
    return gains, notes


@dataclass(frozen=True)
class Headline:
    """The one set of numbers a run's line may show: the mean over the repeats of one point. With several
    points (a load sweep), the point of peak output throughput, and how many points there were."""

    points: int
    key: PointKey
    repeats: int
    metrics: Metrics = field(default_factory=dict)
    loads: list[str] = field(default_factory=list)  # every point, in order, as text
    order: int = 0  # the headline's place in `loads`
    distinct_loads: int = 1

    @property
    def load_text(self) -> str:
        return format_load(self.key[1], self.key[2])

    @property
    def point(self) -> str:
        """The headline's point as text: its load, and its workload's difference where that tells it apart."""
        return self.loads[self.order] if self.loads else self.load_text

    @property
    def text(self) -> str:
        """Empty for one point; `4 loads, peak output at 16 req/s` for a sweep (`3 benchmarks, …` when the
        points differ in more than their load, e.g. a cold and a warm cache)."""
        if self.points < 2:
            return ""
        what = "loads" if self.distinct_loads == self.points else "benchmarks"
        return f"{self.points} {what}, peak output at {self.point}"


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


def mean_metrics(results: Sequence[Mapping[str, Any]]) -> Metrics:
    """The mean of each numeric metric over repeats of one point (keys any repeat reports)."""
    keys = dict.fromkeys(k for r in results for k, v in r.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool))
    return {k: _mean([r.get(k) for r in results]) for k in keys}


def headline(results: Iterable[tuple[PointKey, Mapping[str, Any]]]) -> Headline | None:
    """A run's headline from its results as (point, metrics); None without results."""
    groups: dict[PointKey, list[Mapping[str, Any]]] = {}
    for key, metrics in results:
        groups.setdefault(key, []).append(metrics)
    if not groups:
        return None
    means = {k: mean_metrics(v) for k, v in groups.items()}
    order = ordered(groups)

    def throughput(k: PointKey) -> float:
        v = means[k].get("output_throughput")
        return -math.inf if v is None else v

    best = max(order, key=throughput)  # the first of equals
    workloads = {k[0] for k in order}
    return Headline(len(order), best, len(groups[best]), means[best], [point_text(k, workloads) for k in order],
                    order.index(best), len({k[1:] for k in order}))
