"""Compare page through AppTest on the seed's runs: the gain table in the seed's form, charts, downloads."""

from __future__ import annotations

import json

SEED_ROWS = {
    "Request Throughput (req/s)": ["1.25", "1.57", "+0.32", "+25.6%"],
    "Output Token Throughput (tok/s)": ["485.78", "695.13", "+209.35", "+43.1%"],
    "Mean TTFT (s)": ["271.2", "227.8", "-43.4", "+16.0%"],
    "Median TTFT (s)": ["227.4", "227.1", "-0.3", "+0.1%"],
}


def chart_titles(at) -> list[str]:
    return [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")]


def test_gain_table_of_the_seeds_two_runs(open_page, seeded) -> None:
    at = open_page("compare", a=1, b=2)
    assert at.subheader[0].value == "TP8+DCP8 vs TP8"
    table = at.table[0].value
    assert list(table.columns) == ["Metric", "TP8", "TP8+DCP8", "Change", "Improvement(%)"]
    cells = {row["Metric"]: [row["TP8"], row["TP8+DCP8"], row["Change"], row["Improvement(%)"]]
             for _, row in table.iterrows()}
    for metric, expected in SEED_ROWS.items():
        assert cells[metric] == expected, metric
    markdown = next(c for c in at.code if c.language == "markdown").value
    assert "| Request Throughput (req/s) | 1.25 | 1.57 | +0.32 | +25.6% |" in markdown
    assert "| Median TTFT (s) | 227.4 | 227.1 | -0.3 | +0.1% |" in markdown
    downloads = [d.label for d in at.download_button]
    assert downloads[:2] == ["Gain table (CSV)", "Metrics of these runs (CSV)"]


def test_headline_toggle_gives_exactly_the_seeds_table(open_page, seeded) -> None:
    at = open_page("compare", a=1, b=2)
    at.toggle[0].set_value(True).run()
    table = at.table[0].value
    assert list(table["Metric"]) == list(SEED_ROWS)
    markdown = next(c for c in at.code if c.language == "markdown").value
    assert markdown + "\n" == (
        "| Metric | TP8 | TP8+DCP8 | Change | Improvement(%) |\n|---|---|---|---|---|\n"
        "| Request Throughput (req/s) | 1.25 | 1.57 | +0.32 | +25.6% |\n"
        "| Output Token Throughput (tok/s) | 485.78 | 695.13 | +209.35 | +43.1% |\n"
        "| Mean TTFT (s) | 271.2 | 227.8 | -43.4 | +16.0% |\n"
        "| Median TTFT (s) | 227.4 | 227.1 | -0.3 | +0.1% |\n")


def test_charts_for_benchmarks_and_accuracy(open_page, seeded) -> None:
    at = open_page("compare", a=1, b="2,3,4")
    assert chart_titles(at) == ["Throughput", "Latency (mean, median, P99)", "Accuracy"]
    assert any("No benchmark results, so no gain table" in c.value and "gsm8k_tp8" in c.value for c in at.caption)
    accuracy = at.dataframe[-1].value
    dcp8 = accuracy[(accuracy["run"] == "gsm8k_tp8_dcp8") & (accuracy["filter"] == "flexible-extract")].iloc[0]
    assert round(dcp8["delta"], 4) == -0.003 and round(dcp8["delta_stderr"], 4) == 0.0093 and not dcp8["flagged"]
    assert "Accuracy (CSV)" in [d.label for d in at.download_button]
    assert any("KV capacity" in c.value for c in at.caption)  # none recorded for printed results


def test_kv_capacity_and_pareto_once_configuration_is_known(open_page, seeded) -> None:
    from runner import queries

    queries.describe_imported(seeded, [1], "moonshotai/Kimi-K2-Thinking", 8, 1)
    queries.describe_imported(seeded, [2], "moonshotai/Kimi-K2-Thinking", 8, 8)
    seeded.update_run(2, kv_cache_tokens=5_721_088, kv_cache_gib=46.8, dcp_multiplier=8)
    at = open_page("compare", a=1, b=2)
    assert chart_titles(at) == ["Throughput", "Latency (mean, median, P99)", "KV-cache capacity",
                                "Throughput per GPU vs median TPOT"]
    assert "Pareto points (CSV)" in [d.label for d in at.download_button]


def test_runs_without_results_and_a_single_run(open_page, store) -> None:
    at = open_page("compare")
    assert "Comparing needs two runs" in at.info[0].value
