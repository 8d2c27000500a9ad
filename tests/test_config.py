import json
import math

import pytest

from runner.config import CPU_DCP, BenchSpec, EvalSpec, Host, LaunchSpec, RunSpec, SweepSpec, load_run_spec
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
        # options before the model, a boolean vLLM knows and servelab does not: vLLM's grammar decides
        ("vllm serve --enable-prefix-caching org/m -tp 2",
         dict(model="org/m", tensor_parallel_size=2, extra_args=["--enable-prefix-caching"])),
        ("vllm serve org/m -tp 4 -dcp 2 -pp 2 -dp 1", dict(tensor_parallel_size=4, decode_context_parallel_size=2,
                                                         pipeline_parallel_size=2, data_parallel_size=1)),
        ("vllm serve org/m --tensor-parallel-size=2 --max-model-len=4096 --gpu-memory-utilization 0.9",
         dict(tensor_parallel_size=2, max_model_len=4096, gpu_memory_utilization=0.9)),
        ("vllm serve org/m --max_num_seqs 8 --max-model-len 32k --no-enforce-eager",  # vLLM's spellings
         dict(max_num_seqs=8, max_model_len=32000, enforce_eager=False, extra_args=[])),  # k: 1000
        ("VLLM_USE_V1=1 HF_HOME=/x vllm serve org/m --seed 3 --chat-template 'a;b' --enable-prefix-caching",
         dict(env={"VLLM_USE_V1": "1", "HF_HOME": "/x"},
              extra_args=["--seed", "3", "--chat-template", "a;b", "--enable-prefix-caching"])),
        ("vllm serve -tp 2 --model org/m", dict(model="org/m", tensor_parallel_size=2)),
        ("vllm serve \\\n  org/m \\\n  -tp 8", dict(model="org/m", tensor_parallel_size=8)),
    ],
)
def test_from_command_reads_with_vllms_parser(command, expected):
    spec = LaunchSpec.from_command(command)
    for key, value in expected.items():
        assert getattr(spec, key) == value, key


@pytest.mark.parametrize(
    "command, message",
    [
        ("python foo.py", "A pasted command must start with `vllm serve`; e.g. `vllm serve MODEL -tp 8`."),
        ("vllm serve", "No model in the command; write `vllm serve MODEL …`."),
        ("vllm serve -tp 2", "No model in the command; write `vllm serve MODEL …`."),
        ("vllm serve m -tp", "vLLM refuses this command: argument --tensor-parallel-size/-tp: expected one argument"),
        ("vllm serve m -tp eight",
         "vLLM refuses this command: argument --tensor-parallel-size/-tp: invalid int value: 'eight'"),
        ("vllm serve m --no-such-flag 1", "vLLM refuses this command: unrecognized arguments: --no-such-flag 1"),
        ("vllm serve m --served-model-name a b", "served-model-name lists 2 names; give one."),
        ("vllm serve m 'unclosed", "Could not split the command (No closing quotation); check its quotes."),
    ],
)
def test_from_command_errors(command, message):
    with pytest.raises(SpecError) as err:
        LaunchSpec.from_command(command)
    assert err.value.problems == [message]


def test_from_command_falls_back_to_the_simple_rule_without_vllm(monkeypatch):
    import runner.vllm_args

    monkeypatch.setattr(runner.vllm_args, "serve_parser", lambda: None)
    spec = LaunchSpec.from_command("vllm serve org/m -tp 2 --foo bar --enforce-eager")
    assert (spec.model, spec.tensor_parallel_size, spec.enforce_eager, spec.extra_args) == (
        "org/m", 2, True, ["--foo", "bar"])
    with pytest.raises(SpecError, match="`-tp` needs a value"):
        LaunchSpec.from_command("vllm serve m -tp")


def test_maximal_spec_round_trips_through_vllms_parser():
    """Every LaunchSpec field set: `serve_argv` read back by vLLM's own parser gives the same spec, so a
    flag servelab writes that vLLM does not know fails here."""
    from runner.commands import display, serve_argv
    from runner.vllm_args import serve_parser

    spec = LaunchSpec(
        model="org/m", served_model_name="tiny", tensor_parallel_size=4, decode_context_parallel_size=2,
        pipeline_parallel_size=2, data_parallel_size=2, enable_expert_parallel=True, max_model_len=4096,
        gpu_memory_utilization=0.85, max_num_seqs=64, max_num_batched_tokens=8192, kv_cache_dtype="fp8",
        dtype="bfloat16", load_format="dummy", trust_remote_code=True, reasoning_parser="deepseek_r1",
        tool_call_parser="hermes", enforce_eager=True, host="0.0.0.0", port=8123,  # noqa: S104
        extra_args=["--enable-prefix-caching", "--seed", "7"], env={"VLLM_LOGGING_LEVEL": "DEBUG"})
    unset = [n for n, f in LaunchSpec.model_fields.items() if getattr(spec, n) == f.get_default(
        call_default_factory=True)]
    assert unset == []  # the spec is maximal: a new field must be added here
    argv = serve_argv(spec)
    top, _ = serve_parser()
    ns = top.parse_args(argv[1:])  # raises for any flag vLLM does not know
    assert (ns.model_tag, ns.served_model_name, ns.tensor_parallel_size, ns.decode_context_parallel_size,
            ns.pipeline_parallel_size, ns.data_parallel_size, ns.enable_expert_parallel, ns.max_model_len,
            ns.gpu_memory_utilization, ns.max_num_seqs, ns.max_num_batched_tokens, ns.kv_cache_dtype, ns.dtype,
            ns.load_format, ns.trust_remote_code, ns.reasoning_parser, ns.tool_call_parser, ns.enforce_eager,
            ns.host, ns.port, ns.enable_prefix_caching, ns.seed) == (
        "org/m", ["tiny"], 4, 2, 2, 2, True, 4096, 0.85, 64, 8192, "fp8", "bfloat16", "dummy", True, "deepseek_r1",
        "hermes", True, "0.0.0.0", 8123, True, 7)  # noqa: S104
    assert LaunchSpec.from_command(display(argv, spec.env)) == spec


@pytest.mark.parametrize(
    "fields, host, message",
    [
        (dict(tensor_parallel_size=8, decode_context_parallel_size=3), None,
         "DCP size 3 does not divide TP size 8; pick one of 1, 2, 4, 8."),
        (dict(tensor_parallel_size=8, pipeline_parallel_size=2), Host(gpus=8),
         "TP×PP×DP = 8×2×1 = 16 ranks, but this machine has 8 GPUs; lower the sizes to fit 8, or queue it for a "
         "worker on a machine with 16 GPUs."),
        (dict(tensor_parallel_size=8), Host(cpu_backend=True, cores=2),
         "TP×PP×DP = 8×1×1 = 8 ranks, but this machine has no GPU and vLLM's CPU backend runs one rank per core on "
         "its 2 cores; lower the sizes to fit 2, or queue it for a worker on a machine with 8 GPUs."),
        (dict(tensor_parallel_size=2, decode_context_parallel_size=2), Host(cpu_backend=True, cores=2),
         "vLLM's CPU backend cannot run decode context parallel: its attention does not return the softmax LSE "
         "that DCP merges; DCP needs a GPU backend."),
        (dict(extra_args=["--tensor-parallel-size", "2"]), None,
         "`--tensor-parallel-size` in extra args repeats the spec field `tensor_parallel_size`; set "
         "`tensor_parallel_size` instead of passing it twice."),
        (dict(model="/nonexistent/model"), None,
         "Model path /nonexistent/model does not exist; give an existing folder or a Hugging Face id."),
    ],
)
def test_launch_problems(fields, host, message):
    spec = LaunchSpec.parse({"model": "org/m", **fields})
    with pytest.raises(SpecError) as err:
        spec.check(host)
    assert err.value.problems == [message]


def test_problems_name_their_field():
    spec = RunSpec.parse({"launch": {"model": "org/m", "tensor-parallel-size": 2, "decode-context-parallel-size": 2},
                          "bench": {"dataset-name": "sharegpt"}})
    assert [(p.field, p) for p in spec.problems(Host(cpu_backend=True, cores=2))] == [
        ("launch.decode_context_parallel_size", CPU_DCP),
        ("bench.dataset_path", "Dataset sharegpt needs dataset-path; give the file or use the random dataset.")]


def test_cpu_dcp_gives_the_cpu_reason_not_the_gqa_one(tmp_path):
    model = _model_dir(tmp_path, num_attention_heads=4, num_key_value_heads=4)
    spec = LaunchSpec.parse({"model": model, "tensor_parallel_size": 2, "decode_context_parallel_size": 2})
    assert spec.problems(Host(cpu_backend=True, cores=2)) == [CPU_DCP]
    assert spec.problems(Host(gpus=2)) == [  # on GPUs the GQA rule is the one that applies
        "DCP 2 needs TP greater than the model's 4 KV heads (GQA/MQA), but TP is 2; raise TP above 4 or set DCP to 1."]


def test_a_run_for_another_worker_is_checked_without_this_machine():
    spec = RunSpec.parse({"launch": {"model": "org/m", "tensor-parallel-size": 8}, "other_worker": True})
    assert spec.problems(Host(cpu_backend=True, cores=2)) == []
    assert RunSpec.parse({"launch": {"model": "org/m", "tensor-parallel-size": 8}}).problems(Host(gpus=8)) == []


@pytest.mark.parametrize(
    "cfg, tp, message",
    [
        (dict(num_attention_heads=4, num_key_value_heads=4), 3,
         "TP 3 does not divide the model's 4 attention heads (its config.json); pick TP 1, 2 or 4."),
        (dict(num_attention_heads=32, num_key_value_heads=8), 6,
         "TP 6 does not divide the model's 32 attention heads (its config.json); pick TP 1, 2, 4, 8, 16 or 32."),
        (dict(num_attention_heads=24, num_key_value_heads=8), 6,
         "the model's 8 KV heads (its config.json) cannot be split over TP 6: vLLM needs TP to divide them or be a "
         "multiple of them; pick TP 1, 2, 4, 8 or 24."),
    ],
)
def test_attention_heads_and_kv_heads_must_split_over_tp(tmp_path, cfg, tp, message):
    spec = LaunchSpec.parse({"model": _model_dir(tmp_path, **cfg), "tensor_parallel_size": tp})
    assert spec.problems() == [message]


def test_heads_that_split_are_accepted(tmp_path):
    model = _model_dir(tmp_path, num_attention_heads=32, num_key_value_heads=8)
    for tp in (1, 2, 4, 8, 16, 32):  # 16 and 32: KV heads replicated
        assert LaunchSpec.parse({"model": model, "tensor_parallel_size": tp}).problems() == []


@pytest.mark.parametrize(
    "data, message",
    [
        ({"launch": {"model": ""}}, "Model: enter a model name (a Hugging Face id such as org/name) or a local path."),
        ({"launch": {"model": "m"}, "bench": {"num-prompts": 999999999999}},
         "num-prompts must be between 1 and 1,000,000; it is 999,999,999,999."),
        ({"launch": {"model": "m", "max-num-seqs": 100000}}, "max-num-seqs must be between 1 and 65536; it is 100,000."),
        ({"launch": {"model": "m", "port": 80}}, "port must be between 1024 and 65535; it is 80."),
        ({"launch": {"model": "m", "port": 70000}}, "port must be between 1024 and 65535; it is 70000."),
        ({"launch": {"model": "m", "tensor-parallel-size": "eight"}},
         "tensor-parallel-size must be a whole number; 'eight' is not."),
        ({"launch": {"model": "m", "gpu-memory-utilization": 1.5}}, "gpu-memory-utilization must be at most 1; it is 1.5."),
        ({"launch": {"model": "m"}, "bench": [{}, {"request-rate": "fast"}]},
         "request-rate (benchmark 2) must be a number (or inf where allowed); 'fast' is not."),
        ({"launch": {"model": "m"}, "bench": {"dataset-name": "csv"}},
         "dataset-name must be one of 'random', 'sharegpt', 'custom', 'sonnet' or 'hf'; 'csv' is not."),
        ({"launch": {}}, "model is required in RunSpec; add it."),
    ],
)
def test_spec_errors_are_plain(data, message):
    with pytest.raises(SpecError) as err:
        RunSpec.parse(data)
    assert err.value.problems == [message]


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
    with pytest.raises(SpecError, match="^port must be"):
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
    with pytest.raises(SpecError, match="request-rate must be above 0; it is -1."):
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
    with pytest.raises(SpecError, match="neither a benchmark nor an evaluation nor an output check"):
        RunSpec.parse({"launch": {"model": "m"}, "bench": [], "output-check": "off"}).check()


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


@pytest.mark.parametrize("sizes, shape, nodes, problem", [
    (dict(tensor_parallel_size=8), (0, 8, 8), 1, None),
    (dict(tensor_parallel_size=16), (0, 8, 8), 2, None),
    (dict(tensor_parallel_size=8, pipeline_parallel_size=2), (8, 8), 2, None),
    (dict(tensor_parallel_size=32), (0, 8, 8), None,
     "The Ray cluster has 2 nodes × 8 GPUs; TP 32 needs 4 such nodes: add nodes or lower the "
     "sizes to fit 16 GPUs."),
    (dict(tensor_parallel_size=4, pipeline_parallel_size=3), (8, 8), None,
     "The Ray cluster has 2 nodes × 8 GPUs; TP×PP×DP = 4×3×1 needs 12 GPUs, and a launch larger than one node "
     "takes whole 8-GPU nodes: pick sizes whose product is one of 8, 16."),
    (dict(tensor_parallel_size=16), (8, 4, 4), None,
     "The Ray cluster has 1 node × 8 GPUs + 2 nodes × 4 GPUs; TP 16 needs 2 such nodes: add nodes or lower the "
     "sizes to fit 8 GPUs."),
    (dict(tensor_parallel_size=2), (0, 0), None,
     "The Ray cluster has 2 nodes and no GPU; TP 2 needs 2 GPUs: add GPU nodes (`ray start --address … "
     "--num-gpus N`)."),
])
def test_launch_checked_against_the_ray_clusters_shape(sizes, shape, nodes, problem):
    from runner.config import ClusterShape

    cluster = ClusterShape(shape)
    spec = RunSpec.parse({"launch": {"model": "org/m", **sizes}})
    assert cluster.nodes_for(spec.launch) == nodes
    assert [(p.field, p) for p in spec.problems(cluster)] == ([] if problem is None else
                                                              [("launch.tensor_parallel_size", problem)])
