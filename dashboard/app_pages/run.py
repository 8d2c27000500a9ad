"""Run: one run, live while it runs; KV capacity, final metrics, downloads, the commands that reproduce it."""

import time
from collections.abc import Callable

import streamlit as st

from dashboard import charts, data, run_view, signals_view
from dashboard.state import PAGES, duration, query_int, run_title, store, when
from runner import api
from runner.errors import ServelabError
from runner.models import LIVE, TERMINAL, RunSource, RunStatus

db = store()
runs = api.list_runs(db)
if not runs:
    st.title("Run")
    st.info("No runs yet: queue one on Launch, or bring existing results in on Import.")
    st.page_link(PAGES["launch"], label="Launch a run →")
    st.stop()
ids = [r.id for r in runs]
wanted = query_int("run")
if wanted not in ids:
    if wanted is not None:
        st.warning(f"There is no run {wanted}; showing the newest. Runs lists them all.")
    wanted = ids[0]
titles = {r.id: run_title(r) for r in runs}
choice = st.sidebar.selectbox("Run", ids, index=ids.index(wanted), format_func=titles.__getitem__)
if choice is None:  # the list is never empty here
    st.stop()
if choice != query_int("run"):
    st.query_params["run"] = str(choice)

run = api.get_run(db, choice)
live = run.status in LIVE
st.title(f"Run #{run.id} — {api.label_of(run)}")
st.caption(run_view.summary_line(run))
if live and st.button("Cancel this run", help="A queued run stops at once, a running one at the worker's next tick."):
    try:
        api.cancel(db, run.id)
        st.rerun()
    except ServelabError as exc:
        st.error(str(exc))


def badge(status: RunStatus) -> None:
    color, icon = data.STATUS_BADGE[status.value]
    st.badge(status.value, color=color, icon=icon)


def kv_card(r) -> None:
    if kv := run_view.kv_card(r):
        with st.container(border=True):
            st.markdown("**KV-cache capacity** (from vLLM's startup log)")
            for col, (name, value, help_) in zip(st.columns(len(kv)), kv):
                col.metric(name, value, help=help_)


@st.fragment(run_every=2 if live else None)
def live_panel() -> None:
    now = api.get_run(db, choice)
    if live and now.status in TERMINAL:
        st.rerun(scope="app")  # finished: show the final page once and stop refreshing
    if live:
        badge(now.status)
    phase = now.status.value if now.phase in ("", now.status.value) else f"{now.status.value} — {now.phase}"
    st.progress(min(max(now.progress, 0.0), 1.0), text=phase)
    st.caption(f"created {when(now.created_at)} · started {when(now.started_at)} · ready {when(now.ready_at)} · "
               f"finished {when(now.finished_at)} · took {duration(now.started_at, now.finished_at)}")
    if now.status == RunStatus.queued:
        ahead = api.queued_ahead(db, now.id)
        st.info(f"Queued; {ahead} run(s) ahead. The worker (`servelab worker`, started by `servelab dashboard`) "
                "claims it when the GPUs it needs are free.")
    if live:
        kv_card(now)
    phases = data.phases_frame(db, now.id)
    if not phases.empty:
        ended = now.status in TERMINAL
        st.plotly_chart(charts.phase_timeline(phases, None if ended else time.time()), key="phases")
    samples = data.run_samples(db, now.id)
    if not samples.empty:
        gpu_rows = samples["gpu_index"].notna().any()
        scraped = samples[["kv_cache_usage_perc", "num_requests_running"]].notna().any().any()
        figs = [charts.kv_usage_chart(samples), charts.requests_chart(samples)] if scraped else []
        if not scraped:
            st.caption("vLLM's /metrics has not been sampled yet (it answers once the server is ready).")
        figs += [charts.gpu_util_chart(samples), charts.gpu_memory_chart(samples)] if gpu_rows \
            else [charts.host_chart(samples)]
        for row in range(0, len(figs), 2):
            for col, (i, fig) in zip(st.columns(2), enumerate(figs[row:row + 2], start=row)):
                col.plotly_chart(fig, key=f"telemetry{i}")
        if not gpu_rows:
            st.caption("No GPU samples: this run used the CPU backend (or NVML was unavailable).")
    log = api.run_files(now).get("server.log")
    if log is not None:
        st.markdown("**Server log** (last 40 lines)")
        st.code(api.log_tail(log, 40) or "(empty)", language="log", height=320, wrap_lines=True)


def outcome() -> None:
    """What the run produced: why it failed, its KV capacity, its metrics and scores."""
    if run.failure_reason:
        first, _, rest = run.failure_reason.partition("\n")
        st.error(f"{'Cancelled' if run.status == RunStatus.cancelled else 'Failed'}: {first}")
        if rest:
            st.code(rest, language="log")
    kv_card(run)
    if (metrics := api.run_metrics(db, run.id)) and (head := api.run_headline(db, run.id)):
        st.subheader("Results")
        if head.points > 1:
            st.markdown(f"**{head.text}** — the cards show that load (mean of its {head.repeats} result(s)); "
                        "every load in the table below, never averaged together.")
        else:
            st.caption(f"At {head.point}" + (f", mean of {head.repeats} repeats" if head.repeats > 1 else "") + ".")
        for col, (name, value) in zip(st.columns(6), run_view.headline(head.metrics)):
            col.metric(name, value)
        if head.points > 1:
            st.dataframe(run_view.loads_table(api.run_points(db, run.id)), hide_index=True, key="loads_table")
        with st.expander(f"All benchmark metrics ({len(metrics)} execution(s))"):
            st.dataframe(run_view.metrics_table(metrics, api.result_loads(db, run.id)), hide_index=True)
        for stop in api.load_sweep_stops(db, run.id):
            st.info(f"Load sweep stopped early: {stop}.", icon=":material/speed:")
        signals_view.run_windows(db, run.id)
    if scores := api.eval_results(db, run.id):
        st.subheader("Accuracy")
        cards = run_view.eval_metrics(scores)
        for row in range(0, len(cards), 4):
            for col, (name, value, detail, help_) in zip(st.columns(4), cards[row:row + 4]):
                col.metric(name, value, help=help_)
                col.caption(detail)
        st.caption("As lm-eval prints it:")
        st.code(api.eval_table(db, run.id), language=None)


if run.source == RunSource.imported:
    badge(run.status)
    held = [f"{n} {what}" for n, what in ((len(api.run_metrics(db, run.id)), "benchmark result(s)"),
                                          (len(api.eval_results(db, run.id)), "accuracy score(s)")) if n]
    st.info(f"Imported results ({', '.join(held) or run.phase}); there was no server to watch. "
            "Add more files to this run on Import.")
    outcome()
elif live:
    live_panel()
else:
    badge(run.status)
    outcome()
    st.subheader("Timeline and telemetry")
    live_panel()

if run.status in TERMINAL:
    st.subheader("Downloads")
    files = api.run_files(run)
    cols = st.columns(4)
    downloads: list[tuple[str, Callable[[], bytes | str], str]] = [
        (name, path.read_bytes, name) for name, path in files.items()
    ]
    if not api.samples_frame(db, [run.id], max_points=1).empty:
        downloads.append(("samples.csv (telemetry)", lambda: api.frame_to_csv(api.samples_frame(db, [run.id])),
                          f"run{run.id}-samples.csv"))
    downloads.append(("results.csv", lambda: api.frame_to_csv(api.results_frame(db, [run.id])),
                      f"run{run.id}-results.csv"))
    for i, (label, payload, file_name) in enumerate(downloads):
        cols[i % 4].download_button(label, payload, file_name=file_name, key=f"dl{i}", on_click="ignore")

commands = run_view.reproduce(run)
if commands:
    st.subheader("Reproduce")
    for title, (text, lang) in commands.items():
        # a line rebuilt by today's code stands out: it may hold flags this run never had
        st.caption(title.replace(api.RE_RENDERED, f":orange[:material/warning: {api.RE_RENDERED}]"))
        st.code(text, language=lang, wrap_lines=True)
