"""Noise on every gain: bootstrap CIs from a real vLLM-CPU run's per-request data (checked against scipy), the
noise verdict, and each flag triggered by real or constructed per-request data."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import scipy.stats

from runner import noise
from runner.compare import BEYOND, NO_CI, WITHIN, Side, gain_table, run_flags
from runner.parsers import parse_bench_json
from tests.conftest import FIXTURES

# `vllm bench serve --save-detailed` of the CPU demo model on vLLM-CPU 0.32 (40 requests, 32 tokens each)
DETAILED = parse_bench_json((FIXTURES / "cpu_0.32" / "bench_detailed.json").read_text())
STATS = [f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for s in ("mean", "median", "p90", "p99")]


@pytest.fixture
def reqs() -> noise.Requests:
    r = noise.requests_from_arrays(DETAILED.arrays)
    assert r is not None
    return r


def test_statistics_of_the_requests_are_vllms_own(reqs: noise.Requests) -> None:
    assert (reqs.n, reqs.failed, len(reqs.itl_ms), reqs.e2el_ms is not None) == (40, 0, 40, True)
    for key in STATS:
        assert noise.point([reqs], key) == pytest.approx(DETAILED.metrics[key], rel=1e-12), key


def _scipy_ci(reqs: noise.Requests, key: str, seed: int) -> tuple[float, float]:
    """scipy.stats.bootstrap (percentile) over the request indices: a resampled request brings all its values."""
    stat, latency = noise.statistic_of(key)
    clusters = reqs.clusters(latency)

    def statistic(idx: np.ndarray) -> float:
        pooled = np.concatenate([clusters[i] for i in idx])
        return float(pooled.mean() if stat == "mean" else np.percentile(pooled, 50 if stat == "median" else float(stat[1:])))

    res = scipy.stats.bootstrap((np.arange(len(clusters)),), statistic, vectorized=False, n_resamples=2000,
                                method="percentile", confidence_level=0.95, rng=np.random.default_rng(seed))
    return res.confidence_interval.low, res.confidence_interval.high


@pytest.mark.parametrize("key", ["median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p90_tpot_ms",
                                 "p99_tpot_ms", "median_itl_ms", "p90_itl_ms", "p99_itl_ms", "median_e2el_ms",
                                 "p90_e2el_ms", "p99_e2el_ms"])
def test_bootstrap_interval_is_scipys_percentile_bootstrap(reqs: noise.Requests, key: str) -> None:
    ours = noise.side_ci([reqs], key, seed=7)
    assert ours == pytest.approx(_scipy_ci(reqs, key, seed=7), rel=1e-12)
    value = DETAILED.metrics[key]
    assert ours[0] <= value <= ours[1] and ours[0] < ours[1]


def test_plain_values_match_scipys_vectorized_bootstrap(reqs: noise.Requests) -> None:
    res = scipy.stats.bootstrap((reqs.ttft_ms,), lambda x, axis: np.percentile(x, 50, axis=axis), n_resamples=2000,
                                method="percentile", rng=np.random.default_rng(noise.SEED))
    assert noise.side_ci([reqs], "median_ttft_ms") == pytest.approx(
        (res.confidence_interval.low, res.confidence_interval.high), rel=1e-12)


def test_difference_interval_comes_from_scipys_bootstrap_distributions(reqs: noise.Requests) -> None:
    """The sides are resampled independently, a seed each; the change's interval is the percentile interval of
    the differences of their bootstrap distributions (scipy's, here)."""
    slower = dataclasses.replace(reqs, ttft_ms=reqs.ttft_ms * 2)

    def dist(x: np.ndarray, seed: int) -> np.ndarray:
        return scipy.stats.bootstrap((x,), lambda v, axis: np.median(v, axis=axis), n_resamples=2000,
                                     method="percentile", rng=np.random.default_rng(seed)).bootstrap_distribution

    expected = np.percentile(dist(slower.ttft_ms, 1) - dist(reqs.ttft_ms, 0), [2.5, 97.5])
    a = noise.Bootstrap([reqs], ["median_ttft_ms"], seed=0)
    b = noise.Bootstrap([slower], ["median_ttft_ms"], seed=1)
    assert noise.diff_ci(a, b, "median_ttft_ms") == pytest.approx(tuple(expected), rel=1e-12)
    assert noise.diff_ci(a, b, "median_ttft_ms")[0] > 0  # twice as slow: beyond noise


def _side(metrics: dict, reqs: noise.Requests) -> Side:
    return Side([metrics], [reqs])


def test_noise_verdicts_from_per_request_data(reqs: noise.Requests) -> None:
    m = DETAILED.metrics
    # the same run against itself: every latency statistic within noise, throughputs without a CI
    rows = {r.key: r for r in gain_table(_side(m, reqs), _side(m, reqs))}
    assert rows["median_ttft_ms"].verdict == WITHIN and rows["median_ttft_ms"].ci95_low < 0 < rows["median_ttft_ms"].ci95_high
    assert rows["median_ttft_ms"].ci_a == noise.side_ci([reqs], "median_ttft_ms", seed=noise.SEED)
    assert rows["median_ttft_ms"].ci_b == noise.side_ci([reqs], "median_ttft_ms", seed=noise.SEED + 1)
    assert "p50_ttft_ms" not in rows  # vLLM writes P50 beside the median: one row
    assert rows["output_throughput"].verdict == NO_CI and rows["output_throughput"].ci95_low is None
    assert not any(r.colored for r in rows.values())
    # every E2EL 30 % longer: beyond noise, and coloured
    slow = dataclasses.replace(reqs, e2el_ms=reqs.e2el_ms * 1.3)
    slow_m = {**m, "median_e2el_ms": noise.point([slow], "median_e2el_ms")}
    row = next(r for r in gain_table(_side(m, reqs), _side(slow_m, slow)) if r.key == "median_e2el_ms")
    assert (row.verdict, row.better, row.colored) == (BEYOND, False, True)
    assert row.ci95_low > 0 and row.ci95_low <= row.change <= row.ci95_high
    # per-request data on one side only: no CI
    row = next(r for r in gain_table(Side([m]), _side(m, reqs)) if r.key == "median_ttft_ms")
    assert (row.verdict, row.ci95_low, row.ci_a) == (NO_CI, None, None)


def test_flags_of_the_real_cpu_run(reqs: noise.Requests) -> None:
    """The CPU demo run is 0.32 s long, its median ITL is 0.0024 ms (tokens arrive in bursts), its rtfx 0."""
    m = DETAILED.metrics
    assert (m["rtfx"], round(m["duration"], 2)) == (0.0, 0.32)
    rows = {r.key: r for r in gain_table(_side(m, reqs), _side(m, reqs))}
    assert "rtfx" not in rows  # 0 on both sides: carries nothing
    short = ("benchmark 0.3 s on baseline (< 10 s)", "benchmark 0.3 s on candidate (< 10 s)")
    assert rows["median_itl_ms"].flags == (*short, "≈0 ms on both")
    assert (rows["median_itl_ms"].better, rows["median_itl_ms"].improvement_pct, rows["median_itl_ms"].colored) == (
        None, None, False)
    assert rows["output_throughput"].flags == short
    assert rows["failed"].flags == short  # counts carry the run's flags, not "from N requests"


def test_failed_requests_and_a_first_request_stall_from_per_request_data() -> None:
    arrays = json.loads(json.dumps(DETAILED.raw))  # a copy to change
    arrays["errors"][5] = "Not Found"
    arrays["errors"][9] = "Not Found"
    arrays["ttfts"][5] = arrays["ttfts"][9] = 0.0
    first = int(np.argmin(arrays["start_times"]))
    arrays["ttfts"][first] = 13.4  # s: the cold start of issue 13
    broken = noise.requests_from_arrays(arrays)
    assert (broken.n, broken.failed) == (38, 2)
    assert noise.first_request_stall(broken) == (13_400.0, pytest.approx(float(np.median(broken.ttft_ms[1:]))))
    ok = noise.requests_from_arrays(DETAILED.arrays)
    assert noise.first_request_stall(ok) is None
    base = {"failed": 0.0, "duration": 30.0, "completed": 40.0, "median_ttft_ms": 140.0}
    cand = {"failed": 2.0, "duration": 30.0, "completed": 38.0, "median_ttft_ms": 140.0}
    rest = float(np.median(broken.ttft_ms[1:]))
    assert run_flags(Side([base], [ok]), Side([cand], [broken])) == [
        "failed requests 0 vs 2", f"first-request stall on candidate (TTFT 13,400 ms vs median {rest:,.0f} ms)"]


def test_a_statistic_from_fewer_than_30_requests_is_flagged() -> None:
    rows = {r.key: r for r in gain_table([{"completed": 20, "median_tpot_ms": 5.0, "output_throughput": 9.0}],
                                         [{"completed": 40, "median_tpot_ms": 4.0, "output_throughput": 9.5}])}
    assert rows["median_tpot_ms"].flags == ("from 20 requests on baseline (< 30)",)
    assert rows["output_throughput"].flags == ("from 20 requests on baseline (< 30)",)
    assert rows["completed"].flags == ()


def test_a_percentile_of_zero_is_flagged_and_not_judged() -> None:
    """Issue 13: median TPOT 3.86 → 0.00 ms was shown as +99.9 % in green."""
    [row] = gain_table([{"median_tpot_ms": 3.86}], [{"median_tpot_ms": 0.001}])
    assert (row.flags, row.better, row.improvement_pct, row.colored) == (("≈0 ms on candidate",), None, None, False)
    [row] = gain_table([{"median_itl_ms": 0.0055}], [{"median_itl_ms": 86.1}])  # the TP1 vs TP2 demo: 0.01 shown
    assert (row.flags, row.better, row.improvement_pct) == (("≈0 ms on baseline",), None, None)


def test_bootstrap_is_skipped_where_it_would_be_too_slow(reqs: noise.Requests, monkeypatch) -> None:
    monkeypatch.setattr(noise, "MAX_WORK", 1000)
    assert noise.side_ci([reqs], "median_itl_ms") is None
    assert noise.side_ci([reqs], "median_ttft_ms") is None  # 40 × 2000 > 1000 too
