"""Security: no shell anywhere, uploads stay inside their run folder, log text is shown as text, the dashboard
listens on 127.0.0.1 unless told otherwise, a password gates every page, and no URL serves the database."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from runner import api
from runner.config import BenchSpec, LaunchSpec, RunSpec, Settings
from runner.models import RunStatus, utcnow
from runner.server import port_is_free
from runner.store import Store
from tests.reliability.conftest import REPO, files_of

APP = str(REPO / "dashboard" / "streamlit_app.py")
CLI = [sys.executable, "-m", "runner.cli"]
SEED = REPO / "tests" / "fixtures" / "seed"
PAGES = ["launch", "runs", "run", "compare", "import_results"]
HOSTILE = "<script>alert('owned')</script><img src=x onerror=alert(1)>"


def test_no_shell_true_anywhere(record) -> None:
    """tests/test_architecture.py holds the grep; it is run here, not copied."""
    from tests.test_architecture import test_no_shell_true

    test_no_shell_true()
    record("security", "no shell-string subprocess anywhere", "every command is an argv list (grep of runner/ and dashboard/)",
           "tests/test_architecture.py::test_no_shell_true passed; the bad-input matrix's shell-character cases "
           "show argv items arriving verbatim", surface="source")


UPLOAD_NAMES = ["../../../../tmp/servelab-escape.txt", "/etc/servelab-escape.txt", "..\\..\\servelab-escape.txt",
                "....//....//servelab-escape.txt", "a/../../servelab-escape.txt", "..", "", ".bashrc",
                "%2e%2e%2fservelab-escape.txt", "nul\x00byte.txt", "~/servelab-escape.txt"]


@pytest.mark.parametrize("name", UPLOAD_NAMES, ids=[repr(n) for n in UPLOAD_NAMES])
def test_an_upload_never_becomes_a_path_outside_its_run_folder(env: Path, store: Store, tmp_path: Path, record,
                                                               name: str) -> None:
    outside_before = files_of(tmp_path)
    (run_id,) = api.import_files(store, [(name, (SEED / "tp8.txt").read_bytes())], label="upload")
    run = store.get_run(run_id)
    run_dir = Path(run.run_dir).resolve()
    [raw_path] = {br.raw_path for br in store.bench_results(run_id)}
    raw = Path(raw_path).resolve()
    assert raw.parent == run_dir and raw.is_file() and raw.name.startswith("imported-")
    assert "/" not in raw.name and "\\" not in raw.name and ".." not in raw.name.removeprefix("imported-")[:2]
    assert run_dir.is_relative_to(env.resolve())
    new_outside = {f for f in set(files_of(tmp_path)) - set(outside_before)
                   if not (tmp_path / f).resolve().is_relative_to(env.resolve())}
    assert not new_outside
    assert not Path("/tmp/servelab-escape.txt").exists() and not Path("/etc/servelab-escape.txt").exists()
    record("security", f"upload named {name!r}", "stored inside its run folder under a cleaned name",
           f"stored as runs/{run_id}/{raw.name}", surface="import")


def test_an_upload_through_the_dashboard_stays_inside_its_run_folder(env: Path, store: Store, monkeypatch, record):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("SERVELAB_BACKEND", "cpu")
    monkeypatch.delenv("SERVELAB_PASSWORD", raising=False)
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    at.switch_page("app_pages/import_results.py").run()
    name = "../../../../../tmp/servelab-escape.txt"
    at.file_uploader[0].set_value([(name, (SEED / "tp8.txt").read_bytes(), "text/plain")]).run()
    next(b for b in at.button if b.label.startswith("Import")).click().run()
    assert not at.exception and at.success[0].value == "Imported 1 run(s): #1."
    raw = Path(store.bench_results(1)[0].raw_path).resolve()
    assert raw.parent == Path(store.get_run(1).run_dir).resolve() and raw.parent.is_relative_to(env.resolve())
    assert not Path("/tmp/servelab-escape.txt").exists()
    record("security", "dashboard upload named '../../../../../tmp/servelab-escape.txt'",
           "stored inside its run folder", f"stored as runs/1/{raw.name}", surface="dashboard")


def _elements(node) -> list:
    """Every element of an AppTest tree (depth first)."""
    out = []
    children = getattr(node, "children", None)
    if isinstance(children, dict):
        for child in children.values():
            out += _elements(child)
    elif getattr(node, "proto", None) is not None:
        out.append(node)
    return out


def test_log_text_is_shown_as_text(env: Path, store: Store, monkeypatch, record) -> None:
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("SERVELAB_BACKEND", "cpu")
    monkeypatch.delenv("SERVELAB_PASSWORD", raising=False)
    run_dir = env / "runs" / "1"
    run_dir.mkdir(parents=True)
    (run_dir / "server.log").write_text(f"INFO Starting vLLM\nERROR {HOSTILE}\n")
    spec = RunSpec(label=f"label {HOSTILE}", launch=LaunchSpec(model="org/model"), bench=[BenchSpec()])
    store.create_run(label=f"label {HOSTILE}", model="org/model", spec_json=spec.model_dump_json(),
                     status=RunStatus.failed, phase="failed", started_at=utcnow(), finished_at=utcnow(),
                     run_dir=str(run_dir), failure_reason=f"vLLM exited: {HOSTILE}\nTraceback line {HOSTILE}")
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["run"] = "1"
    at.run()
    at.switch_page("app_pages/run.py").run()
    assert not at.exception
    showing = [e for e in _elements(at._tree) if "<script>" in str(e.proto)]
    kinds = sorted({type(e).__name__ for e in showing})
    assert showing, "the hostile text is not shown at all"
    for e in showing:
        proto = e.proto
        assert not getattr(proto, "allow_html", False), f"{type(e).__name__} renders HTML"
        assert type(e).__name__ in {"Code", "Error", "Title", "Caption", "Markdown", "Header", "Subheader", "Text",
                                    "Selectbox", "Alert", "Exception"}, type(e).__name__
    log = next(c for c in at.code if c.language == "log" and "ERROR" in c.value)
    assert HOSTILE in log.value  # verbatim in a code block: text, never markup
    record("security", "log line and failure reason with <script> and <img onerror> on the Run page",
           "shown as text (code blocks, error box, title), never as HTML",
           f"shown verbatim by {', '.join(kinds)}; no element allows HTML", surface="dashboard")


@pytest.mark.parametrize("page", PAGES)
def test_the_password_gates_every_page(env: Path, store: Store, monkeypatch, record, page: str) -> None:
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("SERVELAB_BACKEND", "cpu")
    monkeypatch.setenv("SERVELAB_PASSWORD", "s3cret")
    api.import_files(store, [("tp8.txt", (SEED / "tp8.txt").read_bytes())], label="secret-run-label")
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params.update({"run": "1", "a": "1", "b": "1"})
    at.run()
    with pytest.raises(ValueError, match=r"Known pages: \['Sign in'\]"):  # no URL leads to the page itself
        at.switch_page(f"app_pages/{page}.py")
    at.text_input[0].set_value("wrong guess").run()
    assert "Wrong password" in at.error[0].value
    shown = " ".join(str(e.proto) for e in _elements(at._tree))
    assert "secret-run-label" not in shown and "TP8" not in shown
    assert [t.value for t in at.title] == ["servelab"] and [w.label for w in at.text_input] == ["Password"]
    assert not at.get("plotly_chart") and not at.dataframe and not at.button
    at.text_input[0].set_value("s3cret").run()
    at.switch_page(f"app_pages/{page}.py").run()  # signed in, the page is there
    assert not at.exception and at.title[0].value != "servelab"
    record("security", f"SERVELAB_PASSWORD set: the {page} page", "only the password box until signed in",
           f"locked: the only page is 'Sign in', a wrong password is refused, nothing of the store shown; "
           f"signed in: '{at.title[0].value}'", surface="dashboard")


# -- a live dashboard --------------------------------------------------------------------------------------
def _serving(proc: subprocess.Popen, port: int, timeout_s: float = 120) -> bool:
    """The dashboard answers on `port` and it is this process tree that listens there."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            up = httpx.get(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            up = False
        try:
            tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.Error:
            return False
        if up and any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                      for p in tree for c in p.net_connections("inet")):
            return True
        time.sleep(0.5)
    return False


@pytest.fixture(scope="module")
def live_dashboard(tmp_path_factory: pytest.TempPathFactory):
    """`servelab dashboard --no-worker` on a store holding one run, stopped with SIGTERM at the end."""
    data = tmp_path_factory.mktemp("dash") / "data"
    data.mkdir()
    store = Store(str(data / "servelab.db"))
    api.import_files(store, [("tp8.txt", (SEED / "tp8.txt").read_bytes())], settings=Settings(data_dir=data))
    env = {**os.environ, "SERVELAB_DATA": str(data), "SERVELAB_DB": str(data / "servelab.db")}
    env.pop("SERVELAB_PASSWORD", None)
    proc, port = None, None
    try:
        for first in (8870, 8880, 8890):  # another session may take the same free port at the same moment
            port = next(p for p in range(first, first + 10) if port_is_free(p))
            proc = subprocess.Popen([*CLI, "dashboard", "--no-worker", "--port", str(port)], env=env, cwd=REPO,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            if _serving(proc, port):
                break
            proc.kill()
            proc.wait()
        else:
            raise AssertionError("the dashboard did not come up on a port of its own within 120 s")
        yield {"proc": proc, "port": port, "data": data, "db": data / "servelab.db", "store": store}
    finally:
        store.close()
        if proc is not None and proc.poll() is None:
            children = psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            gone, alive = psutil.wait_procs(children, timeout=30)
            assert not alive, f"the dashboard left {alive} behind after SIGTERM"


def test_the_dashboard_binds_127_0_0_1_unless_told(live_dashboard, record) -> None:
    port = live_dashboard["port"]
    tree = [psutil.Process(live_dashboard["proc"].pid), *psutil.Process(live_dashboard["proc"].pid).children(True)]
    listening = [c for p in tree for c in p.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert listening and {c.laddr.ip for c in listening} == {"127.0.0.1"}
    argv = next(p.cmdline() for p in tree if "streamlit" in " ".join(p.cmdline()))
    assert argv[argv.index("--server.address") + 1] == "127.0.0.1"
    help_text = subprocess.run([*CLI, "dashboard", "--help"], capture_output=True, text=True, cwd=REPO).stdout
    assert "0.0.0.0 exposes it" in " ".join(help_text.split()) and "127.0.0.1" in help_text
    record("security", "the dashboard's listening address", "127.0.0.1 unless --host says otherwise",
           f"listening on 127.0.0.1:{port} only (psutil); Streamlit argv --server.address 127.0.0.1; "
           "--host documented as the way to expose it", surface="dashboard")


DB_PATHS = ["/servelab.db", "/data/servelab.db", "/app/static/servelab.db", "/app/static/../../data/servelab.db",
            "/app/static/%2e%2e/%2e%2e/data/servelab.db", "/static/servelab.db", "/static/../data/servelab.db",
            "/media/servelab.db", "/_stcore/static/servelab.db", "/component/..%2f..%2fdata%2fservelab.db",
            "/runs/../servelab.db", "/data/runs/1/server.log"]


def test_no_url_serves_the_database(live_dashboard, record) -> None:
    port, db = live_dashboard["port"], live_dashboard["db"]
    head = db.read_bytes()[:16]
    assert head.startswith(b"SQLite format 3")
    paths = [*DB_PATHS, str(db), str(db).replace("/", "%2f")]
    seen = {}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        for path in paths:
            resp = client.get(path) if "%" not in path else client.send(client.build_request("GET", path))
            seen[path] = resp.status_code
            assert not resp.content.startswith(b"SQLite format 3"), path
            assert head not in resp.content, path
    codes = sorted(set(seen.values()))
    record("security", "the database by URL (/data/servelab.db, /app/static/…, traversal, its absolute path)",
           "no URL returns the database's bytes",
           f"{len(paths)} paths tried: HTTP {', '.join(map(str, codes))} (404 or Streamlit's own page), "
           "never the SQLite bytes", surface="dashboard")


def test_delete_and_downloads_reach_nothing_outside_the_data_folder(env: Path, store: Store, tmp_path: Path,
                                                                    monkeypatch, record) -> None:
    from streamlit.testing.v1 import AppTest

    outside = tmp_path / "elsewhere"  # beside the data folder, as another host's /root/sl/data/runs/1 would be
    outside.mkdir()
    for name in ("bench-0-0.json", "server.log", "secret.txt"):
        (outside / name).write_text(f"SECRET {name}\n")
    (env / "runs").mkdir()
    (env / "runs" / "2").symlink_to(outside, target_is_directory=True)  # inside by name, outside once resolved
    mixed = env / "runs" / "3"
    mixed.mkdir()
    (mixed / "bench-0-0.json").write_text("{}")
    (mixed / "leak.txt").symlink_to(outside / "secret.txt")
    ended = dict(status=RunStatus.succeeded, model="org/model", phase="succeeded", finished_at=utcnow())
    foreign = store.create_run(label="foreign", run_dir=str(outside), **ended)
    linked = store.create_run(label="linked", run_dir=str(env / "runs" / "2"), **ended)
    local = store.create_run(label="local", run_dir=str(mixed), **ended)

    assert api.run_files(foreign) == {} and api.run_files(linked) == {}
    assert api.run_files(local) == {"bench-0-0.json": (mixed / "bench-0-0.json").resolve()}

    monkeypatch.setenv("SERVELAB_BACKEND", "cpu")
    monkeypatch.delenv("SERVELAB_PASSWORD", raising=False)
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["run"] = str(foreign.id)
    at.run()
    at.switch_page("app_pages/run.py").run()
    assert not at.exception
    assert [d.label for d in at.download_button] == ["results.csv"]  # nothing of the folder outside
    assert not any("SECRET" in c.value for c in at.code)  # nor its server.log in the log panel

    for run in (foreign, linked, local):
        api.delete_run(store, run.id)
    assert store.list_runs() == []
    assert sorted(p.name for p in outside.iterdir()) == ["bench-0-0.json", "secret.txt", "server.log"]
    assert (outside / "secret.txt").read_text() == "SECRET secret.txt\n"
    assert (env / "runs" / "2").is_symlink() and not mixed.exists()  # the local folder went, its link's target stayed
    record("security", "runs whose run_dir is outside the data folder (a path elsewhere, a symlink out, a file "
           "linked out)", "delete removes nothing outside the data folder; downloads serve nothing from outside",
           "the outside folder and its 3 files survived the deletes; the Run page offered only results.csv; "
           "run_files listed only the inside file", surface="api, dashboard")


def test_reproduce_shows_no_internal_marks(store: Store) -> None:
    from dashboard import run_view

    spec = RunSpec(launch=LaunchSpec(model="org/model", env={"VLLM_LOGGING_LEVEL": "DEBUG"}), bench=[BenchSpec()])
    env = {"CUDA_VISIBLE_DEVICES": "0,1", "VLLM_LOGGING_LEVEL": "DEBUG", "SERVELAB_RUN_ID": "1",
           "SERVELAB_STORE": "0123456789abcdef"}
    run = store.create_run(label="r", spec_json=spec.model_dump_json(), env_json=json.dumps(env), port=8123,
                           status=RunStatus.succeeded)
    assert api.reproduce_env(run) == {"CUDA_VISIBLE_DEVICES": "0,1", "VLLM_LOGGING_LEVEL": "DEBUG"}
    text = "\n".join(t for t, _ in run_view.reproduce(run).values())
    assert "CUDA_VISIBLE_DEVICES=0,1" in text and "SERVELAB" not in text and "0123456789abcdef" not in text
