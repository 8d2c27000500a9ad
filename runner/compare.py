"""Gain tables: baseline vs candidate benchmark metrics, direction of "better", confidence intervals.

Pure: plain dicts keyed by canonical `vllm bench serve --save-result` names in, `GainRow`s and
strings/frames out. No database, no Streamlit.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass
from statistics import fmean, variance
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import pandas as pd

Better = Literal["higher", "lower"] | None
Kind = Literal["throughput", "latency", "count", "accuracy"]


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
    ]
    for short, name in _LATENCIES:
        for stat, stat_label in _STATS:
            # The spread of a latency is reported, not judged: a lower std is not an improvement on its own.
            better: Better = None if stat == "std" else "lower"
            defs.append(MetricDef(f"{stat}_{short}_ms", f"{stat_label} {name}", "ms", better, "latency"))
    return {d.key: d for d in defs}


METRICS: dict[str, MetricDef] = _registry()
"""Ordered registry of the known bench metrics; percentiles other than p99 are resolved by `metric_def`."""

CONFIG_KEYS = frozenset({"request_rate", "max_concurrency", "burstiness", "num_prompts"})
"""Canonical keys that describe the benchmark's configuration, not its outcome: never compared."""

_PCT = re.compile(r"^p(\d+(?:\.\d+)?)_(ttft|tpot|itl|e2el)_ms$")
_MS_TO_S_AT = 10_000.0


def metric_def(key: str) -> MetricDef:
    """The definition of `key`: registered, a latency percentile such as `p95_itl_ms`, or neutral."""
    if key in METRICS:
        return METRICS[key]
    m = _PCT.match(key)
    if m:
        name = dict(_LATENCIES)[m.group(2)]
        return MetricDef(key, f"P{m.group(1)} {name}", "ms", "lower", "latency")
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
    return (1, 0, 0.0)


@dataclass
class GainRow:
    """One metric compared. a, b, change and the CI are in `unit` (ms latencies may be shown as s)."""

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


def _values(side: list[dict[str, float | None]], key: str) -> list[float]:
    out: list[float] = []
    for rep in side:
        v = rep.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            continue
        out.append(float(v))
    return out


def _numeric_keys(side: list[dict[str, float | None]]) -> set[str]:
    return {k for rep in side for k in rep if k not in CONFIG_KEYS and _values([rep], k)}


def gain_table(
    baseline: list[dict[str, float | None]],
    candidate: list[dict[str, float | None]],
    metrics: list[str] | None = None,
) -> list[GainRow]:
    """Compare two sets of repeated bench executions (one dict of canonical metrics per execution).

    Each cell is the mean over the repeats that report the metric. Rows follow `METRICS` order and
    only cover metrics present on both sides; unknown numeric keys come last and are neutral.
    With `metrics`, only those keys are compared, in the order given. A 95 % Welch interval of
    b − a is added when both sides have at least two repeats.
    """
    if metrics is None:
        keys = sorted(_numeric_keys(baseline) & _numeric_keys(candidate), key=lambda k: (_order(k), k))
    else:
        keys = list(metrics)
    rows: list[GainRow] = []
    for key in keys:
        va, vb = _values(baseline, key), _values(candidate, key)
        if not va or not vb:
            continue
        rows.append(_row(metric_def(key), va, vb))
    return rows


def _row(d: MetricDef, va: list[float], vb: list[float]) -> GainRow:
    a, b = fmean(va), fmean(vb)
    improvement: float | None = None
    better: bool | None = None
    if d.better is not None and math.isfinite(a) and math.isfinite(b):
        better = b > a if d.better == "higher" else b < a
        if abs(a) >= 0.005:  # a baseline that shows as 0.00 gives no meaningful percentage
            improvement = ((b - a) if d.better == "higher" else (a - b)) / abs(a) * 100.0
    low = high = None
    significant: bool | None = None
    interval = welch_ci95(va, vb)
    if interval is not None:
        low, high = interval
        significant = low > 0 or high < 0
    label, unit, scale = d.label, d.unit, 1.0
    if unit == "ms" and a >= _MS_TO_S_AT and b >= _MS_TO_S_AT:
        unit, scale = "s", 1e-3
    label = f"{label} ({unit})" if unit else label
    return GainRow(
        key=d.key,
        label=label,
        unit=unit,
        a=a * scale,
        b=b * scale,
        change=(b - a) * scale,
        improvement_pct=improvement,
        better=better,
        n_a=len(va),
        n_b=len(vb),
        ci95_low=None if low is None else low * scale,
        ci95_high=None if high is None else high * scale,
        significant=significant,
        kind=d.kind,
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


# --- display ----------------------------------------------------------------------------------

CI_COLUMN = "95% CI of change"


def _decimals(row: GainRow) -> int:
    if row.unit == "s":
        return 1
    if row.unit == "" and row.kind == "count" and row.key in METRICS:
        return 0
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


def format_rows(rows: list[GainRow], a_label: str, b_label: str) -> list[dict[str, str]]:
    """Rows as display strings: `Metric, <a_label>, <b_label>, Change, Improvement(%)` (+ CI if any).

    Equal labels are told apart as "<label> (baseline)" and "<label> (candidate)".
    """
    ca, cb = _columns(a_label, b_label)
    with_ci = any(r.ci95_low is not None for r in rows)
    out: list[dict[str, str]] = []
    for r in rows:
        n = _decimals(r)
        cells = {
            "Metric": r.label,
            ca: _num(r.a, n),
            cb: _num(r.b, n),
            "Change": _num(r.change, n, signed=True),
            "Improvement(%)": "" if r.improvement_pct is None else _num(r.improvement_pct, 1, signed=True) + "%",
        }
        if with_ci:
            ci = ""
            if r.ci95_low is not None and r.ci95_high is not None:
                ci = f"[{_num(r.ci95_low, max(n, 1), True)}, {_num(r.ci95_high, max(n, 1), True)}]"
            cells[CI_COLUMN] = ci
        out.append(cells)
    return out


def _header(rows: list[GainRow], a_label: str, b_label: str) -> list[str]:
    cols = ["Metric", *_columns(a_label, b_label), "Change", "Improvement(%)"]
    return cols + [CI_COLUMN] if any(r.ci95_low is not None for r in rows) else cols


def to_markdown(rows: list[GainRow], a_label: str, b_label: str) -> str:
    """GitHub-flavoured table, as in vLLM's recipes ("DCP Gain Analysis")."""
    header = _header(rows, a_label, b_label)

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [line(header), "|" + "---|" * len(header)]
    lines += [line([cells[c] for c in header]) for cells in format_rows(rows, a_label, b_label)]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[GainRow], a_label: str, b_label: str) -> str:
    """The formatted table as CSV text (same cells as `format_rows`)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_header(rows, a_label, b_label), lineterminator="\n")
    writer.writeheader()
    writer.writerows(format_rows(rows, a_label, b_label))
    return buf.getvalue()


def to_frame(rows: list[GainRow], a_label: str, b_label: str, numeric: bool = False) -> pd.DataFrame:
    """The table as a DataFrame: display strings, or with `numeric=True` the unrounded numbers."""
    import pandas as pd

    header = _header(rows, a_label, b_label)
    if not numeric:
        return pd.DataFrame(format_rows(rows, a_label, b_label), columns=header)
    ca, cb = _columns(a_label, b_label)
    records = [
        {
            "Metric": r.label,
            ca: r.a,
            cb: r.b,
            "Change": r.change,
            "Improvement(%)": r.improvement_pct,
            "CI low": r.ci95_low,
            "CI high": r.ci95_high,
        }
        for r in rows
    ]
    return pd.DataFrame(records, columns=[*header[:5], "CI low", "CI high"])
