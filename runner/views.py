"""What a person reads in a terminal: `servelab runs` in 120 columns, `servelab show` (and its `--json`)."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from runner.api import label_of, load_sweep_stops, one_line, result_loads, run_commands, run_headline
from runner.config import parallel_label
from runner.errors import ServelabError
from runner.store import Store

_RUNS_TEXT = [("ID", 4, ">"), ("STATUS", 11, "<"), ("LABEL", 16, "<"), ("CONFIG", 8, "<"), ("LOAD", 11, "<"),
              ("OUT TOK/S", 9, ">"), ("REQ/S", 6, ">"), ("TTFT MS", 9, ">"), ("TPOT MS", 7, ">"), ("KV TOKENS", 9, ">"),
              ("CREATED", 11, "<")]


SWEEP_NOTE = "LOAD `16/s of 4`: a load sweep's peak-throughput load of its 4 loads, never an average (show ID: each)"


def _swept(loads: Any) -> bool:
    return loads is not None and not pd.isna(loads) and loads > 1


def _load_cell(loads: Any, at: Any) -> str:
    """The load a run's numbers are from, short: `16/s`, `c=64`; `16/s of 4` for a load sweep of 4 loads
    (its numbers are its peak-throughput load's, never a mean across loads)."""
    if not isinstance(at, str) or not at:
        return ""
    short = at.replace(" req/s", "/s").replace("concurrency ", "c=")
    return f"{short} of {loads}" if _swept(loads) else short


def _cell(value: Any, fmt: str, width: int = 9) -> str:
    """`value` formatted; blank when unknown; no decimals from 1,000 on, and k/M/G where even that is wider
    than `width` (a number is never cut: 134,554,560 once read `134,554,5`)."""
    if value is None or (isinstance(value, float) and pd.isna(value)) or value is pd.NaT:
        return ""
    text = f"{value:,.0f}" if abs(value) >= 1000 else fmt.format(value)
    if len(text) <= width:
        return text
    div, suffix = next((d, s) for d, s in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")) if abs(value) >= d)
    return f"{value / div:,.1f}{suffix}"


def runs_text(frame: pd.DataFrame, width: int = 120) -> str:
    """`runs_table` as fixed columns within `width`: rounded numbers, blanks for what is unknown, one line a
    run, the failure reason cut to what is left of the line."""
    head = " ".join(f"{name:{align}{w}}" for name, w, align in _RUNS_TEXT)
    lines = [(head + " REASON")[:width]]
    for r in frame.to_dict("records"):
        tp, dcp = r.get("tensor_parallel_size"), r.get("decode_context_parallel_size")
        config = "" if tp is None or pd.isna(tp) else parallel_label(int(tp), int(dcp) if dcp and dcp > 1 else 1)
        created = r.get("created_at")
        cells = [str(r["id"]), r["status"], str(r.get("label") or ""), config,
                 _load_cell(r.get("loads"), r.get("metrics_at")), _cell(r.get("output_throughput"), "{:,.1f}"),
                 _cell(r.get("request_throughput"), "{:.2f}", 6),
                 _cell(r.get("median_ttft_ms"), "{:,.1f}"), _cell(r.get("median_tpot_ms"), "{:.2f}", 7),
                 _cell(r.get("kv_cache_tokens"), "{:,.0f}"),
                 "" if created is None or pd.isna(created) else pd.Timestamp(created).strftime("%m-%d %H:%M")]
        text = " ".join(f"{c[:w]:{align}{w}}" for c, (_, w, align) in zip(cells, _RUNS_TEXT))
        reason = r.get("failure_reason")
        reason = str(one_line(reason)) if isinstance(reason, str) else ""
        room = width - len(text) - 1
        if reason and room > 1:
            text += " " + (reason if len(reason) <= room else reason[:room - 1] + "…")
        lines.append(text.rstrip())
    if "loads" in frame and frame["loads"].map(_swept).any():
        lines.append(SWEEP_NOTE)
    return "\n".join(lines)


def run_record(store: Store, run_id: int) -> dict[str, Any]:
    """One run as plain JSON-able values: every stored field, its bench metrics and eval scores."""
    run = store.get_run(run_id)
    out = {k: v for k, v in run.model_dump(mode="json").items() if v not in (None, "")}
    for key in ("spec_json", "serve_argv_json", "commands_json", "env_json", "gpu_ids_json", "gpu_inventory_json"):
        if key in out:
            out[key.removesuffix("_json")] = json.loads(out.pop(key))
    out["bench"] = store.run_metrics(run_id)
    if stops := load_sweep_stops(store, run_id):
        out["load_sweep_stopped"] = stops
    out["eval"] = [s.model_dump(exclude={"id", "run_id"}) for s in store.eval_results(run_id)]
    return out


_SHOW_METRICS = [("completed", "requests", "{:,.0f}"), ("failed", "failed", "{:,.0f}"), ("duration", "s", "{:,.1f}"),
                 ("output_throughput", "out tok/s", "{:,.1f}"), ("request_throughput", "req/s", "{:,.2f}"),
                 ("median_ttft_ms", "median TTFT ms", "{:,.1f}"), ("median_tpot_ms", "median TPOT ms", "{:,.2f}"),
                 ("median_itl_ms", "median ITL ms", "{:,.2f}"), ("p99_e2el_ms", "P99 E2EL ms", "{:,.1f}")]


def run_text(store: Store, run_id: int) -> str:
    """One run for a person: state, launch, times, KV capacity, commands, headline metrics, accuracy, reason."""
    run = store.get_run(run_id)
    lines = [f"run {run.id} · {run.status.value} · {label_of(run)}" + (f" · {run.phase}" if run.phase and
                                                                       run.phase != run.status.value else "")]

    def field(name: str, value: str) -> None:
        lines.append(f"{name:<13}{value}")

    field("source", run.source.value + (f", sweep #{run.sweep_id} ({run.sweep_cell})" if run.sweep_id else ""))
    if run.model:
        field("model", run.model)
    if run.tensor_parallel_size:
        par = [f"TP{run.tensor_parallel_size}"] + [f"{n}{v}" for n, v in (
            ("DCP", run.decode_context_parallel_size), ("PP", run.pipeline_parallel_size),
            ("DP", run.data_parallel_size)) if v and v > 1]
        where = [f"vLLM {run.vllm_version}" if run.vllm_version else "", f"host {run.host}" if run.host else "",
                 f"port {run.port}" if run.port else ""]
        field("launch", " ".join(par) + "".join(f", {w}" for w in where if w))
    times = [f"created {run.created_at:%Y-%m-%d %H:%M:%S} UTC"]
    if run.started_at and run.ready_at:
        times.append(f"ready after {(run.ready_at - run.started_at).total_seconds():.0f} s")
    if run.started_at and run.finished_at:
        times.append(f"finished after {(run.finished_at - run.started_at).total_seconds():.0f} s")
    field("times", ", ".join(times))
    if run.kv_cache_tokens is not None or run.kv_cache_gib is not None:
        kv = [f"{run.kv_cache_tokens:,} tokens" if run.kv_cache_tokens else "",
              f"{run.kv_cache_gib:.2f} GiB" if run.kv_cache_gib else "",
              f"max concurrency {run.max_concurrency:,.2f}x" if run.max_concurrency else "",
              f"DCP x{run.dcp_multiplier}" if run.dcp_multiplier and run.dcp_multiplier > 1 else ""]
        field("KV capacity", ", ".join(k for k in kv if k))
    if run.run_dir:
        field("folder", run.run_dir)
    try:
        commands = run_commands(run)
    except (ValueError, ServelabError) as exc:  # a stored spec this version cannot read
        commands = {"stored spec": f"unreadable here: {exc}"}
    for title, text in commands.items():
        lines += ["", f"{title}:", "  " + text.replace("\n", "\n  ")]
    results = store.bench_results(run_id)
    if results:
        head = run_headline(store, run_id)
        lines += ["", "benchmark" + (f" ({len(results)} executions)" if len(results) > 1 else "") + ":"]
        for i, (br, load) in enumerate(zip(results, result_loads(store, run_id), strict=True)):
            m = json.loads(br.metrics_json)
            cells = [f"{fmt.format(m[k])} {name}" for k, name, fmt in _SHOW_METRICS if m.get(k) is not None]
            lines.append(("  " if len(results) == 1 else f"  #{i + 1} ") + f"at {load}: " + ", ".join(cells))
        if head is not None and head.points > 1:
            lines.append(f"  {head.text} ({head.metrics.get('output_throughput') or 0:,.1f} out tok/s); "
                         "each load's numbers stand alone, never averaged")
        lines += [f"  load sweep stopped early: {stop}" for stop in load_sweep_stops(store, run_id)]
    scores = store.eval_results(run_id)
    if scores:
        lines += ["", "accuracy:"]
        lines += [f"  {e.task} {e.filter} {e.metric} {e.value:.4f}" + (f" ± {e.stderr:.4f}" if e.stderr is not None
                                                                      else "") for e in scores]
    if run.failure_reason:
        lines += ["", "reason:", "  " + run.failure_reason.strip().replace("\n", "\n  ")]
    return "\n".join(lines)
