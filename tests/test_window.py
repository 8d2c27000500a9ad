"""Benchmark windows: counter deltas from real vLLM `/metrics` pages (0.32 CPU and 0.24 GPU captures,
served over real HTTP), histogram estimates checked by hand, energy from a fake NVML.

The fake NVML stands for what this machine cannot cause: GPUs with an energy counter. Its scenarios are
named: `h200_pair_with_energy_counter` (counters read at both ends), `energy_counter_not_supported`
(NVML raises Not Supported: the sampler's power readings are integrated instead).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner import compare as cmp
from runner.errors import RunError
from runner.window import (
    Reading,
    Snapshot,
    WindowProbe,
    counter_metrics,
    energy_metrics,
    estimate,
    histogram_quantile,
    integrate_power,
    parse_snapshot,
    quantile_bucket,
    reset_prefix_cache,
    window_metrics,
)
from tests.conftest import LocalHTTPServer

FIX = Path(__file__).parent / "fixtures"
IDLE = (FIX / "cpu_0.32" / "metrics_idle.txt").read_text()
BUSY = (FIX / "cpu_0.32" / "metrics_busy.txt").read_text()


# -- fake NVML with an energy counter ---------------------------------------------------------------------
class NVMLError(Exception):
    pass


class FakeEnergyNvml:
    """`pynvml` as far as a window reads it: handles and nvmlDeviceGetTotalEnergyConsumption (mJ)."""

    NVMLError = NVMLError

    def __init__(self, energy_mj: dict[int, list[float] | None]):
        self.energy = energy_mj  # GPU → successive counter values; None: "Not Supported"
        self.inits = self.shutdowns = 0

    def nvmlInit(self) -> None:
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.energy)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetTotalEnergyConsumption(self, h: int) -> int:
        values = self.energy[h]
        if values is None:
            raise NVMLError("Not Supported")
        return int(values.pop(0))


def h200_pair_with_energy_counter() -> FakeEnergyNvml:
    # GPU 0 spends 6 000 J, GPU 1 4 000 J between the two reads; counters far from zero, as after days of uptime
    return FakeEnergyNvml({0: [9_000_000_000, 9_006_000_000], 1: [7_500_000_000, 7_504_000_000]})


def energy_counter_not_supported() -> FakeEnergyNvml:
    return FakeEnergyNvml({0: None})


# -- a real HTTP server with captured vLLM pages -------------------------------------------------------------
@pytest.fixture
def metrics_server() -> Iterator[tuple[str, list[str]]]:
    pages = [IDLE, BUSY]
    server = LocalHTTPServer(lambda path: (200, (pages.pop(0) if len(pages) > 1 else pages[0]).encode(), "text/plain"))
    yield server.base_url + "/metrics", pages
    server.shutdown()


def test_counter_deltas_of_a_real_cpu_benchmark_window(metrics_server) -> None:
    url, _ = metrics_server
    probe = WindowProbe(url, gpu_indices=[])
    start, end = probe.read(), probe.read()
    probe.close()
    bench = {"total_output_tokens": 23305.0, "output_throughput": 500.0}
    scalars, detail = window_metrics(start, end, bench)
    assert scalars == {
        "prefix_cache_queries": 15390.0, "prefix_cache_hits": 1536.0, "prefix_cache_hit_pct": 1536 / 15390 * 100,
        "preemptions": 0.0, "server_prompt_tokens": 15390.0, "server_generation_tokens": 23305.0,
        "finished_abort": 0.0, "finished_error": 0.0, "finished_length": 80.0, "finished_repetition": 0.0,
        "finished_stop": 0.0,
        # every request in the first bucket (≤ 0.3 s): its bound, an upper bound (lo 0), never Prometheus's
        # interpolation from 0 (which read 150 and 297 ms here)
        **{f"est_p{q}_{phase}{end}": value for q in (50, 99) for phase in ("queue", "prefill", "decode")
           for end, value in (("_ms", 300.0), ("_lo_ms", 0.0), ("_hi_ms", 300.0))},
        "server_mean_queue_ms": pytest.approx(0.4953070600004139 / 80 * 1000),
        "server_mean_prefill_ms": pytest.approx(3.1444604100005336 / 80 * 1000),
        "server_mean_decode_ms": scalars["server_mean_decode_ms"],
        # no GPU: energy is blank, not zero
        "energy_j": None, "j_per_output_token": None, "mean_power_w_per_gpu": None, "output_tok_per_s_per_w": None,
    }
    assert scalars["server_mean_decode_ms"] > 0
    assert "energy" not in detail and detail["end_t"] >= detail["start_t"]


def test_vllm_024_gpu_page_has_the_same_names() -> None:
    snap = parse_snapshot((FIX / "gpu_0.24" / "metrics_busy.txt").read_text())
    assert set(snap.counters) == {"prefix_cache_queries", "prefix_cache_hits", "preemptions",
                                  "server_prompt_tokens", "server_generation_tokens"}
    assert set(snap.finished) == {"stop", "length", "abort", "error", "repetition"}
    assert set(snap.buckets) == {"queue", "prefill", "decode"}


def test_two_engines_are_summed() -> None:
    snap = parse_snapshot((FIX / "parsers" / "metrics_dp2.prom").read_text())
    assert (snap.counters["prefix_cache_queries"], snap.counters["prefix_cache_hits"]) == (6144.0, 1536.0)


def test_spec_decode_acceptance_and_a_restarted_server() -> None:
    start = Snapshot(counters={"spec_decode_drafts": 100, "spec_decode_draft_tokens": 300,
                               "spec_decode_accepted_tokens": 150, "preemptions": 5})
    end = Snapshot(counters={"spec_decode_drafts": 300, "spec_decode_draft_tokens": 900,
                             "spec_decode_accepted_tokens": 510, "preemptions": 2})
    assert counter_metrics(start, end) == {
        "spec_decode_drafts": 200, "spec_decode_draft_tokens": 600, "spec_decode_accepted_tokens": 360,
        "spec_decode_acceptance_pct": 60.0, "spec_decode_mean_acceptance_len": 2.8,
        "preemptions": None,  # went down: the server restarted in between, no honest delta
    }


def test_histogram_quantile_by_hand() -> None:
    # 10 requests ≤ 0.1 s, 30 more ≤ 0.5 s, none above 1 s
    buckets = {0.1: 10.0, 0.5: 40.0, 1.0: 40.0, math.inf: 40.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1 + 0.4 * (20 - 10) / 30)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.99, {1.0: 1.0, 2.0: 1.0, math.inf: 2.0}) == 2.0  # rank in +Inf: highest bound
    assert histogram_quantile(0.5, {1.0: 0.0, math.inf: 0.0}) is None


def test_estimates_say_which_bucket_they_lie_in() -> None:
    # vLLM's queue-time bounds start 0.3, 0.5, 0.8 s; 80 requests, all under 0.3 s (the CPU capture)
    low = {0.3: 80.0, 0.5: 80.0, 0.8: 80.0, math.inf: 80.0}
    assert histogram_quantile(0.5, low) == pytest.approx(0.15)  # Prometheus invents 150 ms …
    assert quantile_bucket(0.5, low) == (0.0, 0.3)
    assert estimate(0.5, low) == estimate(0.99, low) == (0.3, 0.0, 0.3)  # … servelab says ≤ 300 ms
    # 40 under 0.3 s, 40 between 0.3 and 0.5 s: P99 interpolated inside (0.3, 0.5]; the P50 rank (40) is the
    # first bucket's last request, so P50 ≤ 0.3 s and no closer
    mid = {0.3: 40.0, 0.5: 80.0, 0.8: 80.0, math.inf: 80.0}
    assert estimate(0.99, mid) == (pytest.approx(0.3 + 0.2 * (79.2 - 40) / 40), 0.3, 0.5)
    assert estimate(0.5, mid) == (0.3, 0.0, 0.3) and estimate(0.6, mid) == (pytest.approx(0.34), 0.3, 0.5)
    # 2 of 80 beyond the last finite bound: P99 is ≥ 0.8 s, a lower bound (hi None)
    tail = {0.3: 40.0, 0.5: 70.0, 0.8: 78.0, math.inf: 80.0}
    assert estimate(0.99, tail) == (0.8, 0.8, None)
    assert estimate(0.5, {0.3: 0.0, math.inf: 0.0}) is None
    # through counter_metrics: the bounds are stored beside the value, in ms
    out = counter_metrics(Snapshot(buckets={"queue": {0.3: 10.0, 0.5: 10.0, 0.8: 10.0, math.inf: 10.0}}),
                          Snapshot(buckets={"queue": {0.3: 50.0, 0.5: 90.0, 0.8: 90.0, math.inf: 90.0}},
                                   sums={"queue": (20.0, 90.0)}))
    assert (out["est_p50_queue_ms"], out["est_p50_queue_lo_ms"], out["est_p50_queue_hi_ms"]) == (300.0, 0.0, 300.0)
    assert out["est_p99_queue_lo_ms"] == 300.0 and out["est_p99_queue_hi_ms"] == 500.0
    assert out["est_p99_queue_ms"] == pytest.approx(300.0 + 200.0 * (79.2 - 40) / 40)


def test_a_bound_is_shown_as_one_and_never_judged() -> None:
    a = [{"est_p50_queue_ms": 300.0, "est_p50_queue_lo_ms": 0.0, "est_p50_queue_hi_ms": 300.0,
          "est_p99_queue_ms": 450.0, "est_p99_queue_lo_ms": 300.0, "est_p99_queue_hi_ms": 500.0}]
    b = [{"est_p50_queue_ms": 412.0, "est_p50_queue_lo_ms": 300.0, "est_p50_queue_hi_ms": 500.0,
          "est_p99_queue_ms": 800.0, "est_p99_queue_lo_ms": 800.0, "est_p99_queue_hi_ms": None}]
    rows = {r.key: r for r in cmp.gain_table(a, b)}
    assert set(rows) == {"est_p50_queue_ms", "est_p99_queue_ms"}  # the bounds are reported, not compared
    p50, p99 = rows["est_p50_queue_ms"], rows["est_p99_queue_ms"]
    assert (p50.bound_a, p50.bound_b, p50.better, p50.improvement_pct) == ("≤", "", None, None)
    assert p50.flags == ("≤ 300 ms on baseline: a bucket's bound (the rank is in the lowest bucket)",)
    assert (p99.bound_a, p99.bound_b, p99.better) == ("", "≥", None)
    assert p99.flags == ("≥ 800 ms on candidate: a bucket's bound (the rank is in +Inf)",)
    shown = {r["Metric"]: r for r in cmp.format_rows(list(rows.values()), "a", "b")}
    assert (shown["P50 Queue Time (server, estimate from buckets) (ms)"]["a"],
            shown["P50 Queue Time (server, estimate from buckets) (ms)"]["b"]) == ("≤ 300.00", "412.00")
    assert shown["P99 Queue Time (server, estimate from buckets) (ms)"]["b"] == "≥ 800.00"
    assert cmp.metric_def("est_p99_queue_hi_ms").label == (
        "P99 Queue Time (server, estimate from buckets): bucket's upper bound")


def test_energy_from_the_nvml_counter_h200_pair() -> None:
    nvml = h200_pair_with_energy_counter()
    probe = WindowProbe("http://127.0.0.1:9/metrics", gpu_indices=[0, 1], nvml=nvml, timeout_s=0.2)
    start = probe.read()
    end = probe.read()
    probe.close()
    assert (nvml.inits, nvml.shutdowns) == (1, 1)
    assert start.snapshot is None and "unreadable" in (start.note or "")  # nobody listens on port 9
    start.t, end.t = 1000.0, 1020.0  # a 20 s window
    scalars, detail = energy_metrics(start, end, output_tokens=50_000, output_throughput=2_500.0)
    # 10 000 J over 20 s on 2 GPUs: 500 W in all, 250 W each; 0.2 J per token; 2 500 tok/s ÷ 500 W = 5
    assert scalars == {"energy_j": 10_000.0, "j_per_output_token": 0.2, "mean_power_w_per_gpu": 250.0,
                       "output_tok_per_s_per_w": 5.0}
    assert detail == {"window_s": 20.0, "gpus": {
        "0": {"start_mj": 9_000_000_000.0, "end_mj": 9_006_000_000.0, "joules": 6000.0,
              "source": "nvml energy counter"},
        "1": {"start_mj": 7_500_000_000.0, "end_mj": 7_504_000_000.0, "joules": 4000.0,
              "source": "nvml energy counter"},
    }}


def test_energy_counter_not_supported_integrates_power_samples() -> None:
    probe = WindowProbe("http://127.0.0.1:9/metrics", gpu_indices=[0], nvml=energy_counter_not_supported(),
                        timeout_s=0.2)
    start, end = probe.read(), probe.read()
    probe.close()
    assert start.energy_mj == {0: None}
    start.t, end.t = 100.0, 110.0
    # 200 W from 101 to 105 s, 300 W from 105 to 109 s (trapezoid 101→105 and 105→109 gives 800 + 1000 J),
    # edges held: 1 s × 200 W before, 1 s × 300 W after; a sample outside the window is ignored
    samples = [(99.0, 0, 999.0), (101.0, 0, 200.0), (105.0, 0, 200.0), (109.0, 0, 300.0)]
    scalars, detail = energy_metrics(start, end, output_tokens=1000, output_throughput=100.0, power_samples=samples)
    joules = 800 + 1000 + 200 + 300
    assert scalars == {"energy_j": joules, "j_per_output_token": joules / 1000, "mean_power_w_per_gpu": joules / 10,
                       "output_tok_per_s_per_w": 100.0 / (joules / 10)}
    assert detail["gpus"]["0"]["source"] == "integrated power samples"
    # without samples the energy stays blank rather than 0
    blank, _ = energy_metrics(start, end, 1000, 100.0, [])
    assert blank == {"energy_j": None, "j_per_output_token": None, "mean_power_w_per_gpu": None,
                     "output_tok_per_s_per_w": None}


def test_integrate_power_needs_two_points() -> None:
    assert integrate_power([(5.0, 0, 100.0)], 0.0, 10.0) == {}
    assert integrate_power([(0.0, 1, 100.0), (10.0, 1, 100.0)], 0.0, 10.0) == {1: 1000.0}


def test_window_metrics_in_the_gain_table() -> None:
    a = [{"j_per_output_token": 0.2, "prefix_cache_hit_pct": 10.0, "finished_error": 0.0, "est_p99_queue_ms": 300.0}]
    b = [{"j_per_output_token": 0.1, "prefix_cache_hit_pct": 60.0, "finished_error": 2.0, "est_p99_queue_ms": 150.0}]
    rows = {r.key: r for r in cmp.gain_table(a, b)}
    assert [(k, r.label, r.better, r.improvement_pct) for k, r in rows.items()] == [
        ("j_per_output_token", "Energy per Output Token (J/tok)", True, 50.0),
        ("prefix_cache_hit_pct", "Prefix Cache Hit Rate (%)", True, 500.0),
        ("est_p99_queue_ms", "P99 Queue Time (server, estimate from buckets) (ms)", True, 50.0),
        ("finished_error", "Finished Requests (error)", False, None),
    ]
    md = cmp.to_markdown(list(rows.values()), "A", "B")
    assert "| Energy per Output Token (J/tok) | 0.2000 | 0.1000 | -0.1000 | +50.0% |" in md


def test_a_reading_without_gpus_is_blank() -> None:
    r = Reading(1.0, None)
    scalars, detail = window_metrics(r, Reading(2.0, None), {"total_output_tokens": 10})
    assert scalars == dict.fromkeys(("energy_j", "j_per_output_token", "mean_power_w_per_gpu",
                                     "output_tok_per_s_per_w"))
    assert detail == {"start_t": 1.0, "end_t": 2.0}


@pytest.mark.parametrize(("answers", "tries"), [
    ([(200, b"", "text/plain")], 1),  # vLLM 0.24: an empty 200
    ([(200, b'{"success": false}', "application/json"), (200, b'{"success": true}', "application/json")], 2),  # 0.32
])
def test_reset_prefix_cache_takes_both_versions_answers(answers: list[tuple[int, bytes, str]], tries: int) -> None:
    asked: list[str] = []

    def respond(path: str) -> tuple[int, bytes, str]:
        asked.append(path)
        return answers[min(len(asked), len(answers)) - 1]

    server = LocalHTTPServer(respond)
    try:
        assert reset_prefix_cache(server.base_url, timeout_s=5.0) < 5.0
    finally:
        server.shutdown()
    assert asked == ["/reset_prefix_cache"] * tries


def test_reset_prefix_cache_without_dev_mode_says_so() -> None:
    server = LocalHTTPServer(lambda path: (404, b'{"detail": "Not Found"}', "application/json"))
    try:
        with pytest.raises(RunError, match="VLLM_SERVER_DEV_MODE=1"):
            reset_prefix_cache(server.base_url, timeout_s=5.0)
    finally:
        server.shutdown()
