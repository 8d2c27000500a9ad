"""Launch: a form generated from the specs, presets, a paste box, live validation, commands, queueing."""

from typing import Any

import pandas as pd
import streamlit as st

from dashboard import launch_form as lf
from dashboard import presets
from dashboard import spec_form as form
from dashboard.state import PAGES, machine, store
from runner import api
from runner.config import BenchSpec, EvalSpec, LaunchSpec
from runner.errors import ServelabError, SpecError

ss = st.session_state
box = machine()
choices = presets.presets()
if "launch.model" not in ss:  # first visit: the preset this machine can run
    ss["form.preset"] = presets.default_preset(box.gpu_count)
    lf.apply(choices[ss["form.preset"]], ss)


def _on_preset() -> None:
    lf.apply(choices[ss["form.preset"]], ss)
    ss["form.paste_problems"] = []


def _on_paste() -> None:
    try:
        with st.spinner("Reading the command with vLLM's own parser (the first time loads vLLM: seconds)…"):
            lf.apply_command(ss.get("form.paste", ""), ss)
        ss["form.paste_problems"] = []
    except SpecError as exc:
        ss["form.paste_problems"] = exc.problems


def _tp(key: str, label: str, help_: str) -> None:
    options = sorted({*box.tp_options, int(ss[key])})
    offered = (f"the Ray cluster's {box.cluster.describe()}" if box.cluster is not None
               else "CPU backend: 1–2" if box.cpu else f"{len(box.gpus)} GPUs visible")
    st.selectbox(label, options, key=key, help=f"{help_} Offered: {offered}.")


def _dcp(key: str, label: str, help_: str) -> None:
    tp = int(ss["launch.tensor_parallel_size"])
    ok = lf.divisors(tp)
    st.selectbox(label, sorted({*ok, int(ss[key])}), key=key, help=f"{help_} Divisors of TP {tp}: {ok}.",
                 format_func=lambda d: str(d) if d in ok else f"{d} — does not divide TP {tp}")


st.title("Launch a run")
top_left, top_right = st.columns([3, 2])
with top_right, st.container(border=True):
    if box.cluster_address:
        st.markdown(f"**Ray cluster** at `{box.cluster_address}` (the Ray worker's)")
        if box.cluster is None:
            st.error(f"{box.cluster_error}; launches are not checked against it until it answers.",
                     icon=":material/cloud_off:")
        else:
            st.metric("Nodes × GPUs", box.cluster.describe())
            st.caption(f"Up to {box.cluster.node_size} GPUs run on one node; larger launches take whole nodes "
                       "(vLLM's Ray executor). The Cluster page shows which are free.")
    elif box.cpu or not box.gpus:
        st.info(box.note or "no GPU — CPU backend with the demo model", icon=":material/memory:")
    else:
        st.metric("GPUs (NVML)", len(box.gpus))
        st.dataframe(pd.DataFrame([{"GPU": g["index"], "name": g["name"],
                                    "free GiB": round((g["mem_free_mib"] or 0) / 1024, 1),
                                    "total GiB": round((g["mem_total_mib"] or 0) / 1024, 1)} for g in box.gpus]),
                     hide_index=True)
with top_left:
    st.selectbox("Preset", list(choices), key="form.preset", on_change=_on_preset,
                 help="Fills the whole form; the Kimi-K2-Thinking presets are the seed recipe's two launches.")
    st.text_area("Paste a `vllm serve …` line", key="form.paste", height=90,
                 placeholder="vllm serve moonshotai/Kimi-K2-Thinking -tp 8 --decode-context-parallel-size 8")
    st.button("Fill the form from this command", on_click=_on_paste)
    for problem in ss.get("form.paste_problems", []):
        st.error(problem)

# Checked before drawing: the widgets' values are in the session state already, so each field can
# carry its own problem beside it.
checked = lf.read(ss, box.host)
by_field = checked.by_field()
with st.container(border=True):
    st.subheader("Launch — `vllm serve`")
    st.text_input("label", key="run.label", placeholder="default: e.g. TP8+DCP8",
                  help="Name shown in tables and charts.")
    form.render(LaunchSpec, "launch", list(LaunchSpec.model_fields), errors=by_field, custom={
        "tensor_parallel_size": _tp, "decode_context_parallel_size": _dcp})
with st.container(border=True):
    st.subheader("Benchmark — `vllm bench serve`")
    form.render(BenchSpec, "bench", list(BenchSpec.model_fields), errors=by_field)
with st.container(border=True):
    st.subheader("Accuracy — `lm_eval` (local-completions)")
    st.checkbox("Evaluate accuracy after the benchmark", key="eval.enabled")
    if ss.get("eval.enabled"):
        form.render(EvalSpec, "eval", list(EvalSpec.model_fields), errors=by_field)

for note in checked.notes:
    st.info(note)
if checked.spec is None or checked.problems:
    st.caption("The serve, bench and eval command lines appear here once the form is valid.")
else:
    st.subheader("Commands")
    for title, line in lf.commands(checked.spec).items():
        st.caption(title)
        st.code(line, language="bash", wrap_lines=True)

if lf.cannot_run_here(checked.spec, box.host) or ss.get("run.other_worker"):
    st.checkbox("Queue it for a worker on another machine that has the GPUs (same database); this machine's worker "
                "leaves it queued", key="run.other_worker")
if checked.problems:
    count = len(checked.problems)
    st.error(f"**{count} problem{'s' if count > 1 else ''} keep{'' if count > 1 else 's'} this run from queueing** "
             "(each is also shown beside its field):\n" + "\n".join(f"- {p}" for p in checked.problems),
             icon=":material/block:")
if st.button("Queue run", type="primary", disabled=bool(checked.problems) or checked.spec is None) and checked.spec:
    try:
        with st.spinner("Writing the demo model (first use only)…"):
            lf.ensure_demo_model(checked.spec)
        run = api.queue_run(store(), checked.spec, box.host)
        st.success(f"Queued run #{run.id} ({api.label_of(run)}).")
        st.page_link(PAGES["run"], label=f"Watch run #{run.id} →", query_params={"run": str(run.id)})
    except ServelabError as exc:
        st.error(str(exc))

with st.expander("Sweep — a matrix of runs around this form"):
    st.caption("Launch fields give one run (one server) per combination; bench fields give several benchmarks "
               "against the same server. Leave a list empty to keep the form's value.")
    st.text_input("Sweep name", key="sweep.name", placeholder="sweep")
    tp_now = int(ss["launch.tensor_parallel_size"])
    c1, c2 = st.columns(2)
    tps = c1.multiselect("tensor-parallel-size values", sorted({*box.tp_options, tp_now}), key="sweep.tp")
    dcp_options = sorted({d for t in (tps or [tp_now]) for d in lf.divisors(t)})
    dcps = c2.multiselect("decode-context-parallel-size values", dcp_options, key="sweep.dcp",
                          help="Divisors of the chosen TP sizes.")
    matrix: dict[str, list[Any]] = {"tensor_parallel_size": tps, "decode_context_parallel_size": dcps}
    for i in range(2):
        f1, f2 = st.columns([1, 2])
        other = f1.selectbox(f"Other field {i + 1}", [None, *lf.SWEEPABLE], key=f"sweep.field{i}",
                             format_func=lambda n: "—" if n is None else form.flag_label(n))
        values = f2.text_input(f"Values {i + 1} (comma separated)", key=f"sweep.values{i}", placeholder="0.8, 0.9")
        if other and other not in matrix:
            matrix[other] = lf.parse_values(values)
    if not any(matrix.values()):
        st.caption("Pick values above to see the runs of the sweep.")
    elif checked.spec is None:
        st.warning("Fix the form first: the sweep starts from it.")
    else:
        try:
            sweep = lf.sweep(ss.get("sweep.name") or "", checked.spec, matrix)
            cells = lf.sweep_cells(sweep, box.host)
        except SpecError as exc:
            cells = None
            for problem in exc.problems:
                st.error(problem)
        if cells is not None:
            st.dataframe(cells, hide_index=True)
            bad = cells["problems"].ne("").sum()
            if bad:
                st.error(f"{bad} of {len(cells)} combinations cannot run; remove the values named above.")
            if st.button(f"Queue sweep ({len(cells)} runs)", disabled=bool(bad) or not len(cells)):
                try:
                    with st.spinner("Writing the demo model (first use only)…"):
                        lf.ensure_demo_model(checked.spec)
                    sweep_id, runs = api.queue_sweep(store(), sweep, box.host)
                    kept = len(cells) - len(runs)
                    st.success(f"Sweep #{sweep_id}: queued {len(runs)} runs" + (f", kept {kept} done" if kept else "."))
                    st.page_link(PAGES["runs"], label="See them on Runs →")
                except ServelabError as exc:
                    st.error(str(exc))
