"""The Ray worker's pure parts: the SQLite refusal across nodes and the one-bundle placement of a run."""

import pytest

pytest.importorskip("ray")

from runner.ray_worker import bundle, sqlite_refusal  # noqa: E402


def test_sqlite_store_refused_across_several_nodes():
    assert sqlite_refusal("sqlite:////data/servelab.db", 2) == (
        "the store is a SQLite file (sqlite:////data/servelab.db) and the Ray cluster has 2 nodes: a file on one "
        "node is not shared with the others; set SERVELAB_DB=postgresql://… (a server every node reaches)")


@pytest.mark.parametrize(("url", "nodes"), [("sqlite:////data/servelab.db", 1),
                                             ("postgresql+psycopg://u@db:5432/servelab", 4)])
def test_one_node_or_a_server_store_is_accepted(url, nodes):
    assert sqlite_refusal(url, nodes) is None


@pytest.mark.parametrize(("gpus", "want"), [(0, {"CPU": 1.0}), (1, {"GPU": 1.0, "CPU": 1.0}),
                                            (8, {"GPU": 8.0, "CPU": 1.0})])
def test_a_single_node_run_is_one_bundle_of_its_gpus_and_one_cpu(gpus, want):
    assert bundle(gpus) == want
