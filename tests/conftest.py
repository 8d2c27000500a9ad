"""Fixtures shared by every test folder: a fresh SQLite store per test and the seed's benchmark metrics.

A folder whose tests need the database inside a data folder of their own (ui/, e2e/) overrides `db_path`;
`store` itself is defined here only.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runner.store import Store

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
SEED = FIXTURES / "seed"

# The seed's two "Serving Benchmark Result" blocks (tests/fixtures/seed/tp8.txt, tp8_dcp8.txt), every value
# as printed: Kimi-K2-Thinking on 8 GPUs, TP8 and TP8+DCP8.
_SEED_METRICS: dict[str, dict[str, Any]] = {
    "TP8": {
        "completed": 998, "failed": 2, "request_rate": 100.00, "duration": 800.26,
        "total_input_tokens": 7984000, "total_output_tokens": 388750, "request_throughput": 1.25,
        "output_throughput": 485.78, "max_output_tokens_per_s": 2100.00,
        "max_concurrent_requests": 988.00, "total_token_throughput": 10462.57,
        "mean_ttft_ms": 271196.67, "median_ttft_ms": 227389.87, "p99_ttft_ms": 686294.46,
        "mean_tpot_ms": 381.29, "median_tpot_ms": 473.04, "p99_tpot_ms": 578.64,
        "mean_itl_ms": 111.22, "median_itl_ms": 38.04, "p99_itl_ms": 490.93,
    },
    "TP8+DCP8": {
        "completed": 994, "failed": 6, "request_rate": 100.00, "duration": 631.35,
        "total_input_tokens": 7952000, "total_output_tokens": 438872, "request_throughput": 1.57,
        "output_throughput": 695.13, "max_output_tokens_per_s": 2618.00,
        "max_concurrent_requests": 988.00, "total_token_throughput": 13290.35,
        "mean_ttft_ms": 227780.13, "median_ttft_ms": 227055.20, "p99_ttft_ms": 451255.55,
        "mean_tpot_ms": 398.60, "median_tpot_ms": 472.81, "p99_tpot_ms": 569.91,
        "mean_itl_ms": 104.73, "median_itl_ms": 43.97, "p99_itl_ms": 483.37,
    },
}  # fmt: skip


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--write-reliability-doc", action="store_true",
                     help="rewrite docs/reliability.md from this run of tests/reliability (the whole folder must "
                          "run and pass; otherwise the run fails)")


@pytest.fixture
def seed_metrics() -> dict[str, dict[str, Any]]:
    """The seed's metrics by run label ("TP8", "TP8+DCP8"); a fresh copy per test."""
    return copy.deepcopy(_SEED_METRICS)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """Where this test's SQLite file lives."""
    return tmp_path / "servelab.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    """A real store on a fresh SQLite file, closed after the test."""
    s = Store(str(db_path))
    yield s
    s.close()
