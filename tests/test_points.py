"""A load sweep's results are never averaged across loads (issue 15): gain tables pair results by (workload, load),
one table per common load, loads only one side has named; true repeats of a load still pool into intervals; the
run headline and `servelab runs` show one load's numbers. Real SQLite store, the real `servelab` CLI."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from statistics import fmean

import pytest

from dashboard.signals_view import window_table
from runner import api
from runner import compare as cmp
from runner.config import BenchSpec
from runner.models import RunStatus
from runner.store import Store
from tests.conftest import REPO

CLI = [sys.executable, "-m", "runner.cli"]


def _metrics(tok_s: float, ttft: float, completed: float = 100.0, failed: float = 0.0) -> dict[str, float]:
    return {"completed": completed, "failed": failed, "duration": 20.0, "output_throughput": tok_s,
            "request_throughput": tok_s / 64, "median_ttft_ms": ttft, "p99_ttft_ms": ttft * 3,
            "median_tpot_ms": 5.0 + tok_s / 1000, "p99_tpot_ms": 9.0 + tok_s / 1000}


def _run(store: Store, label: str, loads: dict[float, list[tuple[float, float]]], **bench: object) -> int:
    """A launched run's results as the executor stores them: per load (request rate) its repeats, each with
    the bench spec it ran (`bench_spec_json`), in the order run."""
    run = store.create_run(label=label, status=RunStatus.succeeded, tensor_parallel_size=1)
    for rate, repeats in loads.items():
        spec = BenchSpec(num_prompts=100, request_rate=rate, **bench).model_dump_json()
        for i, (tok_s, ttft) in enumerate(repeats):
            store.add_bench_result(run.id, {**_metrics(tok_s, ttft), "request_rate": rate}, repeat=i,
                                   bench_spec_json=spec)
    return run.id


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "SERVELAB_DATA": str(tmp_path), "SERVELAB_DB": str(tmp_path / "s.db"),
            "PYTHONPATH": str(REPO)}


def sl(env: dict[str, str], *args: str) -> str:
    out = subprocess.run([*CLI, *args], check=False, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def _stored(store: Store, run_id: int, rate: float, key: str) -> list[float]:
    """The stored values of `key` at one load of a run, read back from the result rows."""
    return [getattr(b, key) for b in store.bench_results(run_id)
            if json.loads(b.bench_spec_json)["request_rate"] == rate]


def test_two_load_sweeps_compare_load_by_load_with_repeats_pooled(env) -> None:
    with api.open_store(env["SERVELAB_DB"]) as store:
        a = _run(store, "TP1 seqs 8", {4.0: [(1000.0, 40.0)], 16.0: [(2600.0, 90.0), (2400.0, 110.0)]})
        b = _run(store, "TP1 seqs 64", {4.0: [(1100.0, 35.0)], 16.0: [(3900.0, 60.0), (4100.0, 70.0)]})
        report = api.compare_report(store, a, b)
        assert [(g.load_kind, g.load, g.title, g.n_a, g.n_b) for g in report.bench] == [
            ("request-rate", 4.0, "4 req/s", 1, 1), ("request-rate", 16.0, "16 req/s", 2, 2)]
        assert report.notes == []
        low, high = ({r.key: r for r in g.rows} for g in report.bench)
        # each load against the same load, never a mean across loads (which would read 2,000 vs 3,033.3)
        assert (low["output_throughput"].a, low["output_throughput"].b) == (1000.0, 1100.0)
        assert low["output_throughput"].a == _stored(store, a, 4.0, "output_throughput")[0]
        assert (high["output_throughput"].a, high["output_throughput"].b) == (2500.0, 4000.0)
        assert high["output_throughput"].a == fmean(_stored(store, a, 16.0, "output_throughput"))
        assert high["median_ttft_ms"].b == fmean(_stored(store, b, 16.0, "median_ttft_ms")) == 65.0
        # true repeats (same load) still give Welch intervals; the single results at 4 req/s have none
        assert (high["output_throughput"].ci95_low, high["output_throughput"].ci95_high) == pytest.approx(
            cmp.welch_ci95([2600.0, 2400.0], [3900.0, 4100.0]))
        assert high["output_throughput"].verdict == cmp.BEYOND
        assert low["output_throughput"].verdict == cmp.NO_CI and low["output_throughput"].n_a == 1
        assert low["output_throughput"].improvement_pct == pytest.approx(10.0)
        assert high["output_throughput"].improvement_pct == pytest.approx(60.0)

    text = sl(env, "compare", str(a), str(b))
    assert [ln for ln in text.splitlines() if ln.startswith("Benchmark")] == [
        "Benchmark at 4 req/s", "Benchmark at 16 req/s"]
    rows = list(csv.DictReader(io.StringIO(sl(env, "compare", str(a), str(b), "--format", "csv"))))
    tput = [(r["load_kind"], float(r["load"]), float(r["TP1 seqs 8"]), float(r["TP1 seqs 64"])) for r in rows
            if r["section"] == "benchmark" and r["key"] == "output_throughput"]
    assert tput == [("request-rate", 4.0, 1000.0, 1100.0), ("request-rate", 16.0, 2500.0, 4000.0)]
    # api.compare_runs wants one shared load and says so
    with api.open_store(env["SERVELAB_DB"]) as store, pytest.raises(api.StoreError, match="share 2 loads"):
        api.compare_runs(store, a, b)


def test_one_load_against_a_sweep_pairs_the_common_load_and_names_the_others(env) -> None:
    with api.open_store(env["SERVELAB_DB"]) as store:
        a = _run(store, "one", {16.0: [(2000.0, 80.0)]})
        b = _run(store, "sweep", {4.0: [(900.0, 30.0)], 16.0: [(2400.0, 70.0)], 64.0: [(2450.0, 900.0)]})
        report = api.compare_report(store, a, b)
        [gain] = report.bench
        assert (gain.title, gain.n_a, gain.n_b) == ("16 req/s", 1, 1)
        row = next(r for r in gain.rows if r.key == "output_throughput")
        assert (row.a, row.b) == (_stored(store, a, 16.0, "output_throughput")[0],
                                  _stored(store, b, 16.0, "output_throughput")[0]) == (2000.0, 2400.0)
        assert report.notes == ["only the candidate has 4 req/s, 64 req/s: not compared"]
        rows, _, _ = api.compare_runs(store, a, b)  # one shared load: its table
        assert next(r for r in rows if r.key == "output_throughput").b == 2400.0
    text = sl(env, "compare", str(a), str(b))
    assert "note: only the candidate has 4 req/s, 64 req/s: not compared" in text.splitlines()
    assert [ln for ln in text.splitlines() if ln.startswith("Benchmark")] == ["Benchmark at 16 req/s"]
    rows = list(csv.DictReader(io.StringIO(sl(env, "compare", str(a), str(b), "--format", "csv"))))
    assert [r["flags"] for r in rows if r["section"] == "benchmark_note"] == [
        "only the candidate has 4 req/s, 64 req/s: not compared"]
    assert {float(r["load"]) for r in rows if r["section"] == "benchmark"} == {16.0}


def test_two_single_load_runs_at_different_loads_are_compared_with_every_row_flagged(env) -> None:
    """The seed's recipe: one rate per run, and imports whose settings are unknown. The browser test found the
    demo run (100 req/s) against the imported seed run (40 req/s) left without any gain table."""
    with api.open_store(env["SERVELAB_DB"]) as store:
        a = _run(store, "seed", {40.0: [(485.78, 271.2)]})
        b = _run(store, "demo", {100.0: [(695.13, 227.8)]})
        report = api.compare_report(store, a, b)
        [gain] = report.bench
        assert gain.title == "40 req/s (baseline) vs 100 req/s (candidate)"
        row = next(r for r in gain.rows if r.key == "output_throughput")
        assert (row.a, row.b) == (485.78, 695.13)
        assert all("different loads: baseline at 40 req/s, candidate at 100 req/s" in r.flags for r in gain.rows)
        assert report.notes == ["the two runs measured one load each, not the same one (40 req/s vs 100 req/s): "
                                "compared anyway, every row flagged — throughput and latency at different loads "
                                "are not like for like"]
        # a second load on either side: pairing is strict again
        c = _run(store, "sweep", {4.0: [(100.0, 10.0)], 16.0: [(300.0, 20.0)]})
        assert api.compare_report(store, a, c).bench == []
    assert "Benchmark at 40 req/s (baseline) vs 100 req/s (candidate)" in sl(env, "compare", str(a), str(b))


def test_other_settings_or_cache_states_are_told_apart(store) -> None:
    # one workload each, different settings: paired by load, with the difference said
    a = _run(store, "a", {8.0: [(500.0, 20.0)]})
    b = _run(store, "b", {8.0: [(600.0, 20.0)]}, random_input_len=2048)
    report = api.compare_report(store, a, b)
    assert [g.title for g in report.bench] == ["8 req/s"]
    assert report.notes == ["benchmark settings differ (random-input-len 1024 vs 2048); results paired by load"]
    # a cold and a warm benchmark at one load are two points, each compared with its like
    c = store.create_run(label="c", status=RunStatus.succeeded).id
    d = store.create_run(label="d", status=RunStatus.succeeded).id
    for run_id, base in ((c, 500.0), (d, 700.0)):
        for state, extra in (("cold", 0.0), ("warm", 100.0)):
            spec = BenchSpec(request_rate=8.0, prefix_cache=state).model_dump_json()
            store.add_bench_result(run_id, _metrics(base + extra, 20.0), bench_spec_json=spec)
    report = api.compare_report(store, c, d)
    assert [(g.title, next(r.a for r in g.rows if r.key == "output_throughput"),
             next(r.b for r in g.rows if r.key == "output_throughput")) for g in report.bench] == [
        ("8 req/s (prefix-cache cold)", 500.0, 700.0), ("8 req/s (prefix-cache warm)", 600.0, 800.0)]
    head = api.run_headline(store, c)
    assert head is not None and head.text == "2 benchmarks, peak output at 8 req/s (prefix-cache warm)"


def test_the_headline_of_a_sweep_is_its_peak_load_never_a_mean(env, tmp_path) -> None:
    with api.open_store(env["SERVELAB_DB"]) as store:
        sweep = _run(store, "sweep", {4.0: [(900.0, 30.0)], 16.0: [(2400.0, 70.0), (2600.0, 90.0)],
                                      64.0: [(2450.0, 900.0)]})
        single = _run(store, "single", {8.0: [(1200.0, 40.0), (1300.0, 44.0)]})
        head = api.run_headline(store, sweep)
        assert head is not None
        assert (head.points, head.point, head.repeats, head.text) == (
            3, "16 req/s", 2, "3 loads, peak output at 16 req/s")
        assert head.metrics["output_throughput"] == fmean(_stored(store, sweep, 16.0, "output_throughput")) == 2500.0
        assert head.metrics["median_ttft_ms"] == 80.0
        table = api.runs_table(store).set_index("id")
        assert (table.loc[sweep, "loads"], table.loc[sweep, "metrics_at"]) == (3, "16 req/s")
        assert table.loc[sweep, "output_throughput"] == 2500.0  # the mean of all 5 results would be 2,070
        assert (table.loc[single, "loads"], table.loc[single, "metrics_at"], table.loc[single, "output_throughput"]) \
            == (1, "8 req/s", 1250.0)  # repeats of one load: their mean, as before
        assert api.runs_frame(store).set_index("id").loc[sweep, "p99_ttft_ms"] == 240.0
        points = api.run_points(store, sweep)
        assert [(p["load"], p["repeats"], p["output_throughput"]) for p in points] == [
            ("4 req/s", 1, 900.0), ("16 req/s", 2, 2500.0), ("64 req/s", 1, 2450.0)]
        # in the store's order (repeat, then as run), each execution with its own load
        assert api.result_loads(store, sweep) == ["4 req/s", "16 req/s", "64 req/s", "16 req/s"]

    lines = sl(env, "runs").splitlines()
    assert lines[1].split()[:6] == [str(single), "succeeded", "single", "TP1", "8/s", "1,250"]
    assert lines[2].split()[:8] == [str(sweep), "succeeded", "sweep", "TP1", "16/s", "of", "3", "2,500"]
    assert lines[-1].startswith("LOAD `16/s of 4`: a load sweep's peak-throughput load") and \
        all(len(ln) <= 120 for ln in lines)
    out = tmp_path / "runs.csv"
    sl(env, "export", "runs", "--out", str(out))
    row = next(r for r in csv.DictReader(out.open()) if r["id"] == str(sweep))
    assert (row["loads"], row["metrics_at"], float(row["output_throughput"])) == ("3", "16 req/s", 2500.0)
    shown = sl(env, "show", str(sweep))
    assert "  #1 at 4 req/s: 100 requests" in shown and "  #3 at 64 req/s: 100 requests" in shown
    assert "  3 loads, peak output at 16 req/s (2,500.0 out tok/s)" in shown
    sl(env, "export", "results", "--run", str(sweep), "--out", str(tmp_path / "r.csv"))
    results = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert [(r["load_kind"], float(r["load"]), float(r["output_throughput"])) for r in results] == [
        ("request-rate", 4.0, 900.0), ("request-rate", 16.0, 2400.0), ("request-rate", 64.0, 2450.0),
        ("request-rate", 16.0, 2600.0)]


def test_caps_at_one_rate_are_points_never_repeats(env) -> None:
    """The Launch page's sweep over max-concurrency keeps the form's request rate: 40 req/s with caps 1, 4 and 16
    are three points (the walk saw their mean shown as "At 40 req/s, mean of 3 repeats")."""
    with api.open_store(env["SERVELAB_DB"]) as store:
        run = store.create_run(label="caps", status=RunStatus.succeeded, tensor_parallel_size=1).id
        for cap, tok_s in ((1, 208.7), (4, 578.1), (16, 1167.9)):
            spec = BenchSpec(num_prompts=100, request_rate=40.0, max_concurrency=cap).model_dump_json()
            store.add_bench_result(run, {**_metrics(tok_s, 60.0), "request_rate": 40.0, "max_concurrency": cap},
                                   bench_spec_json=spec)
        head = api.run_headline(store, run)
        assert head is not None and (head.points, head.repeats, head.metrics["output_throughput"], head.text) == (
            3, 1, 1167.9, "3 benchmarks, peak output at 40 req/s (max-concurrency 16)")
        assert [(p["load"], p["repeats"]) for p in api.run_points(store, run)] == [
            ("40 req/s (max-concurrency 1)", 1), ("40 req/s (max-concurrency 4)", 1),
            ("40 req/s (max-concurrency 16)", 1)]
        # the counters table (and the results CSV) tell the three apart too
        caps = ["40 req/s (max-concurrency 1)", "40 req/s (max-concurrency 4)", "40 req/s (max-concurrency 16)"]
        assert list(api.window_frame(store, [run])["load_text"]) == caps
        assert list(window_table(api.window_frame(store, [run]))["Load"]) == caps
        # against a run at the same rate without a cap: nothing pooled, what differs said
        plain = _run(store, "plain", {40.0: [(840.0, 1700.0)]})
        report = api.compare_report(store, plain, run)
        assert report.bench == [] and report.notes == [
            "only the baseline has 40 req/s (max-concurrency unset): not compared",
            "only the candidate has 40 req/s (max-concurrency 1), 40 req/s (max-concurrency 4), "
            "40 req/s (max-concurrency 16): not compared"]
    shown = sl(env, "show", str(run))
    assert "  #2 at 40 req/s (max-concurrency 4): 100 requests" in shown
