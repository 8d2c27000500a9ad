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
    assert list(ranking["load at knee"]) == ["inf req/s", "8 req/s"]
    assert list(ranking["tok/s per GPU"]) == ["950.0", "450.0"]
    # a tighter P99 TPOT bound: seqs 4 keeps only 2 req/s (120), the TP2 run 8 req/s (500 / 2 = 250 per GPU)
    at.number_input(key="slo_tpot").set_value(15.0).run()
    ranking = at.dataframe[-1].value
    assert list(ranking["run"]) == [str(b), str(a)] and list(ranking["tok/s per GPU"]) == ["250.0", "120.0"]
    assert list(ranking["load at knee"]) == ["8 req/s", "2 req/s"]
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
    assert list(at.dataframe[-1].value["load at knee"]) == ["inf req/s", "32 req/s"]
    # a goodput typo is a message on the page, not a traceback
    at.text_input(key="slo_goodput").set_value("ttft 500").run()
    assert not at.exception
    assert [e.value for e in at.error] == [
        "SLO 'ttft' is not understood; write METRIC:STAT<=MS with METRIC one of ttft, tpot, itl, e2el, "
        "e.g. ttft:p99<=2000, or vLLM's goodput form ttft:2000"]
