"""Load sweeps: list-valued loads expand in order, and the saturation rules stop a sweep where they say."""

import math

import pytest

from runner.config import RunSpec, SweepSpec
from runner.errors import SpecError
from runner.loads import LoadPoint, LoadSweeps, expand_load_lists, saturation, sweep_groups


def run(bench, **launch) -> RunSpec:
    return RunSpec.parse({"launch": {"model": "m", **launch}, "bench": bench})


def test_a_list_of_rates_becomes_one_bench_per_rate_in_order():
    spec = run({"request-rate": [2, 8, 32, "inf"], "num-prompts": 16})
    assert [(b.request_rate, b.num_prompts, b.stop_early) for b in spec.bench] == [
        (2.0, 16, True), (8.0, 16, True), (32.0, 16, True), (math.inf, 16, True)]
    assert sweep_groups(spec.bench) == [[0, 1, 2, 3]]


def test_a_list_of_concurrencies_and_a_second_bench_make_two_groups():
    spec = run([{"max-concurrency": [1, 8, 64]}, {"request-rate": 4, "num-prompts": 10}])
    assert [(b.max_concurrency, b.request_rate) for b in spec.bench] == [
        (1, math.inf), (8, math.inf), (64, math.inf), (None, 4.0)]
    assert sweep_groups(spec.bench) == [[0, 1, 2]]


def test_two_lists_or_an_empty_list_are_refused_with_a_fix():
    with pytest.raises(SpecError, match="request-rate or for max-concurrency, not both"):
        run({"request-rate": [1, 2], "max-concurrency": [1, 2]})
    with pytest.raises(SpecError, match="empty list"):
        run({"request-rate": []})


def test_stop_early_off_and_repeated_loads_form_no_sweep():
    assert sweep_groups(run({"request-rate": [1, 2], "stop-early": False}).bench) == []
    assert sweep_groups(run([{"request-rate": 1}, {"request-rate": 1}]).bench) == []


def test_a_sweep_matrix_over_launches_and_rates_keeps_the_rates_on_each_server():
    sweep = SweepSpec.parse({"launch": {"model": "m"}, "bench": {"request-rate": [2, 8], "num-prompts": 5},
                             "matrix": {"max-num-seqs": [4, 64]}})
    cells = sweep.cells()
    assert [(key, [b.request_rate for b in spec.bench]) for key, spec in cells] == [
        ("max_num_seqs=4", [2.0, 8.0]), ("max_num_seqs=64", [2.0, 8.0])]
    matrix = SweepSpec.parse({"launch": {"model": "m"}, "matrix": {"request-rate": [1, 4], "max-num-seqs": [4]}})
    [(_, spec)] = matrix.cells()
    assert sweep_groups(spec.bench) == [[0, 1]]


def point(load, tok, failed=0, ttft=10.0):
    return LoadPoint(load, tok, "output_throughput", failed, 16, ttft)


def test_saturation_rules():
    assert saturation([point("2 req/s", 100)]) is None
    assert saturation([point("2 req/s", 100), point("8 req/s", 105)]) is None  # exactly +5 % is still a rise
    assert saturation([point("2 req/s", 100), point("8 req/s", 104.9)]) == (
        "output throughput 104.9 at 8 req/s rose +4.9 % over 100.0 at 2 req/s (less than +5 %)")
    assert saturation([point("2 req/s", 100), point("8 req/s", 300, failed=3)]) == "3 of 19 requests failed at 8 req/s"
    assert saturation([point("2 req/s", 100, ttft=20), point("8 req/s", 300, ttft=150),
                       point("32 req/s", 400, ttft=201)]) == (
        "P99 TTFT 201.0 ms at 32 req/s is over 10× its 20.0 ms at 2 req/s")
    assert saturation([point("2 req/s", 100, ttft=20), point("8 req/s", 300, ttft=200)]) is None


def test_tracker_waits_for_repeats_and_skips_the_rest():
    spec = run({"request-rate": [2, 8, 32, "inf"], "repeats": 2})
    sweeps = LoadSweeps(spec.bench)

    def m(tok):
        return {"output_throughput": tok, "failed": 0.0, "completed": 16.0, "p99_ttft_ms": 5.0}

    assert sweeps.record(0, m(100)) is None and sweeps.record(0, m(110)) is None
    assert sweeps.record(1, m(100)) is None  # one repeat of two: no decision yet
    assert sweeps.record(1, m(116)) == ("output throughput 108.0 at 8 req/s rose +2.9 % over 105.0 at 2 req/s "
                                        "(less than +5 %); skipped 32 req/s, inf req/s")
    assert [sweeps.skip(i) for i in range(4)] == [False, False, True, True]


def test_the_last_load_saturating_stops_nothing():
    sweeps = LoadSweeps(run({"request-rate": [2, 8]}).bench)
    m = {"output_throughput": 1.0, "failed": 0.0, "completed": 1.0, "p99_ttft_ms": 1.0}
    assert sweeps.record(0, m) is None and sweeps.record(1, m) is None
    assert expand_load_lists("not a list") == "not a list"
