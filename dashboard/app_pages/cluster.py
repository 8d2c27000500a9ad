"""Cluster: the Ray cluster a Ray worker schedules onto — its nodes, their GPUs free and busy, the runs on each,
and the worker's state. Read through runner.api (a short child process reads Ray; this server never joins)."""

import time

import streamlit as st

from dashboard.state import PAGES, store
from runner import api

st.title("Cluster")
address = api.ray_address() or ""
if not address:
    st.info("No Ray worker is configured: runs execute on this machine (the local worker). To schedule them on "
            "the nodes of a Ray cluster, start `servelab worker --ray` and set `SERVELAB_RAY_ADDRESS` (e.g. "
            "`HEAD_IP:6379`, or `auto` on a node of the cluster) for the worker and this dashboard; "
            "docs/scale-out.md says how.", icon=":material/hub:")
    st.stop()


@st.fragment(run_every=10)
def cluster() -> None:
    state = api.cluster_state(address, max_age_s=8)
    st.caption(f"Ray cluster at `{address}` · read {time.strftime('%H:%M:%S', time.localtime(state.read_at))} "
               "(every 10 s)")
    if state.error:
        st.error(f"{state.error}. Check that the cluster runs (`ray status` on its head node) and that "
                 "SERVELAB_RAY_ADDRESS names its head (`HOST:6379`).", icon=":material/cloud_off:")
        return
    alive = state.alive
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Nodes alive", f"{len(alive)} of {len(state.nodes)}")
    c2.metric("GPUs", sum(n.gpus_total for n in alive))
    c3.metric("GPUs free", sum(n.gpus_free for n in alive))
    c4.metric("GPUs busy", sum(n.gpus_busy for n in alive))
    shape = state.shape()
    st.markdown(f"**Shape:** {shape.describe()} — a launch of up to {shape.node_size} GPUs runs on one node; "
                + (f"larger ones take whole {shape.node_size}-GPU nodes (up to {shape.node_size * shape.full_nodes} "
                   "GPUs, vLLM's Ray executor)." if shape.full_nodes > 1 else "nothing larger fits."))

    st.subheader("Ray worker")
    if not state.workers:
        st.warning("No Ray worker is connected to this cluster: queued runs wait until `servelab worker --ray` "
                   "runs (on a node of the cluster, or with `--address`).", icon=":material/pause_circle:")
    for w in state.workers:
        held = ", ".join(f"#{r}" for r in w.runs) or "none"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(w.started_at))
        st.success(f"**{w.worker_id}** — connected since {since}"
                   f", last scheduling pass {max(0.0, state.read_at - w.last_step_at):.0f} s before this reading; "
                   f"runs held (placed or waiting for GPUs): {held}", icon=":material/play_circle:")
        for error in w.errors:
            st.error(error)

    st.subheader("Nodes")
    frame = api.cluster_nodes_frame(store(), state)
    st.dataframe(frame, hide_index=True, column_config={
        "Alive": st.column_config.CheckboxColumn(), "CPUs": st.column_config.NumberColumn(format="%.0f"),
        "Runs": st.column_config.TextColumn(width="large"), "Ray node id": st.column_config.TextColumn(width="small")})
    runs = sorted({r for n in state.nodes for r in n.runs})
    if runs:
        st.caption("Open a run:")
        for run_id in runs:
            st.page_link(PAGES["run"], label=f"Run #{run_id} →", query_params={"run": str(run_id)})


cluster()
