"""Compare page through AppTest on the seed's runs: the gain table in the seed's form, the accuracy comparison
with its 2σ check, charts, downloads."""

from __future__ import annotations

import json

from runner import api, noise
from runner.models import RunSource, RunStatus
from runner.parsers import parse_bench_json
from tests.conftest import FIXTURES
from tests.ui.conftest import SEED

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
    assert list(table.columns) == ["Metric", "TP8", "TP8+DCP8", "Change", "Improvement(%)", "Noise", "Flags"]
    cells = {row["Metric"]: [row["TP8"], row["TP8+DCP8"], row["Change"], row["Improvement(%)"]]
             for _, row in table.iterrows()}
    for metric, expected in SEED_ROWS.items():
        assert cells[metric] == expected, metric
    # the seed's 2 and 6 failed requests: at the top and on every row; single runs: no CI, so nothing coloured
    assert [w.value for w in at.warning] == ["Failed requests 2 vs 6."]
    assert set(table["Flags"]) == {"failed requests 2 vs 6"} and set(table["Noise"]) == {"no CI (single run)"}
    css = at.table[0].proto.arrow_data.styler.styles
    assert "46, 160, 67" not in css and "248, 81, 73" not in css
    markdown = next(c for c in at.code if c.language == "markdown").value
    assert "| Request Throughput (req/s) | 1.25 | 1.57 | +0.32 | +25.6% | no CI (single run) |" in markdown
    assert "| Median TTFT (s) | 227.4 | 227.1 | -0.3 | +0.1% | no CI (single run) |" in markdown
    downloads = [d.label for d in at.download_button]
    assert downloads[:2] == ["Gain table at 100 req/s (CSV)", "Metrics of these runs (CSV)"]


def test_headline_toggle_gives_exactly_the_seeds_table(open_page, seeded) -> None:
    at = open_page("compare", a=1, b=2)
    at.toggle[0].set_value(True).run()
    table = at.table[0].value
    assert list(table["Metric"]) == list(SEED_ROWS)
    markdown = next(c for c in at.code if c.language == "markdown").value
    flag = " no CI (single run) | failed requests 2 vs 6 |"
    assert markdown + "\n" == (
        "| Metric | TP8 | TP8+DCP8 | Change | Improvement(%) | Noise | Flags |\n|---|---|---|---|---|---|---|\n"
        f"| Request Throughput (req/s) | 1.25 | 1.57 | +0.32 | +25.6% |{flag}\n"
        f"| Output Token Throughput (tok/s) | 485.78 | 695.13 | +209.35 | +43.1% |{flag}\n"
        f"| Mean TTFT (s) | 271.2 | 227.8 | -43.4 | +16.0% |{flag}\n"
        f"| Median TTFT (s) | 227.4 | 227.1 | -0.3 | +0.1% |{flag}\n")


def accuracy_tables(at) -> list:
    return [t.value for t in at.table if "Check" in t.value.columns]


def test_seed_accuracy_beside_the_gain_table_of_the_same_two_runs(open_page, seeded) -> None:
    at = open_page("compare", a=1, b=2)
    assert [s.value for s in at.subheader] == ["TP8+DCP8 vs TP8", "Accuracy: TP8+DCP8 vs TP8"]
    (table,) = accuracy_tables(at)
    rows = {r["Filter"]: [r["TP8"], r["TP8+DCP8"], r["Change"], r["Combined stderr"], r["Check"]]
            for _, r in table.iterrows()}
    assert rows == {
        "flexible-extract": ["0.9416 ± 0.0065", "0.9386 ± 0.0066", "-0.0030", "0.0093", "within noise"],
        "strict-match": ["0.9409 ± 0.0065", "0.9371 ± 0.0067", "-0.0038", "0.0093", "within noise"],
    }
    assert list(table["Task"]) == ["gsm8k", "gsm8k"] and list(table["n-shot"]) == ["5", "5"]
    assert not at.error  # no drop flagged
    assert "#b42318" not in at.table[1].proto.arrow_data.styler.styles
    markdown = [c.value for c in at.code if c.language == "markdown"][-1]
    assert "| gsm8k | strict-match | exact_match | 0.9409 ± 0.0065 | 0.9371 ± 0.0067 | -0.0038 | no |" in markdown
    assert chart_titles(at) == ["Throughput", "Latency (mean, median, P99)", "Accuracy",
                                "Accuracy vs output throughput",
                                "Load curves: output tok/s against latency and load"]  # GPU counts unknown
    assert at.selectbox[-1].label == "Filter for the chart below" and at.selectbox[-1].value == "strict-match"
    assert not any("Left out of accuracy" in c.value for c in at.caption)  # both runs have both
    assert {"Gain table at 100 req/s (CSV)", "Accuracy comparison (CSV)"} <= {d.label for d in at.download_button}
    assert any("KV capacity" in c.value for c in at.caption)  # none recorded for printed results


def test_a_drop_beyond_twice_the_combined_stderr_is_flagged(open_page, store) -> None:
    for label, value, stderr in (("base", 0.94, 0.0065), ("worse", 0.90, 0.008)):
        run = store.create_run(label=label, source=RunSource.imported, status=RunStatus.succeeded)
        store.add_eval_results(run.id, [{"task": "gsm8k", "filter": "strict-match", "metric": "exact_match",
                                         "value": value, "stderr": stderr, "n_shot": 5}])
    at = open_page("compare", a=1, b=2)
    (table,) = accuracy_tables(at)
    row = table.iloc[0]
    assert [row["base"], row["worse"], row["Change"], row["Combined stderr"], row["Check"]] == [
        "0.9400 ± 0.0065", "0.9000 ± 0.0080", "-0.0400", "0.0103", "drop > 2σ"]
    assert any("strict-match (exact_match) drops by 0.0400" in e.value and "0.0206" in e.value for e in at.error)
    css = at.table[0].proto.arrow_data.styler.styles
    assert "color: #b42318" in css and "248, 81, 73" in css  # the flag is red
    # no benchmarks: no gain table, and the scatter says who is left out
    assert any("Left out of accuracy vs throughput" in c.value and "base, worse" in c.value for c in at.caption)


def test_an_eval_only_baseline_is_explained_and_charts_still_show(open_page, store) -> None:
    """Results imported the old way, one run per file: the bench run has no accuracy to compare with."""
    for name in ("tp8.txt", "tp8_dcp8.txt", "gsm8k_tp8_dcp8.txt"):
        api.import_files(store, [(name, (SEED / name).read_bytes())])
    at = open_page("compare", a=1, b="2,3")
    assert any("The baseline #1 tp8 (succeeded) has no accuracy results" in i.value for i in at.info)
    assert any(c.value == "No accuracy results: #2 tp8_dcp8 (succeeded)." for c in at.caption)
    assert not accuracy_tables(at)
    assert "Accuracy" in chart_titles(at)
    assert any("Left out of accuracy vs throughput" in c.value and "tp8, tp8_dcp8, gsm8k_tp8_dcp8" in c.value
               for c in at.caption)


def test_kv_capacity_and_pareto_once_configuration_is_known(open_page, seeded) -> None:
    from runner import api

    api.describe_imported(seeded, [1], "moonshotai/Kimi-K2-Thinking", 8, 1)
    api.describe_imported(seeded, [2], "moonshotai/Kimi-K2-Thinking", 8, 8)
    seeded.update_run(2, kv_cache_tokens=5_721_088, kv_cache_gib=46.8, dcp_multiplier=8)
    at = open_page("compare", a=1, b=2)
    assert chart_titles(at) == ["Throughput", "Latency (mean, median, P99)", "KV-cache capacity", "Accuracy",
                                "Accuracy vs output throughput", "Throughput per GPU vs median TPOT",
                                "Load curves: output tok/s per GPU against latency and load"]
    assert "Pareto points (CSV)" in [d.label for d in at.download_button]


def test_runs_without_results_and_a_single_run(open_page, store) -> None:
    at = open_page("compare")
    assert "Comparing needs two runs" in at.info[0].value


def test_opens_on_the_two_newest_succeeded_runs_with_bootstrap_intervals(open_page, store) -> None:
    """Issue 13: Compare opened on a failed run as baseline. Two real vLLM-CPU results with per-request data,
    a failed run between and after them."""
    detailed = (FIXTURES / "cpu_0.32" / "bench_detailed.json").read_bytes()
    api.import_files(store, [("bench.json", detailed)], label="A")
    store.create_run(label="broken", status=RunStatus.failed, failure_reason="vLLM exited")
    api.import_files(store, [("bench.json", detailed)], label="B")
    store.create_run(label="broken again", status=RunStatus.failed, failure_reason="vLLM exited")
    at = open_page("compare")
    assert (at.selectbox[0].value, at.multiselect[0].value) == (1, [3])
    table = at.table[0].value
    assert list(table.columns) == ["Metric", "A", "B", "Change", "Improvement(%)", "95% CI of change", "A 95% CI",
                                   "B 95% CI", "Noise", "Flags"]
    row = table.set_index("Metric").loc["Median TTFT (ms)"]
    reqs = [noise.requests_from_arrays(parse_bench_json(detailed).arrays)]
    ci_a, ci_b = (noise.side_ci(reqs, "median_ttft_ms", seed=seed) for seed in (noise.SEED, noise.SEED + 1))
    assert (row["A"], row["A 95% CI"], row["B 95% CI"], row["Noise"]) == (
        "141.79", f"[{ci_a[0]:.2f}, {ci_a[1]:.2f}]", f"[{ci_b[0]:.2f}, {ci_b[1]:.2f}]", "within noise")
    assert row["Flags"] == "benchmark 0.3 s on baseline (< 10 s); benchmark 0.3 s on candidate (< 10 s)"
    assert set(table.set_index("Metric").loc["Output Token Throughput (tok/s)", ["Noise"]]) == {"no CI (single run)"}
    assert [w.value for w in at.warning] == ["Benchmark 0.3 s on baseline (< 10 s).",
                                             "Benchmark 0.3 s on candidate (< 10 s)."]
