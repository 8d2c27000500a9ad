"""The CLI as a person reads it: `compare` with every section (CSV with a `section` column), `runs` in 120
columns, `show` readable (and `--json`), the default pair of a comparison. Real SQLite, the real `servelab` CLI."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner import api
from runner.config import BenchSpec, EvalSpec, LaunchSpec, RunSpec, Settings
from runner.models import RunStatus
from tests.conftest import FIXTURES, REPO, SEED

CLI = [sys.executable, "-m", "runner.cli"]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "SERVELAB_DATA": str(tmp_path), "SERVELAB_DB": str(tmp_path / "s.db"),
            "PYTHONPATH": str(REPO)}


def sl(env: dict[str, str], *args: str, code: int = 0) -> str:
    out = subprocess.run([*CLI, *args], check=False, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == code, out.stdout + out.stderr
    return out.stdout


def imported(env: dict[str, str], name: str | Path, label: str | None = None, into: int | None = None) -> None:
    path = Path(name) if isinstance(name, Path) else SEED / name
    settings = Settings(data_dir=Path(env["SERVELAB_DATA"]))
    with api.open_store(env["SERVELAB_DB"]) as store:
        api.import_files(store, [(path.name, path.read_bytes())], label=label, into=into, settings=settings)


def seed(env: dict[str, str]) -> None:
    """1 TP8 and 2 TP8+DCP8 with their GSM8K tables; 3 and 4 the GSM8K tables alone (accuracy only)."""
    imported(env, "tp8.txt", "TP8")
    imported(env, "gsm8k_tp8.txt", into=1)
    imported(env, "tp8_dcp8.txt", "TP8+DCP8")
    imported(env, "gsm8k_tp8_dcp8.txt", into=2)
    imported(env, "gsm8k_tp8.txt", "gsm8k TP8")
    imported(env, "gsm8k_tp8_dcp8.txt", "gsm8k TP8+DCP8")


def records(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_seed_compare_csv_carries_every_section_in_canonical_units(env) -> None:
    seed(env)
    rows = records(sl(env, "compare", "1", "2", "--format", "csv"))
    assert {r["section"] for r in rows} == {"benchmark", "accuracy"}
    bench = {r["key"]: r for r in rows if r["section"] == "benchmark"}
    assert (bench["mean_ttft_ms"]["Metric"], bench["mean_ttft_ms"]["unit"], bench["mean_ttft_ms"]["TP8"]) == (
        "Mean TTFT (ms)", "ms", "271196.67")
    assert float(bench["output_throughput"]["Improvement(%)"]) == pytest.approx(43.1, abs=0.05)
    assert {r["flags"] for r in bench.values()} == {"failed requests 2 vs 6"}
    assert {r["noise"] for r in bench.values()} == {"no CI (single run)"}
    acc = [r for r in rows if r["section"] == "accuracy"]
    assert [(r["key"], r["TP8"], r["TP8+DCP8"], r["noise"]) for r in acc] == [
        ("gsm8k/flexible-extract/exact_match", "0.9416", "0.9386", "within noise"),
        ("gsm8k/strict-match/exact_match", "0.9409", "0.9371", "within noise"),
    ]
    table = sl(env, "compare", "1", "2")
    assert table.splitlines()[:5] == ["TP8+DCP8 vs TP8", "", "Benchmark at 100 req/s", "",
                                      "flag: failed requests 2 vs 6"]
    assert {(r["load_kind"], r["load"], r["workload"]) for r in bench.values()} == {("request-rate", "100.0", "")}
    assert {(r["load_kind"], r["load"]) for r in acc} == {("", "")}
    assert "Accuracy" in table


def test_seed_lm_eval_tables_alone_compare_to_a_non_empty_csv(env) -> None:
    """Issue 13: runs holding accuracy only printed nothing with --format csv."""
    seed(env)
    rows = records(sl(env, "compare", "3", "4", "--format", "csv"))
    assert [(r["section"], r["baseline"], r["candidate"], r["Metric"], r["gsm8k TP8"], r["gsm8k TP8+DCP8"])
            for r in rows] == [
        ("accuracy", "3", "4", "gsm8k flexible-extract exact_match", "0.9416", "0.9386"),
        ("accuracy", "3", "4", "gsm8k strict-match exact_match", "0.9409", "0.9371"),
    ]
    assert float(rows[0]["Change"]) == pytest.approx(-0.003)
    markdown = sl(env, "compare", "3", "4", "--format", "markdown")
    assert "### Accuracy" in markdown and "### Benchmark" not in markdown
    # nothing in common: said, and a non-zero exit
    api.open_store(env["SERVELAB_DB"]).create_run(label="empty", status=RunStatus.succeeded)
    out = subprocess.run([*CLI, "compare", "1", "5", "--format", "csv"], check=False, capture_output=True, text=True,
                         env=env)
    assert out.returncode == 1 and "no benchmark, accuracy or KV capacity in common" in out.stderr


def test_detailed_results_give_bootstrap_intervals_through_the_store(env) -> None:
    detailed = FIXTURES / "cpu_0.32" / "bench_detailed.json"
    imported(env, detailed, "A")
    imported(env, detailed, "B")
    bench = {r["key"]: r for r in records(sl(env, "compare", "1", "2", "--format", "csv"))}
    row = bench["median_ttft_ms"]
    assert row["noise"] == "within noise" and float(row["CI low"]) < 0 < float(row["CI high"])
    assert float(row["A CI low"]) < float(row["A"]) < float(row["A CI high"])
    assert bench["output_throughput"]["noise"] == "no CI (single run)"
    assert "rtfx" not in bench and bench["median_itl_ms"]["flags"].endswith("≈0 ms on both")
    assert bench["duration"]["flags"] == "benchmark 0.3 s on baseline (< 10 s); benchmark 0.3 s on candidate (< 10 s)"


def _runs(env) -> None:
    store = api.open_store(env["SERVELAB_DB"])
    spec = RunSpec(label="a long label that does not fit in its column",
                   launch=LaunchSpec(model="/models/demo", tensor_parallel_size=2, port=8123),
                   bench=[BenchSpec(num_prompts=40)], eval=EvalSpec(limit=10))
    store.create_run(label="a long label that does not fit in its column", spec_json=spec.model_dump_json(),
                     status=RunStatus.failed, tensor_parallel_size=2, model="/models/demo", port=8123,
                     failure_reason="vLLM exited during startup:\nERROR port 8123 is used by process 77\n" + "x" * 300)
    imported(env, "tp8.txt", "TP8")


def test_runs_fit_120_columns_one_line_a_run(env) -> None:
    _runs(env)
    lines = sl(env, "runs").splitlines()
    assert len(lines) == 3 and all(len(line) <= 120 for line in lines)
    assert lines[0].split() == ["ID", "STATUS", "LABEL", "CONFIG", "LOAD", "OUT", "TOK/S", "REQ/S", "TTFT", "MS",
                                "TPOT", "MS", "KV", "TOKENS", "CREATED", "REASON"]
    tp8, failed = lines[1], lines[2]
    assert tp8.split()[:8] == ["2", "succeeded", "TP8", "100/s", "485.8", "1.25", "227,390", "473.04"]
    assert "nan" not in " ".join(lines).lower() and "none" not in " ".join(lines).lower()
    assert failed.split()[:4] == ["1", "failed", "a", "long"] and " TP2 " in failed
    assert failed.endswith(" vLLM ex…") and len(failed) == 120


def test_runs_csv_holds_one_physical_line_a_run(env, tmp_path) -> None:
    _runs(env)
    out = tmp_path / "runs.csv"
    sl(env, "export", "runs", "--out", str(out))
    lines = out.read_text().splitlines()
    assert len(lines) == 3
    [failed] = [r for r in records(out.read_text()) if r["status"] == "failed"]
    assert failed["failure_reason"].startswith("vLLM exited during startup: ⏎ ERROR port 8123 is used by process 77 ⏎ x")
    assert len(sl(env, "runs", "--format", "csv").splitlines()) == 3


def test_show_is_readable_with_commands_and_json_on_request(env) -> None:
    _runs(env)
    text = sl(env, "show", "1")
    lines = text.splitlines()
    assert lines[0] == "run 1 · failed · a long label that does not fit in its column"
    assert "launch       TP2, port 8123" in lines
    # stored without the argv it ran (it failed before any): today's rendering, and the titles say so
    marked = f" — {api.RE_RENDERED}:"
    assert {f"vllm serve{marked}", f"vllm bench serve{marked}", f"lm_eval{marked}"} <= set(lines)
    bench = lines[lines.index(f"vllm bench serve{marked}") + 1]
    assert "--num-prompts 40" in bench and "--base-url http://127.0.0.1:8123" in bench and "--save-detailed" in bench
    assert lines[lines.index("reason:") + 1:lines.index("reason:") + 3] == [
        "  vLLM exited during startup:", "  ERROR port 8123 is used by process 77"]
    shown = sl(env, "show", "2")
    assert "  at 100 req/s: 998 requests, 2 failed, 800.3 s, 485.8 out tok/s, 1.25 req/s, 227,389.9 median TTFT ms" \
        in shown
    record = json.loads(sl(env, "show", "1", "--json"))
    assert (record["status"], record["spec"]["launch"]["tensor_parallel_size"], record["bench"]) == ("failed", 2, [])


def test_default_pair_is_the_two_newest_succeeded_runs(store) -> None:
    assert api.default_pair(store) is None
    ok1 = store.create_run(label="ok1", status=RunStatus.succeeded).id
    failed = store.create_run(label="failed", status=RunStatus.failed).id
    assert api.default_pair(store) == (ok1, failed)  # one succeeded run: it is the baseline
    ok2 = store.create_run(label="ok2", status=RunStatus.succeeded).id
    store.create_run(label="failed again", status=RunStatus.failed)
    assert api.default_pair(store) == (ok1, ok2)


def test_runs_never_cut_a_number(env) -> None:
    # an H200 run's 134,554,560 KV tokens printed as `134,554,5` in the 9-wide column
    with api.open_store(env["SERVELAB_DB"]) as store:
        run = api.queue_run(store, RunSpec(launch=LaunchSpec(model="m"), bench=[BenchSpec()]))
        store.update_run(run.id, status=RunStatus.succeeded, label="big", kv_cache_tokens=134_554_560)
        store.add_bench_result(run.id, {"completed": 200.0, "failed": 0.0, "output_throughput": 12_682.4,
                                        "request_throughput": 99.08, "median_ttft_ms": 12_345_678.0,
                                        "median_tpot_ms": 12_345.0})
    line = sl(env, "runs").splitlines()[1]
    assert line.split()[:9] == ["1", "succeeded", "big", "TP1", "inf/s", "12,682", "99.08", "12.3M", "12,345"]
    assert line.split()[9] == "134.6M"
