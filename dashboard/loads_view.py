"""Compare's load section: the SLO picker, load curves with knees, and the launches ranked under the SLO.

Placed by `app_pages/compare.py`; data through `runner.api`, figures from `dashboard.charts`.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from dashboard import charts
from runner import api
from runner.errors import ServelabError


def slo_inputs() -> list[str]:
    """The SLO as `runner.slo` reads it: P99 TTFT and P99 TPOT bounds, or vLLM's `--goodput` form instead."""
    c1, c2, c3 = st.columns([1, 1, 2])
    ttft = c1.number_input("P99 TTFT ≤ (ms)", min_value=0.0, value=2000.0, step=100.0, key="slo_ttft")
    tpot = c2.number_input("P99 TPOT ≤ (ms)", min_value=0.0, value=100.0, step=5.0, key="slo_tpot")
    goodput = c3.text_input("…or vLLM's --goodput form", key="slo_goodput", placeholder="ttft:500 tpot:50",
                            help="METRIC:MS pairs (ttft, tpot, itl, e2el), read as P99 bounds; replaces the two "
                                 "fields on the left. METRIC:STAT<=MS (e.g. tpot:median<=20) works too.")
    return goodput.split() if goodput.strip() else [f"ttft:p99<={_ms(ttft)}", f"tpot:p99<={_ms(tpot)}"]


def _ms(value: float) -> str:
    """A bound as the SLO parser reads it: plain digits, never `1e+06`."""
    return f"{value:.3f}".rstrip("0").rstrip(".")


def render(db: Any, chosen: list[int]) -> None:
    st.header("Load curves and SLO")
    slos = slo_inputs()
    try:
        curves = api.load_curves(db, chosen, slos)
        recs = api.recommend(db, slos, chosen)
    except ServelabError as exc:
        st.error(str(exc))
        return
    if curves.empty:
        st.caption("No benchmark results for these runs. A load sweep gives a curve: request-rate: [2, 8, 32, inf] "
                   "in the bench section runs each load on the same server.")
        return
    known = curves["gpus"].notna().all()
    per_gpu = st.toggle("Per GPU", value=bool(known), disabled=not known, key="curves_per_gpu",
                        help="Output tok/s divided by the run's GPUs (TP×PP×DP), so launches of different sizes "
                             "compare; off for total output tok/s.")
    st.plotly_chart(charts.load_curves_chart(curves, per_gpu=per_gpu), key="load_curves")
    st.caption("One line per run through its loads (the mean of repeats at each). Star: the knee, the highest "
               "load whose P99s meet the SLO above.")
    st.markdown("**Ranking under the SLO**")
    st.dataframe(api.recommendations_table(recs, slos), hide_index=True, key="slo_ranking")
    st.caption("Output tok/s per GPU at each run's best load within the SLO (its knee, unless the server serves "
               "less there: see the note), best first; a 95 % t-interval where that load was repeated. "
               "`servelab recommend " + " ".join(f"--slo '{s}'" for s in slos) + "` prints the same.")
    for run_id in chosen:
        for stop in api.load_sweep_stops(db, run_id):
            st.caption(f"Run #{run_id}'s load sweep stopped early: {stop}.")
    st.download_button("Load curves (CSV)", api.frame_to_csv(curves), "compare-load-curves.csv", "text/csv",
                       on_click="ignore")
