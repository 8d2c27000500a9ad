"""What the Run page shows about one run, as plain values: summary, KV card, metrics, reproduce commands."""

from __future__ import annotations

import json
import math

import pandas as pd
import yaml
from pydantic import ValidationError

from dashboard import data
from runner import api
from runner.compare import carries_nothing, metric_def
from runner.config import RunSpec
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
    if run.node_name or run.node_ip:
        parts.append(f"Ray node {data.node_label(run.node_name, run.node_ip)}")
    elif run.host:
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


def headline(metrics: dict) -> list[tuple[str, str]]:
    """The metric cards of one point's metrics (`api.run_headline(...).metrics`: one load, never a mean of loads)."""
    out = []
    for key, name, fmt in HEADLINE:
        value = metrics.get(key)
        ok = isinstance(value, (int, float)) and not math.isnan(value)
        out.append((name, fmt.format(value) if ok else "—"))
    return out


LOAD_COLUMNS = [("output_throughput", "Output tok/s"), ("request_throughput", "Requests/s"),
                ("median_ttft_ms", "Median TTFT (ms)"), ("p99_ttft_ms", "P99 TTFT (ms)"),
                ("median_tpot_ms", "Median TPOT (ms)"), ("p99_tpot_ms", "P99 TPOT (ms)"), ("completed", "Completed"),
                ("failed", "Failed")]


def loads_table(points: list[dict]) -> pd.DataFrame:
    """`api.run_points` as shown: one row per load, the mean of its repeats."""
    return pd.DataFrame([{"Load": p["load"], "Repeats": p["repeats"], **{name: p.get(k) for k, name in LOAD_COLUMNS}}
                         for p in points], columns=["Load", "Repeats", *(name for _, name in LOAD_COLUMNS)])


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


def metrics_table(metrics: list[dict], loads: list[str] | None = None) -> pd.DataFrame:
    """Every metric of every execution: Metric, unit, then one column per execution (`#2 · 4 req/s` with the
    executions' `loads`); the metrics that say nothing here (0 everywhere, P50 beside the median) left out by
    Compare's rule."""
    keys = [k for k in dict.fromkeys(k for m in metrics for k in m) if not carries_nothing(k, metrics)]
    rows = []
    for key in keys:
        d = metric_def(key)
        row = {"Metric": d.label, "key": key, "unit": d.unit}
        for i, m in enumerate(metrics):
            row[f"#{i + 1}" + (f" · {loads[i]}" if loads else "")] = m.get(key)
        rows.append(row)
    return pd.DataFrame(rows)


def reproduce(run: Run) -> dict[str, tuple[str, str]]:
    """Title → (text, language): the exact command lines of a launched run and a `servelab run` file."""
    if not run.spec_json:
        return {}
    try:
        spec = RunSpec.model_validate_json(run.spec_json)
    except ValidationError as exc:  # a stored spec this version cannot read: say so, keep the page
        return {"stored spec (unreadable)": (f"{run.spec_json}\n\n# {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}",
                                             "json")}
    out = {title: (line, "bash") for title, line in api.run_commands(run).items()}
    body = spec.model_dump(exclude_defaults=True)  # python mode: inf stays inf (YAML .inf)
    out["run file for `servelab run run.yaml`"] = (yaml.safe_dump(body, sort_keys=False), "yaml")
    return out
