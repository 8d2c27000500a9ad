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


PAGE = Path(__file__).parent / "fixtures" / "seed_page.txt"  # the seed's usage guide, as pasted
SEED_ROWS = [  # its "DCP Gain Analysis" table
    "| Request Throughput (req/s) | 1.25 | 1.57 | +0.32 | +25.6% |",
    "| Output Token Throughput (tok/s) | 485.78 | 695.13 | +209.35 | +43.1% |",
    "| Mean TTFT (s) | 271.2 | 227.8 | -43.4 | +16.0% |",
    "| Median TTFT (s) | 227.4 | 227.1 | -0.3 | +0.1% |",
]
SPLIT = ("2 runs from one page (seed_page.txt): #1 TP8 (998 requests, 485.78 output tok/s, gsm8k flexible-extract "
         "0.9416), #2 TP8+DCP8 (994 requests, 695.13 output tok/s, gsm8k flexible-extract 0.9386, KV cache 5,721,088 "
         "tokens). TP8: no startup-log lines on the page.")


def test_the_seed_page_imports_as_its_two_runs_and_compares_to_its_gain_table(cli_env, seed_metrics):
    """The seed page pasted whole was refused (df631b1), before that cut to its last block: now one run per
    bench block, named as the page names it, each with the GSM8K table labelled with its name."""
    out = subprocess.run([*CLI, "import", str(PAGE)], capture_output=True, text=True, env=cli_env,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "2"]
    assert out.stderr.strip() == SPLIT
    store = api.Store(cli_env["SERVELAB_DB"])
    assert [(r.id, r.label, r.source.value) for r in sorted(store.list_runs(), key=lambda r: r.id)] == [
        (1, "TP8", "imported"), (2, "TP8+DCP8", "imported")]
    for run_id, name in [(1, "TP8"), (2, "TP8+DCP8")]:
        [metrics] = store.run_metrics(run_id)
        assert {k: metrics[k] for k in seed_metrics[name]} == seed_metrics[name]  # every value the page prints
    assert {(e.task, e.filter, e.value, e.stderr, e.n_shot) for e in store.eval_results(1)} == {
        ("gsm8k", "flexible-extract", 0.9416, 0.0065, 5), ("gsm8k", "strict-match", 0.9409, 0.0065, 5)}
    assert {(e.filter, e.value, e.stderr) for e in store.eval_results(2)} == {
        ("flexible-extract", 0.9386, 0.0066), ("strict-match", 0.9371, 0.0067)}
    tp8, dcp8 = store.get_run(1), store.get_run(2)
    assert (tp8.kv_cache_tokens, tp8.kv_cache_gib, tp8.dcp_multiplier) == (None, None, None)  # none on the page
    assert (dcp8.kv_cache_tokens, dcp8.kv_cache_gib, dcp8.dcp_multiplier) == (5_721_088, 46.80, 8)
    table = sl(cli_env, "compare", "1", "2", "--format", "markdown")
    for row in SEED_ROWS:
        assert row in table
    assert "| gsm8k | flexible-extract | exact_match | 0.9416 ± 0.0065 | 0.9386 ± 0.0066 | -0.0030 | no |" in table
    folder = Path(cli_env["SERVELAB_DATA"]) / "runs"  # each run keeps its own share of the page
    assert "485.78" in (folder / "1" / "imported-seed_page.txt").read_text()
    assert "695.13" not in (folder / "1" / "imported-seed_page.txt").read_text()


def test_a_page_that_names_its_runs_ambiguously_is_refused(tmp_path):
    """Never a guess: a table whose label names no block, two blocks of one name, a block without a name, a
    table too few all keep the refusal, saying why; nothing is stored."""
    page = PAGE.read_text()
    read = lambda name: (SEED / name).read_text()  # noqa: E731
    found = ("holds 2 'Serving Benchmark Result' blocks (998 requests, 485.78 output tok/s; 994 requests, 695.13 "
             "output tok/s) and an lm-eval table; ")
    cut = "so it is not split into runs by the names it gives them. Import each benchmark block and each lm-eval"
    store = api.Store(str(tmp_path / "s.db"))
    for name, text, said in [
        ("tp4.txt", page.replace("- TP8\nlocal-completions", "- TP4\nlocal-completions"),
         f"{found}the lm-eval table labelled 'TP4' matches no block's name (TP8, TP8+DCP8), {cut}"),
        ("same.txt", page.replace("TP8+DCP8 Benchmark Output¶", "TP8 Benchmark Output¶"),
         f"{found}2 blocks are named 'TP8', {cut}"),
        ("unnamed.txt", page.replace("TP8 Benchmark Output¶\n", ""),
         f"{found}its block 1 has no name on the line above it (as 'TP8 Benchmark Output' names the block below "
         f"it), {cut}"),
        ("one_table.txt", page[:page.index("- TP8+DCP8\nlocal")] + page[page.index("Benchmarking¶"):],
         f"{found}it has 1 lm-eval table(s) for 2 blocks, {cut}"),
        ("two_tables.txt", page.replace("- TP8+DCP8\nlocal", "- TP8\nlocal"),
         f"{found}2 lm-eval tables are labelled 'TP8', {cut}"),
        # what the split does not take is refused as before: one block with a table, tables alone
        ("block+table.txt", read("tp8.txt") + read("gsm8k_tp8.txt"),
         "holds a 'Serving Benchmark Result' block and an lm-eval table; a file is imported as one run's result."),
        ("tables.txt", read("gsm8k_tp8.txt") + read("gsm8k_tp8_dcp8.txt"),
         "holds 2 values of gsm8k flexible-extract exact_match (0.9416, 0.9386): several runs' tables; a file is"),
    ]:
        with pytest.raises(ParseError) as refused:
            api.import_files(store, [(name, text)])
        assert str(refused.value).startswith(f"{name}: {said}"), str(refused.value)
    api.import_files(store, [("tp8.txt", read("tp8.txt"))])
    with pytest.raises(ParseError, match=r"seed_page.txt: holds 2 runs' results \(TP8, TP8\+DCP8\); a page of "
                                         r"several runs is imported as new runs, not into run 1"):
        api.import_files(store, [("seed_page.txt", page)], into=1)
    assert len(store.list_runs()) == 1 and len(store.bench_results(1)) == 1


def test_startup_lines_that_name_no_run_are_left_out_and_said(tmp_path):
    page = PAGE.read_text().replace("- TP8\n- TP8+DCP8\n(Worker_TP0", "(Worker_TP0")
    items = api.parse_import("page.txt", page)
    assert [(i.part, i.kv) for i in items] == [("TP8", None), ("TP8+DCP8", None)]
    [said] = api.import_summary(items)
    assert said.endswith("TP8+DCP8 (994 requests, 695.13 output tok/s, gsm8k flexible-extract 0.9386). 1 "
                         "startup-log line(s) under 'You can observe from the service startup logs that the kv "
                         "…' name no run: left out."), said
    assert items[1].text.count("KV cache") == 0  # the run's share of the page holds none of them


def test_a_single_block_imports_as_before(tmp_path):
    store = api.Store(str(tmp_path / "s.db"))
    [item] = api.parse_import("tp8.txt", (SEED / "tp8.txt").read_text())
    assert (item.kind, item.part, item.scores, item.kv) == ("bench_text", None, None, None)
    assert api.import_summary([item]) == []
    assert api.import_files(store, [("tp8.txt", (SEED / "tp8.txt").read_text())]) == [1]
    run = store.get_run(1)
    assert (run.label, run.phase) == ("tp8", "imported bench_text")
    assert store.run_metrics(1)[0]["output_throughput"] == 485.78
