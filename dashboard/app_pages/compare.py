"""Compare: a baseline and candidates — gain tables, grouped bars, KV capacity, accuracy, time series, Pareto."""

import pandas as pd
import streamlit as st

from dashboard import charts, data, loads_view, signals_view, tables
from dashboard.state import PAGES, query_int, query_ints, run_title, store
from runner import api
from runner.errors import ServelabError

db = store()


@st.cache_data(ttl=3600, show_spinner="Bootstrapping the confidence intervals…", max_entries=64)
def comparison(_db, baseline: int, candidate: int, versions: tuple) -> api.Comparison:
    """The comparison of two runs, recomputed only when either run changes (`versions`)."""
    return api.compare_report(_db, baseline, candidate)


@st.cache_data(ttl=3600, show_spinner="Bootstrapping the latency intervals…", max_entries=64)
def intervals(_db, run_ids: list[int], versions: tuple) -> pd.DataFrame:
    return data.latency_intervals(_db, run_ids)


def version(run_id: int) -> tuple:
    run = db.get_run(run_id)
    return str(db.url), run.id, run.status.value, run.finished_at, len(db.bench_results(run_id))


st.title("Compare runs")
runs = sorted(api.list_runs(db), key=lambda r: r.id)
if len(runs) < 2:
    st.info("Comparing needs two runs with results: launch them, or import the seed's bench outputs.")
    st.page_link(PAGES["import"], label="Import results →")
    st.stop()
ids = [r.id for r in runs]
titles = {r.id: run_title(r) for r in runs}
pair = api.default_pair(db)  # the two newest succeeded runs: never a failed run as the baseline
a = query_int("a")
a = a if a in ids else pair[0] if pair else ids[0]
wanted = [b for b in query_ints("b") if b in ids and b != a] or (
    [pair[1]] if pair and pair[1] != a else [i for i in ids if i != a][:1])
c1, c2 = st.columns([1, 2])
baseline = c1.selectbox("Baseline", ids, index=ids.index(a), format_func=titles.__getitem__)
candidates = c2.multiselect("Candidates", [i for i in ids if i != baseline],
                            default=[b for b in wanted if b != baseline], format_func=titles.__getitem__)
st.query_params.update({"a": str(baseline), "b": ",".join(map(str, candidates))})
if not candidates:
    st.info("Pick at least one candidate to compare with the baseline.")
    st.stop()
chosen = [baseline, *candidates]

summary = data.bench_summary(db, chosen)
benched = summary[summary["bench_repeats"] > 0]
st.header("Gain tables")
headline = st.toggle("Only the seed's headline rows", help="Request and output throughput, mean and median TTFT.")
if baseline not in set(benched["run_id"]):
    st.info(f"The baseline {titles[baseline]} has no benchmark results; pick one that has for gain tables.")
no_bench = [titles[c] for c in candidates if c not in set(benched["run_id"])]
if no_bench:
    st.caption(f"No benchmark results, so no gain table (see Accuracy and the other sections): {', '.join(no_bench)}.")
for cand in (c for c in candidates if c in set(benched["run_id"]) and baseline in set(benched["run_id"])):
    try:
        report = comparison(db, baseline, cand, (version(baseline), version(cand)))
    except ServelabError as exc:
        st.info(f"#{cand} vs #{baseline}: {exc}")
        continue
    a_label, b_label = report.a_label, report.b_label
    st.subheader(f"{b_label} vs {a_label}")
    for note in report.notes:
        st.info(note[0].upper() + note[1:] + ".", icon=":material/info:")
    if not report.bench:
        st.caption("No load in common, so no gain table: a load sweep's loads are compared only with the same load.")
    for i, gain in enumerate(report.bench):
        rows = tables.pick_rows(gain.rows, headline)
        many = len(report.bench) > 1
        st.markdown(f"**At {gain.title}**" + (f" — load {i + 1} of {len(report.bench)}" if many else "")
                    + f" · {gain.n_a} vs {gain.n_b} result(s)")
        for note in gain.flags:
            st.warning(note[0].upper() + note[1:] + ".", icon=":material/flag:")
        shown, markdown = st.tabs(["Table", "Markdown"])
        shown.table(tables.gain_styler(rows, a_label, b_label), hide_index=True)
        shown.download_button(f"Gain table at {gain.load_text} (CSV)", api.gain_csv(report, gain, rows),
                              f"gain-{baseline}-vs-{cand}-{i + 1}.csv", "text/csv", key=f"gain{cand}-{i}",
                              on_click="ignore")
        markdown.code(api.render_gain_table(rows, a_label, b_label, "markdown"), language="markdown")
    if report.bench:
        st.caption("One table per load both runs measured: repeats of a load are pooled, loads never. Green: the "
                   "candidate is better; red: worse (higher throughput, lower latency), and only where the 95 % "
                   "interval of the change excludes 0 (beyond noise). Intervals: a bootstrap over the requests of a "
                   "single run (latency statistics), Welch across repeats (2+ on both sides). Improvement(%) is "
                   "signed so that positive is always better. What the flags mean: docs/measurement.md.")

if len(benched):
    st.header("Throughput and latency")
    st.plotly_chart(charts.throughput_bars(benched), key="throughput")
    ids = [int(i) for i in benched["run_id"]]
    st.plotly_chart(charts.latency_bars(benched, intervals(db, ids, tuple(version(i) for i in ids))), key="latency")
    swept = benched[benched["loads"] > 1]
    if len(swept):
        st.caption("Load sweeps are shown at their peak-throughput load (never a mean across loads): " + ", ".join(
            f"{label} at {at} of {n} loads" for label, at, n in zip(swept["label"], swept["metrics_at"],
                                                                   swept["loads"], strict=True))
                   + ". The load curves below show every load.")
    st.download_button("Metrics of these runs (CSV)", api.frame_to_csv(summary), "compare-metrics.csv", "text/csv",
                       on_click="ignore")

st.header("KV-cache capacity")
if summary["kv_cache_tokens"].notna().any() or summary["kv_cache_gib"].notna().any():
    st.plotly_chart(charts.kv_capacity_bars(summary), key="kv")
else:
    st.caption("No KV capacity recorded for these runs: launched runs record it at startup; for imported results, "
               "import the server's startup log.")


def accuracy(evals) -> None:
    """Per candidate: its scores against the baseline's with the 2σ check; then all runs' scores, and
    accuracy against output throughput."""
    scored = set(evals["run_id"])
    if baseline not in scored:
        st.info(f"The baseline {titles[baseline]} has no accuracy results; pick one that has, or add its lm-eval "
                "output to it on Import.")
    unscored = [titles[c] for c in candidates if c not in scored]
    if unscored:
        st.caption(f"No accuracy results: {', '.join(unscored)}.")
    compared = []
    for cand in (c for c in candidates if c in scored and baseline in scored):
        rows = api.compare_accuracy(db, baseline, cand)
        a_label, b_label = labels[baseline], labels[cand]
        st.subheader(f"Accuracy: {b_label} vs {a_label}")
        if not rows:
            st.caption("No task, filter and metric in common with the baseline.")
            continue
        drops = [r for r in rows if r["flagged"]]
        for r in drops:
            st.error(f"{r['task']} {r['filter']} ({r['metric']}) drops by {-r['delta']:.4f}, more than twice the "
                     f"combined stderr ({2 * r['stderr']:.4f}).", icon=":material/trending_down:")
        if not drops:
            st.badge("no drop beyond 2σ", color="green", icon=":material/check:")
        frame = tables.accuracy_frame(rows, a_label, b_label)
        shown, markdown = st.tabs(["Table", "Markdown"])
        shown.table(tables.accuracy_styler(frame), hide_index=True)
        markdown.code(api.render_accuracy(rows, a_label, b_label), language="markdown")
        compared.append(pd.DataFrame(rows).assign(baseline=a_label, candidate=b_label))
    if compared:
        st.caption("Combined stderr = √(stderr_a² + stderr_b²); a drop larger than twice it is flagged, a smaller "
                   "change is within the noise of the sample.")
        st.download_button("Accuracy comparison (CSV)", api.frame_to_csv(pd.concat(compared)),
                           "compare-accuracy.csv", "text/csv", on_click="ignore")
    st.plotly_chart(charts.accuracy_chart(evals), key="accuracy")

    filters = list(dict.fromkeys(evals["filter"]))
    tasks = list(dict.fromkeys(evals["task"]))
    c1, c2 = st.columns(2)
    filt = c1.selectbox("Filter for the chart below", filters,
                        index=filters.index("strict-match") if "strict-match" in filters else 0,
                        help="lm-eval's answer extraction: strict-match wants the exact answer format, "
                             "flexible-extract takes the last number.")
    task = c2.selectbox("Task", tasks) if len(tasks) > 1 else tasks[0]
    points = charts.accuracy_throughput_frame(summary, evals, filt, task)
    if points.empty:
        st.caption("Accuracy vs output throughput needs runs with both a benchmark and this score.")
    else:
        st.plotly_chart(charts.accuracy_throughput_chart(points), key="accuracy_throughput")
    left_out = [labels[i] for i in chosen if i not in set(points["run_id"])]
    if left_out:
        st.caption(f"Left out of accuracy vs throughput (no benchmark or no {task} {filt} score): "
                   f"{', '.join(left_out)}.")


evals = data.eval_frame(db, chosen)
labels = dict(zip(summary["run_id"], summary["label"]))
st.header("Accuracy")
if evals.empty:
    st.caption("No accuracy results for these runs: enable lm-eval on Launch, or import lm-eval output "
               "(into the run of the same configuration) on Import.")
else:
    accuracy(evals)

signals_view.window_section(db, chosen)
signals_view.output_check_section(db, baseline, candidates, labels)

aligned = data.aligned_samples(db, chosen)
if len(aligned):
    st.header("Time series")
    st.plotly_chart(charts.overlay_timeseries(aligned), key="overlay")
    st.download_button("Time series (CSV)", api.frame_to_csv(aligned), "compare-timeseries.csv", "text/csv",
                       on_click="ignore")

st.header("Throughput per GPU vs median TPOT")
pareto = charts.pareto_frame(summary)
if pareto.empty:
    st.caption("Needs runs with a known GPU count (TP×PP×DP) and benchmark results; describe imported runs "
               "with their TP size on Import.")
else:
    st.plotly_chart(charts.pareto_chart(summary), key="pareto")
    left_out = sorted(set(benched["label"]) - set(pareto["label"]))
    if left_out:
        st.caption(f"Left out (GPU count unknown): {', '.join(left_out)}.")
    st.download_button("Pareto points (CSV)", api.frame_to_csv(pareto), "compare-pareto.csv", "text/csv",
                       on_click="ignore")

loads_view.render(db, chosen)
signals_view.energy_curves_section(db, chosen)
