"""Runs page through AppTest on the seeded store: table, filters, select-to-compare, open, cancel, delete."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from runner import api
from runner.config import BenchSpec, LaunchSpec, RunSpec
from runner.errors import StoreError
from runner.models import RunStatus


def select(at, rows: list[int]) -> None:
    """Tick rows of the runs table (row positions, oldest run first), as a click in the browser would."""
    key = next(k for k in at.session_state if isinstance(k, str) and k.startswith("runs.table."))
    at.session_state[key] = {"selection": {"rows": rows, "columns": [], "cells": []}}
    at.run()


def button(at, prefix: str):
    return next(b for b in at.button if b.label.startswith(prefix))


def test_table_lists_every_run_with_status_config_and_headline_metrics(open_page, seeded) -> None:
    seeded.update_run(2, node_name="gpu-node-2", node_ip="10.0.0.6")  # as the Ray worker records it
    at = open_page("runs")
    table = at.dataframe[0].value
    assert list(table["ID"]) == [1, 2]
    assert list(table["Label"]) == ["TP8", "TP8+DCP8"]
    assert set(table["Status"]) == {"succeeded"}
    assert table["Output tok/s"].iloc[:2].tolist() == [485.78, 695.13]
    assert table["Req/s"].iloc[:2].tolist() == [1.25, 1.57]
    assert list(table["Node"]) == ["", "gpu-node-2 (10.0.0.6)"]  # the local worker's run names none
    assert {"Model", "TP/DCP", "Median TTFT (ms)", "Median TPOT (ms)", "KV tokens", "Started",
            "Duration (s)"} <= set(table.columns)
    assert [d.label for d in at.download_button] == ["Download this table (CSV)"]


def test_filters_narrow_the_table(open_page, seeded) -> None:
    at = open_page("runs")
    at.text_input(key="runs.text").set_value("dcp8").run()
    assert list(at.dataframe[0].value["ID"]) == [2]
    at.text_input(key="runs.text").set_value("").run()
    at.multiselect(key="runs.status").set_value(["failed"]).run()
    assert at.dataframe[0].value.empty


def test_select_two_and_compare_opens_compare_with_baseline_and_candidate(open_page, seeded) -> None:
    at = open_page("runs")
    select(at, [0, 1])
    assert not button(at, "Compare").disabled and button(at, "Open").disabled
    button(at, "Compare").click().run()
    assert [t.value for t in at.title] == ["Compare runs"]
    assert at.query_params["a"] == "1" and at.query_params["b"] == "2"
    assert at.table[0].value["Metric"].iloc[0] == "Request Throughput (req/s)"


def test_open_one_run(open_page, seeded) -> None:
    at = open_page("runs")
    select(at, [1])
    button(at, "Open").click().run()
    assert at.title[0].value == "Run #2 — TP8+DCP8"


def test_delete_asks_for_confirmation_then_removes_rows_and_files(open_page, seeded) -> None:
    folder = Path(seeded.get_run(2).run_dir)
    assert folder.is_dir()
    at = open_page("runs")
    select(at, [1])
    button(at, "Delete (1)").click().run()
    assert any("Delete #2" in w.value and "cannot be undone" in w.value for w in at.warning)
    button(at, "Keep them").click().run()
    assert seeded.get_run(2)  # still there
    select(at, [1])
    button(at, "Delete (1)").click().run()
    button(at, "Yes, delete").click().run()
    assert not at.exception
    with pytest.raises(StoreError):
        seeded.get_run(2)
    assert not folder.exists()
    assert seeded.eval_results(2) == []  # its GSM8K scores went with it
    assert list(at.dataframe[0].value["ID"]) == [1]
    assert any("Deleted: #2" in s.value for s in at.success)


def test_cancel_a_queued_run(open_page, seeded, demo_model: Path) -> None:
    spec = RunSpec(launch=LaunchSpec(model=str(demo_model)), bench=[BenchSpec(num_prompts=2)])
    queued = api.queue_run(seeded, spec)
    at = open_page("runs")
    assert at.dataframe[0].value["Status"].iloc[-1] == "queued"
    select(at, [2])
    assert button(at, "Delete").disabled  # a live run is cancelled, not deleted
    button(at, "Cancel (1)").click().run()
    assert seeded.get_run(queued.id).status == RunStatus.cancelled
    assert at.dataframe[0].value["Status"].iloc[-1] == "cancelled"


def test_empty_store_points_to_launch_and_import(open_page, store) -> None:
    at = open_page("runs")
    assert "No runs yet" in at.info[0].value


def test_local_model_paths_are_shortened_in_the_table(open_page, seeded, demo_model: Path) -> None:
    api.queue_run(seeded, RunSpec(launch=LaunchSpec(model=str(demo_model)), bench=[BenchSpec(num_prompts=2)]))
    at = open_page("runs")
    assert at.dataframe[0].value["Model"].tolist() == ["—", "—", "…/models/demo"]


def test_worker_errors_of_the_last_hour_show_as_a_banner(open_page, seeded) -> None:
    seeded.add_worker_error("gpu-box:1:2", "scheduling failed: database is locked", t=time.time() - 7200)
    at = open_page("runs")
    assert [w.value for w in at.warning] == []  # two hours old: past
    seeded.add_worker_error("gpu-box:1:2", "run 7 crashed its executor: KeyError: 'x'")
    at = open_page("runs")
    [banner] = at.warning
    assert banner.value.startswith("**The worker caught 1 error(s) in the last hour** (its console has the "
                                   "tracebacks). Newest, at ")
    assert banner.value.endswith(": run 7 crashed its executor: KeyError: 'x'")


def test_a_run_without_results_shows_a_dash_not_none(open_page, seeded, demo_model: Path) -> None:
    queued = api.queue_run(seeded, RunSpec(launch=LaunchSpec(model=str(demo_model)), bench=[BenchSpec(num_prompts=2)]))
    at = open_page("runs")
    table = at.dataframe[0]
    metrics = ["Output tok/s", "Req/s", "Median TTFT (ms)", "Median TPOT (ms)"]
    assert table.value.set_index("ID").loc[queued.id, metrics].isna().all()  # missing: no results yet
    assert table.value.set_index("ID").loc[1, metrics].tolist() == [485.78, 1.25, 227389.87, 473.04]
    assert all(table.value[m].dtype.kind == "f" for m in metrics)  # numbers, so a header click sorts them as such
    assert table.proto.placeholder == "—"  # what the grid draws for a missing cell (Streamlit's default: "None")
