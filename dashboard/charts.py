"""Pure chart builders: frames in, Plotly figures out. No Streamlit, no store; tested on their own.

Inputs are the frames of `dashboard.data`: `bench_summary` (one row per run, canonical metric names),
`eval_frame` (one row per run and score), `run_samples` / `aligned_samples` (telemetry with `t_s`), `phases_frame`.
"""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

PALETTE = qualitative.Plotly
TEMPLATE = "plotly_white"
THROUGHPUTS = {
    "request_throughput": ("Request throughput", "req/s"),
    "output_throughput": ("Output token throughput", "tok/s"),
    "total_token_throughput": ("Total token throughput", "tok/s"),
}
LATENCIES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2EL"}
STATS = {"mean": "Mean", "median": "Median", "p99": "P99"}
STAGES = {
    "prestarted": ("prestarted beside the previous run: importing vLLM", "#C9DBFF"),
    "prestart_imported": ("prestarted: imported, waiting for its launch", "#E5ECF6"),
    "prestart_discarded": ("prestarted server not adopted: starting vLLM", "#636EFA"),
    "launched": ("starting vLLM", "#636EFA"),
    "ready": ("ready", "#00CC96"),
    "bench_start": ("benchmark client start-up (not measured)", "#FECB52"),
    "request_warmup_start": ("warm-up requests (not measured)", "#FF97FF"),
    "request_warmup_end": ("benchmark", "#EF553B"),
    "bench_measured": ("benchmark", "#EF553B"),
    "port_retry": ("port taken: relaunching", "#FF6692"),
    "bench_end": ("between steps", "#B6E880"),
    "cache_reset": ("prefix cache reset", "#B6E880"),
    "warmup_start": ("prefix-cache warm-up run (not measured)", "#FF97FF"),
    "warmup_end": ("between steps", "#B6E880"),
    "outputs_start": ("output check", "#19D3F3"),
    "outputs_end": ("after output check", "#FFA15A"),
    "eval_start": ("evaluation", "#AB63FA"),
    "eval_end": ("after evaluation", "#FFA15A"),
}


def _layout(fig: go.Figure, title: str, height: int = 320) -> go.Figure:
    """Title on top, then the legend, then the plots (and their subplot titles), never overlapping."""
    fig.update_layout(title=dict(text=title, y=0.98, yanchor="top", x=0, xanchor="left"), template=TEMPLATE,
                      height=height, margin=dict(l=10, r=10, t=100, b=10),
                      legend=dict(orientation="h", yanchor="bottom", y=1.08, x=0, xanchor="left"))
    return fig


def _colors(labels: list[str]) -> dict[str, str]:
    return {lab: PALETTE[i % len(PALETTE)] for i, lab in enumerate(dict.fromkeys(labels))}


def _short(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:,.4g}"


def _has(frame: pd.DataFrame, column: str) -> bool:
    return column in frame.columns and frame[column].notna().any()


# Events after `bench_start` that say where the benchmark client's start-up ended
_CLIENT_STARTED = frozenset({"request_warmup_start", "request_warmup_end", "bench_measured"})
_UNSPLIT_BENCH = ("benchmark (client start-up included)", "#EF553B")


def _stage(events: pd.DataFrame, i: int) -> tuple[str, str]:
    """Name and colour of the segment that event `i` opens. A `bench_start` (the client process starting)
    opens its start-up only when a later event of the same benchmark marks the measured window's start;
    runs stored without one show the whole benchmark as one bar, and say it includes the start-up."""
    phase = events["phase"].iloc[i]
    if phase == "bench_start":
        for later in events["phase"].iloc[i + 1:]:
            if later in _CLIENT_STARTED:
                break
            if later in ("bench_end", "bench_start", "stopped"):
                return _UNSPLIT_BENCH
    return STAGES.get(phase, (phase, "#999999"))


# -- one run --------------------------------------------------------------------------------------
def phase_timeline(phases: pd.DataFrame, now: float | None = None) -> go.Figure:
    """A run's life as consecutive segments (starting, ready, benchmark client start-up, warm-up requests,
    the measured benchmark, evaluation), in seconds since launch.

    The last segment runs to `now` while the run is alive (no `stopped` event yet)."""
    fig = go.Figure()
    if phases.empty:
        return _layout(fig, "Phases", 160)
    events = phases.sort_values("t", kind="stable").reset_index(drop=True)
    t0 = events["t"].iloc[0]
    seen: set[str] = set()
    for i, ev in events.iterrows():
        if ev["phase"] == "stopped":
            break
        end = events["t"].iloc[i + 1] if i + 1 < len(events) else now
        if end is None:
            continue
        name, color = _stage(events, int(i))
        fig.add_bar(x=[end - ev["t"]], base=[ev["t"] - t0], y=["phases"], orientation="h", name=name,
                    marker_color=color, showlegend=name not in seen, legendgroup=name,
                    hovertemplate=f"{name}: %{{x:.1f}} s<extra>{ev['detail'] or ''}</extra>")
        seen.add(name)
    fig.update_layout(barmode="overlay")
    fig.update_xaxes(title_text="seconds since launch (or its prestart)" if events["phase"].iloc[0] == "prestarted"
                     else "seconds since launch")
    fig.update_yaxes(showticklabels=False)
    return _layout(fig, "Phases", 180)


def _lines(frame: pd.DataFrame, columns: dict[str, str], title: str, y_title: str, scale: float = 1.0,
           by: str | None = None) -> go.Figure:
    """One line per column (or per value of `by` for a single column) against `t_s`."""
    fig = go.Figure()
    for col, name in columns.items():
        if not _has(frame, col):
            continue
        data = frame[frame[col].notna()]
        groups = data.groupby(by, sort=True) if by else [(None, data)]
        for key, part in groups:
            label = name if key is None else f"{name} {int(key) if isinstance(key, float) else key}"
            fig.add_scatter(x=part["t_s"], y=part[col] * scale, mode="lines", name=label)
    fig.update_xaxes(title_text="seconds")
    fig.update_yaxes(title_text=y_title, rangemode="tozero")
    return _layout(fig, title)


def _host(samples: pd.DataFrame) -> pd.DataFrame:
    return samples[samples["gpu_index"].isna()] if "gpu_index" in samples.columns else samples


def _gpus(samples: pd.DataFrame) -> pd.DataFrame:
    return samples[samples["gpu_index"].notna()] if "gpu_index" in samples.columns else samples.iloc[0:0]


def kv_usage_chart(samples: pd.DataFrame) -> go.Figure:
    return _lines(_host(samples), {"kv_cache_usage_perc": "KV cache used"}, "KV-cache usage", "% of KV cache",
                  scale=100.0)


def requests_chart(samples: pd.DataFrame) -> go.Figure:
    cols = {"num_requests_running": "running", "num_requests_waiting": "waiting"}
    return _lines(_host(samples), cols, "Requests running / waiting", "requests")


def gpu_util_chart(samples: pd.DataFrame) -> go.Figure:
    return _lines(_gpus(samples), {"util_pct": "GPU"}, "GPU utilisation per GPU", "utilisation (%)", by="gpu_index")


def gpu_memory_chart(samples: pd.DataFrame) -> go.Figure:
    return _lines(_gpus(samples), {"mem_used_mib": "GPU"}, "GPU memory per GPU", "used (GiB)", scale=1 / 1024,
                  by="gpu_index")


def host_chart(samples: pd.DataFrame) -> go.Figure:
    """The CPU backend's stand-in for the GPU charts: the server's CPU use and resident memory."""
    host = _host(samples)
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    if _has(host, "cpu_pct"):
        fig.add_scatter(x=host["t_s"], y=host["cpu_pct"], mode="lines", name="CPU (% of one core)")
    if _has(host, "rss_mib"):
        fig.add_scatter(x=host["t_s"], y=host["rss_mib"] / 1024, mode="lines", name="resident memory (GiB)",
                        secondary_y=True)
    fig.update_xaxes(title_text="seconds")
    fig.update_yaxes(title_text="CPU (%)", rangemode="tozero", secondary_y=False)
    fig.update_yaxes(title_text="memory (GiB)", rangemode="tozero", secondary_y=True)
    return _layout(fig, "vLLM server process (CPU backend)")


# -- several runs ---------------------------------------------------------------------------------
def _facet_bars(summary: pd.DataFrame, facets: list[tuple[str, str, str]], title: str) -> go.Figure:
    """One panel per (column, panel title, unit), one bar per run, each panel on its own scale."""
    facets = [f for f in facets if _has(summary, f[0])]
    fig = make_subplots(rows=1, cols=max(1, len(facets)), subplot_titles=[f[1] for f in facets])
    colors = _colors(list(summary["label"]))
    for i, (col, _, unit) in enumerate(facets, start=1):
        for _, row in summary.iterrows():
            value = row[col]
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            fig.add_bar(x=[row["label"]], y=[value], name=row["label"], marker_color=colors[row["label"]],
                        legendgroup=row["label"], showlegend=i == 1, text=[_short(value)], textposition="auto",
                        row=1, col=i)
        fig.update_yaxes(title_text=unit, row=1, col=i)
    fig.update_xaxes(showticklabels=False)
    return _layout(fig, title, 360)


def throughput_bars(summary: pd.DataFrame) -> go.Figure:
    return _facet_bars(summary, [(k, name, unit) for k, (name, unit) in THROUGHPUTS.items()], "Throughput")


def latency_bars(summary: pd.DataFrame, intervals: pd.DataFrame | None = None) -> go.Figure:
    """Mean / median / P99 of TTFT, TPOT, ITL (and E2EL when present), grouped by run, in ms; with
    `intervals` (`data.latency_intervals`: run_id, key, low, high), each bar's 95 % interval as an error bar."""
    present = [m for m in LATENCIES if any(_has(summary, f"{s}_{m}_ms") for s in STATS)]
    fig = make_subplots(rows=1, cols=max(1, len(present)), subplot_titles=[LATENCIES[m] for m in present])
    colors = _colors(list(summary["label"]))
    bounds = {} if intervals is None else {(r.run_id, r.key): (r.low, r.high) for r in intervals.itertuples()}
    for i, m in enumerate(present, start=1):
        for _, row in summary.iterrows():
            stats = [s for s in STATS if f"{s}_{m}_ms" in row and pd.notna(row[f"{s}_{m}_ms"])]
            values = [row[f"{s}_{m}_ms"] for s in stats]
            ci = [bounds.get((row["run_id"], f"{s}_{m}_ms")) for s in stats]
            error = None
            if any(ci):
                error = {"type": "data", "symmetric": False, "color": "#444", "thickness": 1.2,
                         "array": [c[1] - v if c else 0 for c, v in zip(ci, values)],
                         "arrayminus": [v - c[0] if c else 0 for c, v in zip(ci, values)]}
            fig.add_bar(x=[STATS[s] for s in stats], y=values, name=row["label"], error_y=error,
                        marker_color=colors[row["label"]], legendgroup=row["label"], showlegend=i == 1,
                        row=1, col=i)
        fig.update_yaxes(title_text="ms", row=1, col=i)
    fig.update_layout(barmode="group")
    title = "Latency (mean, median, P99)" + (" with 95 % intervals" if bounds else "")
    return _layout(fig, title, 380)


def kv_capacity_bars(summary: pd.DataFrame) -> go.Figure:
    """KV-cache capacity per run: tokens (with the DCP multiplier as text) and GiB."""
    facets = [("kv_cache_tokens", "KV cache (tokens)", "tokens"), ("kv_cache_gib", "KV cache memory (GiB)", "GiB"),
              ("max_concurrency_x", "Max concurrency (×)", "requests of max-model-len")]
    fig = _facet_bars(summary, facets, "KV-cache capacity")
    if _has(summary, "dcp_multiplier"):
        mult = dict(zip(summary["label"], summary["dcp_multiplier"]))
        for trace in fig.data:
            m = mult.get(trace.name)
            if trace.xaxis in (None, "x") and m and not math.isnan(m) and m > 1:
                trace.text = [f"{trace.y[0]:,.0f} (DCP ×{int(m)})"]
    return fig


def accuracy_chart(evals: pd.DataFrame) -> go.Figure:
    """Scores per run as points with ± stderr error bars, one group per task/filter. Points, not bars, so
    the axis can zoom to where scores differ."""
    fig = go.Figure()
    if evals.empty:
        return _layout(fig, "Accuracy")
    for (task, filt, metric), part in evals.groupby(["task", "filter", "metric"], sort=False):
        fig.add_scatter(x=part["label"], y=part["value"], name=f"{task} {filt} ({metric})", mode="markers+text",
                        error_y=dict(type="data", array=part["stderr"].fillna(0).tolist(), visible=True),
                        marker=dict(size=11), text=[f"{v:.4f}" for v in part["value"]], textposition="middle right")
    metrics = ", ".join(dict.fromkeys(evals["metric"]))
    fig.update_layout(scattermode="group", scattergap=0.6)
    err = evals["stderr"].fillna(0)
    lo, hi = float((evals["value"] - err).min()), float((evals["value"] + err).max())
    pad = max(hi - lo, 0.01) * 0.25  # Plotly's autorange misses grouped points; zoom to the scores
    fig.update_yaxes(title_text=f"{metrics} (± stderr)", range=[lo - pad, hi + pad])
    fig.update_xaxes(title_text="run")
    return _layout(fig, "Accuracy", 380)


def accuracy_throughput_frame(summary: pd.DataFrame, evals: pd.DataFrame, filter_: str = "strict-match",
                              task: str | None = None) -> pd.DataFrame:
    """One row per run that has both a benchmark and a score of `task` (default: the first) under `filter_`:
    its headline output tok/s (`api.run_headline`: the mean of its repeats; of a load sweep, its peak load's),
    the score and its stderr."""
    columns = ["run_id", "label", "output_throughput", "task", "filter", "metric", "value", "stderr"]
    if evals.empty or not _has(summary, "output_throughput"):
        return pd.DataFrame(columns=columns)
    task = task or evals["task"].iloc[0]
    scores = evals[(evals["task"] == task) & (evals["filter"] == filter_)].drop_duplicates("run_id")
    speed = summary.dropna(subset=["output_throughput"])[["run_id", "output_throughput"]]
    return scores.merge(speed, on="run_id")[columns].reset_index(drop=True)


def accuracy_throughput_chart(points: pd.DataFrame) -> go.Figure:
    """Accuracy against output throughput, one labelled point per run with ± stderr error bars: the runs up
    and to the right serve faster without losing accuracy."""
    fig = go.Figure()
    if points.empty:
        return _layout(fig, "Accuracy vs output throughput", 420)
    colors = _colors(list(points["label"]))
    for r in points.itertuples():
        err = 0.0 if r.stderr is None or pd.isna(r.stderr) else float(r.stderr)
        fig.add_scatter(x=[r.output_throughput], y=[r.value], mode="markers+text", name=r.label,
                        text=[f"{r.label}: {r.value:.4f}"], textposition="middle right",
                        error_y=dict(type="data", array=[err], visible=True),
                        marker=dict(size=13, color=colors[r.label]),
                        hovertemplate=f"{r.label}<br>%{{x:,.2f}} tok/s<br>%{{y:.4f}} ± {err:.4f}<extra></extra>")
    err = points["stderr"].astype(float).fillna(0)
    lo, hi = float((points["value"] - err).min()), float((points["value"] + err).max())
    pad = max(hi - lo, 0.01) * 0.25
    x_lo, x_hi = float(points["output_throughput"].min()), float(points["output_throughput"].max())
    x_pad = max(x_hi - x_lo, x_hi * 0.1, 1.0) * 0.2
    label_room = max(x_hi - x_lo, x_hi * 0.1, 1.0) * 0.25  # the labels sit right of their points
    first = points.iloc[0]
    fig.update_xaxes(title_text="output tok/s (a load sweep at its peak load) — higher is better",
                     range=[max(0.0, x_lo - x_pad), x_hi + x_pad + label_room])
    fig.update_yaxes(title_text=f"{first['task']} {first['filter']} {first['metric']} (± stderr)",
                     range=[lo - pad, hi + pad])
    return _layout(fig, "Accuracy vs output throughput", 420)


OVERLAY = {
    "kv_cache_usage_perc": ("KV-cache usage (%)", 100.0),
    "num_requests_running": ("Requests running", 1.0),
    "num_requests_waiting": ("Requests waiting", 1.0),
    "gen_tok_s": ("Generated tokens / s", 1.0),
}


def overlay_timeseries(aligned: pd.DataFrame) -> go.Figure:
    """Telemetry of several runs overlaid, time measured from each run's first benchmark request."""
    fig = make_subplots(rows=2, cols=2, subplot_titles=[v[0] for v in OVERLAY.values()], shared_xaxes=True,
                        vertical_spacing=0.14)
    colors = _colors(list(aligned["label"])) if len(aligned) else {}
    for i, (col, (_, scale)) in enumerate(OVERLAY.items()):
        r, c = divmod(i, 2)
        if not _has(aligned, col):
            continue
        for label, part in aligned.groupby("label", sort=False):
            fig.add_scatter(x=part["t_s"], y=part[col] * scale, mode="lines", name=label, legendgroup=label,
                            line_color=colors[label], showlegend=i == 0, row=r + 1, col=c + 1)
    fig.update_xaxes(title_text="seconds since the benchmark's first request", row=2)
    window = bench_window(aligned)
    if window is not None:
        fig.update_xaxes(range=list(window))
        fig.add_vline(x=0, line_dash="dot", line_color="#888", row="all", col="all")
    fig.update_yaxes(rangemode="tozero")
    return _layout(fig, "Time series from the benchmark's first request", 520)


def bench_window(aligned: pd.DataFrame) -> tuple[float, float] | None:
    """The x range that shows the benchmarks rather than the startups before them: from a little
    before the benchmark start to a little after the longest one ended (zooming out shows the rest).
    None when no run has a benchmark end."""
    if not _has(aligned, "bench_end_s"):
        return None
    end = float(aligned["bench_end_s"].max())
    if not end > 0:
        return None
    pad = max(2.0, 0.1 * end)
    lo = max(float(aligned["t_s"].min()), -pad)
    return lo, end + pad


def pareto_frame(summary: pd.DataFrame) -> pd.DataFrame:
    """Runs with a known GPU count: output tok/s per GPU, median TPOT, and whether each is on the frontier
    (no other run has both more throughput per GPU and a lower median TPOT)."""
    need = {"output_throughput", "median_tpot_ms", "gpus"}
    if not need <= set(summary.columns):
        return pd.DataFrame(columns=["label", "median_tpot_ms", "tok_s_per_gpu", "pareto"])
    data = summary.dropna(subset=list(need)).copy()
    data = data[data["gpus"] > 0]
    data["tok_s_per_gpu"] = data["output_throughput"] / data["gpus"]
    data["pareto"] = [
        not ((data["tok_s_per_gpu"] >= r.tok_s_per_gpu) & (data["median_tpot_ms"] <= r.median_tpot_ms)
             & ((data["tok_s_per_gpu"] > r.tok_s_per_gpu) | (data["median_tpot_ms"] < r.median_tpot_ms))).any()
        for r in data.itertuples()
    ]
    return data[["label", "median_tpot_ms", "tok_s_per_gpu", "pareto"]]


def pareto_chart(summary: pd.DataFrame) -> go.Figure:
    data = pareto_frame(summary)
    fig = go.Figure()
    colors = _colors(list(data["label"]))
    for r in data.itertuples():
        fig.add_scatter(x=[r.median_tpot_ms], y=[r.tok_s_per_gpu], mode="markers+text", name=r.label,
                        text=[r.label], textposition="top center", marker=dict(size=14, color=colors[r.label],
                        symbol="star" if r.pareto else "circle"))
    front = data[data["pareto"]].sort_values("median_tpot_ms")
    if len(front) > 1:
        fig.add_scatter(x=front["median_tpot_ms"], y=front["tok_s_per_gpu"], mode="lines", name="Pareto frontier",
                        line=dict(dash="dash", color="#555"))
    fig.update_xaxes(title_text="median TPOT (ms) — lower is better")
    fig.update_yaxes(title_text="output tok/s per GPU — higher is better", rangemode="tozero")
    return _layout(fig, "Throughput per GPU vs median TPOT", 400)


# -- load curves ----------------------------------------------------------------------------------
CURVE_AXES = (("p99_ttft_ms", "P99 TTFT (ms)"), ("p99_tpot_ms", "P99 TPOT (ms)"), ("load", "load"))


def _load_axis(loads: pd.Series) -> tuple[pd.Series, list[float], list[str]]:
    """Loads as x positions on a log axis: an unlimited rate (inf) sits at twice the largest finite load."""
    finite = loads[~loads.isin([math.inf])]
    top = float(finite.max()) * 2 if len(finite) else 1.0
    xs = loads.replace(math.inf, top)
    ticks = sorted(set(xs))
    text = ["inf" if t == top and math.inf in set(loads) else f"{t:g}" for t in ticks]
    return xs, ticks, text


def load_curves_chart(curves: pd.DataFrame, per_gpu: bool = True) -> go.Figure:
    """Output tok/s (per GPU, or total) against P99 TTFT, P99 TPOT and load: one line per run through its
    loads, the same colour in each panel; its knee (highest load meeting the SLO) a star.

    `curves` is `runner.api.load_curves`: one row per run and load, columns `label`, `load`, `load_text`,
    `output_throughput`, `tok_s_per_gpu`, `p99_ttft_ms`, `p99_tpot_ms`, `knee`."""
    y_col = "tok_s_per_gpu" if per_gpu else "output_throughput"
    y_title = "output tok/s per GPU" if per_gpu else "output tok/s"
    data = curves.dropna(subset=[y_col]) if y_col in curves.columns else curves.iloc[0:0]
    fig = make_subplots(rows=1, cols=3, subplot_titles=[f"vs {t}" for _, t in CURVE_AXES], horizontal_spacing=0.06)
    colors = _colors(list(data["label"]))
    xs_load, ticks, text = _load_axis(data["load"]) if len(data) else (data["load"], [], [])
    knee_shown = False
    for label, part in data.groupby("label", sort=False):
        part = part.sort_values("load")
        for col, (x_col, _) in enumerate(CURVE_AXES, start=1):
            xs = xs_load.loc[part.index] if x_col == "load" else part[x_col]
            fig.add_scatter(x=xs, y=part[y_col], mode="lines+markers", name=str(label), legendgroup=str(label),
                            showlegend=col == 1, line=dict(color=colors[label]), customdata=part["load_text"],
                            hovertemplate=f"%{{customdata}}<br>x %{{x:,.4g}}<br>y %{{y:,.1f}}<extra>{label}</extra>",
                            row=1, col=col)
            knee = part[part["knee"].astype(bool)]
            if len(knee):
                kx = xs_load.loc[knee.index] if x_col == "load" else knee[x_col]
                fig.add_scatter(x=kx, y=knee[y_col], mode="markers", name="knee: highest load meeting the SLO",
                                legendgroup="knee", showlegend=not knee_shown,
                                marker=dict(symbol="star", size=16, color=colors[label],
                                            line=dict(width=1, color="#222")),
                                customdata=knee["load_text"], hovertemplate="knee at %{customdata}<extra>"
                                + str(label) + "</extra>", row=1, col=col)
                knee_shown = True
    for col, (_, title) in enumerate(CURVE_AXES, start=1):
        fig.update_xaxes(title_text=title, row=1, col=col)
    fig.update_xaxes(type="log", tickvals=ticks, ticktext=text, row=1, col=3)
    fig.update_yaxes(title_text=y_title, rangemode="tozero", row=1, col=1)
    fig.update_yaxes(rangemode="tozero")
    return _layout(fig, f"Load curves: {y_title} against latency and load", 430)


def energy_curves_chart(curves: pd.DataFrame) -> go.Figure:
    """Energy per output token (J) and output tok/s per watt against load, one line per run: the
    `j_per_output_token` and `output_tok_per_s_per_w` columns of `runner.api.load_curves`."""
    data = curves.dropna(subset=["j_per_output_token"])
    fig = make_subplots(rows=1, cols=2, subplot_titles=["J per output token (lower is better)",
                                                        "output tok/s per W (higher is better)"])
    colors = _colors(list(data["label"]))
    xs_load, ticks, text = _load_axis(data["load"]) if len(data) else (data["load"], [], [])
    for label, part in data.groupby("label", sort=False):
        part = part.sort_values("load")
        for col, y in enumerate(("j_per_output_token", "output_tok_per_s_per_w"), start=1):
            fig.add_scatter(x=xs_load.loc[part.index], y=part[y], mode="lines+markers", name=str(label),
                            legendgroup=str(label), showlegend=col == 1, line=dict(color=colors[label]),
                            customdata=part["load_text"], row=1, col=col,
                            hovertemplate=f"%{{customdata}}<br>%{{y:,.4g}}<extra>{label}</extra>")
        fig.update_xaxes(title_text="load", type="log", tickvals=ticks, ticktext=text)
    fig.update_yaxes(rangemode="tozero")
    return _layout(fig, "Energy against load (NVML energy counter per benchmark window)", 380)
