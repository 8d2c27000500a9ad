"""Gain tables: the seed's "DCP Gain Analysis" (Kimi-K2-Thinking, TP8 vs TP8+DCP8), directions, CIs, formats."""

import csv
import io
import math

import pandas as pd
import pytest
import scipy.stats

from runner.compare import (
    CI_COLUMN,
    METRICS,
    accuracy_delta,
    format_rows,
    gain_table,
    metric_def,
    t_ppf,
    to_csv,
    to_frame,
    to_markdown,
    welch_ci95,
)

SEED_KEYS = ["request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms"]


def by_metric(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {r["Metric"]: r for r in rows}


def test_reproduces_the_seed_dcp_gain_analysis(seed_metrics) -> None:
    rows = format_rows(gain_table([seed_metrics["TP8"]], [seed_metrics["TP8+DCP8"]], SEED_KEYS), "TP8", "TP8+DCP8")
    seed = {"Noise": "no CI (single run)", "Flags": "failed requests 2 vs 6"}
    assert rows == [
        {"Metric": "Request Throughput (req/s)", "TP8": "1.25", "TP8+DCP8": "1.57", "Change": "+0.32", "Improvement(%)": "+25.6%", **seed},
        {"Metric": "Output Token Throughput (tok/s)", "TP8": "485.78", "TP8+DCP8": "695.13", "Change": "+209.35", "Improvement(%)": "+43.1%", **seed},
        {"Metric": "Mean TTFT (s)", "TP8": "271.2", "TP8+DCP8": "227.8", "Change": "-43.4", "Improvement(%)": "+16.0%", **seed},
        {"Metric": "Median TTFT (s)", "TP8": "227.4", "TP8+DCP8": "227.1", "Change": "-0.3", "Improvement(%)": "+0.1%", **seed},
    ]  # fmt: skip


def test_seed_markdown_has_the_seed_shape(seed_metrics) -> None:
    md = to_markdown(gain_table([seed_metrics["TP8"]], [seed_metrics["TP8+DCP8"]], SEED_KEYS), "TP8", "TP8+DCP8")
    assert md.splitlines() == [
        "| Metric | TP8 | TP8+DCP8 | Change | Improvement(%) | Noise | Flags |",
        "|---|---|---|---|---|---|---|",
        "| Request Throughput (req/s) | 1.25 | 1.57 | +0.32 | +25.6% | no CI (single run) | failed requests 2 vs 6 |",
        "| Output Token Throughput (tok/s) | 485.78 | 695.13 | +209.35 | +43.1% | no CI (single run) | failed requests 2 vs 6 |",
        "| Mean TTFT (s) | 271.2 | 227.8 | -43.4 | +16.0% | no CI (single run) | failed requests 2 vs 6 |",
        "| Median TTFT (s) | 227.4 | 227.1 | -0.3 | +0.1% | no CI (single run) | failed requests 2 vs 6 |",
    ]


def test_full_table_order_units_and_directions(seed_metrics) -> None:
    rows = gain_table([seed_metrics["TP8"]], [seed_metrics["TP8+DCP8"]])
    keys = [r.key for r in rows]
    expected = [k for k in METRICS if k in seed_metrics["TP8"]]
    assert keys == expected  # registry order; request_rate is configuration, never compared
    table = by_metric(format_rows(rows, "TP8", "TP8+DCP8"))
    seed = {"Noise": "no CI (single run)", "Flags": "failed requests 2 vs 6"}
    assert table["Failed Requests"] == {
        "Metric": "Failed Requests",
        "TP8": "2",
        "TP8+DCP8": "6",
        "Change": "+4",
        "Improvement(%)": "-200.0%",
        **seed,
    }
    assert table["Successful Requests"]["Change"] == "-4"
    assert table["Total Input Tokens"]["Improvement(%)"] == ""  # neutral
    assert table["Peak Concurrent Requests"]["TP8"] == "988"
    assert table["Benchmark Duration (s)"] == {
        "Metric": "Benchmark Duration (s)",
        "TP8": "800.3",
        "TP8+DCP8": "631.4",
        "Change": "-168.9",
        "Improvement(%)": "+21.1%",
        **seed,
    }
    # Below 10 s latencies stay in ms, with two decimals.
    assert table["Mean TPOT (ms)"] == {
        "Metric": "Mean TPOT (ms)",
        "TP8": "381.29",
        "TP8+DCP8": "398.60",
        "Change": "+17.31",
        "Improvement(%)": "-4.5%",
        **seed,
    }
    # Shown in s from 10 s on; the row itself stays in ms (units are data, scaling is rendering).
    assert table["P99 TTFT (s)"]["TP8"] == "686.3"
    p99 = next(r for r in rows if r.key == "p99_ttft_ms")
    assert (p99.label, p99.unit, p99.better, p99.significant, p99.ci95_low) == ("P99 TTFT (ms)", "ms", True, None, None)
    assert (p99.a, p99.b, p99.change) == (686294.46, 451255.55, 451255.55 - 686294.46)
    assert next(r for r in rows if r.key == "mean_tpot_ms").better is False
    assert next(r for r in rows if r.key == "total_input_tokens").better is None


def test_seconds_only_when_both_sides_reach_ten_seconds() -> None:
    (row,) = gain_table([{"mean_ttft_ms": 9_999.0}], [{"mean_ttft_ms": 20_000.0}])
    assert (row.label, row.unit, row.a) == ("Mean TTFT (ms)", "ms", 9_999.0)
    assert format_rows([row], "a", "b")[0]["Metric"] == "Mean TTFT (ms)"
    (row,) = gain_table([{"mean_ttft_ms": 10_000.0}], [{"mean_ttft_ms": 20_000.0}])
    assert (row.label, row.unit, row.a, row.b) == ("Mean TTFT (ms)", "ms", 10_000.0, 20_000.0)
    assert [format_rows([row], "a", "b")[0][c] for c in ("Metric", "a", "b")] == ["Mean TTFT (s)", "10.0", "20.0"]


@pytest.mark.parametrize("ms", [50.0, 50_000.0])
def test_csv_keeps_milliseconds_whatever_the_magnitude(ms: float) -> None:
    (row,) = gain_table([{"median_ttft_ms": ms}], [{"median_ttft_ms": ms / 2}])
    [rec] = list(csv.DictReader(io.StringIO(to_csv([row], "A", "B"))))
    assert (rec["Metric"], rec["unit"], float(rec["A"]), float(rec["B"]), float(rec["Change"])) == (
        "Median TTFT (ms)", "ms", ms, ms / 2, -ms / 2)
    assert float(rec["Improvement(%)"]) == 50.0  # a number, not "+50.0%"
    numeric = to_frame([row], "A", "B", numeric=True)
    assert (numeric.loc[0, "unit"], numeric.loc[0, "A"], numeric.loc[0, "Improvement(%)"]) == ("ms", ms, 50.0)


def test_missing_none_and_unknown_keys() -> None:
    a = [{"request_throughput": 2.0, "mean_ttft_ms": None, "custom_score": 3.0, "only_a": 1.0, "backend": "vllm"}]
    b = [{"request_throughput": 3.0, "mean_ttft_ms": 5.0, "custom_score": 6.0}]
    rows = gain_table(a, b)  # type: ignore[arg-type]
    assert [(r.key, r.label, r.better, r.improvement_pct) for r in rows] == [
        ("request_throughput", "Request Throughput (req/s)", True, 50.0),
        ("custom_score", "custom_score", None, None),
    ]
    assert format_rows(rows, "a", "b")[1]["a"] == "3.00"


def test_extra_percentiles_sit_next_to_p99() -> None:
    side = [
        {
            "p99_itl_ms": 5.0,
            "p90_itl_ms": 4.0,
            "p99.9_itl_ms": 6.0,
            "mean_itl_ms": 1.0,
            "std_itl_ms": 2.0,
            "mean_e2el_ms": 9.0,
        }
    ]
    rows = gain_table(side, side)
    assert [r.key for r in rows] == [
        "mean_itl_ms",
        "p90_itl_ms",
        "p99_itl_ms",
        "p99.9_itl_ms",
        "std_itl_ms",
        "mean_e2el_ms",
    ]
    assert metric_def("p99.9_itl_ms").label == "P99.9 ITL"
    assert [r.better for r in rows] == [False] * 4 + [None, False]  # equal values are not better; std is neutral


def test_zero_baseline_has_no_improvement() -> None:
    (row,) = gain_table([{"failed": 0}], [{"failed": 3}])
    assert (row.improvement_pct, row.better, row.change) == (None, False, 3.0)
    assert format_rows([row], "a", "b")[0]["Improvement(%)"] == ""


def test_repeats_give_means_and_a_welch_interval() -> None:
    base = [{"output_throughput": v} for v in (100.0, 102.0, 98.0)]
    cand = [{"output_throughput": v} for v in (120.0, 125.0, 118.0, 121.0)]
    (row,) = gain_table(base, cand)
    assert (row.n_a, row.n_b, row.a, row.significant, row.verdict) == (3, 4, 100.0, True, "beyond noise")
    assert math.isclose(row.b, 121.0) and math.isclose(row.change, 21.0)
    ref = scipy.stats.ttest_ind([120.0, 125.0, 118.0, 121.0], [100.0, 102.0, 98.0], equal_var=False)
    low, high = ref.confidence_interval(0.95)
    assert math.isclose(row.ci95_low, low, rel_tol=1e-9) and math.isclose(row.ci95_high, high, rel_tol=1e-9)
    cells = format_rows([row], "A", "B")[0]
    assert cells[CI_COLUMN] == f"[{low:+.2f}, {high:+.2f}]"
    assert CI_COLUMN in to_markdown([row], "A", "B").splitlines()[0]


def test_overlapping_repeats_are_not_significant() -> None:
    (row,) = gain_table([{"mean_itl_ms": v} for v in (10.0, 14.0)], [{"mean_itl_ms": v} for v in (11.0, 13.5)])
    assert row.significant is False and row.ci95_low < 0 < row.ci95_high
    assert (row.verdict, row.colored) == ("within noise", False)


def test_single_repeat_on_one_side_has_no_interval() -> None:
    (row,) = gain_table([{"completed": 10}, {"completed": 11}], [{"completed": 12}])
    assert (row.ci95_low, row.ci95_high, row.significant, row.verdict) == (None, None, None, "no CI (single run)")
    assert row.a == 10.5
    assert format_rows([row], "a", "b")[0]["a"] == "10.5"  # a fractional mean of counts is not hidden
    assert CI_COLUMN not in format_rows([row], "a", "b")[0]


def test_welch_with_zero_spread_and_t_quantiles() -> None:
    assert welch_ci95([1.0, 1.0], [3.0, 3.0]) == (2.0, 2.0)
    assert welch_ci95([1.0], [3.0, 4.0]) is None
    assert math.isclose(t_ppf(0.975, 1), 12.706204736, rel_tol=1e-8)
    assert math.isclose(t_ppf(0.975, 10), 2.228138852, rel_tol=1e-8)
    assert math.isclose(t_ppf(0.975, 3.5), 2.940088637, rel_tol=1e-8)  # fractional Welch df
    assert math.isclose(t_ppf(0.975, 1e6), 1.959966, rel_tol=1e-5)


def test_csv_and_numeric_frame_carry_the_same_numbers(seed_metrics) -> None:
    rows = gain_table([seed_metrics["TP8"]], [seed_metrics["TP8+DCP8"]], SEED_KEYS)
    parsed = list(csv.DictReader(io.StringIO(to_csv(rows, "TP8", "TP8+DCP8"))))
    assert list(parsed[2].items()) == [
        ("Metric", "Mean TTFT (ms)"), ("key", "mean_ttft_ms"), ("unit", "ms"), ("TP8", "271196.67"),
        ("TP8+DCP8", "227780.13"), ("Change", "-43416.5"),  # not -43416.53999999998
        ("Improvement(%)", "16.0092"), ("CI low", ""), ("CI high", ""),  # not 16.00924…
        ("TP8 CI low", ""), ("TP8 CI high", ""), ("TP8+DCP8 CI low", ""), ("TP8+DCP8 CI high", ""),
        ("noise", "no CI (single run)"), ("flags", "failed requests 2 vs 6"),
    ]  # fmt: skip
    numeric = to_frame(rows, "TP8", "TP8+DCP8", numeric=True)
    assert list(numeric.columns) == list(parsed[0])
    assert [float(r["TP8"]) for r in parsed] == numeric["TP8"].tolist() == [1.25, 485.78, 271196.67, 227389.87]
    assert math.isclose(numeric.loc[0, "Improvement(%)"], 25.6) and numeric["CI low"].isna().all()
    frame = to_frame(rows, "TP8", "TP8+DCP8")
    assert list(frame.columns) == ["Metric", "TP8", "TP8+DCP8", "Change", "Improvement(%)", "Noise", "Flags"]
    assert frame.iloc[2].tolist()[:5] == ["Mean TTFT (s)", "271.2", "227.8", "-43.4", "+16.0%"]


def test_csv_text_carries_no_float_noise() -> None:
    """Compare's CSVs showed 0.30000000000000004 and 12.340000001; measured values keep their digits, counts
    stay whole, derived columns keep 6 significant digits."""
    from runner import api
    from runner.compare import csv_number

    a = [{"request_throughput": 0.1 + 0.2, "mean_ttft_ms": 12.340000001, "completed": 994.0},
         {"request_throughput": 0.3, "mean_ttft_ms": 12.34, "completed": 994.0}]
    b = [{"request_throughput": 0.7, "mean_ttft_ms": 271196.67, "completed": 1000.0},
         {"request_throughput": 0.7 + 1e-12, "mean_ttft_ms": 271196.67, "completed": 1000.0}]
    text = to_csv(gain_table(a, b, ["request_throughput", "mean_ttft_ms", "completed"]), "A", "B")
    assert text.splitlines()[1:] == [
        # 0.30000000000000004 (mean of 0.1 + 0.2 and 0.3): 0.3; 133.33333333349998 %: 133.333
        "Request Throughput (req/s),request_throughput,req/s,0.3,0.7,0.4,133.333,0.4,0.4,0.3,0.3,0.7,0.7,beyond noise,",
        # 12.3400000005 (mean of 12.340000001 and 12.34): 12.34; a run's interval in its values' 10 digits
        "Mean TTFT (ms),mean_ttft_ms,ms,12.34,271196.67,271184,-2197604,271184,271184,12.33999999,12.34000001,"
        "271196.67,271196.67,beyond noise,",
        "Successful Requests,completed,,994,1000,6,0.603622,6,6,994,994,1000,1000,beyond noise,",  # counts whole
    ]
    # one rule for every CSV the dashboard offers
    frame = pd.DataFrame({"label": ["A"], "t_s": [0.1 + 0.2], "gen_tok_s": [1234.5678901234], "n": [3]})
    assert api.frame_to_csv(frame) == "label,t_s,gen_tok_s,n\nA,0.3,1234.56789,3\n"
    cells = [csv_number(v) for v in (227389.87654321, 0.000123456789012, -43416.53999999998, 7, float("inf"), "x")]
    assert cells == [227389.8765, 0.000123456789, -43416.54, 7, float("inf"), "x"]
    assert csv_number(-43416.53999999998, "Change") == -43416.5 and math.isnan(csv_number(float("nan")))


def test_equal_labels_and_pipes_stay_readable() -> None:
    rows = gain_table([{"completed": 1}], [{"completed": 2}])
    assert list(format_rows(rows, "run", "run")[0]) == [
        "Metric",
        "run (baseline)",
        "run (candidate)",
        "Change",
        "Improvement(%)",
        "Noise",
        "Flags",
    ]
    assert "a\\|b" in to_markdown(rows, "a|b", "c").splitlines()[0]


def test_no_negative_zero() -> None:
    (row,) = gain_table([{"request_throughput": 1.0001}], [{"request_throughput": 1.0}])
    cells = format_rows([row], "a", "b")[0]
    assert (cells["Change"], cells["Improvement(%)"]) == ("+0.00", "+0.0%") and row.better is False


def test_accuracy_delta_on_the_seed_gsm8k_scores() -> None:
    d = accuracy_delta(0.9416, 0.0065, 0.9386, 0.0066)  # flexible-extract, TP8 vs TP8+DCP8
    assert math.isclose(d["delta"], -0.0030, abs_tol=1e-12)
    assert math.isclose(d["stderr"], math.hypot(0.0065, 0.0066))
    assert d["flagged"] is False
    assert accuracy_delta(0.94, 0.006, 0.90, 0.006)["flagged"] is True
    assert accuracy_delta(0.90, 0.006, 0.94, 0.006)["flagged"] is False  # a gain is never flagged
    assert accuracy_delta(0.94, None, 0.90, 0.006) == {"delta": pytest.approx(-0.04), "stderr": None, "flagged": None}


def test_no_percentage_against_a_baseline_that_rounds_to_zero():
    from runner.compare import gain_table

    [row] = gain_table([{"median_itl_ms": 0.001}], [{"median_itl_ms": 26.0}], metrics=["median_itl_ms"])
    assert (row.improvement_pct, row.better, row.flags) == (None, None, ("≈0 ms on baseline",))


def test_configuration_keys_have_words_and_units_where_results_list_them() -> None:
    # the run page's results table showed the raw key `request_rate` with no unit
    assert [(metric_def(k).label, metric_def(k).unit, metric_def(k).better)
            for k in ("request_rate", "max_concurrency", "burstiness", "num_prompts")] == [
        ("Request Rate (configured)", "req/s", None), ("Max Concurrency (configured)", "", None),
        ("Burstiness (configured)", "", None), ("Prompts (configured)", "", None)]
    assert [r.key for r in gain_table([{"request_rate": 100.0, "failed": 0}], [{"request_rate": 50.0, "failed": 1}])] \
        == ["failed"]  # still never compared
