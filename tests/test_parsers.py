"""Tests for runner.parsers: seed outputs, every vLLM log wording, malformed input."""

import json
import math
from pathlib import Path

import pytest

from runner.errors import ParseError
from runner.parsers import (
    KINDS,
    BenchParse,
    EvalScore,
    KvCapacity,
    detect_kind,
    find_failure_reason,
    is_noise,
    meaningful_tail,
    parse_bench_json,
    parse_bench_progress,
    parse_bench_text,
    parse_lm_eval_json,
    parse_lm_eval_table,
    parse_prometheus,
    parse_startup_log,
    port_conflict,
)

FIXTURES = Path(__file__).parent / "fixtures"
SEED = FIXTURES / "seed"
OWN = FIXTURES / "parsers"


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# ---------------------------------------------------------------- bench text (seed)


@pytest.mark.parametrize(("name", "label"), [("tp8.txt", "TP8"), ("tp8_dcp8.txt", "TP8+DCP8")])
def test_seed_bench_blocks_parse_every_value(name, label, seed_metrics):
    parsed = parse_bench_text(read(SEED / name))
    assert parsed.metrics == seed_metrics[label]
    assert parsed.info == {} and parsed.arrays == {}
    assert parsed.raw["text"].startswith("============ Serving Benchmark Result")


def test_full_stdout_block_with_every_section():
    text = read(OWN / "bench_text_0.32_stdout.txt")
    metrics = parse_bench_text(text).metrics
    assert metrics == {
        "completed": 2, "failed": 1, "max_concurrency": 2, "request_rate": 2.0,
        "duration": 3.75, "total_input_tokens": 1024, "total_output_tokens": 256,
        "request_throughput": 0.53, "request_goodput": 0.27, "output_throughput": 68.27,
        "max_output_tokens_per_s": 96.0, "max_concurrent_requests": 2.0,
        "total_token_throughput": 341.33,
        "mean_ttft_ms": 115.0, "median_ttft_ms": 115.0, "p25_ttft_ms": 112.5,
        "p50_ttft_ms": 115.0, "p90_ttft_ms": 119.0, "p95_ttft_ms": 119.5,
        "p99_ttft_ms": 119.9, "p99.9_ttft_ms": 119.99,
        "mean_tpot_ms": 11.0, "median_tpot_ms": 11.0, "p99_tpot_ms": 11.49,
        "mean_itl_ms": 11.0, "median_itl_ms": 11.0, "p99_itl_ms": 11.98,
        "mean_e2el_ms": 1550.0, "median_e2el_ms": 1550.0, "p50_e2el_ms": 1550.0,
        "p90_e2el_ms": 1590.0, "p95_e2el_ms": 1595.0, "p99_e2el_ms": 1599.0,
        "mean_client_queue_time_ms": 0.0, "median_client_queue_time_ms": 0.0,
        "p99_client_queue_time_ms": 0.0,
        "mean_e2el_including_client_queue_ms": 1550.0,
        "median_e2el_including_client_queue_ms": 1550.0,
        "p99_e2el_including_client_queue_ms": 1599.0,
        "spec_decode_acceptance_rate": 62.5, "spec_decode_acceptance_length": 2.25,
        "spec_decode_num_drafts": 80, "spec_decode_draft_tokens": 160,
        "spec_decode_accepted_tokens": 100,
    }  # fmt: skip
    # The pre-block "Maximum request concurrency: 2" and progress bars are not in the block.
    assert "Traffic" not in parse_bench_text(text).raw["text"]


def test_text_keys_match_json_keys():
    """The printed block and the saved JSON of the same run share key names."""
    text_keys = set(parse_bench_text(read(OWN / "bench_text_0.32_stdout.txt")).metrics)
    json_keys = set(parse_bench_json(read(OWN / "bench_0.32.json")).metrics)
    shared = {"completed", "failed", "duration", "p99.9_ttft_ms", "mean_e2el_ms", "request_goodput"}
    assert shared <= text_keys & json_keys
    assert not {k for k in text_keys if k.startswith("spec_decode")} - {
        "spec_decode_acceptance_rate", "spec_decode_acceptance_length", "spec_decode_num_drafts",
        "spec_decode_draft_tokens", "spec_decode_accepted_tokens",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("line", "key", "value"),
    [
        ("Successful requests:   1,000", "completed", 1000),
        ("  Total input tokens :  12,345,678,901  ", "total_input_tokens", 12345678901),
        ("Total Token throughput (tok/s): 10462.57", "total_token_throughput", 10462.57),
        ("Total token throughput (tok/s):          9.5", "total_token_throughput", 9.5),
        ("Request rate configured (RPS):  inf", "request_rate", math.inf),
        ("Maximum request concurrency:  None", "max_concurrency", None),
        ("P95 E2EL (ms):\t123.40", "p95_e2el_ms", 123.4),
        ("P99.99 TPOT (ms): 1.5", "p99.99_tpot_ms", 1.5),
        ("RTFx (Inverse Real-Time Factor):  31.20", "rtfx", 31.2),
        ("Input throughput (inputs/s):  4.00", "input_sequence_throughput", 4.0),
        ("Median probe E2EL (ms):  12.00", "probe_median_e2el_ms", 12.0),
        ("Probe requests completed:  7", "probe_completed", 7),
    ],
)
def test_bench_text_line_variants(line, key, value):
    metrics = parse_bench_text(f"Successful requests: 3\r\n{line}\r\n").metrics
    assert metrics[key] == value


def test_bench_text_takes_the_last_block_and_ignores_unknown_lines(seed_metrics):
    first = read(SEED / "tp8.txt")
    second = read(SEED / "tp8_dcp8.txt").replace("Failed requests:", "Unknown thing: x\nFailed requests:")
    assert parse_bench_text(first + "\nnoise\n" + second).metrics == seed_metrics["TP8+DCP8"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "Successful requests"),
        ("hello world\n", "Successful requests"),
        ("============ Serving Benchmark Result ============\nDuration: 3\n", "Successful requests"),
        ("Successful requests: many\n", "'many'"),
    ],
)
def test_bench_text_rejects(text, message):
    with pytest.raises(ParseError, match=message):
        parse_bench_text(text)


# ---------------------------------------------------------------- bench JSON


def test_bench_json_0_11_without_failed_latencies_start_times():
    parsed = parse_bench_json(read(OWN / "bench_0.11.json"))
    assert isinstance(parsed, BenchParse)
    assert parsed.metrics["request_rate"] == math.inf
    assert parsed.metrics["request_goodput"] is None
    assert parsed.metrics["max_concurrency"] is None
    assert parsed.metrics["completed"] == 4.0
    assert {"p50_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "std_itl_ms"} <= set(parsed.metrics)
    assert "failed" not in parsed.metrics
    assert set(parsed.arrays) == {"input_lens", "output_lens", "ttfts", "itls", "generated_texts", "errors"}
    assert parsed.info == {
        "date": "20251106-160212", "endpoint_type": "openai", "backend": "openai", "label": None,
        "model_id": "moonshotai/Kimi-K2-Thinking", "tokenizer_id": "moonshotai/Kimi-K2-Thinking",
    }  # fmt: skip


def test_bench_json_0_32_full():
    text = read(OWN / "bench_0.32.json")
    parsed = parse_bench_json(text)
    assert parsed.raw == json.loads(text)
    assert parsed.metrics["failed"] == 1.0
    assert parsed.metrics["request_goodput"] == 0.2667
    assert parsed.metrics["p99.9_e2el_ms"] == 1599.9
    assert parsed.metrics["p25_itl_ms"] == 10.5
    assert parsed.metrics["mean_client_queue_time_ms"] == 0.0
    assert parsed.metrics["max_concurrency"] == 2.0
    assert parsed.info["gpu"] == "none"  # --metadata gpu=none
    assert parsed.info["label"] == "tp1-cpu"
    assert parsed.arrays["latencies"] == [1.5, 1.6, 0.0]
    assert parsed.arrays["start_times"] == [100.0, 100.5, 101.0]
    assert parsed.arrays["errors"][2] == "Bad Request"
    assert all(isinstance(v, float) for v in parsed.metrics.values())


def test_bench_json_accepts_dict_and_bytes():
    data = {"completed": 5, "duration": 1.0, "request_rate": "inf", "flag": True}
    from_dict = parse_bench_json(data)
    assert from_dict.metrics == {"completed": 5.0, "duration": 1.0, "request_rate": math.inf}
    assert from_dict.info == {"flag": True}
    assert parse_bench_json(json.dumps(data).encode()).metrics == from_dict.metrics


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty text"),
        ("   \n", "empty text"),
        ("garbage", "not valid JSON"),
        ('{"completed": 5, "duration": 1.0', "truncated"),
        ("[1, 2, 3]", "found list"),
        ('{"results": {"gsm8k": {}}}', r"found keys \['results'\]"),
        ('{"duration": 1.0}', "completed"),
    ],
)
def test_bench_json_rejects(text, message):
    with pytest.raises(ParseError, match=message):
        parse_bench_json(text)


def test_bench_json_truncated_file_fixture():
    text = read(OWN / "bench_0.32.json")
    with pytest.raises(ParseError, match="truncated"):
        parse_bench_json(text[: len(text) // 2])


# ---------------------------------------------------------------- startup logs


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            SEED / "startup_tp8_dcp8.log",  # three log lines run together on one line
            KvCapacity(backend="GPU", kv_cache_tokens=5_721_088, kv_cache_gib=46.80, dcp_multiplier=8),
        ),
        (
            OWN / "startup_v0.11_dcp.log",
            KvCapacity(
                backend="GPU", kv_cache_tokens=5_721_088, kv_cache_gib=46.80, max_concurrency=21.82,
                max_concurrency_tokens_per_request=262_144, dcp_multiplier=8,
                engine_init_s=107.64, vllm_version="0.11.0",
            ),
        ),
        (
            OWN / "startup_v0.12_pcp_dcp.log",
            KvCapacity(
                backend="GPU", kv_cache_tokens=4_638_720, kv_cache_gib=44.77, max_concurrency=17.70,
                max_concurrency_tokens_per_request=262_144, dcp_multiplier=2, pcp_multiplier=2,
                engine_init_s=212.68, vllm_version="0.12.0",
            ),
        ),
        (
            OWN / "startup_v0.20_dp2.log",  # two engines: the last lines win
            KvCapacity(
                backend="GPU", kv_cache_tokens=4_636_672, kv_cache_gib=44.70, max_concurrency=17.69,
                max_concurrency_tokens_per_request=262_144, dcp_multiplier=4, pcp_multiplier=1,
                engine_init_s=321.02, vllm_version="0.20.1",
            ),
        ),
        (
            OWN / "startup_v0.26_gpu.log",
            KvCapacity(
                backend="GPU", kv_cache_tokens=62_400, kv_cache_gib=8.57, max_concurrency=7.62,
                max_concurrency_tokens_per_request=8_192, engine_init_s=91.20, vllm_version="0.26.1",
            ),
        ),
        (
            OWN / "startup_v0.30_merged_gpu.log",
            KvCapacity(
                backend="GPU", kv_cache_tokens=34_952, kv_cache_gib=4.80, max_concurrency=4.27,
                max_concurrency_tokens_per_request=8_192, engine_init_s=50.05, vllm_version="0.30.0",
            ),
        ),
        (
            OWN / "startup_v0.32_cpu.log",
            KvCapacity(
                backend="CPU", kv_cache_tokens=1_048_576, kv_cache_gib=16.0, max_concurrency=512.0,
                max_concurrency_tokens_per_request=2_048, engine_init_s=6.91, vllm_version="0.32.0",
            ),
        ),
    ],
    ids=lambda value: value.name if isinstance(value, Path) else "",
)  # fmt: skip
def test_startup_log_versions(name, expected):
    assert parse_startup_log(read(name)) == expected


@pytest.mark.parametrize(
    ("field", "value", "line"),
    [
        ("kv_cache_tokens", 946_384,
         "INFO 08-05 09:09:04 [kv_cache_utils.py:634] GPU KV cache size: 946,384 tokens"),
        ("backend", "CPU",
         "CPU KV cache size: 1,048,576 tokens, Maximum concurrency for 2,048 tokens per request: 512.00x"),
        ("kv_cache_tokens", 2000,
         "GPU + host KV cache size: 2,000 tokens, Maximum concurrency for 1,000 tokens per request: 2.00x"),
        ("max_concurrency_tokens_per_request", 32768,  # before 0.8: no thousands separators, no "["
         "INFO 02-18 08:50:24 executor_base.py:113] Maximum concurrency for 32768 tokens per request: 136.97x"),
        ("max_concurrency", 1024.5, "Maximum concurrency for 2,048 tokens per request: 1,024.50x"),
        ("dcp_multiplier", 4, "Multiplying the GPU KV cache size by the dcp_world_size 4."),
        ("pcp_multiplier", 2,
         "Multiplying the GPU KV cache size by the cp_world_size 8 (pcp_world_size 2 * dcp_world_size 4)."),
        ("engine_init_s", 3.87,
         "INFO 11-06 [core.py:1] init engine (profile, create kv cache, warmup model) took 3.87 seconds"),
        ("engine_init_s", 1234.5,
         "init engine (profile, create kv cache, warmup model) took 1,234.50 s (compilation: 13.01 s)"),
        ("vllm_version", "0.7.4.dev360+gc91b64f7",
         "INFO 03-11 06:17:30 [api_server.py:912] vLLM API server version 0.7.4.dev360+gc91b64f7"),
        ("vllm_version", "0.14.0",
         "(APIServer pid=1) INFO 01-21 14:16:50 [api_server.py:1272] vLLM API server version 0.14.0"),
        ("vllm_version", "0.32.0", "vLLM server version 0.32.0, serving model servelab/tiny-llama"),
        ("vllm_version", "0.19.2rc1.dev8+g4b7f5ea1a",
         "INFO [core.py:4] Initializing a V1 LLM engine (v0.19.2rc1.dev8+g4b7f5ea1a) with config: x"),
        ("vllm_version", "0.32.0",  # the logo banner, colours on
         "\x1b[1;37m█     █     █ ▀▄▀ █\x1b[0m  version \x1b[1;37m0.32.0\x1b[0m"),
        ("kv_cache_gib", 8.0, "Explicitly set (8.00/125.70) GiB for KV cache on node 0."),
    ],
)  # fmt: skip
def test_startup_log_line_variants(field, value, line):
    assert getattr(parse_startup_log(line), field) == value


def test_startup_log_newest_multiplier_wording_wins():
    text = "by the dcp_world_size 2.\nby the cp_world_size 4 (pcp_world_size 1 * dcp_world_size 4)."
    assert parse_startup_log(text).dcp_multiplier == 4


@pytest.mark.parametrize("text", ["", "garbage\x00\xff", "INFO nothing to see here", "{}"])
def test_startup_log_without_capacity_lines_is_all_none(text):
    assert parse_startup_log(text) == KvCapacity()


# ---------------------------------------------------------------- failure reasons

DCP_LSE = (
    "AssertionError: Decode Context Parallelism (DCP) requires attention implementations to "
    "return the softmax LSE during decode, but CPUAttentionBackendImpl does not. Try a different "
    "backend by setting --attention-backend or disable DCP."
)
DCP_GQA = (
    "ValueError: Decode context parallelism for GQA/MQA requires `--tensor-parallel-size` (2) to "
    "be greater than the model's total number of KV heads (8). Increase `--tensor-parallel-size` "
    "or set `--decode-context-parallel-size 1`."
)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("fail_dcp_lse_cpu.log", DCP_LSE),
        ("fail_dcp_gqa.log", DCP_GQA),
        ("fail_error_lines.log", "Insufficient space in /dev/shm: 160 MiB required, 64 MiB free."),
        ("startup_v0.32_cpu.log", None),
    ],
)
def test_failure_reason_fixtures(name, expected):
    assert find_failure_reason(read(OWN / name)) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", None),
        (
            "(EngineCore_DP0 pid=666657) ERROR 11-06 15:34:59 [core.py:708] ValueError: Decode Context "
            "Parallelism (DCP) requires attention implementations to return the softmax LSE during "
            "decode, but CPUAttentionBackendImpl does not\n"
            "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
            "ValueError: Decode Context Parallelism (DCP) requires attention implementations to return "
            "the softmax LSE during decode, but CPUAttentionBackendImpl does not",
        ),
        (
            "(EngineCore pid=1309) torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n"
            "(APIServer pid=757) vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an "
            "issue. See stack trace (above) for the root cause.",
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
        ),
        (
            "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n    assert x\nAssertionError\n",
            "AssertionError",
        ),
        (
            "usage: vllm serve [model_tag] [options]\n"
            "vllm serve: error: argument --tensor-parallel-size/-tp: invalid int value: 'two'",
            "vllm serve: error: argument --tensor-parallel-size/-tp: invalid int value: 'two'",
        ),
        (
            "2026-04-19 12:19:08.142 | (EngineCore pid=207) ERROR 04-19 10:19:08 [core.py:1] boom\n",
            "boom",
        ),
        (
            "\x1b[31mERROR 05-02 23:41:00 [gpu.py:69] Out of memory\x1b[0m\nINFO 05-02 23:41:01 [x.py:1] bye",
            "Out of memory",
        ),
        (
            "pydantic_core._pydantic_core.ValidationError: 1 validation error for VllmConfig\n"
            "  Value error, torch.bfloat16 is not supported for quantization method gguf.\n"
            "  Supported dtypes: [torch.float16, torch.float32] [type=value_error, input_value=x]\n",
            "ValueError: torch.bfloat16 is not supported for quantization method gguf. Supported "
            "dtypes: [torch.float16, torch.float32]",
        ),
        (
            "pydantic_core._pydantic_core.ValidationError: 1 validation error for VllmConfig\n"
            "  Assertion failed, Flash Comm v1 is only supported [type=assertion_error]\n",
            "AssertionError: Flash Comm v1 is only supported",
        ),
        ("INFO 03-01 10:10:00 [x.py:1] all good\nWARNING 03-01 10:10:00 [x.py:2] careful", None),
    ],
)  # fmt: skip
def test_failure_reason_variants(text, expected):
    assert find_failure_reason(text) == expected


# ---------------------------------------------------------------- lm-eval

SEED_SCORES = {
    "gsm8k_tp8.txt": [("flexible-extract", 0.9416, 0.0065), ("strict-match", 0.9409, 0.0065)],
    "gsm8k_tp8_dcp8.txt": [("flexible-extract", 0.9386, 0.0066), ("strict-match", 0.9371, 0.0067)],
}


@pytest.mark.parametrize("name", sorted(SEED_SCORES))
def test_seed_lm_eval_tables(name):
    expected = [
        EvalScore("gsm8k", filter_, "exact_match", value, stderr, n_shot=5, version="3")
        for filter_, value, stderr in SEED_SCORES[name]
    ]
    assert parse_lm_eval_table(read(SEED / name)) == expected


def test_lm_eval_table_with_groups_subtasks_and_na_stderr():
    scores = parse_lm_eval_table(read(OWN / "lm_eval_mmlu_groups.txt"))
    assert scores == [
        EvalScore("mmlu", "none", "acc", 0.6211, 0.0038, n_shot=None, version="2"),
        EvalScore("humanities", "none", "acc", 0.5488, 0.0066, n_shot=None, version="2"),
        EvalScore("formal_logic", "none", "acc", 0.4286, 0.0443, n_shot=0, version="1"),
        EvalScore("tinyGSM8k", "strict-match", "exact_match", 0.9010, None, n_shot=5, version="0"),
        EvalScore("tinyGSM8k", "flexible-extract", "exact_match", 0.9120, None, n_shot=5, version="0"),
    ]


@pytest.mark.parametrize(
    "text",
    ["", "garbage", "|a|b|\n|-|-|\n|1|2|", "|Tasks|Version|Filter|n-shot|Metric| |Value| |Stderr|\n|--|--|"],
)
def test_lm_eval_table_rejects(text):
    with pytest.raises(ParseError, match="Tasks"):
        parse_lm_eval_table(text)


def test_lm_eval_json_fixture():
    scores = parse_lm_eval_json(read(OWN / "lm_eval_gsm8k.json"))
    assert scores == [
        EvalScore("gsm8k", "strict-match", "exact_match", 0.9409, 0.0065, 5, "3", 1319),
        EvalScore("gsm8k", "flexible-extract", "exact_match", 0.9416, 0.0065, 5, "3", 1319),
    ]


def test_lm_eval_json_variants():
    data = {
        "results": {
            "tinyGSM8k": {
                "alias": "tinyGSM8k",
                "sample_len": 100,
                "exact_match,strict-match": 0.901,
                "exact_match_stderr,strict-match": "N/A",
            },
            "mmlu": {"alias": "mmlu", "acc,none": 0.61, "acc_stderr,none": 0.004},
        },
        "groups": {"mmlu": {"acc,none": 0.5}, "arc": {"acc_norm,none": 0.7}},
        "configs": {"tinyGSM8k": {"num_fewshot": 5}},
        "versions": {"tinyGSM8k": 0, "mmlu": "2.0.1"},
        "n-shot": {"mmlu": 0},
        "n-samples": {"mmlu": {"original": 14042, "effective": 14042}},
    }
    assert parse_lm_eval_json(data) == [
        EvalScore("tinyGSM8k", "strict-match", "exact_match", 0.901, None, 5, "0", None),
        EvalScore("mmlu", "none", "acc", 0.61, 0.004, 0, "2.0.1", 14042),
        EvalScore("arc", "none", "acc_norm", 0.7, None, None, None, None),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty text"),
        ("nope", "not valid JSON"),
        ('{"results": {"gsm8k": {"acc,none": 0.5', "truncated"),
        ('{"completed": 1, "duration": 2}', "results"),
        ('{"results": [1, 2]}', "results"),
        ("42", "found int"),
    ],
)
def test_lm_eval_json_rejects(text, message):
    with pytest.raises(ParseError, match=message):
        parse_lm_eval_json(text)


# ---------------------------------------------------------------- Prometheus


def test_prometheus_sums_engines_and_drops_buckets():
    values = parse_prometheus(read(OWN / "metrics_dp2.prom"))
    assert values["vllm:num_requests_running"] == 8.0
    assert values["vllm:num_requests_waiting"] == 1.0
    assert values["vllm:kv_cache_usage_perc"] == 0.75
    assert values["vllm:prompt_tokens_total"] == 12288.0
    assert values["vllm:generation_tokens_total"] == 3072.0
    assert values["vllm:prefix_cache_queries_total"] == 6144.0
    assert values["vllm:prefix_cache_hits_total"] == 1536.0
    assert values["vllm:time_to_first_token_seconds_count"] == 6.0
    assert values["vllm:time_to_first_token_seconds_sum"] == pytest.approx(7.65)
    assert not [name for name in values if name.endswith(("_bucket", "_created"))]


def test_prometheus_minimal_and_special_values():
    text = 'a 1\nb{x="1"} 2\nb{x="2"} 3.5\nc +Inf\n# comment only\n'
    assert parse_prometheus(text) == {"a": 1.0, "b": 5.5, "c": math.inf}


@pytest.mark.parametrize(
    "text",
    ["", "# HELP only a comment\n", "hello world", "<html><body>502</body></html>", '{"a": 1}', 'x{a="1" 2'],
)
def test_prometheus_rejects(text):
    with pytest.raises(ParseError, match="Prometheus"):
        parse_prometheus(text)


# ---------------------------------------------------------------- progress


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" 45%|████▌     | 90/200 [00:10<00:12,  8.9it/s]", (90, 200)),
        ("\r  0%|          | 0/200 [00:00<?, ?it/s]\r 45%|████▌     | 90/200 [00:10<00:12,  8.9it/s]\r", (90, 200)),
        ("100%|██████████| 1000/1000 [13:20<00:00,  1.25it/s]\n", (1000, 1000)),
        ("Starting main benchmark run...\nTraffic request rate: inf\n", None),
        ("", None),
        ("90it [00:10, 8.9it/s]", None),
    ],
)
def test_bench_progress(text, expected):
    assert parse_bench_progress(text) == expected


def test_bench_progress_from_stdout_fixture():
    assert parse_bench_progress(read(OWN / "bench_text_0.32_stdout.txt")) == (3, 3)


# ---------------------------------------------------------------- detect_kind


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        (OWN / "bench_0.11.json", "bench_json"),
        (OWN / "bench_0.32.json", "bench_json"),
        (SEED / "tp8.txt", "bench_text"),
        (SEED / "tp8_dcp8.txt", "bench_text"),
        (OWN / "bench_text_0.32_stdout.txt", "bench_text"),
        (OWN / "lm_eval_gsm8k.json", "lm_eval_json"),
        (SEED / "gsm8k_tp8.txt", "lm_eval_table"),
        (OWN / "lm_eval_mmlu_groups.txt", "lm_eval_table"),
        (SEED / "startup_tp8_dcp8.log", "server_log"),
        (OWN / "startup_v0.32_cpu.log", "server_log"),
        (OWN / "fail_dcp_gqa.log", "server_log"),
        ("[rank0]: Traceback (most recent call last):\n[rank0]: ValueError: x", "server_log"),
    ],
    ids=lambda value: value.name if isinstance(value, Path) else value,
)
def test_detect_kind(path, kind):
    assert kind in KINDS
    assert detect_kind(read(path) if isinstance(path, Path) else path) == kind


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("  \n\t", "empty"),
        ("just some words", "expected a `vllm bench serve"),
        ('{"a": 1}', r"JSON with keys \['a'\]"),
        ("[1, 2]", "JSON with list"),
        ('{"completed": 1, "duration"', "not valid JSON"),
        ('{"results": {"gsm8k": {"alias": "gsm8k"}}}', "JSON with keys"),
    ],
)
def test_detect_kind_rejects(text, message):
    with pytest.raises(ParseError, match=message):
        detect_kind(text)


# ---------------------------------------------------------------- real vLLM 0.32 CPU output
# Captured from real runs and committed (a missing file fails); assertions hold across re-captures.

CPU = FIXTURES / "cpu_0.32"


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("bench.json", "bench_json"),
        ("bench_detailed.json", "bench_json"),
        ("bench_stdout.txt", "bench_text"),
        ("server_tp1.log", "server_log"),
        ("dcp_gqa_fail.log", "server_log"),
        ("dcp_lse_fail.log", "server_log"),
    ],
)
def test_cpu_capture_kinds(name, kind):
    assert detect_kind(read(CPU / name)) == kind


def test_cpu_capture_printed_block_agrees_with_saved_json():
    saved = parse_bench_json(read(CPU / "bench.json")).metrics
    printed = parse_bench_text(read(CPU / "bench_stdout.txt")).metrics
    assert {"completed", "failed", "p99_e2el_ms", "max_output_tokens_per_s"} <= set(printed)
    assert set(printed) <= set(saved)
    for key, value in printed.items():
        assert value == pytest.approx(round(saved[key], 2), abs=0.006), key
    assert parse_bench_progress(read(CPU / "bench_stdout.txt")) == (saved["completed"], saved["num_prompts"])


def test_cpu_capture_startup_log():
    kv = parse_startup_log(read(CPU / "server_tp1.log"))
    assert kv.backend == "CPU" and kv.vllm_version.startswith("0.32")
    assert kv.kv_cache_tokens > 0 and kv.kv_cache_gib > 0 and kv.engine_init_s > 0
    assert kv.max_concurrency == pytest.approx(kv.kv_cache_tokens / kv.max_concurrency_tokens_per_request, rel=0.01)
    assert find_failure_reason(read(CPU / "server_tp1.log")) is None


@pytest.mark.parametrize(
    ("name", "start"),
    [
        ("dcp_lse_fail.log", "AssertionError: Decode Context Parallelism (DCP) requires attention implementations"),
        ("dcp_gqa_fail.log", "ValueError: Decode context parallelism for GQA/MQA requires `--tensor-parallel-size`"),
    ],
)
def test_cpu_capture_failure_reasons(name, start):
    assert find_failure_reason(read(CPU / name)).startswith(start)


@pytest.mark.parametrize("name", ["metrics_idle.txt", "metrics_busy.txt"])
def test_cpu_capture_prometheus(name):
    values = parse_prometheus(read(CPU / name))
    for key in (
        "vllm:kv_cache_usage_perc",
        "vllm:num_requests_running",
        "vllm:prompt_tokens_total",
        "vllm:prefix_cache_queries_total",
        "vllm:time_to_first_token_seconds_count",
    ):
        assert key in values
    assert not [key for key in values if key.endswith("_bucket")]


# ---------------------------------------------------------------- noise is never a reason (issue 13)


def test_noise_lines_of_real_cpu_logs():
    log = read(CPU / "server_tp1.log").splitlines()
    logo = [line.split("] ", 1)[1] if "] " in line else "" for line in log[1:7]]  # the ASCII logo block
    assert [is_noise(line) for line in logo] == [True] * 6
    nanobind = [line for line in log if "nanobind" in line or "leaked " in line]
    assert len(nanobind) >= 20 and all(is_noise(line) for line in nanobind)
    bars = read(CPU / "bench_stdout.txt").replace("\r", "\n").splitlines()
    assert [line for line in bars if "%|" in line and not is_noise(line)] == []
    for meaningful in ("ValueError: Decode context parallelism for GQA/MQA requires", "Successful requests: 160",
                       "INFO:     Application startup complete.", "Starting main benchmark run..."):
        assert not is_noise(meaningful)


def test_meaningful_tail_of_a_stopped_server_ends_with_its_shutdown_not_nanobind():
    assert meaningful_tail(read(CPU / "server_tp1.log"), 3) == (
        "INFO:     Shutting down\nINFO:     Waiting for application shutdown.\nINFO:     Application shutdown complete."
    )


def test_meaningful_tail_of_a_benchmark_ends_with_its_result_block():
    assert meaningful_tail(read(CPU / "bench_stdout.txt"), 2) == (
        "P99 E2EL (ms):                           489.45\n" + "=" * 50
    )


def test_an_error_followed_by_nanobind_and_progress_bars_is_still_the_reason():
    """The shape of issue 13's report: the cause, then the leak report and bars that end every CPU log."""
    log = read(CPU / "server_tp1.log")
    tail = log[log.index("nanobind: leaked"):]
    bars = "\r 10%|#         | 16/160 [00:01<00:09, 15.2it/s]\r100%|##########| 160/160 [00:10<00:00, 15.9it/s]\n"
    text = "(APIServer pid=1) ERROR 11-29 05:00:37 [core.py:1] EngineCore died unexpectedly\n" + bars + tail
    assert find_failure_reason(text) == "EngineCore died unexpectedly"
    assert find_failure_reason(tail + bars) is None  # noise alone: no reason at all rather than a leak line
    assert meaningful_tail(tail + bars, 8) == ""


def test_port_lost_before_vllm_binds_is_the_reason():
    """Captured: a listener took the port between its choice and vLLM's bind (tests/e2e does it to a run)."""
    log = read(CPU / "port_conflict.log")
    assert find_failure_reason(log) == port_conflict(log) == "OSError: [Errno 98] Address already in use"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("(APIServer pid=7) WARNING 12-02 10:00:00 [launcher.py:299] port 8000 is used by process "
         "psutil.Process(pid=4242, name='python3', status='sleeping', started='10:00:00') launched with command:\n"
         "/usr/bin/python3 -m http.server 8000\n"
         "(APIServer pid=7) ERROR 12-02 10:00:01 [core.py:1] OSError: [Errno 98] Address already in use\n"
         "RuntimeError: Engine core initialization failed. See root cause above.\n",
         "port 8000 is used by process psutil.Process(pid=4242, name='python3', status='sleeping', "
         "started='10:00:00') launched with command"),
        ("(APIServer pid=7) WARNING 12-02 10:00:00 [parallel.py:746] Address already in use. Retrying with a new "
         "port.\nValueError: real cause\n", "ValueError: real cause"),  # vLLM's own DP-port retry is no conflict
    ],
)  # fmt: skip
def test_port_conflict_wording(text, expected):
    assert find_failure_reason(text) == expected
