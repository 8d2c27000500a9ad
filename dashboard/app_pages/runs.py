"""Runs: every run with its state and headline metrics; filter, select to compare or open, cancel, delete."""

from datetime import UTC, datetime

import streamlit as st

from dashboard import data
from dashboard.state import PAGES, store, tz, when
from runner import api
from runner.errors import ServelabError
from runner.models import LIVE, TERMINAL, RunStatus

ss = st.session_state
db = store()

st.title("Runs")
if worker_errors := api.worker_errors(db):
    newest = worker_errors[0]
    st.warning(f"**The worker caught {len(worker_errors)} error(s) in the last hour** (its console has the "
               f"tracebacks). Newest, at {when(datetime.fromtimestamp(newest.t, UTC))}: {newest.message}",
               icon=":material/warning:")
everything = api.runs_frame(db, with_metrics=False)
if everything.empty:
    st.info("No runs yet: queue one on Launch, or bring existing results in on Import.")
    st.page_link(PAGES["launch"], label="Launch a run →")
    st.page_link(PAGES["import"], label="Import results →")
    st.stop()

f1, f2, f3, f4 = st.columns(4)


def _new_selection() -> None:
    """Selections are row positions: start a fresh one whenever the rows change."""
    ss["runs.gen"] = ss.get("runs.gen", 0) + 1


statuses = f1.multiselect("Status", [s.value for s in RunStatus], key="runs.status", on_change=_new_selection)
models = f2.multiselect("Model", sorted(everything["model"].dropna().unique()), key="runs.model",
                        on_change=_new_selection)
sources = f3.multiselect("Source", ["launched", "imported"], key="runs.source", on_change=_new_selection)
text = f4.text_input("Label contains", key="runs.text", on_change=_new_selection)
live_at_load = everything["status"].isin(LIVE).any()


def _filtered():
    frame = api.runs_frame(db)
    keep = frame["status"].isin(statuses) if statuses else frame["status"].notna()
    if models:
        keep &= frame["model"].isin(models)
    if sources:
        keep &= frame["source"].isin(sources)
    if text:
        keep &= frame["label"].str.contains(text, case=False, regex=False)
    return frame[keep].sort_values("id")  # oldest first: new runs append, selected rows keep their place


def _act(label: str, fn, run_ids: list[int]) -> None:
    for run_id in run_ids:
        try:
            fn(db, run_id)
        except ServelabError as exc:
            st.error(str(exc))
    ss["runs.notice"] = f"{label}: {', '.join(f'#{i}' for i in run_ids)}"


@st.fragment(run_every=3 if live_at_load else None)
def table() -> None:
    frame = _filtered()
    if live_at_load and not frame["status"].isin(LIVE).any():
        st.rerun(scope="app")  # the last live run ended: stop refreshing
    view = data.runs_view(frame)
    view["Started"] = view["Started"].dt.tz_convert(tz()).dt.tz_localize(None)
    cfg = st.column_config
    # a missing value (no results yet) reads "—" as on the other pages, not Streamlit's grey "None"; the metric
    # columns stay numbers, so they still sort as numbers
    event = st.dataframe(view, key=f"runs.table.{ss.get('runs.gen', 0)}", on_select="rerun",
                         selection_mode="multi-row", hide_index=True, placeholder="—",
                         column_config={
                             "Output tok/s": cfg.NumberColumn(format="%.2f"), "Req/s": cfg.NumberColumn(format="%.2f"),
                             "Median TTFT (ms)": cfg.NumberColumn(format="%.1f"),
                             "Median TPOT (ms)": cfg.NumberColumn(format="%.2f"),
                             "KV tokens": cfg.NumberColumn(format="localized"),
                             "Started": cfg.DatetimeColumn(format="YYYY-MM-DD HH:mm:ss"),
                             "Duration (s)": cfg.NumberColumn(format="%.0f"),
                             "Progress": cfg.ProgressColumn(min_value=0, max_value=1, format="percent"),
                             "Open": cfg.LinkColumn(display_text="open"),
                             "Model": cfg.TextColumn(width="medium"), "Label": cfg.TextColumn(width="medium"),
                         })  # fmt: skip
    shown = api.runs_table(db)
    st.download_button("Download this table (CSV)", api.frame_to_csv(shown[shown["id"].isin(view["ID"])]),
                       "runs.csv", "text/csv")
    chosen = view.iloc[list(event.selection.rows)]["ID"].tolist() if event.selection.rows else []
    if not chosen:
        st.caption("Select rows (the boxes on the left) to open, compare, cancel or delete runs.")
        return
    status = dict(zip(frame["id"], frame["status"]))
    st.caption(f"Selected: {', '.join(f'#{i}' for i in chosen)}")
    b1, b2, b3, b4 = st.columns(4)
    if b1.button("Open", disabled=len(chosen) != 1, help="Open the selected run."):
        st.switch_page(PAGES["run"], query_params={"run": chosen[0]})
    if b2.button("Compare", disabled=len(chosen) < 2, type="primary",
                 help="The oldest selected run is the baseline; change it on Compare."):
        first, *rest = sorted(chosen)
        st.switch_page(PAGES["compare"], query_params={"a": first, "b": ",".join(map(str, rest))})
    cancellable = [i for i in chosen if status[i] in LIVE]
    if b3.button(f"Cancel ({len(cancellable)})", disabled=not cancellable):
        _act("Cancel requested", api.cancel, cancellable)
        st.rerun(scope="app")
    deletable = [i for i in chosen if status[i] in {s.value for s in TERMINAL}]
    if b4.button(f"Delete ({len(deletable)})", disabled=not deletable, help="Asks for confirmation first."):
        ss["runs.confirm_delete"] = deletable
    pending = ss.get("runs.confirm_delete")
    if pending:
        st.warning(f"Delete {', '.join(f'#{i}' for i in pending)} with their results, telemetry and files? "
                   "This cannot be undone.")
        y, n = st.columns(2)
        if y.button("Yes, delete", type="primary"):
            ss["runs.confirm_delete"] = None
            _act("Deleted", api.delete_run, pending)
            _new_selection()
            st.rerun(scope="app")
        if n.button("Keep them"):
            ss["runs.confirm_delete"] = None
            st.rerun(scope="fragment")


if ss.get("runs.notice"):
    st.success(ss.pop("runs.notice"))
table()
