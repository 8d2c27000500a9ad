"""Chart builders without Streamlit: frames in, Plotly figures out (traces, axis titles, special cases)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from dashboard import charts, data

REPO = Path(__file__).resolve().parents[2]


SUMMARY_METRICS = ["request_throughput", "output_throughput", "total_token_throughput",
                   *(f"{stat}_{m}_ms" for m in ("ttft", "tpot", "itl") for stat in ("mean", "median", "p99"))]


@pytest.fixture
def summary(seed_metrics) -> pd.DataFrame:
    """The seed's two runs as `data.bench_summary` gives them, with their configurations."""
    configs = [
        {"run_id": 1, "label": "TP8", "gpus": 8, "kv_cache_tokens": 715_136, "kv_cache_gib": 46.8,
         "dcp_multiplier": 1, "max_concurrency_x": None},
        {"run_id": 2, "label": "TP8+DCP8", "gpus": 8, "kv_cache_tokens": 5_721_088, "kv_cache_gib": 46.8,
         "dcp_multiplier": 8, "max_concurrency_x": None},
    ]
    return pd.DataFrame([{**c, **{k: seed_metrics[c["label"]][k] for k in SUMMARY_METRICS}} for c in configs])


def axis_titles(fig, axis: str = "yaxis") -> list[str]:
    layout = fig.to_plotly_json()["layout"]
    return [v["title"]["text"] for k, v in sorted(layout.items()) if k.startswith(axis) and "title" in v]


def test_throughput_bars_one_panel_per_metric_one_bar_per_run(summary) -> None:
    fig = charts.throughput_bars(summary)
    assert fig.layout.title.text == "Throughput"
    assert [a.text for a in fig.layout.annotations] == ["Request throughput", "Output token throughput",
                                                        "Total token throughput"]
    assert len(fig.data) == 6 and [t.name for t in fig.data[:2]] == ["TP8", "TP8+DCP8"]
    assert [t.y[0] for t in fig.data if t.xaxis == "x2"] == [485.78, 695.13]
    assert axis_titles(fig) == ["req/s", "tok/s", "tok/s"]
    assert sum(t.showlegend for t in fig.data) == 2  # one legend entry per run


def test_latency_bars_group_mean_median_p99_and_add_e2el_only_when_present(summary) -> None:
    fig = charts.latency_bars(summary)
    assert [a.text for a in fig.layout.annotations] == ["TTFT", "TPOT", "ITL"]
    assert list(fig.data[0].x) == ["Mean", "Median", "P99"] and list(fig.data[0].y) == [271196.67, 227389.87, 686294.46]
    assert fig.layout.barmode == "group" and axis_titles(fig) == ["ms", "ms", "ms"]
    with_e2el = summary.assign(mean_e2el_ms=[1.0, 2.0], median_e2el_ms=[1.0, 2.0], p99_e2el_ms=[1.0, 2.0])
    assert [a.text for a in charts.latency_bars(with_e2el).layout.annotations][-1] == "E2EL"


def test_kv_capacity_bars_show_the_dcp_multiplier(summary) -> None:
    fig = charts.kv_capacity_bars(summary)
    tokens = [t for t in fig.data if t.xaxis == "x"]
    assert [t.y[0] for t in tokens] == [715_136, 5_721_088]
    assert tokens[1].text[0] == "5,721,088 (DCP ×8)"
    assert [a.text for a in fig.layout.annotations] == ["KV cache (tokens)", "KV cache memory (GiB)"]


def test_accuracy_points_carry_stderr_error_bars() -> None:
    evals = pd.DataFrame([
        {"run_id": 3, "label": "TP8", "task": "gsm8k", "filter": "flexible-extract", "metric": "exact_match",
         "value": 0.9416, "stderr": 0.0065},
        {"run_id": 4, "label": "TP8+DCP8", "task": "gsm8k", "filter": "flexible-extract", "metric": "exact_match",
         "value": 0.9386, "stderr": 0.0066},
    ])  # fmt: skip
    fig = charts.accuracy_chart(evals)
    (trace,) = fig.data
    assert list(trace.error_y.array) == [0.0065, 0.0066] and list(trace.x) == ["TP8", "TP8+DCP8"]
    assert axis_titles(fig) == ["exact_match (± stderr)"]
    low, high = fig.layout.yaxis.range
    assert low < 0.9386 - 0.0066 and high > 0.9416 + 0.0065 and low > 0.9  # zoomed to where scores differ


def test_accuracy_against_throughput_has_one_labelled_point_per_run_with_both() -> None:
    summary = pd.DataFrame([
        {"run_id": 1, "label": "TP8", "output_throughput": 485.78},
        {"run_id": 2, "label": "TP8+DCP8", "output_throughput": 695.13},
        {"run_id": 3, "label": "no eval", "output_throughput": 900.0},
        {"run_id": 4, "label": "no bench", "output_throughput": None},
    ])  # fmt: skip
    evals = pd.DataFrame([
        {"run_id": r, "label": lab, "task": "gsm8k", "filter": f, "metric": "exact_match", "value": v, "stderr": se}
        for r, lab, f, v, se in [(1, "TP8", "flexible-extract", 0.9416, 0.0065),
                                 (1, "TP8", "strict-match", 0.9409, 0.0065),
                                 (2, "TP8+DCP8", "flexible-extract", 0.9386, 0.0066),
                                 (2, "TP8+DCP8", "strict-match", 0.9371, 0.0067),
                                 (4, "no bench", "strict-match", 0.5, 0.01)]
    ])  # fmt: skip
    points = charts.accuracy_throughput_frame(summary, evals)  # strict-match unless told
    assert list(points["label"]) == ["TP8", "TP8+DCP8"]
    assert list(points["value"]) == [0.9409, 0.9371] and list(points["output_throughput"]) == [485.78, 695.13]
    assert list(charts.accuracy_throughput_frame(summary, evals, "flexible-extract")["value"]) == [0.9416, 0.9386]
    fig = charts.accuracy_throughput_chart(points)
    assert [t.name for t in fig.data] == ["TP8", "TP8+DCP8"]
    assert [list(t.x) for t in fig.data] == [[485.78], [695.13]]
    assert [list(t.y) for t in fig.data] == [[0.9409], [0.9371]]
    assert [list(t.error_y.array) for t in fig.data] == [[0.0065], [0.0067]]
    assert [t.text[0] for t in fig.data] == ["TP8: 0.9409", "TP8+DCP8: 0.9371"]
    # the x values are run headlines (a sweep's peak load, never a mean over its executions), and the axis says so
    assert fig.layout.xaxis.title.text == "output tok/s (a load sweep at its peak load) — higher is better"
    assert fig.layout.yaxis.title.text == "gsm8k strict-match exact_match (± stderr)"
    low, high = fig.layout.yaxis.range
    assert low < 0.9371 - 0.0067 and high > 0.9409 + 0.0065 and low > 0.9
    assert charts.accuracy_throughput_frame(summary.drop(columns="output_throughput"), evals).empty
    assert charts.accuracy_throughput_frame(summary, evals.iloc[0:0]).empty


def test_overlay_aligns_runs_from_benchmark_start() -> None:
    aligned = pd.DataFrame({"label": ["a", "a", "b", "b"], "t_s": [-5.0, 10.0, 0.0, 10.0],
                            "kv_cache_usage_perc": [0.1, 0.5, 0.2, 0.4], "num_requests_running": [0, 4, 0, 2],
                            "num_requests_waiting": [0, 1, 0, 0], "gen_tok_s": [None, 30.0, None, 20.0]})
    fig = charts.overlay_timeseries(aligned)
    assert [a.text for a in fig.layout.annotations] == ["KV-cache usage (%)", "Requests running", "Requests waiting",
                                                        "Generated tokens / s"]
    assert len(fig.data) == 8 and list(fig.data[0].y) == [10.0, 50.0]
    assert fig.layout.xaxis3.title.text == "seconds since the benchmark's first request"
    assert fig.layout.xaxis.range is None  # no benchmark end known: the whole of the samples


def test_overlay_opens_on_the_benchmark_window_not_the_startup_before_it() -> None:
    t_s = [-60.0, -30.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 20.0]
    aligned = pd.DataFrame({"label": "a", "t_s": t_s, "kv_cache_usage_perc": 0.1, "num_requests_running": 2,
                            "num_requests_waiting": 0, "gen_tok_s": 50.0, "bench_end_s": 4.0})
    fig = charts.overlay_timeseries(aligned)
    assert list(fig.layout.xaxis.range) == [-2.0, 6.0] and list(fig.layout.xaxis4.range) == [-2.0, 6.0]
    assert list(fig.data[0].x) == t_s  # the startup is still there to zoom out to
    assert [s.x0 for s in fig.layout.shapes] == [0, 0, 0, 0]  # benchmark start marked in each panel
    long = aligned.assign(bench_end_s=[None] * 8 + [100.0])
    assert charts.bench_window(long) == (-10.0, 110.0)  # the longest benchmark of the runs, 10 % either side
    late = pd.DataFrame({"label": "a", "t_s": [-0.5, 1.0, 3.0], "bench_end_s": 4.0})
    assert charts.bench_window(late) == (-0.5, 6.0)  # no empty stretch before the first sample
    assert charts.bench_window(late.assign(bench_end_s=float("nan"))) is None


def test_pareto_marks_the_frontier_of_throughput_per_gpu_and_tpot(summary) -> None:
    worse = {"run_id": 3, "label": "TP4", "gpus": 4, "output_throughput": 100.0, "median_tpot_ms": 500.0}
    unknown = {"run_id": 4, "label": "imported", "gpus": None, "output_throughput": 900.0, "median_tpot_ms": 1.0}
    frame = charts.pareto_frame(pd.concat([summary, pd.DataFrame([worse, unknown])], ignore_index=True))
    assert list(frame["label"]) == ["TP8", "TP8+DCP8", "TP4"]  # a run without a GPU count is left out
    assert list(frame["pareto"]) == [False, True, False]
    fig = charts.pareto_chart(summary)
    assert fig.layout.xaxis.title.text.startswith("median TPOT (ms)")
    assert fig.layout.yaxis.title.text.startswith("output tok/s per GPU")
    assert [t.marker.symbol for t in fig.data] == ["circle", "star"]


def test_phase_timeline_segments_in_seconds_since_launch() -> None:
    phases = pd.DataFrame({"t": [100.0, 145.0, 146.0, 160.0, 161.0], "detail": [None] * 5,
                           "phase": ["launched", "ready", "bench_start", "bench_end", "stopped"]})
    fig = charts.phase_timeline(phases)
    # stored without a mark of where the measured requests began: one bar, saying what it includes
    assert [t.name for t in fig.data] == ["starting vLLM", "ready", "benchmark (client start-up included)",
                                          "between steps"]
    assert [t.base[0] for t in fig.data] == [0.0, 45.0, 46.0, 60.0]
    assert [t.x[0] for t in fig.data] == [45.0, 1.0, 14.0, 1.0]
    live = charts.phase_timeline(phases.iloc[:3], now=200.0)
    assert live.data[-1].x[0] == 54.0  # the running benchmark reaches now
    assert fig.layout.xaxis.title.text == "seconds since launch"


def test_a_prestarted_run_shows_its_import_beside_the_previous_run_before_its_launch() -> None:
    # the server process started at 100 beside the previous run, imported vLLM's CLI until 113, then waited
    # for its launch at 140 (runner/prestart.py)
    phases = pd.DataFrame({"t": [100.0, 113.0, 140.0, 165.0, 166.0], "detail": [None] * 5,
                           "phase": ["prestarted", "prestart_imported", "launched", "ready", "stopped"]})
    fig = charts.phase_timeline(phases)
    assert bars(fig)[:3] == [("prestarted beside the previous run: importing vLLM", 0.0, 13.0),
                             ("prestarted: imported, waiting for its launch", 13.0, 40.0),
                             ("starting vLLM", 40.0, 65.0)]
    assert fig.layout.xaxis.title.text == "seconds since launch (or its prestart)"


def test_every_phase_the_runner_marks_has_words_on_the_timeline() -> None:
    # the timeline showed `outputs_start` and `outputs_end`, raw, for the output check
    import re

    marked = set(re.findall(r'(?:_mark|add_phase)\((?:self\.run_id, )?"(\w+)"', (REPO / "runner" / "execute.py").read_text()))
    assert "bench_measured" in marked
    marked |= set(re.findall(r'"(request_warmup_\w+)"', (REPO / "runner" / "execute.py").read_text()))
    assert marked - {"stopped"} <= set(charts.STAGES), marked - {"stopped"} - set(charts.STAGES)
    phases = pd.DataFrame({"t": [0.0, 40.0, 41.0, 58.0, 59.0, 85.0, 86.0], "detail": [None] * 7,
                           "phase": ["launched", "ready", "bench_start", "bench_end", "outputs_start", "outputs_end",
                                     "stopped"]})
    assert [t.name for t in charts.phase_timeline(phases).data] == [
        "starting vLLM", "ready", "benchmark (client start-up included)", "between steps", "output check",
        "after output check"]


def bars(fig) -> list[tuple[str, float, float]]:
    return [(t.name, t.base[0], t.base[0] + t.x[0]) for t in fig.data]


def test_the_bar_named_benchmark_is_the_measured_window_not_the_client_start_up() -> None:
    # a run's benchmark as the executor marks it: the client process starts at 20 (imports for 12 s), sends
    # vLLM's 8 warm-up requests from 32, and its measured requests from 35 (the window's start) to 60
    phases = pd.DataFrame({"t": [0.0, 19.0, 20.0, 32.0, 34.9, 35.0, 60.0, 61.0], "detail": [None] * 8,
                           "phase": ["launched", "ready", "bench_start", "request_warmup_start", "request_warmup_end",
                                     "bench_measured", "bench_end", "stopped"]})
    shown = bars(charts.phase_timeline(phases))
    assert shown[2:5] == [("benchmark client start-up (not measured)", 20.0, 32.0),
                          ("warm-up requests (not measured)", 32.0, 34.9), ("benchmark", 34.9, 35.0)]
    assert shown[5] == ("benchmark", 35.0, 60.0)
    # without warm-ups (num-warmups 0), and live while the client is still starting
    no_warmups = phases.drop(index=[3, 4]).reset_index(drop=True)
    assert bars(charts.phase_timeline(no_warmups))[2:4] == [("benchmark client start-up (not measured)", 20.0, 35.0),
                                                            ("benchmark", 35.0, 60.0)]
    assert bars(charts.phase_timeline(phases.iloc[:3], now=25.0))[-1] == (
        "benchmark client start-up (not measured)", 20.0, 25.0)


def test_telemetry_charts_per_gpu_and_in_percent() -> None:
    samples = pd.DataFrame([
        {"t_s": 0.0, "gpu_index": None, "kv_cache_usage_perc": 0.25, "num_requests_running": 3.0,
         "num_requests_waiting": 1.0},
        {"t_s": 0.0, "gpu_index": 0.0, "util_pct": 90.0, "mem_used_mib": 2048.0},
        {"t_s": 0.0, "gpu_index": 1.0, "util_pct": 80.0, "mem_used_mib": 1024.0},
    ])  # fmt: skip
    assert list(charts.kv_usage_chart(samples).data[0].y) == [25.0]
    assert [t.name for t in charts.requests_chart(samples).data] == ["running", "waiting"]
    util = charts.gpu_util_chart(samples)
    assert [t.name for t in util.data] == ["GPU 0", "GPU 1"] and axis_titles(util) == ["utilisation (%)"]
    mem = charts.gpu_memory_chart(samples)
    assert [list(t.y) for t in mem.data] == [[2.0], [1.0]] and axis_titles(mem) == ["used (GiB)"]


def test_charts_import_no_streamlit() -> None:
    code = "import sys, dashboard.charts, dashboard.data, dashboard.tables; assert 'streamlit' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_latency_bars_carry_each_runs_bootstrap_interval(store) -> None:
    from runner import api
    from tests.conftest import FIXTURES

    detailed = (FIXTURES / "cpu_0.32" / "bench_detailed.json").read_bytes()
    [run_id] = api.import_files(store, [("bench.json", detailed)], label="CPU demo")
    summary = data.bench_summary(store, [run_id])
    intervals = data.latency_intervals(store, [run_id])
    assert len(intervals) == 12  # mean, median, P99 of TTFT, TPOT, ITL, E2EL
    low, high = intervals.set_index("key").loc["median_ttft_ms", ["low", "high"]]
    fig = charts.latency_bars(summary, intervals)
    assert fig.layout.title.text == "Latency (mean, median, P99) with 95 % intervals"
    ttft = fig.data[0]
    assert list(ttft.x) == ["Mean", "Median", "P99"] and ttft.y[1] == summary.loc[0, "median_ttft_ms"]
    assert ttft.error_y.array[1] == high - ttft.y[1] and ttft.error_y.arrayminus[1] == ttft.y[1] - low
    assert charts.latency_bars(summary).data[0].error_y.array is None  # without intervals: plain bars
