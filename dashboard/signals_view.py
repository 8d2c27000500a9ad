"""Compare sections of issue 15: what each benchmark window measured, and the output check.

Only `runner.api` (and pure value modules) are called; each section is one function the Compare page places.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import streamlit as st

from runner import api

_WINDOW_HEADERS = {
    "label": "Run", "load": "Load", "repeat": "Repeat", "prefix_cache_state": "Prefix cache",
    "prefix_cache_hit_pct": "Hit rate (%)",
    "preemptions": "Preemptions", "finished_stop": "Finished: stop", "finished_length": "Finished: length",
    "finished_abort": "Finished: abort", "finished_error": "Finished: error",
    "est_p50_queue_ms": "Queue P50 (ms, est.)", "est_p99_queue_ms": "Queue P99 (ms, est.)",
    "est_p50_prefill_ms": "Prefill P50 (ms, est.)", "est_p99_prefill_ms": "Prefill P99 (ms, est.)",
    "est_p50_decode_ms": "Decode P50 (ms, est.)", "est_p99_decode_ms": "Decode P99 (ms, est.)",
    "spec_decode_acceptance_pct": "Spec-decode acceptance (%)", "j_per_output_token": "Energy (J/output tok)",
    "mean_power_w_per_gpu": "Mean power per GPU (W)", "output_tok_per_s_per_w": "Output tok/s per W",
    "energy_source": "Energy from",
}


_DECIMALS = {"j_per_output_token": 4, "prefix_cache_hit_pct": 1, "spec_decode_acceptance_pct": 1,
             "mean_power_w_per_gpu": 1, "output_tok_per_s_per_w": 2}


def _cell(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "—"
    if not isinstance(value, (int, float)):
        return str(value)
    decimals = _DECIMALS.get(key, 1 if key.endswith("_ms") else 0)
    return f"{value:.{decimals}f}"


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def estimate_cell(value: Any, lo: Any, hi: Any) -> str:
    """A histogram estimate with the bucket it lies in: `≤ 300` (every rank in the lowest bucket: an upper
    bound), `412 (300–500)` (interpolated inside that bucket), `≥ 20000` (in +Inf: a lower bound)."""
    if _blank(value):
        return "—"
    if _blank(lo):
        return f"{value:.1f}"  # stored before the bounds were kept
    if lo == 0:
        return f"≤ {value:.0f}"
    if _blank(hi):
        return f"≥ {value:.0f}"
    return f"{value:.1f} ({lo:.0f}–{hi:.0f})"


def window_table(frame: pd.DataFrame) -> pd.DataFrame:
    """`api.window_frame` as shown (text cells): the load as text, columns with units, each estimate with its
    bucket's bounds (`estimate_cell`), all-blank columns dropped, blanks "—"."""
    bounds = {c for k in api.ESTIMATE_KEYS for c in (f"{k}_lo_ms", f"{k}_hi_ms")}
    keep = [c for c in frame.columns if c not in ("run_id", "load_kind", "load_text", *bounds)
            and (c in ("label", "load", "repeat", "prefix_cache_state") or frame[c].notna().any())]
    cells: dict[str, list[str]] = {}
    for c in keep:
        if c == "load":  # with what tells a run's workloads apart (the cap of each of three loads at 40 req/s)
            cells[c] = ["—" if _blank(v) else str(t) for v, t in zip(frame["load"], frame["load_text"], strict=True)]
        elif c.startswith("est_p"):
            base = c.removesuffix("_ms")
            cells[c] = [estimate_cell(v, lo, hi) for v, lo, hi in
                        zip(frame[c], frame[f"{base}_lo_ms"], frame[f"{base}_hi_ms"], strict=True)]
        else:
            cells[c] = [_cell(c, v) for v in frame[c]]
    return pd.DataFrame(cells, columns=keep).rename(columns=_WINDOW_HEADERS)


def window_section(db: Any, run_ids: list[int]) -> None:
    """Per bench execution: its prefix-cache state, server counters, histogram estimates, energy."""
    frame = api.window_frame(db, run_ids)
    st.header("Server counters, cache state and energy per benchmark")
    if frame.empty:
        st.caption("No benchmark results for these runs.")
        return
    st.dataframe(window_table(frame), hide_index=True)
    notes = [("Counters are the differences of vLLM's /metrics between the start and end of each benchmark, one "
              "row per load. Queue/prefill/decode percentiles are estimates from histogram buckets, shown with the "
              "bucket they lie in: ≤ X means every rank fell in the lowest bucket (below X ms, no closer figure "
              "exists); ≥ X means beyond the last finite bucket.")]
    if frame["j_per_output_token"].isna().all():
        notes.append("Energy is blank: no GPU energy reading (CPU runs and imported results have none).")
    if (~frame["prefix_cache_state"].isin(["cold", "warm"])).any():
        notes.append("A prefix-cache state of unknown means the benchmark ran as-is (after whatever came before "
                     "it) or was imported; set prefix-cache: cold or warm to control it.")
    st.caption(" ".join(notes))
    st.download_button("Benchmark windows (CSV)", api.frame_to_csv(frame), "compare-windows.csv", "text/csv",
                       on_click="ignore", key="windows_csv")


def run_windows(db: Any, run_id: int) -> None:
    """On a run's page: each benchmark's cache state, hit rate, counters and energy; its output-check answers."""
    frame = api.window_frame(db, [run_id])
    if not frame.empty:
        with st.expander("Server counters, cache state and energy per benchmark"):
            st.dataframe(window_table(frame).drop(columns=["Run"]), hide_index=True)
    answers = api.output_answers(db, run_id)
    if answers:
        with st.expander(f"Output check ({len(answers)} fixed prompts, greedy)"):
            st.dataframe(pd.DataFrame(answers), hide_index=True)


def energy_curves_section(db: Any, run_ids: list[int]) -> None:
    """Energy per output token and tok/s per watt against load, beside the load curves; blank on the CPU."""
    from dashboard import charts

    curves = api.load_curves(db, run_ids)
    if curves.empty:
        return
    if curves["j_per_output_token"].isna().all():
        st.caption("Energy against load: no GPU energy readings for these runs (CPU runs and imported results "
                   "have none).")
        return
    st.plotly_chart(charts.energy_curves_chart(curves), key="energy_curves")


def output_check_section(db: Any, baseline: int, candidates: list[int], labels: dict[int, str]) -> None:
    """Per candidate: its share of answers identical to the baseline's, flagged below the threshold."""
    st.header("Output check")
    for cand in candidates:
        agreement = api.compare_outputs(db, baseline, cand)
        line = api.output_check_summary(agreement, labels[baseline], labels[cand])
        if agreement is None:
            st.caption(line)
        elif agreement.flagged:
            st.error(line, icon=":material/rule:")
        else:
            st.success(line, icon=":material/check:")
    st.caption("Every run answers the same fixed prompts greedily (temperature 0), one at a time; answers are "
               "compared token by token. Set output-check: off in a run spec to skip it.")
