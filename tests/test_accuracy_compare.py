"""Issue 5: the seed's GSM8K tables imported next to its bench blocks, compared without a flagged drop."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner import api
from runner.errors import ParseError
from runner.parsers import parse_lm_eval_table

SEED = Path(__file__).parent / "fixtures" / "seed"
CLI = [sys.executable, "-m", "runner.cli"]


@pytest.fixture
def cli_env(tmp_path):
    return {**os.environ, "SERVELAB_DATA": str(tmp_path), "SERVELAB_DB": str(tmp_path / "s.db")}


def sl(env, *args) -> str:
    out = subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_seed_accuracy_imports_into_the_bench_runs_and_shows_no_flagged_drop(cli_env):
    assert sl(cli_env, "import", str(SEED / "tp8.txt"), "--label", "TP8").split() == ["1"]
    assert sl(cli_env, "import", str(SEED / "gsm8k_tp8.txt"), "--into", "1").split() == ["1"]
    assert sl(cli_env, "import", str(SEED / "tp8_dcp8.txt"), "--label", "TP8+DCP8").split() == ["2"]
    assert sl(cli_env, "import", str(SEED / "gsm8k_tp8_dcp8.txt"), "--into", "2").split() == ["2"]

    store = api.Store(cli_env["SERVELAB_DB"])
    values = {(e.filter, e.value, e.stderr, e.n_shot) for e in store.eval_results(1)}
    assert values == {("flexible-extract", 0.9416, 0.0065, 5), ("strict-match", 0.9409, 0.0065, 5)}
    values = {(e.filter, e.value, e.stderr) for e in store.eval_results(2)}
    assert values == {("flexible-extract", 0.9386, 0.0066), ("strict-match", 0.9371, 0.0067)}

    rows = api.compare_accuracy(store, 1, 2)
    assert {r["filter"]: round(r["delta"], 4) for r in rows} == {"flexible-extract": -0.003, "strict-match": -0.0038}
    assert all(r["flagged"] is False for r in rows)

    out = sl(cli_env, "compare", "1", "2", "--format", "markdown")
    assert "| Request Throughput (req/s) | 1.25 | 1.57 | +0.32 | +25.6% |" in out
    assert "| gsm8k | flexible-extract | exact_match | 0.9416 ± 0.0065 | 0.9386 ± 0.0066 | -0.0030 | no |" in out
    assert "| gsm8k | strict-match | exact_match | 0.9409 ± 0.0065 | 0.9371 ± 0.0067 | -0.0038 | no |" in out


def test_a_real_drop_is_flagged(tmp_path):
    store = api.Store(str(tmp_path / "s.db"))
    a = store.create_run(label="a")
    b = store.create_run(label="b")
    store.add_eval_results(a.id, [{"task": "gsm8k", "filter": "strict-match", "metric": "exact_match",
                                   "value": 0.94, "stderr": 0.0065}])
    store.add_eval_results(b.id, [{"task": "gsm8k", "filter": "strict-match", "metric": "exact_match",
                                   "value": 0.90, "stderr": 0.0080}])
    [row] = api.compare_accuracy(store, a.id, b.id)
    assert row["flagged"] is True  # drop 0.04 > 2 × 0.0103


def test_eval_table_prints_the_seed_form_and_parses_back(tmp_path):
    store = api.Store(str(tmp_path / "s.db"))
    [run_id] = api.import_files(store, [("gsm8k_tp8.txt", (SEED / "gsm8k_tp8.txt").read_text())])
    printed = api.eval_table(store, run_id)
    assert printed.splitlines()[0] == "|Tasks|Version| Filter |n-shot| Metric | |Value | |Stderr|"
    again = {(s.task, s.filter, s.value, s.stderr, s.n_shot) for s in parse_lm_eval_table(printed)}
    assert again == {("gsm8k", "flexible-extract", 0.9416, 0.0065, 5), ("gsm8k", "strict-match", 0.9409, 0.0065, 5)}


def test_import_into_a_missing_run_creates_nothing(tmp_path, cli_env):
    out = subprocess.run([*CLI, "import", str(SEED / "gsm8k_tp8.txt"), "--into", "7"], capture_output=True,
                         text=True, env=cli_env, cwd=Path(__file__).parent.parent)
    assert out.returncode == 2 and "no run 7" in out.stderr
    assert api.Store(cli_env["SERVELAB_DB"]).list_runs() == []


def test_a_page_of_several_results_is_refused_not_cut_to_its_last(tmp_path):
    """The seed page itself (both GSM8K tables, then both bench blocks) was imported as one run holding only the
    TP8+DCP8 block: TP8's 485.78 tok/s and both tables dropped without a word."""
    read = lambda name: (SEED / name).read_text()  # noqa: E731
    page = "\n".join([read("gsm8k_tp8.txt"), read("gsm8k_tp8_dcp8.txt"), "TP8 Benchmark Output", read("tp8.txt"),
                      "TP8+DCP8 Benchmark Output", read("tp8_dcp8.txt")])
    store = api.Store(str(tmp_path / "s.db"))
    for name, text, said in [
        ("seed.txt", page, "holds 2 'Serving Benchmark Result' blocks (998 requests, 485.78 output tok/s; 994 "
                           "requests, 695.13 output tok/s) and an lm-eval table; a file is imported as one run's"),
        ("block+table.txt", read("tp8.txt") + read("gsm8k_tp8.txt"),
         "holds a 'Serving Benchmark Result' block and an lm-eval table;"),
        ("tables.txt", read("gsm8k_tp8.txt") + read("gsm8k_tp8_dcp8.txt"),
         "holds 2 values of gsm8k flexible-extract exact_match (0.9416, 0.9386): several runs' tables;"),
    ]:
        with pytest.raises(ParseError) as refused:
            api.import_files(store, [(name, text)])
        assert str(refused.value).startswith(f"{name}: {said}")
    assert store.list_runs() == []
    # each part on its own still imports, as the seed's fixtures always did
    assert api.parse_import("tp8.txt", read("tp8.txt")).bench.metrics["output_throughput"] == 485.78
