"""benchmarks/peer.py without vLLM: both tools' result files read into cells, the ratios, the best launch, the
process roles, and the whole-tree CPU counting a process its parent left behind."""

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from runner.config import RunSpec, load_sweep_spec
from runner.store import Store

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import peer  # noqa: E402  (benchmarks/ is not a package)


def _peer_file(experiment: Path, seqs: int, rate: object, tput: float, tpot: float, duration: float,
               run_number: int = 0) -> None:
    # the peer's layout and keys: vllm/benchmarks/sweep/serve.py writes the bench JSON plus its overrides
    folder = experiment / f"SERVE--max_num_seqs={seqs}-BENCH--request_rate={rate}"
    folder.mkdir(parents=True, exist_ok=True)
    name = "warmup.json" if run_number < 0 else f"run={run_number}.json"
    (folder / name).write_text(json.dumps({
        "output_throughput": tput, "median_tpot_ms": tpot, "duration": duration, "completed": 200,
        "run_number": run_number, "max_num_seqs": seqs, "request_rate": rate}))


def test_peer_results_by_cell_mean_over_runs_without_warmup(tmp_path: Path) -> None:
    _peer_file(tmp_path, 16, 16, 500.0, 10.0, 12.5)
    _peer_file(tmp_path, 16, "inf", 1800.0, 20.0, 3.0)
    _peer_file(tmp_path, 16, "inf", 2000.0, 22.0, 3.2, run_number=1)
    _peer_file(tmp_path, 16, "inf", 9999.0, 1.0, 1.0, run_number=-1)  # its warm-up run: not a result
    got = peer.peer_results(tmp_path)
    assert got == {(16, 16.0): {"output_throughput": 500.0, "median_tpot_ms": 10.0, "duration": 12.5},
                   (16, math.inf): {"output_throughput": 1900.0, "median_tpot_ms": 21.0, "duration": 3.1}}


def test_servelab_results_from_its_store(tmp_path: Path) -> None:
    db = tmp_path / "servelab.db"
    with Store(db) as store:
        for seqs, rows in ((16, [(16, 510.0, 9.0, 12.4), ("inf", 1700.0, 25.0, 3.4)]), (64, [(16, 505.0, 8.0, 12.5)])):
            spec = RunSpec.parse({"launch": {"model": "/m", "max-num-seqs": seqs},
                                  "bench": [{"request-rate": r} for r, *_ in rows]})
            run = store.create_run(spec_json=spec.model_dump_json())
            for bench, (_, tput, tpot, duration) in zip(spec.bench, rows, strict=True):
                store.add_bench_result(run.id, {"output_throughput": tput, "median_tpot_ms": tpot, "duration": duration,
                                                "completed": 200}, bench_spec_json=bench.model_dump_json())
    assert peer.servelab_results(db) == {
        (16, 16.0): {"output_throughput": 510.0, "median_tpot_ms": 9.0, "duration": 12.4},
        (16, math.inf): {"output_throughput": 1700.0, "median_tpot_ms": 25.0, "duration": 3.4},
        (64, 16.0): {"output_throughput": 505.0, "median_tpot_ms": 8.0, "duration": 12.5},
    }


def test_servelab_startups_say_launched_to_ready_and_the_prestart(tmp_path: Path) -> None:
    db = tmp_path / "servelab.db"
    with Store(db) as store:
        for seqs, phases in ((16, [("launched", 100.0), ("ready", 137.5)]),
                             (64, [("prestarted", 150.0), ("launched", 180.0), ("ready", 204.0)])):
            spec = RunSpec.parse({"launch": {"model": "/m", "max-num-seqs": seqs}})
            run = store.create_run(spec_json=spec.model_dump_json())
            for phase, t in phases:
                store.add_phase(run.id, phase, t=t, detail="beside run 1" if phase == "prestarted" else None)
    assert peer.servelab_startups(db) == ["run 1 (max-num-seqs 16): launched → ready 37.5 s",
                                          "run 2 (max-num-seqs 64): launched → ready 24.0 s; prestarted: beside run 1"]


def test_agreement_ratios_long_cells_skipped_cells_and_best_launch() -> None:
    servelab = {(16, 16.0): {"output_throughput": 510.0, "median_tpot_ms": 9.0, "duration": 12.4},
                (16, math.inf): {"output_throughput": 1700.0, "median_tpot_ms": 25.0, "duration": 3.4},
                (64, math.inf): {"output_throughput": 2600.0, "median_tpot_ms": 30.0, "duration": 2.0}}
    other = {(16, 16.0): {"output_throughput": 500.0, "median_tpot_ms": 10.0, "duration": 12.5},
             (16, 64.0): {"output_throughput": 1650.0, "median_tpot_ms": 20.0, "duration": 3.9},
             (16, math.inf): {"output_throughput": 2000.0, "median_tpot_ms": 20.0, "duration": 3.0},
             (64, math.inf): {"output_throughput": 2500.0, "median_tpot_ms": 30.0, "duration": 2.4}}
    rows = peer.agreement(servelab, other)
    assert [a.cell for a in rows] == [(16, 16.0), (16, math.inf), (64, math.inf)]
    assert rows[0].ratio("output_throughput") == pytest.approx(1.02)
    assert rows[0].ratio("median_tpot_ms") == pytest.approx(0.9)
    assert rows[1].ratio("output_throughput") == pytest.approx(0.85)
    assert [a.long for a in rows] == [True, False, False]  # both benchmarks ≥ 10 s only at rate 16
    assert peer.skipped(servelab, other) == [(16, 64.0)]  # servelab's early stop skipped it
    assert peer.best_launch(servelab) == peer.best_launch(other) == 64


def test_the_sweep_file_is_a_servelab_sweep_of_one_server_per_launch(tmp_path: Path) -> None:
    m = peer.MATRICES["decision"]
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(peer.servelab_sweep(m, Path("/m"), 8900, output_check=False)))
    cells = load_sweep_spec(path).cells()
    assert [spec.launch.max_num_seqs for _, spec in cells] == list(m.seqs)
    for _, spec in cells:
        assert [b.request_rate for b in spec.bench] == list(m.rates)
        assert {(b.num_prompts, b.num_warmups, b.stop_early) for b in spec.bench} == {(m.num_prompts, 8, True)}
        assert spec.output_check is None


def test_the_peer_gets_servelabs_own_argv_and_the_same_warmups() -> None:
    m = peer.MATRICES["decision"]
    serve, bench, serve_params, bench_params = peer.peer_commands(m, Path("/m"), 8900, "/bin/vllm")
    assert serve[:3] == ["/bin/vllm", "serve", "/m"] and serve[serve.index("--max-num-seqs") + 1] == "16"
    assert bench[:3] == ["/bin/vllm", "bench", "serve"]
    assert bench[bench.index("--num-warmups") + 1] == "8" and "--ignore-eos" in bench
    assert "--save-result" not in bench and "--result-dir" not in bench  # the peer adds its own
    assert serve_params == [{"max_num_seqs": 16}, {"max_num_seqs": 64}]
    assert bench_params == [{"request_rate": 16}, {"request_rate": 64}, {"request_rate": 256}, {"request_rate": "inf"}]


@pytest.mark.parametrize(("cmdline", "name", "expected"), [
    (["python", "-m", "runner.cli", "sweep", "s.json"], "python", "servelab CLI"),
    (["python", "-m", "runner.vllm_entry", "bench", "sweep", "serve", "--serve-cmd", "x"], "python", "sweep CLI"),
    (["python", "-m", "runner.vllm_entry", "serve", "/m", "--port", "1"], "python", "vLLM API server"),
    (["/w/bin/vllm", "serve", "/m"], "python", "vLLM API server"),
    (["python", "-m", "runner.vllm_entry", "--servelab-gate"], "python", "vLLM API server"),  # prestarted
    (["python", "-c", "from multiprocessing.spawn import spawn_main"], "VLLM::EngineCore", "engine core"),
    (["python", "-c", "x"], "VLLM::Worker", "vLLM worker"),
    ([], "VLLM::EngineCor", "engine core"),  # a zombie: no command line, the kernel's 15-character name
    (["python", "-m", "runner.bench_client"], "python", "benchmark client"),
    (["python", "-m", "runner.vllm_entry", "bench", "serve", "--model", "/m"], "python", "benchmark client"),
    (["python", "-B", "-c", "from multiprocessing.resource_tracker import main"], "python", "other"),
])
def test_process_roles(cmdline: list[str], name: str, expected: str) -> None:
    assert peer.role(cmdline, name) == expected


def test_tree_cpu_counts_a_process_its_parent_left_behind(tmp_path: Path) -> None:
    """The child starts a grandchild in a new session and exits at once: the orphan's 0.4 s of CPU is still
    the tree's (run in a process of its own: a subreaper must not be this test session)."""
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\n"
    child = f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {burn!r}], start_new_session=True)\n"
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        sys.path.insert(0, {str(BENCHMARKS)!r})
        import peer
        peer.child_subreaper()
        tree = peer.run_tree([sys.executable, "-c", {child!r}], {{}}, Path({str(tmp_path)!r}) / "log", poll_s=0.05)
        print(tree.rc, tree.cpu_s, tree.wall_s, tree.leftovers, tree.orphan_cpu_s)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(BENCHMARKS.parent), "PATH": "/usr/bin:/bin"})
    rc, cpu, wall, leftovers, orphan = out.stdout.split()
    assert int(rc) == 0 and int(leftovers) == 1  # the orphan outlived its parent and was waited for here
    assert float(cpu) >= 0.4 > float(wall)  # wall ends with the command; CPU counts what it left running
    assert 0.4 <= float(orphan) <= float(cpu)  # and says how much of it `time` would have missed


def test_arms_saved_one_per_command_combine_into_the_same_summary(tmp_path: Path, capsys) -> None:
    """A lent GPU runs each arm in a command of its own (10 minutes at most): saved, loaded back, paired."""
    tree = peer.TreeRun(rc=0, wall_s=200.0, cpu_s=300.0, by_role=dict.fromkeys(peer.ROLES, 1.0), unseen_s=0.5,
                        poll_cpu_s=0.1, other_cores=0.02, leftovers=0, orphan_cpu_s=0.0,
                        processes=[("engine core", "VLLM::EngineCor", 120.0)], foreign=[("sshd", 1.5)])
    cells = {(16, 32.0): {"output_throughput": 1000.0, "median_tpot_ms": 2.0, "duration": 20.1},
             (16, math.inf): {"output_throughput": 9000.0, "median_tpot_ms": 3.0, "duration": 1.1}}
    peer.save_arm(tmp_path / "s.json", "servelab", tree, cells)
    arm, back, got = peer.load_arm(tmp_path / "s.json")
    assert (arm, back, got) == ("servelab", tree, cells)
    slower = peer.TreeRun(**{**peer.asdict(tree), "wall_s": 400.0, "cpu_s": 600.0})
    peer.save_arm(tmp_path / "p.json", "peer", slower, {c: {**m, "output_throughput": m["output_throughput"] * 0.98}
                                                      for c, m in cells.items()})
    peer.combine([tmp_path / "s.json", tmp_path / "p.json"], peer.MATRICES["gpu"])
    out = capsys.readouterr().out
    assert "over all pairs 0.500" in out  # wall 200 / 400
    assert "cell max-num-seqs 16, rate 32: output tok/s servelab/peer 1.020" in out  # 1000 / 980, a ≥ 10 s cell
    assert out.strip().splitlines()[-1] == "peer ratio=0.5"
    with pytest.raises(SystemExit, match="as many servelab arms as peer arms"):
        peer.combine([tmp_path / "s.json"], peer.MATRICES["gpu"])
