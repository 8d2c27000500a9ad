"""Cluster page through AppTest, without a Ray cluster: the plain messages when no Ray worker is configured and when
the configured cluster cannot be reached (tests/test_ray_multinode.py reads a real cluster's state for the page)."""

from __future__ import annotations

import socket

import streamlit as st


def test_no_ray_worker_configured(open_page, monkeypatch) -> None:
    monkeypatch.delenv("SERVELAB_RAY_ADDRESS", raising=False)
    at = open_page("cluster")
    assert [i.value for i in at.info] == [
        "No Ray worker is configured: runs execute on this machine (the local worker). To schedule them on the nodes "
        "of a Ray cluster, start `servelab worker --ray` and set `SERVELAB_RAY_ADDRESS` (e.g. `HEAD_IP:6379`, or "
        "`auto` on a node of the cluster) for the worker and this dashboard; docs/scale-out.md says how."]


def test_cluster_that_cannot_be_reached(open_page, monkeypatch) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("SERVELAB_RAY_ADDRESS", f"127.0.0.1:{port}")
    at = open_page("cluster")
    assert [e.value for e in at.error] == [
        f"the Ray cluster at 127.0.0.1:{port} cannot be reached: Connection refused. Check that the cluster runs "
        "(`ray status` on its head node) and that SERVELAB_RAY_ADDRESS names its head (`HOST:6379`)."]
    st.cache_data.clear()  # the machine's inventory of an earlier test, read without the cluster
    launch = open_page("launch")  # the launch form says it cannot check against it
    assert any(e.value.startswith(f"the Ray cluster at 127.0.0.1:{port} cannot be reached: Connection refused; "
                                  "launches are not checked against it") for e in launch.error)
