"""Parsers against real output of vLLM 0.24.0 on an NVIDIA H200 (brought back by scripts/gpu_validate.sh)."""

from pathlib import Path

import pytest

from runner.parsers import detect_kind, parse_bench_json, parse_bench_text, parse_prometheus, parse_startup_log

GPU = Path(__file__).parent / "fixtures" / "gpu_0.24"


@pytest.mark.parametrize(
    "log, tokens, gib, concurrency, init_s",
    [
        ("server_tiny_llama.log", 134_554_560, 128.32, 65700.47, 87.24),
        ("server_mla.log", 29_674_800, 127.35, 14489.65, 18.15),
    ],
)
def test_startup_log_of_vllm_0_24_on_h200(log, tokens, gib, concurrency, init_s):
    kv = parse_startup_log((GPU / log).read_text())
    assert kv.backend == "GPU"
    assert (kv.kv_cache_tokens, kv.kv_cache_gib, kv.max_concurrency) == (tokens, gib, concurrency)
    assert kv.max_concurrency_tokens_per_request == 2048
    assert kv.engine_init_s == init_s
    assert kv.vllm_version == "0.24.0"
    assert kv.dcp_multiplier is None  # no DCP: 0.24 prints no multiplier line
    assert detect_kind((GPU / log).read_text()) == "server_log"


def test_bench_json_and_printed_block_of_vllm_0_24_agree():
    js = parse_bench_json((GPU / "bench_mla.json").read_text())
    text = parse_bench_text((GPU / "bench_mla_stdout.txt").read_text())
    assert js.metrics["completed"] == text.metrics["completed"] == 200
    assert js.metrics["failed"] == 0
    assert text.metrics["output_throughput"] == 1719.88
    for key in ("output_throughput", "request_throughput", "median_ttft_ms", "p99_tpot_ms", "mean_itl_ms"):
        assert round(js.metrics[key], 2) == text.metrics[key], key


def test_bench_json_of_tiny_llama_on_h200():
    m = parse_bench_json((GPU / "bench_tiny_llama.json").read_text()).metrics
    assert m["completed"] == 200 and m["total_output_tokens"] == 200 * 128
    assert round(m["output_throughput"], 1) == 16426.8


def test_metrics_text_of_a_busy_h200_server():
    values = parse_prometheus((GPU / "metrics_busy.txt").read_text())
    assert values["vllm:num_requests_running"] == 16
    assert 0 < values["vllm:kv_cache_usage_perc"] < 0.01
    assert values["vllm:prompt_tokens_total"] > 0
