"""Compare sections of issue 15: what each benchmark window measured, and the output check.

Only `runner.api` (and pure value modules) are called; each section is one function the Compare page places.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from runner import api

_WINDOW_HEADERS = {
    "label": "Run", "repeat": "Repeat", "prefix_cache_state": "Prefix cache", "prefix_cache_hit_pct": "Hit rate (%)",
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


def window_table(frame: pd.DataFrame) -> pd.DataFrame:
    """`api.window_frame` as shown (text cells): columns with units, all-blank columns dropped, blanks "—"."""
    keep = [c for c in frame.columns if c != "run_id" and (c in ("label", "repeat", "prefix_cache_state")
                                                            or frame[c].notna().any())]
    shown = pd.DataFrame({c: [_cell(c, v) for v in frame[c]] for c in keep})
    return shown.rename(columns=_WINDOW_HEADERS)


def window_section(db: Any, run_ids: list[int]) -> None:
    """Per bench execution: its prefix-cache state, server counters, histogram estimates, energy."""
    frame = api.window_frame(db, run_ids)
    st.header("Server counters, cache state and energy per benchmark")
    if frame.empty:
        st.caption("No benchmark results for these runs.")
        return
    st.dataframe(window_table(frame), hide_index=True)
    notes = [("Counters are the differences of vLLM's /metrics between the start and end of each benchmark; "
              "queue/prefill/decode percentiles are estimates from histogram buckets (as wide as the bucket).")]
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
