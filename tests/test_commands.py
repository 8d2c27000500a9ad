import math
import sys

import pytest

from runner.commands import bench_argv, display, lm_eval_argv, serve_argv, vllm_prefix
from runner.config import BenchSpec, EvalSpec, LaunchSpec, RunSpec

KIMI = "moonshotai/Kimi-K2-Thinking"
SEED_FLAGS = ["--enable-auto-tool-choice"]


@pytest.mark.parametrize(
    "spec, argv",
    [
        (  # the seed's low-latency launch
            LaunchSpec(model=KIMI, tensor_parallel_size=8, tool_call_parser="kimi_k2", reasoning_parser="kimi_k2",
                       trust_remote_code=True, extra_args=SEED_FLAGS),
            ["vllm", "serve", KIMI, "--host", "127.0.0.1", "--port", "8000", "--tensor-parallel-size", "8",
             "--reasoning-parser", "kimi_k2", "--tool-call-parser", "kimi_k2", "--trust-remote-code",
             "--enable-auto-tool-choice"],
        ),
        (  # the seed's high-throughput launch
            LaunchSpec(model=KIMI, tensor_parallel_size=8, decode_context_parallel_size=8, tool_call_parser="kimi_k2",
                       reasoning_parser="kimi_k2", trust_remote_code=True, extra_args=SEED_FLAGS),
            ["vllm", "serve", KIMI, "--host", "127.0.0.1", "--port", "8000", "--tensor-parallel-size", "8",
             "--decode-context-parallel-size", "8", "--reasoning-parser", "kimi_k2", "--tool-call-parser", "kimi_k2",
             "--trust-remote-code", "--enable-auto-tool-choice"],
        ),
        (
            LaunchSpec(model="/m", port=8123, pipeline_parallel_size=2, data_parallel_size=2, max_model_len=2048,
                       gpu_memory_utilization=0.9, max_num_seqs=64, max_num_batched_tokens=8192, kv_cache_dtype="fp8",
                       dtype="bfloat16", load_format="dummy", enforce_eager=True, enable_expert_parallel=True,
                       served_model_name="tiny", extra_args=["--seed", "1; rm -rf /"]),
            ["vllm", "serve", "/m", "--host", "127.0.0.1", "--port", "8123", "--tensor-parallel-size", "1",
             "--pipeline-parallel-size", "2", "--data-parallel-size", "2", "--served-model-name", "tiny",
             "--max-model-len", "2048", "--gpu-memory-utilization", "0.9", "--max-num-seqs", "64",
             "--max-num-batched-tokens", "8192", "--kv-cache-dtype", "fp8", "--dtype", "bfloat16",
             "--load-format", "dummy", "--enable-expert-parallel", "--enforce-eager", "--seed", "1; rm -rf /"],
        ),
    ],
)
def test_serve_argv(spec, argv):
    assert serve_argv(spec) == argv


def test_serve_argv_does_not_mutate_prefix_or_extra_args():
    prefix, extra = ["python", "-m", "x"], ["--a"]
    spec = LaunchSpec(model="m", extra_args=extra)
    argv = serve_argv(spec, prefix=prefix)
    argv.append("--mutated")
    assert prefix == ["python", "-m", "x"] and spec.extra_args == ["--a"]


def test_seed_benchmark_command():
    bench = BenchSpec(random_input_len=8000, random_output_len=4000, request_rate=100, num_prompts=1000)
    launch = LaunchSpec(model=KIMI, trust_remote_code=True)
    assert bench_argv(bench, launch, "http://127.0.0.1:8000", "/runs/7", "bench-0.json") == [
        "vllm", "bench", "serve", "--model", KIMI, "--base-url", "http://127.0.0.1:8000",
        "--dataset-name", "random", "--random-input-len", "8000", "--random-output-len", "4000",
        "--num-prompts", "1000", "--request-rate", "100", "--burstiness", "1", "--seed", "0", "--num-warmups", "8",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
        "--trust-remote-code", "--save-result", "--save-detailed", "--result-dir", "/runs/7", "--result-filename", "bench-0.json",
    ]


def test_bench_argv_options():
    bench = BenchSpec(dataset_name="sharegpt", dataset_path="/d.json", request_rate=math.inf, max_concurrency=32,
                      ignore_eos=True, goodput=["ttft:500", "tpot:50"], extra_args=["--temperature", "0"],
                      num_warmups=0)  # 0: no warm-up flag at all
    launch = LaunchSpec(model="m", served_model_name="tiny")
    assert bench_argv(bench, launch, "http://h:1", "d", "f.json", prefix=["B"]) == [
        "B", "bench", "serve", "--model", "m", "--served-model-name", "tiny", "--base-url", "http://h:1",
        "--dataset-name", "sharegpt", "--dataset-path", "/d.json", "--num-prompts", "200", "--request-rate", "inf",
        "--max-concurrency", "32", "--burstiness", "1", "--seed", "0", "--ignore-eos",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
        "--goodput", "ttft:500", "tpot:50", "--save-result", "--save-detailed", "--result-dir", "d", "--result-filename", "f.json",
        "--temperature", "0",
    ]


def test_seed_lm_eval_command():
    argv = lm_eval_argv(EvalSpec(temperature=0.0), LaunchSpec(model=KIMI), "http://0.0.0.0:8000", "/runs/7/eval")
    assert argv == [
        "lm_eval", "--model", "local-completions", "--model_args",
        f"model={KIMI},base_url=http://0.0.0.0:8000/v1/completions,tokenized_requests=False,tokenizer_backend=None,"
        "num_concurrent=32,max_retries=3,timeout=3000",
        "--tasks", "gsm8k", "--num_fewshot", "5", "--batch_size", "1", "--output_path", "/runs/7/eval",
        "--gen_kwargs", "temperature=0",
    ]


def test_lm_eval_limit_and_include_path():
    argv = lm_eval_argv(EvalSpec(limit=20, max_gen_toks=64), LaunchSpec(model="m", served_model_name="tiny"),
                        "http://h:1/", "o", include_path="/tasks")
    assert argv[argv.index("--limit") + 1] == "20"
    assert argv[-4:] == ["--gen_kwargs", "max_gen_toks=64", "--include_path", "/tasks"]
    assert "model=tiny,base_url=http://h:1/v1/completions" in argv[4]


def test_display_shows_vllm_and_quotes():
    argv = serve_argv(LaunchSpec(model="m", extra_args=["a b"]), prefix=vllm_prefix())
    shown = display(argv, env={"X": "1 2"})
    assert shown.startswith("X='1 2' vllm serve m ")
    assert shown.endswith("'a b'")
    assert vllm_prefix()[0] == sys.executable


def test_command_lines_are_every_command_of_a_run_once():
    """The Launch page (before queueing), the Run page and `servelab show` all show these lines."""
    from runner import api

    spec = RunSpec(launch=LaunchSpec(model="org/m", port=8124, env={"A": "1"}),
                   bench=[BenchSpec(num_prompts=5), BenchSpec(num_prompts=6, request_rate=2)],
                   eval=EvalSpec(limit=50, dataset_path="/data/gsm8k.jsonl"))
    common = ("--base-url http://127.0.0.1:8124 --dataset-name random --random-input-len 1024 "
              "--random-output-len 128 --num-prompts")
    tail = ("--percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,90,99 --save-result --save-detailed "
            "--result-dir /runs/7 --result-filename")
    assert api.command_lines(spec, "/runs/7") == {
        "vllm serve": "A=1 vllm serve org/m --host 127.0.0.1 --port 8124 --tensor-parallel-size 1",
        "vllm bench serve (1 of 2)": f"vllm bench serve --model org/m {common} 5 --request-rate inf --burstiness 1 "
                                     f"--seed 0 --num-warmups 8 {tail} bench-0-0.json",
        "vllm bench serve (2 of 2)": f"vllm bench serve --model org/m {common} 6 --request-rate 2 --burstiness 1 "
                                     f"--seed 0 --num-warmups 8 {tail} bench-1-0.json",
        "lm_eval": "lm_eval --model local-completions --model_args model=org/m,base_url=http://127.0.0.1:8124/v1/"
                   "completions,tokenized_requests=False,tokenizer_backend=None,num_concurrent=32,max_retries=3,"
                   "timeout=3000 --tasks gsm8k_local --num_fewshot 5 --batch_size 1 --output_path /runs/7/eval "
                   "--limit 50 --include_path /runs/7/eval_tasks",
    }
    assert api.command_lines(spec, "/runs/7", env={})["vllm serve"].startswith("vllm serve org/m ")
    no_gsm8k = spec.model_copy(update={"eval": EvalSpec(tasks="mmlu", dataset_path="/d.jsonl")})
    assert "--tasks mmlu" in api.command_lines(no_gsm8k, "/r")["lm_eval"]  # as given; the form says why it cannot run


def test_a_run_shows_the_argv_it_ran_and_marks_lines_rebuilt_by_todays_code(store) -> None:
    """A run from before `--num-warmups` existed shows the bench command it ran, not today's rendering; a run
    stored without its argv shows today's rendering under a title that says so."""
    import json

    from runner import api
    from runner.models import RunStatus

    spec = RunSpec(launch=LaunchSpec(model="org/m"), bench=[BenchSpec(num_prompts=5)], eval=EvalSpec(limit=5))
    python = ["/opt/other-host/bin/python3.12", "-m"]  # stored on another machine: its interpreter, not this one's
    bench = [*python, "vllm.entrypoints.cli.main", "bench", "serve", "--num-prompts", "5"]
    ran = [{"name": "bench-0-0-warmup", "argv": bench}, {"name": "bench-0-0", "argv": bench},
           {"name": "lm_eval", "argv": [*python, "lm_eval", "--model", "local-completions", "--limit", "5"]}]
    serve = [*python, "runner.vllm_entry", "serve", "org/m", "--port", "8200"]
    run = store.create_run(spec_json=spec.model_dump_json(), status=RunStatus.succeeded, port=8200,
                           serve_argv_json=json.dumps(serve), commands_json=json.dumps(ran),
                           env_json=json.dumps({"SERVELAB_RUN_ID": "1", "OMP_NUM_THREADS": "2"}))
    assert api.run_commands(run) == {
        "vllm serve": "OMP_NUM_THREADS=2 vllm serve org/m --port 8200",
        "vllm bench serve (bench-0-0-warmup)": "vllm bench serve --num-prompts 5",
        "vllm bench serve (bench-0-0)": "vllm bench serve --num-prompts 5",
        "lm_eval": "lm_eval --model local-completions --limit 5",
    }

    old = store.create_run(spec_json=spec.model_dump_json(), status=RunStatus.succeeded, port=8200)
    shown = api.run_commands(old)
    marked = f" — {api.RE_RENDERED}"
    assert list(shown) == [f"vllm serve{marked}", f"vllm bench serve{marked}", f"lm_eval{marked}"]
    assert api.RE_RENDERED == "re-rendered by today's servelab; not the command this run ran"
    assert "--num-warmups 8" in shown[f"vllm bench serve{marked}"]  # today's flag: why the title warns
    # a queued run has run nothing yet: today's rendering is what it will run
    queued = store.create_run(spec_json=spec.model_dump_json(), status=RunStatus.queued)
    assert list(api.run_commands(queued)) == ["vllm serve", "vllm bench serve", "lm_eval"]
