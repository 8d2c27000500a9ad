"""Gain tables: baseline vs candidate benchmark metrics, direction of "better", confidence intervals.

Pure: plain dicts keyed by canonical `vllm bench serve --save-result` names in, `GainRow`s and
strings/frames out. No database, no Streamlit.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from statistics import fmean, variance
from typing import TYPE_CHECKING, Any, Literal

from runner import noise

if TYPE_CHECKING:
    import pandas as pd

Better = Literal["higher", "lower"] | None
Kind = Literal["throughput", "latency", "count", "accuracy", "energy", "server"]


@dataclass(frozen=True)
class MetricDef:
    """How one canonical metric is labelled, measured and judged."""

    key: str
    label: str  # without the unit: "Mean TTFT"
    unit: str  # "req/s", "tok/s", "ms", "s", "" for plain counts
    better: Better
    kind: Kind


_LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2EL"))
_STATS = (("mean", "Mean"), ("median", "Median"), ("p99", "P99"), ("std", "Std"))


def _registry() -> dict[str, MetricDef]:
    defs = [
        MetricDef("request_throughput", "Request Throughput", "req/s", "higher", "throughput"),
        MetricDef("request_goodput", "Request Goodput", "req/s", "higher", "throughput"),
        MetricDef("output_throughput", "Output Token Throughput", "tok/s", "higher", "throughput"),
        MetricDef("total_token_throughput", "Total Token Throughput", "tok/s", "higher", "throughput"),
        MetricDef("max_output_tokens_per_s", "Peak Output Token Throughput", "tok/s", "higher", "throughput"),
        MetricDef("max_concurrent_requests", "Peak Concurrent Requests", "", None, "count"),
        MetricDef("completed", "Successful Requests", "", "higher", "count"),
        MetricDef("failed", "Failed Requests", "", "lower", "count"),
        MetricDef("duration", "Benchmark Duration", "s", "lower", "latency"),
        MetricDef("total_input_tokens", "Total Input Tokens", "", None, "count"),
        MetricDef("total_output_tokens", "Total Output Tokens", "", None, "count"),
        # KV capacity of a run (vLLM's startup lines), compared in a section of its own
        MetricDef("kv_cache_tokens", "KV Cache", "tokens", "higher", "count"),
        MetricDef("kv_cache_gib", "KV Cache Memory", "GiB", "higher", "count"),
        MetricDef("kv_max_concurrency", "Max Concurrency at max-model-len", "x", "higher", "count"),
    ]
    for short, name in _LATENCIES:
        for stat, stat_label in _STATS:
            # The spread of a latency is reported, not judged: a lower std is not an improvement on its own.
            better: Better = None if stat == "std" else "lower"
            defs.append(MetricDef(f"{stat}_{short}_ms", f"{stat_label} {name}", "ms", better, "latency"))
    defs += _window_defs()
    return {d.key: d for d in defs}


def _window_defs() -> list[MetricDef]:
    """Metrics of a benchmark window (runner.window): energy on the run's GPUs and vLLM's own counters.
    Totals that only follow the workload (tokens, queries, energy in J) are reported, not judged."""
    defs = [
        MetricDef("j_per_output_token", "Energy per Output Token", "J/tok", "lower", "energy"),
        MetricDef("output_tok_per_s_per_w", "Output Throughput per Watt", "tok/s/W", "higher", "energy"),
        MetricDef("mean_power_w_per_gpu", "Mean Power per GPU", "W", None, "energy"),
        MetricDef("energy_j", "Energy (all GPUs)", "J", None, "energy"),
        MetricDef("prefix_cache_hit_pct", "Prefix Cache Hit Rate", "%", "higher", "server"),
        MetricDef("prefix_cache_queries", "Prefix Cache Queries", "tokens", None, "server"),
        MetricDef("prefix_cache_hits", "Prefix Cache Hits", "tokens", None, "server"),
        MetricDef("preemptions", "Preemptions", "", "lower", "server"),
        MetricDef("server_prompt_tokens", "Server Prompt Tokens", "tokens", None, "server"),
        MetricDef("server_generation_tokens", "Server Generation Tokens", "tokens", None, "server"),
        MetricDef("spec_decode_acceptance_pct", "Spec-Decode Acceptance Rate", "%", "higher", "server"),
        MetricDef("spec_decode_mean_acceptance_len", "Spec-Decode Mean Acceptance Length", "tokens", "higher",
                  "server"),
        MetricDef("spec_decode_drafts", "Spec-Decode Drafts", "", None, "server"),
        MetricDef("spec_decode_draft_tokens", "Spec-Decode Draft Tokens", "tokens", None, "server"),
        MetricDef("spec_decode_accepted_tokens", "Spec-Decode Accepted Tokens", "tokens", None, "server"),
    ]
    for phase in ("queue", "prefill", "decode"):
        title = phase.capitalize()
        defs.append(MetricDef(f"server_mean_{phase}_ms", f"Mean {title} Time (server)", "ms", "lower", "server"))
        for q in (50, 99):
            defs.append(MetricDef(f"est_p{q}_{phase}_ms", f"P{q} {title} Time (server, estimate from buckets)",
                                  "ms", "lower", "server"))
    return defs


METRICS: dict[str, MetricDef] = _registry()
"""Ordered registry of the known bench metrics; percentiles other than p99 are resolved by `metric_def`."""

CONFIG_KEYS = frozenset({"request_rate", "max_concurrency", "burstiness", "num_prompts"})
"""Canonical keys that describe the benchmark's configuration, not its outcome: never compared."""

_CONFIG_DEFS = {d.key: d for d in (
    MetricDef("request_rate", "Request Rate (configured)", "req/s", None, "count"),
    MetricDef("max_concurrency", "Max Concurrency (configured)", "", None, "count"),
    MetricDef("burstiness", "Burstiness (configured)", "", None, "count"),
    MetricDef("num_prompts", "Prompts (configured)", "", None, "count"),
)}

_PCT = re.compile(r"^p(\d+(?:\.\d+)?)_(ttft|tpot|itl|e2el)_ms$")
_BOUND = re.compile(r"^(est_p\d+_(queue|prefill|decode))_(lo|hi)_ms$")
"""The bucket bounds of a histogram estimate (runner.window.estimate): reported beside it, never compared."""
_FINISHED = re.compile(r"^finished_(\w+)$")
_FAILED_REASONS = frozenset({"abort", "error"})
_MS_TO_S_AT = 10_000.0  # shown in s from here on (rendering only)


def metric_def(key: str) -> MetricDef:
    """The definition of `key`: registered, a latency percentile such as `p95_itl_ms`, or neutral."""
    if key in METRICS:
        return METRICS[key]
    if key in _CONFIG_DEFS:
        return _CONFIG_DEFS[key]
    m = _PCT.match(key)
    if m:
        name = dict(_LATENCIES)[m.group(2)]
        return MetricDef(key, f"P{m.group(1)} {name}", "ms", "lower", "latency")
    m = _BOUND.match(key)
    if m:
        side = "lower" if m.group(3) == "lo" else "upper"
        return MetricDef(key, f"{metric_def(m.group(1) + '_ms').label}: bucket's {side} bound", "ms", None, "server")
    m = _FINISHED.match(key)
    if m:  # vLLM's finished_reason label: stop, length, abort, error, repetition, …
        better: Better = "lower" if m.group(1) in _FAILED_REASONS else None
        return MetricDef(key, f"Finished Requests ({m.group(1)})", "", better, "server")
    return MetricDef(key, key, "", None, "count")


def _order(key: str) -> tuple[float, ...]:
    """Sort key: registry order; extra percentiles sit beside p99 of their latency; unknown keys last."""
    keys = list(METRICS)
    m = _PCT.match(key)
    if m:
        anchor = keys.index(f"p99_{m.group(2)}_ms")
        return (0, anchor, float(m.group(1)) - 99.0)  # p90 before p99, p99.9 after it
    if key in METRICS:
        return (0, keys.index(key), 0.0)
    if _FINISHED.match(key):
        return (0, len(keys), 0.0)
    return (1, 0, 0.0)


BEYOND, WITHIN, NO_CI = "beyond noise", "within noise", "no CI (single run)"
"""The noise verdict of a gain row: its 95 % interval of the change excludes 0, includes it, or is unknown."""
MIN_REQUESTS = 30
SHORT_BENCH_S = 10.0


@dataclass
class GainRow:
    """One metric compared, in the metric's canonical unit (ms, s, tok/s, req/s) whatever its size.

    `ci95_low/high`: 95 % interval of b − a (Welch across repeats when both sides have ≥ 2, else a bootstrap
    over the requests where the metric is a latency statistic with per-request data on both sides).
    `ci_a`, `ci_b`: 95 % interval of each side's value, same method. `flags`: what makes the row doubtful.
    """

    key: str
    label: str
    unit: str
    a: float
    b: float
    change: float
    improvement_pct: float | None
    better: bool | None
    n_a: int
    n_b: int
    ci95_low: float | None = None
    ci95_high: float | None = None
    significant: bool | None = None
    kind: Kind = "count"
    verdict: str = NO_CI
    flags: tuple[str, ...] = ()
    ci_a: tuple[float, float] | None = None
    ci_b: tuple[float, float] | None = None
    bound_a: str = ""  # "≤" / "≥": the side's value is a bound, not an estimate (`estimate_bound`)
    bound_b: str = ""

    @property
    def colored(self) -> bool:
        """Only a judged change beyond the noise is shown in green or red."""
        return self.verdict == BEYOND and self.better is not None


@dataclass(frozen=True)
class Side:
    """What one side of a comparison holds: a dict of canonical metrics per bench execution, and the
    per-request data of each execution where it was kept (None where it was not)."""

    metrics: list[dict[str, float | None]]
    requests: list[noise.Requests | None] | None = None

    @property
    def detailed(self) -> list[noise.Requests] | None:
        reqs = self.requests or []
        if not reqs or len(reqs) != len(self.metrics) or any(r is None for r in reqs):
            return None
        return [r for r in reqs if r is not None]

    def total(self, key: str) -> float | None:
        values = _values(self.metrics, key)
        return sum(values) if values else None

    def least(self, key: str) -> float | None:
        values = _values(self.metrics, key)
        return min(values) if values else None


def _values(side: list[dict[str, float | None]], key: str) -> list[float]:
    out: list[float] = []
    for rep in side:
        v = rep.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            continue
        out.append(float(v))
    return out


def _numeric_keys(side: list[dict[str, float | None]]) -> set[str]:
    return {k for rep in side for k in rep if k not in CONFIG_KEYS and not _BOUND.match(k) and _values([rep], k)}


def estimate_bound(metrics: Mapping[str, float | None], key: str) -> str:
    """`≤` when the histogram estimate `key` (`est_p50_queue_ms`) is an upper bound (its rank fell in the lowest
    bucket), `≥` when a lower bound (in +Inf), else empty (interpolated inside a bucket, or not an estimate)."""
    if not key.startswith("est_p"):
        return ""
    lo, hi = metrics.get(key.removesuffix("_ms") + "_lo_ms"), metrics.get(key.removesuffix("_ms") + "_hi_ms")
    if lo is None or (isinstance(lo, float) and math.isnan(lo)):
        return ""  # stored before bounds were kept
    if lo == 0:
        return "≤"
    return "≥" if hi is None or (isinstance(hi, float) and math.isnan(hi)) else ""


def _bound_of(side: Side, key: str) -> str:
    marks = {estimate_bound(m, key) for m in side.metrics if _values([m], key)}
    return marks.pop() if len(marks) == 1 else ("≤/≥" if marks - {""} else "")


def gain_table(
    baseline: list[dict[str, float | None]] | Side,
    candidate: list[dict[str, float | None]] | Side,
    metrics: list[str] | None = None,
) -> list[GainRow]:
    """Compare two sets of repeated bench executions (one dict of canonical metrics per execution).

    Each cell is the mean over the repeats that report the metric. Rows follow `METRICS` order and
    only cover metrics present on both sides; unknown numeric keys come last and are neutral; a row that
    is 0 on both sides carries nothing and is left out (the failed-request count excepted). With
    `metrics`, only those keys are compared, in the order given. Each row gets its 95 % intervals, its
    noise verdict and its flags (see `GainRow`, `run_flags`).
    """
    sa = baseline if isinstance(baseline, Side) else Side(baseline)
    sb = candidate if isinstance(candidate, Side) else Side(candidate)
    if metrics is None:
        keys = sorted(_numeric_keys(sa.metrics) & _numeric_keys(sb.metrics), key=lambda k: (_order(k), k))
    else:
        keys = list(metrics)
    shared = run_flags(sa, sb)
    boot: tuple[noise.Bootstrap, noise.Bootstrap] | None = None
    if (ra := sa.detailed) and (rb := sb.detailed):  # independent resamples: a seed each
        boot = noise.Bootstrap(ra, keys, seed=noise.SEED), noise.Bootstrap(rb, keys, seed=noise.SEED + 1)
    rows: list[GainRow] = []
    for key in keys:
        va, vb = _values(sa.metrics, key), _values(sb.metrics, key)
        if not va or not vb or (metrics is None and carries_nothing(key, sa.metrics, sb.metrics)):
            continue
        rows.append(_row(metric_def(key), va, vb, sa, sb, shared, boot))
    return rows


def carries_nothing(key: str, *sides: list[dict[str, float | None]]) -> bool:
    """Whether metric `key` says nothing in these executions (`sides`: each run's list of metrics; Compare
    passes two, a run's page one), so that tables leave its row out: 0 or blank in every execution (`rtfx`
    without audio, counters vLLM leaves at 0 for this kind of benchmark; `failed` excepted: its 0 is news),
    or a P50 beside the median vLLM also writes."""
    if key != "failed" and not any(v for side in sides for v in _values(side, key)):
        return True
    m = _PCT.match(key)
    return bool(m and float(m.group(1)) == 50 and all(_values(side, f"median_{m.group(2)}_ms") for side in sides))


def run_flags(baseline: Side, candidate: Side) -> list[str]:
    """Flaws of the two benchmarks themselves, shown at the top of the table and on each of its rows:
    failed requests, a first request that stalled, a benchmark shorter than `SHORT_BENCH_S`."""
    flags = []
    fa, fb = baseline.total("failed") or 0, candidate.total("failed") or 0
    if fa or fb:
        flags.append(f"failed requests {fa:.0f} vs {fb:.0f}")
    for name, side in (("baseline", baseline), ("candidate", candidate)):
        stalls = [s for s in (noise.first_request_stall(r) for r in side.detailed or []) if s]
        if stalls:
            first, rest = stalls[0]
            flags.append(f"first-request stall on {name} (TTFT {first:,.0f} ms vs median {rest:,.0f} ms)")
        shortest = side.least("duration")
        if shortest is not None and shortest < SHORT_BENCH_S:
            flags.append(f"benchmark {shortest:.1f} s on {name} (< {SHORT_BENCH_S:.0f} s)")
    return flags


ZERO_MS = 0.05
"""A latency statistic below this (50 µs) is degenerate: tokens that arrived in one burst, not a speed."""


def _zero(x: float) -> bool:
    return abs(x) < ZERO_MS


def _row(d: MetricDef, va: list[float], vb: list[float], sa: Side, sb: Side, shared: list[str],
         boot: tuple[noise.Bootstrap, noise.Bootstrap] | None) -> GainRow:
    a, b = fmean(va), fmean(vb)
    flags = list(shared)
    judged = d.better is not None
    if d.unit == "ms" and d.better is not None and (_zero(a) or _zero(b)):
        flags.append("≈0 ms on " + ("both" if _zero(a) and _zero(b) else "baseline" if _zero(a) else "candidate"))
        judged = False  # a statistic of (nearly) 0 is degenerate (bursts of tokens), not a gain
    bound_a, bound_b = _bound_of(sa, d.key), _bound_of(sb, d.key)
    for name, mark, value in (("baseline", bound_a, a), ("candidate", bound_b, b)):
        if mark:
            where = "the lowest bucket" if mark == "≤" else "+Inf" if mark == "≥" else "the outer buckets"
            flags.append(f"{mark} {value:,.0f} ms on {name}: a bucket's bound (the rank is in {where})")
            judged = False  # a bound against a value says nothing about which is faster
    if d.kind != "count":
        for name, side in (("baseline", sa), ("candidate", sb)):
            least = side.least("completed")
            if least is not None and least < MIN_REQUESTS:
                flags.append(f"from {least:.0f} requests on {name} (< {MIN_REQUESTS})")
    improvement: float | None = None
    better: bool | None = None
    if judged and math.isfinite(a) and math.isfinite(b):
        better = b > a if d.better == "higher" else b < a
        if abs(a) >= 0.005:  # a baseline that shows as 0.00 gives no meaningful percentage
            improvement = ((b - a) if d.better == "higher" else (a - b)) / abs(a) * 100.0
    interval, ci_a, ci_b = welch_ci95(va, vb), mean_ci95(va), mean_ci95(vb)
    if interval is None and boot is not None:
        ra, rb = boot[0].replicates(d.key), boot[1].replicates(d.key)
        if ra is not None and rb is not None:
            interval, ci_a, ci_b = noise.interval(rb - ra), noise.interval(ra), noise.interval(rb)
    significant = None if interval is None else (interval[0] > 0 or interval[1] < 0)
    verdict = NO_CI if significant is None else BEYOND if significant else WITHIN
    return GainRow(
        key=d.key,
        label=f"{d.label} ({d.unit})" if d.unit else d.label,
        unit=d.unit,
        a=a,
        b=b,
        change=b - a,
        improvement_pct=improvement,
        better=better,
        n_a=len(va),
        n_b=len(vb),
        ci95_low=None if interval is None else interval[0],
        ci95_high=None if interval is None else interval[1],
        significant=significant,
        kind=d.kind,
        verdict=verdict,
        flags=tuple(flags),
        ci_a=ci_a,
        ci_b=ci_b,
        bound_a=bound_a,
        bound_b=bound_b,
    )


# --- statistics -------------------------------------------------------------------------------


def welch_ci95(a: list[float], b: list[float]) -> tuple[float, float] | None:
    """95 % Welch t-interval of mean(b) − mean(a); None unless both sides have ≥ 2 values."""
    if len(a) < 2 or len(b) < 2:
        return None
    diff = fmean(b) - fmean(a)
    qa, qb = variance(a) / len(a), variance(b) / len(b)
    se2 = qa + qb
    if se2 == 0:
        return (diff, diff)
    df = se2**2 / (qa**2 / (len(a) - 1) + qb**2 / (len(b) - 1))
    half = t_ppf(0.975, df) * math.sqrt(se2)
    return (diff - half, diff + half)


def mean_ci95(values: list[float]) -> tuple[float, float] | None:
    """95 % t-interval of the mean of repeated values; None with fewer than two."""
    if len(values) < 2:
        return None
    m, half = fmean(values), t_ppf(0.975, len(values) - 1) * math.sqrt(variance(values) / len(values))
    return (m - half, m + half)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for num in (
            m * (b - m) * x / ((a + m2 - 1) * (a + m2)),
            -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t with (possibly fractional) `df` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """Quantile of Student's t (bisection on `t_cdf`; no scipy needed)."""
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > q:
        lo *= 2.0
    while t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2.0


def accuracy_delta(
    a: float, a_stderr: float | None, b: float, b_stderr: float | None
) -> dict[str, float | bool | None]:
    """Accuracy of b against a: delta = b − a, stderr = √(sa² + sb²), flagged when the drop exceeds 2·stderr.

    With an unknown stderr on either side, `stderr` and `flagged` are None.
    """
    delta = b - a
    stderr = None if a_stderr is None or b_stderr is None else math.hypot(a_stderr, b_stderr)
    flagged = None if stderr is None else (-delta) > 2.0 * stderr
    return {"delta": delta, "stderr": stderr, "flagged": flagged}


ACC_DROP, ACC_WITHIN, ACC_GAIN, ACC_UNKNOWN = "drop > 2σ", "within noise", "gain > 2σ", "no stderr"


def accuracy_verdict(row: Mapping[str, object]) -> str:
    """The verdict of one accuracy comparison (`accuracy_delta` plus `delta`): a drop beyond twice the combined
    stderr is the warning; a rise beyond it is said too, so "within noise" means what it says."""
    stderr, delta = row.get("stderr"), row.get("delta")
    if row.get("flagged") is None or not isinstance(stderr, float) or not isinstance(delta, float):
        return ACC_UNKNOWN
    if row["flagged"]:
        return ACC_DROP
    return ACC_GAIN if delta > 2.0 * stderr else ACC_WITHIN


# --- display ----------------------------------------------------------------------------------

CI_COLUMN = "95% CI of change"
NOISE_COLUMN, FLAGS_COLUMN = "Noise", "Flags"


def display_unit(row: GainRow) -> tuple[str, float]:
    """The unit a row is shown in and the factor from its canonical unit: latencies of 10 s and more on
    both sides read as s. Only rendering scales; rows, frames and CSV stay in the canonical unit."""
    if row.unit == "ms" and abs(row.a) >= _MS_TO_S_AT and abs(row.b) >= _MS_TO_S_AT:
        return "s", 1e-3
    return row.unit, 1.0


def _decimals(row: GainRow, unit: str) -> int:
    if unit == "s":
        return 1
    if unit in ("", "tokens") and row.kind == "count" and row.key in METRICS:
        return 0
    if row.kind == "server" and unit in ("", "tokens") and not row.key.endswith("_len"):
        return 0  # counter deltas are whole numbers
    if unit == "J/tok":
        return 4  # a small model spends hundredths of a joule per token
    return 2


def _num(x: float, decimals: int, signed: bool = False) -> str:
    if math.isinf(x):
        return ("+" if signed and x > 0 else "") + ("inf" if x > 0 else "-inf")
    if decimals == 0 and abs(x - round(x)) > 1e-9:
        decimals = 1  # a mean over repeats of a count can be fractional; don't hide it
    text = f"{x:+.{decimals}f}" if signed else f"{x:.{decimals}f}"
    if float(text) == 0:  # no "-0.0"
        text = text.replace("-", "+" if signed else "")
    return text


def _columns(a_label: str, b_label: str) -> tuple[str, str]:
    if a_label == b_label:
        return f"{a_label} (baseline)", f"{b_label} (candidate)"
    return a_label, b_label


def _interval_text(ci: tuple[float, float] | None, scale: float, n: int, signed: bool) -> str:
    if ci is None:
        return ""
    return f"[{_num(ci[0] * scale, n, signed)}, {_num(ci[1] * scale, n, signed)}]"


def format_rows(rows: list[GainRow], a_label: str, b_label: str) -> list[dict[str, str]]:
    """Rows as display strings: `Metric, <a_label>, <b_label>, Change, Improvement(%)`, then the 95 % intervals
    where any row has one (of the change, and of each side), the noise verdict and the flags.

    Equal labels are told apart as "<label> (baseline)" and "<label> (candidate)".
    """
    ca, cb = _columns(a_label, b_label)
    header = _header(rows, a_label, b_label)
    out: list[dict[str, str]] = []
    for r in rows:
        unit, scale = display_unit(r)
        n = _decimals(r, unit)
        name = metric_def(r.key).label
        cells = {
            "Metric": f"{name} ({unit})" if unit else name,
            ca: (r.bound_a + " " if r.bound_a else "") + _num(r.a * scale, n),
            cb: (r.bound_b + " " if r.bound_b else "") + _num(r.b * scale, n),
            "Change": _num(r.change * scale, n, signed=True),
            "Improvement(%)": "" if r.improvement_pct is None else _num(r.improvement_pct, 1, signed=True) + "%",
            CI_COLUMN: _interval_text(None if r.ci95_low is None or r.ci95_high is None else (r.ci95_low, r.ci95_high),
                                      scale, max(n, 1), True),
            f"{ca} 95% CI": _interval_text(r.ci_a, scale, max(n, 1), False),
            f"{cb} 95% CI": _interval_text(r.ci_b, scale, max(n, 1), False),
            NOISE_COLUMN: r.verdict,
            FLAGS_COLUMN: "; ".join(r.flags),
        }
        out.append({c: cells[c] for c in header})
    return out


def _header(rows: list[GainRow], a_label: str, b_label: str) -> list[str]:
    ca, cb = _columns(a_label, b_label)
    cols = ["Metric", ca, cb, "Change", "Improvement(%)"]
    if any(r.ci95_low is not None for r in rows):
        cols.append(CI_COLUMN)
    if any(r.ci_a is not None or r.ci_b is not None for r in rows):
        cols += [f"{ca} 95% CI", f"{cb} 95% CI"]
    return [*cols, NOISE_COLUMN, FLAGS_COLUMN]


def to_markdown(rows: list[GainRow], a_label: str, b_label: str) -> str:
    """GitHub-flavoured table, as in vLLM's recipes ("DCP Gain Analysis"), with the noise verdict and flags."""
    header = _header(rows, a_label, b_label)

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [line(header), "|" + "---|" * len(header)]
    lines += [line([cells[c] for c in header]) for cells in format_rows(rows, a_label, b_label)]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ["Metric", "key", "unit", "{a}", "{b}", "Change", "Improvement(%)", "CI low", "CI high",
              "{a} CI low", "{a} CI high", "{b} CI low", "{b} CI high", "noise", "flags"]


def csv_records(rows: list[GainRow], a_label: str, b_label: str,
                lead: Mapping[str, object] | None = None) -> list[dict[str, object]]:
    """Rows as numbers in the canonical unit (blank where unknown): what the CSV and numeric frames hold.
    `lead`: columns put first on every row (the load a table was measured at)."""
    ca, cb = _columns(a_label, b_label)
    return [
        {**(lead or {}), "Metric": r.label, "key": r.key, "unit": r.unit, ca: r.a, cb: r.b, "Change": r.change,
         "Improvement(%)": r.improvement_pct, "CI low": r.ci95_low, "CI high": r.ci95_high,
         f"{ca} CI low": r.ci_a[0] if r.ci_a else None, f"{ca} CI high": r.ci_a[1] if r.ci_a else None,
         f"{cb} CI low": r.ci_b[0] if r.ci_b else None, f"{cb} CI high": r.ci_b[1] if r.ci_b else None,
         "noise": r.verdict, "flags": "; ".join(r.flags)}
        for r in rows
    ]  # fmt: skip


def csv_fields(a_label: str, b_label: str) -> list[str]:
    ca, cb = _columns(a_label, b_label)
    return [f.format(a=ca, b=cb) for f in CSV_FIELDS]


CSV_SIGNIFICANT = 10  # float arithmetic's noise sits past the 15th digit; nothing measured here has 10 that mean much
DERIVED_SIGNIFICANT = 6  # a change, an improvement, the interval of a change: beyond 6 digits, noise of the statistics
_DERIVED_COLUMNS = ("Change", "Improvement(%)", "CI low", "CI high", "stderr of change")


def csv_number(value: Any, column: str = "") -> Any:
    """A CSV cell without float noise: a float to 10 significant digits, or 6 in the derived columns (`Change`,
    `Improvement(%)`, the change's interval; a run's own interval is in its values' digits), never rounded into
    its integer part (0.1 + 0.2 → 0.3, 12.340000001 → 12.34, a change of 227780.13 − 271196.67 → -43416.5); an
    integer-valued float as an integer (994.0 → 994); integers, text, blanks, NaN and inf as they are."""
    if isinstance(value, bool) or not isinstance(value, float) or not math.isfinite(value):
        return value
    if value.is_integer():
        return int(value)
    significant = DERIVED_SIGNIFICANT if column in _DERIVED_COLUMNS else CSV_SIGNIFICANT
    decimals = max(significant - 1 - math.floor(math.log10(abs(value))), 0)
    rounded = round(value, decimals)
    return int(rounded) if decimals == 0 else rounded


def to_csv(rows: list[GainRow], a_label: str, b_label: str, lead: Mapping[str, object] | None = None) -> str:
    """The table as CSV numbers: canonical units whatever the magnitude, `Improvement(%)` a number, blanks
    where there is no value, the noise verdict and the flags (`; `-separated) as text; `lead` columns first."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*(lead or {}), *csv_fields(a_label, b_label)], lineterminator="\n")
    writer.writeheader()
    for rec in csv_records(rows, a_label, b_label, lead):
        writer.writerow({k: "" if v is None else csv_number(v, k) for k, v in rec.items()})
    return buf.getvalue()


def to_frame(rows: list[GainRow], a_label: str, b_label: str, numeric: bool = False) -> pd.DataFrame:
    """The table as a DataFrame: display strings, or with `numeric=True` the numbers of `to_csv`."""
    import pandas as pd

    if not numeric:
        return pd.DataFrame(format_rows(rows, a_label, b_label), columns=_header(rows, a_label, b_label))
    return pd.DataFrame(csv_records(rows, a_label, b_label), columns=csv_fields(a_label, b_label))
