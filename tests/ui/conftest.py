"""The dashboard tests: a fresh SQLite file and data folder per test, seeded with the seed's four results
imported through the runner's API (the two bench outputs, each with its GSM8K table); Debian's chromium for the
browser tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from runner import api
from runner.store import Store

REPO = Path(__file__).resolve().parents[2]
SEED = REPO / "tests" / "fixtures" / "seed"
APP = str(REPO / "dashboard" / "streamlit_app.py")
# Debian's chromium, driven by this environment's python playwright (the test extra) through `executable_path`;
# Playwright's own browser downloads are never used.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SEED_RUNS = [(("tp8.txt", "gsm8k_tp8.txt"), "TP8"), (("tp8_dcp8.txt", "gsm8k_tp8_dcp8.txt"), "TP8+DCP8")]


@pytest.fixture(scope="session")
def chromium() -> dict[str, Any]:
    """`pw.chromium.launch(**chromium)`: Debian's chromium, headless. Without it the browser tests fail, never skip
    (./dev.sh test installs it)."""
    if not CHROMIUM.is_file():
        pytest.fail(f"Debian chromium is not at {CHROMIUM}: apt-get install chromium (./dev.sh test installs it)")
    return {"executable_path": str(CHROMIUM), "headless": True, "args": CHROMIUM_ARGS}


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SERVELAB_DATA", str(tmp_path))
    monkeypatch.setenv("SERVELAB_DB", str(tmp_path / "servelab.db"))
    monkeypatch.delenv("SERVELAB_PASSWORD", raising=False)
    monkeypatch.setenv("SERVELAB_BACKEND", "cpu")  # the CPU machine these tests describe, wherever they run
    return tmp_path


@pytest.fixture
def db_path(data_dir: Path) -> Path:
    return data_dir / "servelab.db"


@pytest.fixture
def seeded(store: Store) -> Store:
    """The seed's two configurations as two runs, each holding its bench block and, added with `into=`, its
    GSM8K table: 1 TP8, 2 TP8+DCP8."""
    for (bench, gsm8k), label in SEED_RUNS:
        (run_id,) = api.import_files(store, [(bench, (SEED / bench).read_bytes())], label=label)
        api.import_files(store, [(gsm8k, (SEED / gsm8k).read_bytes())], into=run_id)
    return store


@pytest.fixture
def demo_model(data_dir: Path) -> Path:
    """A stand-in for the demo model folder, so queueing does not spend seconds writing the real one."""
    path = data_dir / "models" / "demo"
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"num_key_value_heads": 4}))
    return path


@pytest.fixture
def open_page(data_dir: Path):
    """`open_page("compare", a=1, b="2,3")`: the app run once (Launch, its default page), then the page."""
    from streamlit.testing.v1 import AppTest

    def _open(page: str | None = None, **query: object) -> AppTest:
        at = AppTest.from_file(APP, default_timeout=60)
        for key, value in query.items():
            at.query_params[key] = str(value)
        at.run()
        if page is not None:
            at.switch_page(f"app_pages/{page}.py").run()
        assert not at.exception, at.exception
        return at

    return _open
