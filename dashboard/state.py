"""What every page shares: the cached store, the GPU inventory, run choosers, time display."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import streamlit as st

from runner import api
from runner.api import Store
from runner.config import ClusterShape, Host, Target
from runner.models import Run

FORM_PREFIXES = ("launch.", "bench.", "eval.", "run.", "sweep.", "form.")
PAGES = {
    "launch": "app_pages/launch.py",
    "runs": "app_pages/runs.py",
    "run": "app_pages/run.py",
    "compare": "app_pages/compare.py",
    "import": "app_pages/import_results.py",
    "cluster": "app_pages/cluster.py",
}


@st.cache_resource(show_spinner=False)
def _store(url: str) -> Store:
    return api.open_store(url)


def store() -> Store:
    """The store named by SERVELAB_DB (or the default), one engine per URL for the whole server."""
    return _store(api.database_url())


@dataclass
class Machine:
    """What this machine offers to runs."""

    cpu: bool
    gpus: list[dict[str, Any]] = field(default_factory=list)
    note: str | None = None
    cluster: ClusterShape | None = None  # a Ray worker is configured: launches are checked against its cluster
    cluster_address: str | None = None
    cluster_error: str | None = None  # it is configured but could not be read

    @property
    def gpu_count(self) -> int | None:
        """The count the specs validate against; None on the CPU backend (no GPU limit)."""
        return None if self.cpu else (len(self.gpus) or None)

    @property
    def host(self) -> Target | None:
        """What launches are checked against: the Ray cluster's shape when a Ray worker is configured; else this
        machine's GPUs, or the CPU backend's cores; None when NVML sees no GPU on a GPU build, or the configured
        cluster cannot be read (nothing to check against)."""
        if self.cluster_address:
            return self.cluster
        if self.cpu:
            return Host(cpu_backend=True, cores=len(os.sched_getaffinity(0)))
        return Host(gpus=len(self.gpus)) if self.gpus else None

    @property
    def tp_options(self) -> list[int]:
        if self.cluster is not None and self.cluster.node_size:
            size = self.cluster.node_size
            return [*range(1, size + 1), *(size * k for k in range(2, self.cluster.full_nodes + 1))]
        if self.cpu or not self.gpus:
            return [1, 2]
        return list(range(1, len(self.gpus) + 1))


def machine() -> Machine:
    """NVML's view of the GPUs, refreshed every 30 s (free memory changes as runs come and go), and the shape
    of the Ray cluster configured now (cached per address: a cluster read once must not answer for another)."""
    return _machine(api.ray_address())


@st.cache_data(ttl=30, show_spinner=False)
def _machine(address: str | None) -> Machine:
    found = api.inventory()
    box = Machine(cpu=found.cpu, gpus=found.gpus, note=found.note)
    if address:
        state = api.cluster_state(address)
        box.cluster_address, box.cluster_error = address, state.error
        box.cluster = None if state.error else state.shape(cpu_backend=found.cpu)
    return box


def keep_form_state() -> None:
    """Keep form values while another page is shown (Streamlit drops the state of unrendered widgets)."""
    for key in list(st.session_state.keys()):
        if isinstance(key, str) and key.startswith(FORM_PREFIXES):
            st.session_state[key] = st.session_state[key]


def query_int(name: str) -> int | None:
    raw = st.query_params.get(name)
    try:
        return int(raw) if raw not in (None, "") else None
    except ValueError:
        return None


def query_ints(name: str) -> list[int]:
    """`?b=2,3` or `?b=2&b=3` as [2, 3]; anything that is not a number is ignored."""
    out = []
    for raw in st.query_params.get_all(name):
        for part in raw.split(","):
            if part.strip().isdigit():
                out.append(int(part))
    return out


def run_title(run: Run) -> str:
    return f"#{run.id} {api.label_of(run)} ({run.status.value})"


def tz() -> ZoneInfo:
    """The browser's time zone when Streamlit knows it, else UTC."""
    name = None
    with contextlib.suppress(Exception):  # no browser (AppTest, bare mode)
        name = st.context.timezone
    try:
        return ZoneInfo(name or os.environ.get("TZ") or "UTC")
    except Exception:
        return ZoneInfo("UTC")


def when(t: datetime | None) -> str:
    return t.astimezone(tz()).strftime("%Y-%m-%d %H:%M:%S") if t else "—"


def duration(start: datetime | None, end: datetime | None) -> str:
    if start is None:
        return "—"
    end = end or datetime.now(start.tzinfo)
    s = max(0, int((end - start).total_seconds()))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
