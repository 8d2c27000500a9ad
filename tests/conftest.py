"""Fixtures and helpers shared by every test folder: a fresh SQLite store per test, the seed's benchmark metrics,
a real PostgreSQL server, a real local HTTP server, a real Ray cluster of the shape a module asks.

A folder whose tests need the database inside a data folder of their own (ui/, e2e/) overrides `db_path`;
`store` itself is defined here only.
"""

from __future__ import annotations

import copy
import http.server
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
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


# -- PostgreSQL: a throwaway cluster for the session, a fresh database per test ---------------------------------------
class PostgresCluster:
    """A PostgreSQL server from the system's packages (Debian: /usr/lib/postgresql/<version>/bin) in a
    temporary folder, on a free port of 127.0.0.1, trusting local connections. The server refuses to
    run as root, so as root it runs as the `postgres` user (`runuser`), which owns its folder."""

    def __init__(self) -> None:
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
        if not bins:
            raise RuntimeError("no PostgreSQL server in /usr/lib/postgresql; `apt-get install postgresql` "
                               "(./dev.sh test installs it)")
        self.bin = bins[-1].parent
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.dir = Path(tempfile.mkdtemp(prefix="servelab-pg-"))
        if self.as_user:
            shutil.chown(self.dir, "postgres", "postgres")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._count = 0

    def _pg(self, tool: str, *args: str) -> None:
        done = subprocess.run([*self.as_user, str(self.bin / tool), *args], capture_output=True, text=True, check=False)
        if done.returncode:
            log = self.dir / "server.log"
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip()}\n"
                               + (log.read_text()[-2000:] if log.exists() else ""))

    def start(self) -> PostgresCluster:
        data = self.dir / "data"
        self._pg("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off"
        self._pg("pg_ctl", "-D", str(data), "-o", options, "-l", str(self.dir / "server.log"), "-w", "start")
        return self

    def stop(self) -> None:
        self._pg("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as c:
            c.execute(sql)

    def create_database(self) -> str:
        """A new empty database; its name."""
        self._count += 1
        name = f"test_{self._count}"
        self._admin(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        self._admin(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """The session's PostgreSQL server, started on first use. A server that cannot start fails the tests
    that need it (never skips them): CI must test the PostgreSQL store."""
    for attempt in range(3):  # the free port may be taken between its probe and the server's bind
        cluster = None
        try:
            cluster = PostgresCluster()
            cluster.start()
            break
        except (RuntimeError, OSError) as exc:
            if cluster is not None:
                shutil.rmtree(cluster.dir, ignore_errors=True)
            if attempt == 2:
                pytest.fail(f"PostgreSQL could not start: {exc}", pytrace=False)
    assert cluster is not None
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, db_path: Path) -> Iterator[str]:
    """A fresh empty database on each backend: a SQLite file, or a new database of the session's cluster."""
    if request.param == "sqlite":
        yield str(db_path)
        return
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    name = cluster.create_database()
    yield cluster.url(name)
    cluster.drop_database(name)


# -- a real local HTTP server ----------------------------------------------------------------------------------
class LocalHTTPServer:
    """A real HTTP server on 127.0.0.1 (a free port) answering every GET and POST with `respond(path)` → (status, body,
    content type); HTTP/1.1 keep-alive when asked. Counts the requests and connections it took."""

    def __init__(self, respond: Callable[[str], tuple[int, bytes, str]], *, keep_alive: bool = False) -> None:
        outer = self
        self.requests = self.connections = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"

            def setup(self) -> None:
                outer.connections += 1
                super().setup()

            def do_GET(self) -> None:
                outer.requests += 1
                status, body, kind = respond(self.path)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", kind)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client gave up waiting (its timeout is short): no one to answer
                    return

            do_POST = do_GET

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def shutdown(self) -> None:
        """Stop serving and close the port: connections are refused from now on."""
        self.httpd.shutdown()
        self.httpd.server_close()


# -- a real Ray cluster on this machine ------------------------------------------------------------------------
class RayTestCluster:
    """A real Ray cluster on this machine (`ray.cluster_utils.Cluster`), this process its driver: a head without
    resources (runs go to the GPU nodes, as docs/scale-out.md starts a cluster) and `nodes` worker nodes of one
    CPU and `gpus_per_node` declared GPUs each."""

    def __init__(self, nodes: int, gpus_per_node: int) -> None:
        import ray
        from ray import cluster_utils

        self.want, self.gpus_per_node = nodes, gpus_per_node
        self.cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "num_gpus": 0, "include_dashboard": False})
        self.address: str = self.cluster.address
        self.refill()
        ray.init(address=self.address, logging_level="WARNING", log_to_driver=False)

    def refill(self) -> list[Any]:
        """The live worker nodes (sorted by node id), after adding nodes until there are `nodes` again (a test
        may have killed one)."""
        while len(self.cluster.worker_nodes) < self.want:
            self.cluster.add_node(num_cpus=1, num_gpus=self.gpus_per_node)
        self.cluster.wait_for_nodes()
        return sorted(self.cluster.worker_nodes, key=lambda n: n.node_id)

    @staticmethod
    def raylet_pid(node: Any) -> int:
        from ray._private import ray_constants

        return int(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)

    @staticmethod
    def gpus_free(expected: float, timeout_s: float = 30.0) -> float | None:
        """The cluster's free GPUs once they are `expected` (Ray frees a removed group's resources
        asynchronously), or what they are after `timeout_s`."""
        import time

        import ray

        deadline = time.monotonic() + timeout_s
        while ray.available_resources().get("GPU") != expected and time.monotonic() < deadline:
            time.sleep(0.2)
        return ray.available_resources().get("GPU")

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def ray_cluster(request: pytest.FixtureRequest) -> Iterator[RayTestCluster]:
    """The module's Ray cluster, of the shape its `ray_cluster` mark asks (default: 2 nodes × 1 GPU), e.g.
    `pytestmark = pytest.mark.ray_cluster(nodes=2, gpus_per_node=8)`."""
    pytest.importorskip("ray")
    mark = request.node.get_closest_marker("ray_cluster")
    c = RayTestCluster(**{"nodes": 2, "gpus_per_node": 1, **(mark.kwargs if mark else {})})
    yield c
    c.shutdown()


@pytest.fixture
def pg_store(postgres: PostgresCluster) -> Iterator[Store]:
    """A store on a fresh database of the session's PostgreSQL server (what a Ray cluster's nodes share)."""
    name = postgres.create_database()
    s = Store(postgres.url(name))
    yield s
    s.engine.dispose()
    postgres.drop_database(name)
