"""Compare and Run pages (AppTest) with benchmark windows and output checks in a real SQLite store: the
seed's two imported runs, one given a window (warm cache, energy) and both given output-check answers."""

from __future__ import annotations

import json

import pandas as pd

from dashboard.signals_view import window_table
from runner import api
from runner.outputs import fixed_prompts


def _with_signals(store) -> None:
    [first] = store.bench_results(1)
    metrics = json.loads(first.metrics_json)
    # what a window adds (runner.window): a warm run on two GPUs
    store.add_bench_window(first.id, "warm", {"energy": {"window_s": 20.0, "gpus": {
        "0": {"start_mj": 9_000_000.0, "end_mj": 9_006_000.0, "joules": 6.0, "source": "nvml energy counter"}}}})
    from sqlmodel import Session

    from runner.models import BenchResult
    with Session(store.engine) as s:
        row = s.get(BenchResult, first.id)
        row.metrics_json = json.dumps({**metrics, "prefix_cache_hit_pct": 87.5, "preemptions": 0.0,
                                       "j_per_output_token": 0.0123, "finished_length": 100.0})
        s.add(row)
        s.commit()
    answers = [{"index": i, "prompt": p, "token_ids": [1, 2, 3, 4]} for i, p in enumerate(fixed_prompts(10, 0))]
    store.add_output_answers(1, answers, max_tokens=4, seed=0)
    store.add_output_answers(2, [{**a, "token_ids": [1, 9, 9, 9]} if a["index"] < 2 else a for a in answers],
                             max_tokens=4, seed=0)


def test_compare_shows_windows_and_flags_the_output_check(open_page, seeded) -> None:
    _with_signals(seeded)
    at = open_page("compare", a=1, b=2)
    headers = [h.value for h in at.header]
    assert "Server counters, cache state and energy per benchmark" in headers and "Output check" in headers
    frame = next(d.value for d in at.dataframe if "Prefix cache" in d.value.columns)
    assert list(frame["Run"]) == ["TP8", "TP8+DCP8"]
    assert list(frame["Prefix cache"]) == ["warm", "unknown"]
    assert list(frame["Hit rate (%)"]) == ["87.5", "—"]
    assert list(frame["Energy (J/output tok)"]) == ["0.0123", "—"]
    assert list(frame["Finished: length"]) == ["100", "—"]
    assert list(frame["Energy from"]) == ["nvml energy counter", "—"]
    assert [e.value for e in at.error if "Output check" in e.value] == [
        "Output check, TP8+DCP8 against TP8: 8/10 answers identical (80.0 %); differing answers first differ at "
        "token 1 (median) — FLAGGED: below 90 % identical."]
    assert "Benchmark windows (CSV)" in [d.label for d in at.download_button]


def test_run_page_lists_its_answers(open_page, seeded) -> None:
    _with_signals(seeded)
    at = open_page("run", run=1)
    labels = [e.label for e in at.expander]
    assert "Server counters, cache state and energy per benchmark" in labels
    assert "Output check (10 fixed prompts, greedy)" in labels
    answers = next(d.value for d in at.dataframe if "prompt" in d.value.columns)
    assert list(answers["#"]) == list(range(10)) and set(answers["tokens"]) == {4}


def test_window_table_blanks_and_unknowns() -> None:
    frame = pd.DataFrame([{"run_id": 1, "label": "a", "repeat": 0, "prefix_cache_state": "unknown (as-is)",
                           "prefix_cache_hit_pct": None, "j_per_output_token": None}])
    assert window_table(frame).to_dict("records") == [{"Run": "a", "Repeat": "0", "Prefix cache": "unknown (as-is)"}]
    assert api.cache_state_text("as-is") == "unknown (as-is)" and api.cache_state_text(None) == "unknown"


def test_energy_against_load_from_stored_windows(tmp_path) -> None:
    from dashboard.charts import energy_curves_chart
    from runner.store import Store

    store = Store(tmp_path / "s.db")
    run = store.create_run(label="TP1", tensor_parallel_size=1)
    for rate, jpt, tpw in ((2.0, 0.5, 2.0), (8.0, 0.2, 5.0)):  # as window_metrics stores them on a GPU
        store.add_bench_result(run.id, {"request_rate": rate, "output_throughput": 100.0 * rate,
                                        "j_per_output_token": jpt, "output_tok_per_s_per_w": tpw})
    cpu = store.create_run(label="CPU", tensor_parallel_size=1)
    store.add_bench_result(cpu.id, {"request_rate": 2.0, "output_throughput": 10.0, "j_per_output_token": None})
    curves = api.load_curves(store, [run.id, cpu.id])
    assert curves[["label", "load", "j_per_output_token", "output_tok_per_s_per_w"]].to_dict("records")[:2] == [
        {"label": "TP1", "load": 2.0, "j_per_output_token": 0.5, "output_tok_per_s_per_w": 2.0},
        {"label": "TP1", "load": 8.0, "j_per_output_token": 0.2, "output_tok_per_s_per_w": 5.0}]
    assert curves[curves.label == "CPU"]["j_per_output_token"].isna().all()
    fig = energy_curves_chart(curves)
    assert [(t.name, list(t.y)) for t in fig.data] == [("TP1", [0.5, 0.2]), ("TP1", [2.0, 5.0])]
