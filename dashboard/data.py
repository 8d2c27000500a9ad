"""Frames the pages and charts need, assembled from the store. No Streamlit here."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any, Literal

import pandas as pd

from runner import api
from runner.api import Store
from runner.config import gpus_for, parallel_label
from runner.models import LIVE, Run

BadgeColor = Literal["gray", "blue", "violet", "green", "red", "orange"]
# colour and Material icon of st.badge (emoji fonts are not everywhere)
STATUS_BADGE: dict[str, tuple[BadgeColor, str]] = {
    "queued": ("gray", ":material/schedule:"), "starting": ("blue", ":material/rocket_launch:"),
    "ready": ("blue", ":material/check_circle:"), "benchmarking": ("violet", ":material/speed:"),
    "evaluating": ("violet", ":material/calculate:"), "succeeded": ("green", ":material/check:"),
    "failed": ("red", ":material/error:"), "cancelled": ("orange", ":material/block:"),
    "interrupted": ("orange", ":material/warning:"),
}  # fmt: skip


def gpus_of(run: Run) -> int | None:
    """GPUs a run used (TP×PP×DP), None when its configuration is unknown (e.g. an imported result)."""
    if run.tensor_parallel_size is None:
        return None
    return gpus_for(run.tensor_parallel_size, run.pipeline_parallel_size or 1, run.data_parallel_size or 1)


def config_label(tp: float | None, dcp: float | None) -> str:
    """`TP8+DCP8` from a frame's TP and DCP cells (NaN where unknown); `—` without a TP size."""
    if tp is None or (isinstance(tp, float) and math.isnan(tp)):
        return "—"
    if dcp is None or (isinstance(dcp, float) and math.isnan(dcp)):
        return parallel_label(int(tp))
    return parallel_label(int(tp), int(dcp))


def short_model(model: object) -> str:
    """A local model path by its last two folders (the Run page shows it whole); hub ids as they are."""
    if not isinstance(model, str) or not model:  # None, or NaN from a frame
        return "—"
    parts = model.rstrip("/").split("/")
    return "…/" + "/".join(parts[-2:]) if model.startswith("/") and len(parts) > 3 else model


def unique_labels(runs: list[Run]) -> dict[int, str]:
    """Run id → label, with `#id` added where two runs share a label, so charts keep them apart."""
    labels = {r.id: api.label_of(r) for r in runs}
    counts = pd.Series(list(labels.values())).value_counts()
    return {i: f"{lab} (#{i})" if counts[lab] > 1 else lab for i, lab in labels.items()}


def load_label(loads: Any, at: Any) -> str:
    """The load a run's numbers are from: `8 req/s`; a sweep's peak-throughput load `32 req/s (peak of 4)`."""
    if not isinstance(at, str) or not at:
        return ""
    swept = loads is not None and not pd.isna(loads) and int(loads) > 1
    return f"{at} (peak of {int(loads)})" if swept else at


def node_label(name: str | None, ip: str | None) -> str:
    """`gpu-node-1 (10.0.0.5)`: the Ray node a run executed on; empty for runs of the local worker."""
    name, ip = (v if isinstance(v, str) and v else None for v in (name, ip))  # a table's missing value is NaN
    if not name and not ip:
        return ""
    return f"{name} ({ip})" if name and ip else str(name or ip)


def runs_view(frame: pd.DataFrame, now: datetime | None = None) -> pd.DataFrame:
    """The Runs page table from `api.runs_frame`: status, label, model, TP/DCP, the load of the headline metrics
    (a sweep's peak load, never a mean across loads), the metrics, times."""
    now = now or datetime.now(UTC)

    def seconds(row: pd.Series) -> float | None:
        start, end = row["started_at"], row["finished_at"]
        if start is None or pd.isna(start):
            return None
        end = now if end is None or pd.isna(end) else end
        return max(0.0, (end - start).total_seconds())

    return pd.DataFrame({
        "ID": frame["id"].astype(int),
        "Status": [f"{s} · {p}" if s in LIVE and p and p != s else s for s, p in zip(frame["status"], frame["phase"])],
        "Label": frame["label"],
        "Model": [short_model(m) for m in frame["model"]],
        "TP/DCP": [config_label(t, d) for t, d in zip(frame["tensor_parallel_size"],
                                                     frame["decode_context_parallel_size"])],
        "Load": [load_label(n, at) for n, at in zip(frame["loads"], frame["metrics_at"], strict=True)],
        "Node": [node_label(n, ip) for n, ip in zip(frame["node_name"], frame["node_ip"])],
        "Output tok/s": frame["output_throughput"],
        "Req/s": frame["request_throughput"],
        "Median TTFT (ms)": frame["median_ttft_ms"],
        "Median TPOT (ms)": frame["median_tpot_ms"],
        "KV tokens": pd.to_numeric(frame["kv_cache_tokens"]),
        "Started": pd.to_datetime(frame["started_at"].where(frame["started_at"].notna(), frame["created_at"]),
                                  utc=True),
        "Duration (s)": [seconds(r) for _, r in frame.iterrows()],
        "Progress": frame["progress"],
        "Open": [f"run?run={i}" for i in frame["id"]],
    })  # fmt: skip


def bench_summary(store: Store, run_ids: list[int]) -> pd.DataFrame:
    """One row per run: its configuration, KV capacity and its headline bench metrics (`api.run_headline`: the
    mean over repeats of its one load; of a load sweep, its peak-throughput load's, never a mean across loads),
    with `loads` and `metrics_at` (that load)."""
    runs = [api.get_run(store, r) for r in run_ids]
    labels = unique_labels(runs)
    rows = []
    for run in runs:
        head = api.run_headline(store, run.id)
        means = {k: math.nan if v is None else v for k, v in head.metrics.items()} if head else {}
        rows.append({
            "run_id": run.id, "label": labels[run.id], "status": run.status.value,
            "tensor_parallel_size": run.tensor_parallel_size,
            "decode_context_parallel_size": run.decode_context_parallel_size,
            "gpus": gpus_of(run), "kv_cache_tokens": run.kv_cache_tokens, "kv_cache_gib": run.kv_cache_gib,
            "max_concurrency_x": run.max_concurrency, "dcp_multiplier": run.dcp_multiplier,
            "bench_repeats": len(api.run_metrics(store, run.id)), "loads": head.points if head else 0,
            "metrics_at": head.point if head else "", **means,
        })  # fmt: skip
    return pd.DataFrame(rows)


def latency_intervals(store: Store, run_ids: list[int]) -> pd.DataFrame:
    """Bootstrap 95 % intervals of each run's mean, median and P99 latencies (runs with per-request data)."""
    keys = [f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for s in ("mean", "median", "p99")]
    rows = [{"run_id": run_id, "key": key, "low": low, "high": high}
            for run_id in run_ids for key, (low, high) in api.run_intervals(store, run_id, keys).items()]
    return pd.DataFrame(rows, columns=["run_id", "key", "low", "high"])


def eval_frame(store: Store, run_ids: list[int]) -> pd.DataFrame:
    runs = [api.get_run(store, r) for r in run_ids]
    labels = unique_labels(runs)
    rows = [
        {"run_id": run.id, "label": labels[run.id], "task": e.task, "filter": e.filter, "metric": e.metric,
         "value": e.value, "stderr": e.stderr, "n_shot": e.n_shot, "samples": e.samples}
        for run in runs for e in api.eval_results(store, run.id)
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=["run_id", "label", "task", "filter", "metric", "value", "stderr", "n_shot",
                                       "samples"])


ESTIMATED_START = "estimated: its end less vLLM's measured duration"


def phases_frame(store: Store, run_id: int) -> pd.DataFrame:
    """A run's phase events. A run stored before the executor marked where each benchmark's measured requests
    start (`bench_measured`, or the end of vLLM's warm-up requests) gets that start estimated, as `load_start`
    does: its end less the duration vLLM measured, so that its timeline still tells start-up from benchmark."""
    events = api.phases(store, run_id)
    rows = [{"t": e.t, "phase": e.phase, "detail": e.detail} for e in events]
    if not any(e.phase in ("bench_measured", "request_warmup_end") for e in events):
        starts = [e.t for e in events if e.phase == "bench_start"]
        ends = [e.t for e in events if e.phase == "bench_end"]
        durations = [m.get("duration") for m in api.run_metrics(store, run_id)]
        if len(starts) == len(ends) == len(durations):  # one result per benchmark: they pair in order
            rows += [{"t": end - d, "phase": "bench_measured", "detail": ESTIMATED_START}
                     for start, end, d in zip(starts, ends, durations)
                     if isinstance(d, (int, float)) and 0 < d <= end - start]
    return pd.DataFrame(rows, columns=["t", "phase", "detail"]).sort_values("t", kind="stable", ignore_index=True)


def run_samples(store: Store, run_id: int, max_points: int = 900) -> pd.DataFrame:
    """A run's telemetry with `t_s`, seconds since its first sample."""
    frame = api.samples_frame(store, [run_id], max_points=max_points)
    if frame.empty:
        return frame.assign(t_s=pd.Series(dtype=float))
    return frame.assign(t_s=frame["t"] - frame["t"].min())


def load_start(starts: list[float], ends: list[float], metrics: list[dict]) -> float:
    """When the first benchmark began sending requests: its end less its measured duration. The
    `bench_start` event is when the `vllm bench` process started, which spends seconds importing
    before the first request (10 s on a 2-core machine), so runs would not line up on it."""
    duration = metrics[0].get("duration") if metrics else None
    if ends and isinstance(duration, (int, float)) and 0 < duration <= ends[0] - min(starts):
        return ends[0] - duration
    return min(starts)


def aligned_samples(store: Store, run_ids: list[int], max_points: int = 600) -> pd.DataFrame:
    """Host/server telemetry of several runs on one clock: seconds since each run's first benchmark
    began sending requests (since its first sample when it has no benchmark), plus generated tokens
    per second and `bench_end_s`, when the run's last benchmark ended on that clock (NaN without one)."""
    runs = [api.get_run(store, r) for r in run_ids]
    labels = unique_labels(runs)
    parts = []
    for run in runs:
        frame = api.samples_frame(store, [run.id], max_points=max_points)
        frame = frame[frame["gpu_index"].isna()]
        if frame.empty:
            continue
        phases = api.phases(store, run.id)
        starts = [p.t for p in phases if p.phase == "bench_start"]
        ends = sorted(p.t for p in phases if p.phase == "bench_end")
        t0 = load_start(starts, ends, api.run_metrics(store, run.id)) if starts else frame["t"].min()
        bench_end_s = ends[-1] - t0 if starts and ends else float("nan")
        frame = frame.sort_values("t").assign(label=labels[run.id], t_s=frame["t"] - t0, bench_end_s=bench_end_s)
        dt = frame["t"].diff()
        frame["gen_tok_s"] = (frame["generation_tokens"].diff() / dt).where(dt > 0)
        parts.append(frame)
    if not parts:
        return pd.DataFrame(columns=["run_id", "label", "t_s", "kv_cache_usage_perc", "num_requests_running",
                                     "num_requests_waiting", "gen_tok_s", "bench_end_s"])
    return pd.concat(parts, ignore_index=True)
