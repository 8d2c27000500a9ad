"""Real vLLM on the CPU backend with a model the tests generate. Marked `vllm` (slow)."""

import threading
import time
from pathlib import Path

import psutil
import pytest

from runner.store import Store
from runner.worker import Worker

pytestmark = pytest.mark.vllm


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.vllm)


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> Path:
    from runner.demo_model import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("models") / "demo", num_kv_heads=2)


@pytest.fixture(scope="session")
def mqa_model(tmp_path_factory) -> Path:
    """One KV head: passes servelab's GQA check for TP=2/DCP=2, so vLLM's own refusal is reached."""
    from runner.demo_model import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("models") / "mqa", num_kv_heads=1)


@pytest.fixture
def env(tmp_path, monkeypatch) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("SERVELAB_DATA", str(data))
    monkeypatch.setenv("SERVELAB_DB", str(data / "servelab.db"))
    monkeypatch.setenv("SERVELAB_SAMPLE_INTERVAL", "0.5")
    monkeypatch.setenv("SERVELAB_STARTUP_TIMEOUT", "400")
    return data


@pytest.fixture
def db_path(env: Path) -> Path:
    return env / "servelab.db"


@pytest.fixture
def worker(store):
    """An in-process worker (CPU backend: one run at a time)."""
    w = Worker(store, gpu_ids=[], poll_s=0.5, tick_s=0.5)
    t = threading.Thread(target=w.run_forever, daemon=True)
    t.start()
    yield w
    w.stop()
    t.join(timeout=120)


def run_processes(data_dir: Path) -> list[psutil.Process]:
    """Live (non-zombie) processes that servelab started for runs of this test's data folder."""
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            env = p.environ()
            if "SERVELAB_RUN_ID" in env and env.get("SERVELAB_DATA") == str(data_dir):
                if p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
        except (psutil.Error, OSError):
            continue
    return out


def assert_no_run_processes(data_dir: Path, within_s: float = 20) -> None:
    deadline = time.monotonic() + within_s
    while (left := run_processes(data_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, [(p.pid, p.name()) for p in left]


def wait_status(store: Store, run_id: int, statuses: set[str], timeout_s: float, phase_has: str = ""):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = store.get_run(run_id)
        if run.status.value in statuses and phase_has in (run.phase or ""):
            return run
        time.sleep(0.25)
    run = store.get_run(run_id)
    raise AssertionError(f"run {run_id} is {run.status.value} ({run.phase}; {run.failure_reason}), wanted {statuses}")
