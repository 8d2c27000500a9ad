import json
import math

import pytest

from runner.config import BenchSpec, EvalSpec, LaunchSpec, RunSpec, SweepSpec, load_run_spec
from runner.errors import SpecError

SEED_TP8 = (
    "vllm serve moonshotai/Kimi-K2-Thinking --tensor-parallel-size 8 --enable-auto-tool-choice "
    "--tool-call-parser kimi_k2 --reasoning-parser kimi_k2 --trust-remote-code"
)
SEED_DCP8 = SEED_TP8 + " --decode-context-parallel-size 8"


def test_dashes_and_underscores_are_the_same_field():
    a = LaunchSpec.parse({"model": "m", "tensor-parallel-size": 4, "decode-context-parallel-size": 2})
    b = LaunchSpec.parse({"model": "m", "tensor_parallel_size": 4, "decode_context_parallel_size": 2})
    assert a == b
    assert (a.tensor_parallel_size, a.decode_context_parallel_size) == (4, 2)


def test_unknown_key_is_refused_with_its_name():
    with pytest.raises(SpecError, match="Unknown key `tensor_paralel_size`"):
        LaunchSpec.parse({"model": "m", "tensor-paralel-size": 4})


@pytest.mark.parametrize(
    "command, expected",
    [
        (SEED_TP8, dict(tensor_parallel_size=8, decode_context_parallel_size=1, trust_remote_code=True,
                        tool_call_parser="kimi_k2", reasoning_parser="kimi_k2",
                        extra_args=["--enable-auto-tool-choice"])),
        (SEED_DCP8, dict(tensor_parallel_size=8, decode_context_parallel_size=8,
                         extra_args=["--enable-auto-tool-choice"])),
        ("vllm serve org/m -tp 4 -dcp 2 -pp 2 -dp 1", dict(tensor_parallel_size=4, decode_context_parallel_size=2,
                                                         pipeline_parallel_size=2, data_parallel_size=1)),
        ("vllm serve org/m --tensor-parallel-size=2 --max-model-len=4096 --gpu-memory-utilization 0.9",
         dict(tensor_parallel_size=2, max_model_len=4096, gpu_memory_utilization=0.9)),
        ("VLLM_USE_V1=1 HF_HOME=/x vllm serve org/m --foo bar --flag --baz=1 'a;b'",
         dict(env={"VLLM_USE_V1": "1", "HF_HOME": "/x"}, extra_args=["--foo", "bar", "--flag", "--baz=1", "a;b"])),
        ("vllm serve \\\n  org/m \\\n  -tp 8", dict(model="org/m", tensor_parallel_size=8)),
    ],
)
def test_from_command(command, expected):
    spec = LaunchSpec.from_command(command)
    for key, value in expected.items():
        assert getattr(spec, key) == value, key


@pytest.mark.parametrize(
    "command, message",
    [
        ("python foo.py", "must start with `vllm serve`"),
        ("vllm serve", "No model"),
        ("vllm serve m -tp", "needs a value"),
        ("vllm serve m -tp eight", "tensor_parallel_size"),
        ("vllm serve m 'unclosed", "quotes"),
    ],
)
def test_from_command_errors(command, message):
    with pytest.raises(SpecError, match=message):
        LaunchSpec.from_command(command)


@pytest.mark.parametrize(
    "fields, gpus, message",
    [
        (dict(tensor_parallel_size=8, decode_context_parallel_size=3), None,
         "DCP size 3 does not divide TP size 8; pick one of 1, 2, 4, 8."),
        (dict(tensor_parallel_size=8, pipeline_parallel_size=2), 8, "= 16 GPUs, but 8 are visible"),
        (dict(extra_args=["--tensor-parallel-size", "2"]), None, "repeats the spec field `tensor_parallel_size`"),
        (dict(extra_args=["-tp=2"]), None, "repeats the spec field"),
        (dict(model="/nonexistent/model"), None, "Model path /nonexistent/model does not exist"),
    ],
)
def test_launch_problems(fields, gpus, message):
    spec = LaunchSpec.parse({"model": "org/m", **fields})
    with pytest.raises(SpecError) as err:
        spec.check(gpu_count=gpus)
    assert message in str(err.value)


def _model_dir(tmp_path, **cfg):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path)


def test_dcp_needs_tp_above_kv_heads_for_gqa(tmp_path):
    model = _model_dir(tmp_path, num_key_value_heads=8)
    with pytest.raises(SpecError, match="DCP 8 needs TP greater than the model's 8 KV heads"):
        LaunchSpec.parse({"model": model, "tensor_parallel_size": 8, "decode_context_parallel_size": 8}).check()
    LaunchSpec.parse({"model": model, "tensor_parallel_size": 16, "decode_context_parallel_size": 8}).check()


def test_dcp_gqa_rule_skips_mla(tmp_path):
    model = _model_dir(tmp_path, num_key_value_heads=64, kv_lora_rank=512)
    LaunchSpec.parse({"model": model, "tensor_parallel_size": 8, "decode_context_parallel_size": 8}).check()


def test_max_model_len_beyond_the_models_context_is_refused_before_launch(tmp_path):
    # found on 2 H200s: vLLM 0.24 refused `--max-model-len 8192` for a model declaring 4096, after a
    # 40 s start; now the launch form says so before anything starts
    model = _model_dir(tmp_path, kv_lora_rank=512, max_position_embeddings=4096,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    with pytest.raises(SpecError, match="max-model-len 8192 exceeds the model's max_position_embeddings 4096"):
        LaunchSpec.parse({"model": model, "max_model_len": 8192}).check()
    LaunchSpec.parse({"model": model, "max_model_len": 4096}).check()
    LaunchSpec.parse({"model": model}).check()  # vLLM derives it
    LaunchSpec.parse({"model": model, "max_model_len": 8192, "env": {"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}}).check()
    yarn = _model_dir(tmp_path, max_position_embeddings=4096, rope_scaling={"type": "yarn", "factor": 4.0})
    LaunchSpec.parse({"model": yarn, "max_model_len": 16384}).check()  # scaled: vLLM's own derivation decides


@pytest.mark.parametrize("port", [80, 0, 70000, "abc"])
def test_port_range(port):
    with pytest.raises(SpecError, match="port"):
        LaunchSpec.parse({"model": "m", "port": port})


@pytest.mark.parametrize("env", [{"BAD NAME": "1"}, {"1X": "a"}, {"A": "x\x00y"}])
def test_env_names_checked(env):
    with pytest.raises(SpecError, match="env"):
        LaunchSpec.parse({"model": "m", "env": env})


def test_short_label():
    assert LaunchSpec(model="m", tensor_parallel_size=8).short_label() == "TP8"
    assert LaunchSpec(model="m", tensor_parallel_size=8, decode_context_parallel_size=8).short_label() == "TP8+DCP8"


def test_bench_spec_rate_inf_and_percentiles():
    assert math.isinf(BenchSpec.parse({"request-rate": "inf"}).request_rate)
    assert BenchSpec.parse({"request-rate": 100}).request_rate == 100
    with pytest.raises(SpecError, match="percentile"):
        BenchSpec.parse({"metric-percentiles": "50,abc"})
    with pytest.raises(SpecError, match="request_rate"):
        BenchSpec.parse({"request-rate": -1})
    assert "needs dataset-path" in BenchSpec.parse({"dataset-name": "sharegpt"}).problems()[0]


def test_run_spec_from_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "label: seed dcp\nlaunch:\n  model: org/m\n  tensor-parallel-size: 8\n  decode-context-parallel-size: 8\n"
        "bench:\n  random-input-len: 8000\n  random-output-len: 4000\n  request-rate: 100\n  num-prompts: 1000\n"
        "eval:\n  num-fewshot: 5\n"
    )
    spec = load_run_spec(path)
    assert spec.display_label == "seed dcp"
    assert spec.bench[0].random_input_len == 8000 and spec.bench[0].num_prompts == 1000
    assert spec.eval == EvalSpec(num_fewshot=5)


def test_run_spec_unknown_nested_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("launch:\n  model: m\nbench:\n  num-prompt: 3\n")
    with pytest.raises(SpecError, match="bench.0.num_prompt"):
        load_run_spec(path)


def test_run_spec_needs_bench_or_eval():
    with pytest.raises(SpecError, match="neither a benchmark nor an evaluation"):
        RunSpec.parse({"launch": {"model": "m"}, "bench": []}).check()


def test_sweep_cells_launch_fields_make_runs_bench_fields_share_a_server():
    sweep = SweepSpec.parse({
        "launch": {"model": "m", "tensor-parallel-size": 8},
        "matrix": {"decode-context-parallel-size": [1, 8], "request-rate": [10, "inf"]},
    })
    cells = sweep.cells()
    assert [k for k, _ in cells] == ["decode_context_parallel_size=1", "decode_context_parallel_size=8"]
    assert [s.launch.short_label() for _, s in cells] == ["TP8", "TP8+DCP8"]
    rates = [b.request_rate for b in cells[0][1].bench]
    assert rates == [10, math.inf]


def test_sweep_unknown_matrix_key():
    with pytest.raises(SpecError, match="neither a launch nor a bench field"):
        SweepSpec.parse({"launch": {"model": "m"}, "matrix": {"tp_size": [1]}})


def test_run_spec_json_round_trip_keeps_infinite_rate():
    spec = RunSpec.parse({"launch": {"model": "m"}, "bench": {"request-rate": "inf"}})
    again = RunSpec.model_validate_json(spec.model_dump_json())
    assert math.isinf(again.bench[0].request_rate) and again == spec


def test_cli_style_overrides(tmp_path):
    from runner.config import apply_overrides

    data = {"launch": {"model": "m", "tensor-parallel-size": 1}, "bench": [{"num-prompts": 5}, {"num-prompts": 6}]}
    out = RunSpec.parse(apply_overrides(data, ["tensor-parallel-size=8", "bench.request-rate=inf", "eval.limit=3",
                                               "served-model-name=tiny"]))
    assert out.launch.tensor_parallel_size == 8 and out.launch.served_model_name == "tiny"
    assert [b.num_prompts for b in out.bench] == [5, 6] and all(math.isinf(b.request_rate) for b in out.bench)
    assert out.eval.limit == 3
    assert data["launch"]["tensor-parallel-size"] == 1  # the caller's data is not changed
    with pytest.raises(SpecError, match="no such launch, bench or eval field"):
        apply_overrides(data, ["tp=8"])
    with pytest.raises(SpecError, match="FIELD=VALUE"):
        apply_overrides(data, ["tensor-parallel-size"])
