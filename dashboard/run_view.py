"""What the Run page shows about one run, as plain values: summary, KV card, metrics, reproduce commands."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import yaml
from pydantic import ValidationError

from dashboard import data
from runner import api
from runner.commands import bench_argv, display, lm_eval_argv, serve_argv
from runner.compare import metric_def
from runner.config import EvalSpec, LaunchSpec, RunSpec
from runner.errors import RunError
from runner.evaluate import LOG_NAME, OUTPUT_DIR, TASK_DIR, local_tasks
from runner.models import Run

HEADLINE = [("output_throughput", "Output tok/s", "{:,.2f}"), ("request_throughput", "Requests/s", "{:,.2f}"),
            ("median_ttft_ms", "Median TTFT (ms)", "{:,.1f}"), ("median_tpot_ms", "Median TPOT (ms)", "{:,.2f}"),
            ("p99_itl_ms", "P99 ITL (ms)", "{:,.2f}"), ("completed", "Completed", "{:,.0f}")]


def summary_line(run: Run) -> str:
    parts = [run.source.value, run.model or "model unknown"]
    if run.tensor_parallel_size:
        parts.append(data.config_label(run.tensor_parallel_size, run.decode_context_parallel_size))
    if (run.pipeline_parallel_size or 1) > 1:
        parts.append(f"PP{run.pipeline_parallel_size}")
    if (run.data_parallel_size or 1) > 1:
        parts.append(f"DP{run.data_parallel_size}")
    if run.vllm_version:
        parts.append(f"vLLM {run.vllm_version}")
    if run.host:
        parts.append(f"host {run.host}")
    if run.gpu_ids_json:
        gpus = json.loads(run.gpu_ids_json)
        parts.append(f"GPUs {', '.join(map(str, gpus))}" if gpus else "CPU backend")
    if run.port:
        parts.append(f"port {run.port}")
    if run.sweep_id:
        parts.append(f"sweep #{run.sweep_id} ({run.sweep_cell})")
    return " · ".join(parts)


def kv_card(run: Run) -> list[tuple[str, str, str]]:
    """(name, value, help) of the KV capacity vLLM reported; empty when it reported none."""
    if run.kv_cache_tokens is None and run.kv_cache_gib is None:
        return []
    card = [("KV cache (tokens)", f"{run.kv_cache_tokens:,}" if run.kv_cache_tokens else "—",
             "Tokens the KV cache holds, across the DCP group (vLLM's 'KV cache size').")]
    card.append(("KV memory", f"{run.kv_cache_gib:.2f} GiB" if run.kv_cache_gib else "—",
                 "KV-cache memory per worker ('Available KV cache memory')."))
    card.append(("Max concurrency", f"{run.max_concurrency:,.2f}×" if run.max_concurrency else "—",
                 "Requests of max-model-len tokens that fit at once."))
    card.append(("DCP multiplier", f"×{run.dcp_multiplier}" if run.dcp_multiplier else "×1",
                 "Decode context parallelism multiplies the KV-cache tokens by the DCP size."))
    return card


def _mean(metrics: list[dict], key: str) -> float | None:
    values = [m[key] for m in metrics if isinstance(m.get(key), (int, float)) and not math.isnan(m[key])]
    return sum(values) / len(values) if values else None


def headline(metrics: list[dict]) -> list[tuple[str, str]]:
    out = []
    for key, name, fmt in HEADLINE:
        value = _mean(metrics, key)
        out.append((name, "—" if value is None else fmt.format(value)))
    return out


def eval_metrics(scores: list) -> list[tuple[str, str, str, str]]:
    """(name, value, detail, help) per stored lm-eval score (`Store.eval_results`); the detail line carries
    the stderr and the shots."""
    out = []
    for e in scores:
        detail = " · ".join(filter(None, [f"± {e.stderr:.4f} stderr" if e.stderr is not None else "no stderr",
                                          f"{e.n_shot}-shot" if e.n_shot is not None else "",
                                          f"{e.samples:,} questions" if e.samples is not None else ""]))
        out.append((f"{e.task} · {e.filter}", f"{e.value:.4f}", detail, f"lm-eval's {e.metric}."))
    return out


def metrics_table(metrics: list[dict]) -> pd.DataFrame:
    """Every metric of every execution: Metric, unit, then one column per execution."""
    keys = list(dict.fromkeys(k for m in metrics for k in m))
    rows = []
    for key in keys:
        d = metric_def(key)
        row = {"Metric": d.label, "key": key, "unit": d.unit}
        for i, m in enumerate(metrics):
            row[f"#{i + 1}"] = m.get(key)
        rows.append(row)
    return pd.DataFrame(rows)


def lm_eval_command(evaluation: EvalSpec, launch: LaunchSpec, base_url: str, run_dir: Path | str) -> str:
    """The `lm_eval` line the eval phase runs: with a dataset path, the run's own task definition
    (`--include_path`) stands in for gsm8k, as `runner.evaluate.run_eval` does."""
    include = None
    if evaluation.dataset_path:
        try:
            evaluation = evaluation.model_copy(update={"tasks": local_tasks(evaluation.tasks)})
        except RunError:
            pass  # the form says why; show the line as given
        include = Path(run_dir) / TASK_DIR
    return display(lm_eval_argv(evaluation, launch, base_url, Path(run_dir) / OUTPUT_DIR, include_path=include))


def _logged_command(log: Path) -> str | None:
    """The command line the eval phase wrote at the top of its log (`$ lm_eval …`), if it ran."""
    try:
        with open(log, encoding="utf-8") as f:
            first = f.readline()
    except OSError:
        return None
    return first[2:].strip() if first.startswith("$ ") else None


def reproduce(run: Run) -> dict[str, tuple[str, str]]:
    """Title → (text, language): the exact command lines of a launched run and a `servelab run` file."""
    if not run.spec_json:
        return {}
    try:
        spec = RunSpec.model_validate_json(run.spec_json)
    except ValidationError as exc:  # a stored spec this version cannot read: say so, keep the page
        return {"stored spec (unreadable)": (f"{run.spec_json}\n\n# {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}",
                                             "json")}
    launch = spec.launch.model_copy(update={"port": run.port}) if run.port else spec.launch
    env = api.reproduce_env(run) or launch.env
    serve = json.loads(run.serve_argv_json) if run.serve_argv_json else serve_argv(launch)
    base = f"http://{launch.host}:{launch.port}"
    run_dir = Path(run.run_dir or f"data/runs/{run.id}")
    out = {"vllm serve": (display(serve, env), "bash")}
    for i, bench in enumerate(spec.bench):
        argv = bench_argv(bench, launch, base, run_dir, f"bench-{i}-0.json")
        out[f"vllm bench serve ({i + 1} of {len(spec.bench)})" if len(spec.bench) > 1 else "vllm bench serve"] = (
            display(argv), "bash")
    if spec.eval is not None:
        ran = _logged_command(run_dir / LOG_NAME)
        out["lm_eval"] = (ran or lm_eval_command(spec.eval, launch, base, run_dir), "bash")
    body = spec.model_dump(exclude_defaults=True)  # python mode: inf stays inf (YAML .inf)
    out["run file for `servelab run run.yaml`"] = (yaml.safe_dump(body, sort_keys=False), "yaml")
    return out
