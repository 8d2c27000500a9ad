"""Load curves and the SLO picker: the chart builder without Streamlit, then the Compare page through AppTest,
on a real store of runs with results at several loads."""

from __future__ import annotations

import json
import math

import pytest

from dashboard import charts
from runner import api
from runner.config import BenchSpec, LaunchSpec, RunSpec

INF = math.inf


def add_run(store, label: str, tp: int, points: list[tuple[float, float, float, float]]) -> int:
    """A finished run with one result per (rate, output tok/s, P99 TTFT ms, P99 TPOT ms)."""
    run = api.queue_run(store, RunSpec(launch=LaunchSpec(model="m", tensor_parallel_size=tp)))
    store.update_run(run.id, label=label, status="succeeded")
    for rate, tok, ttft, tpot in points:
        store.add_bench_result(run.id, {"completed": 16.0, "failed": 0.0, "output_throughput": tok,
                                        "p99_ttft_ms": ttft, "p99_tpot_ms": tpot, "request_rate": rate},
                               bench_spec_json=BenchSpec(request_rate=rate).model_dump_json())
    return run.id


@pytest.fixture
def swept(store):
    a = add_run(store, "seqs 4", 1, [(2, 120, 60, 8), (8, 450, 300, 20), (32, 520, 2600, 40)])
    b = add_run(store, "seqs 64 TP2", 2, [(2, 130, 50, 7), (8, 500, 90, 9), (32, 1600, 400, 20), (INF, 1900, 1500, 30)])
    return store, a, b


def test_curves_chart_per_gpu_with_knees(swept) -> None:
    store, a, b = swept
    curves = api.load_curves(store, [a, b], ["ttft:p99<=2000", "tpot:p99<=25"])
    fig = charts.load_curves_chart(curves, per_gpu=True)
    assert fig.layout.title.text == "Load curves: output tok/s per GPU against latency and load"
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert [(t.name, t.xaxis) for t in lines] == [("seqs 4", "x"), ("seqs 4", "x2"), ("seqs 4", "x3"),
                                                 ("seqs 64 TP2", "x"), ("seqs 64 TP2", "x2"), ("seqs 64 TP2", "x3")]
    assert list(lines[0].x) == [60, 300, 2600] and list(lines[0].y) == [120, 450, 520]
    assert list(lines[4].x) == [7, 9, 20, 30] and list(lines[4].y) == [65, 250, 800, 950]  # per GPU: / 2
    assert list(lines[5].x) == [2, 8, 32, 64]  # inf drawn at twice the largest finite load, labelled inf
    assert list(fig.layout.xaxis3.ticktext) == ["2", "8", "32", "inf"] and fig.layout.xaxis3.type == "log"
    knees = [t for t in fig.data if t.mode == "markers"]
    # seqs 4: 8 req/s (32 has TTFT 2600 and TPOT 40); TP2: 32 req/s (inf has TPOT 30 > 25)
    assert [(t.customdata[0], list(t.y)) for t in knees] == [("8 req/s", [450])] * 3 + [("32 req/s", [800])] * 3
    assert [t.showlegend for t in knees] == [True, False, False, False, False, False]
    total = charts.load_curves_chart(curves, per_gpu=False)
    assert list([t for t in total.data if t.mode == "lines+markers"][4].y) == [130, 500, 1600, 1900]


def test_compare_page_places_the_curves_and_the_ranking(open_page, swept) -> None:
    _, a, b = swept
    at = open_page("compare", a=a, b=b)
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert specs[-1]["layout"]["title"]["text"] == "Load curves: output tok/s per GPU against latency and load"
    ranking = at.dataframe[-1].value
    assert list(ranking["#"]) == ["1", "2"] and list(ranking["run"]) == [str(b), str(a)]
    assert list(ranking["best load in SLO"]) == ["inf req/s", "8 req/s"]
    assert list(ranking["tok/s per GPU"]) == ["950.0", "450.0"]
    # a tighter P99 TPOT bound: seqs 4 keeps only 2 req/s (120), the TP2 run 8 req/s (500 / 2 = 250 per GPU)
    at.number_input(key="slo_tpot").set_value(15.0).run()
    ranking = at.dataframe[-1].value
    assert list(ranking["run"]) == [str(b), str(a)] and list(ranking["tok/s per GPU"]) == ["250.0", "120.0"]
    assert list(ranking["best load in SLO"]) == ["8 req/s", "2 req/s"]
    # vLLM's --goodput form replaces both fields: P99 TTFT ≤ 100 ms only, TPOT unbounded
    at.text_input(key="slo_goodput").set_value("ttft:100").run()
    ranking = at.dataframe[-1].value
    assert list(ranking.columns)[-2:] == ["P99 TTFT (ms)", "note"]
    assert list(ranking["run"]) == [str(b), str(a)] and list(ranking["P99 TTFT (ms)"]) == ["90.0", "60.0"]
    assert any("servelab recommend --slo 'ttft:100'" in c.value for c in at.caption)


def test_run_page_and_show_tell_why_a_load_sweep_stopped(open_page, swept) -> None:
    from runner.loads import STOP_PHASE

    store, a, _ = swept
    reason = "P99 TTFT 2,600.0 ms at 32 req/s is over 10× its 60.0 ms at 2 req/s; skipped inf req/s"
    store.add_phase(a, STOP_PHASE, detail=reason)
    at = open_page("run", run=a)
    assert [i.value for i in at.info if "Load sweep" in i.value] == [f"Load sweep stopped early: {reason}."]
    assert api.load_sweep_stops(store, a) == [reason]


def test_slo_picker_takes_large_bounds_and_says_what_is_wrong_with_a_typo(open_page, swept) -> None:
    _, a, b = swept
    at = open_page("compare", a=a, b=b)
    # 1,000,000 ms was sent to the parser as `ttft:p99<=1e+06` and raised on the page
    at.number_input(key="slo_ttft").set_value(1_000_000.0).run()
    assert not at.exception
    assert any("servelab recommend --slo 'ttft:p99<=1000000' --slo 'tpot:p99<=100'" in c.value for c in at.caption)
    # TP2 meets both at inf (TTFT 1500, TPOT 30), seqs 4 at 32 req/s (TTFT 2600, TPOT 40)
    assert list(at.dataframe[-1].value["best load in SLO"]) == ["inf req/s", "32 req/s"]
    # a goodput typo is a message on the page, not a traceback
    at.text_input(key="slo_goodput").set_value("ttft 500").run()
    assert not at.exception
    assert [e.value for e in at.error] == [
        "SLO 'ttft' is not understood; write METRIC:STAT<=MS with METRIC one of ttft, tpot, itl, e2el, "
        "e.g. ttft:p99<=2000, or vLLM's goodput form ttft:2000"]


def test_compare_gives_a_gain_table_per_common_load_and_names_the_others(open_page, swept) -> None:
    """Issue 15: the sweeps' results were averaged across loads into one gain table."""
    _, a, b = swept
    at = open_page("compare", a=a, b=b)
    titles = [m.value for m in at.markdown if m.value.startswith("**At ")]
    assert titles == [f"**At {x} req/s** — load {i + 1} of 3 · 1 vs 1 result(s)" for i, x in enumerate((2, 8, 32))]
    assert [i.value for i in at.info if "Only the" in i.value] == ["Only the candidate has inf req/s: not compared."]
    gains = [t.value for t in at.table if "Change" in t.value.columns][:3]
    tput = [t.set_index("Metric").loc["Output Token Throughput (tok/s)", ["seqs 4", "seqs 64 TP2"]].tolist()
            for t in gains]
    assert tput == [["120.00", "130.00"], ["450.00", "500.00"], ["520.00", "1600.00"]]  # as stored, load by load
    labels = [d.label for d in at.download_button]
    assert [x for x in labels if x.startswith("Gain table")] == [f"Gain table at {x} req/s (CSV)" for x in (2, 8, 32)]
    # the bars show each sweep at its peak load and say so
    assert any("Load sweeps are shown at their peak-throughput load" in c.value and "seqs 4 at 32 req/s of 3 loads"
               in c.value and "seqs 64 TP2 at inf req/s of 4 loads" in c.value for c in at.caption)


def test_run_page_of_a_sweep_shows_its_peak_load_and_each_load(open_page, swept) -> None:
    store, _, b = swept
    [first, *_] = store.bench_results(b)
    # a window on the first load: every queue time under vLLM's lowest bucket (0.3 s), P99 decode interpolated
    from sqlmodel import Session

    from runner.models import BenchResult
    with Session(store.engine) as s:
        row = s.get(BenchResult, first.id)
        row.metrics_json = json.dumps({**json.loads(row.metrics_json), "est_p50_queue_ms": 300.0,
                                       "est_p50_queue_lo_ms": 0.0, "est_p50_queue_hi_ms": 300.0,
                                       "est_p99_decode_ms": 412.5, "est_p99_decode_lo_ms": 300.0,
                                       "est_p99_decode_hi_ms": 500.0, "prefix_cache_hit_pct": 12.5})
        s.add(row)
        s.commit()
    store.add_bench_window(first.id, "cold", {})
    at = open_page("run", run=b)
    assert [m.value for m in at.markdown if m.value.startswith("**4 loads")] == [
        "**4 loads, peak output at inf req/s** — the cards show that load (mean of its 1 result(s)); every load in "
        "the table below, never averaged together."]
    assert [m.value for m in at.metric][:1] == ["1,900.00"]  # the peak load's, not the mean 1,032.5 of four
    loads = next(d.value for d in at.dataframe if "Load" in d.value.columns and "Repeats" in d.value.columns)
    assert list(loads["Load"]) == ["2 req/s", "8 req/s", "32 req/s", "inf req/s"]
    assert list(loads["Output tok/s"]) == [130.0, 500.0, 1600.0, 1900.0]
    windows = next(d.value for d in at.dataframe if "Prefix cache" in d.value.columns)
    assert list(windows["Load"]) == ["2 req/s", "8 req/s", "32 req/s", "inf req/s"]
    assert list(windows["Queue P50 (ms, est.)"]) == ["≤ 300", "—", "—", "—"]
    assert list(windows["Decode P99 (ms, est.)"]) == ["412.5 (300–500)", "—", "—", "—"]
    csv_frame = api.window_frame(store, [b])
    assert list(csv_frame["load"]) == [2.0, 8.0, 32.0, INF] and set(csv_frame["load_kind"]) == {"request-rate"}
    assert csv_frame.loc[0, ["est_p50_queue_ms", "est_p50_queue_lo_ms", "est_p50_queue_hi_ms"]].tolist() == [
        300.0, 0.0, 300.0]
