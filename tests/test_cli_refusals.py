"""`servelab run` / `servelab sweep` refuse a launch that cannot run, with the same plain words as the form,
a non-zero exit, and nothing queued; `--for-another-worker` queues it for a machine that has the GPUs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from runner import api
from runner.cli import app
from runner.config import CPU_DCP, Host
from runner.models import RunStatus

TWO_CORES = Host(cpu_backend=True, cores=2)  # the CPU-only machine these refusals describe


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SERVELAB_DATA", str(tmp_path))
    monkeypatch.setattr(api, "this_host", lambda: TWO_CORES)
    db = str(tmp_path / "servelab.db")

    def run(*args: str) -> tuple[int, str, str]:
        result = CliRunner().invoke(app, ["--db", db, *args])
        return result.exit_code, result.stdout, result.stderr

    return run


def spec_file(tmp_path: Path, launch: dict, bench: dict | None = None, **more: object) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"launch": {"model": "org/m", **launch}, "bench": bench or {}, **more}))
    return str(path)


def four_head_model(tmp_path: Path) -> str:
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"num_attention_heads": 4, "num_key_value_heads": 4}))
    return str(path)


@pytest.mark.parametrize(
    ("launch", "bench", "message"),
    [
        ({"tensor-parallel-size": 2, "decode-context-parallel-size": 2}, None, CPU_DCP),
        ({"tensor-parallel-size": 8}, None,
         "TP×PP×DP = 8×1×1 = 8 ranks, but this machine has no GPU and vLLM's CPU backend runs one rank per core on "
         "its 2 cores; lower the sizes to fit 2, or queue it for a worker on a machine with 8 GPUs."),
        ({"model": ""}, None, "Model: enter a model name (a Hugging Face id such as org/name) or a local path."),
        ({}, {"num-prompts": 999999999999}, "num-prompts must be between 1 and 1,000,000; it is 999,999,999,999."),
        ({"max-num-seqs": 100000}, None, "max-num-seqs must be between 1 and 65536; it is 100,000."),
        ({"port": 80}, None, "port must be between 1024 and 65535; it is 80."),
    ],
)
def test_run_refuses_with_the_plain_reason(cli, tmp_path: Path, launch: dict, bench: dict | None, message: str):
    code, out, err = cli("run", spec_file(tmp_path, launch, bench))
    assert (code, out, err) == (2, "", f"error: {message}\n")
    assert api.open_store(str(tmp_path / "servelab.db")).list_runs() == []


def test_run_refuses_tp3_for_a_model_with_four_heads(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(api, "this_host", lambda: Host(gpus=4))  # room for 3 ranks: only the heads rule speaks
    code, out, err = cli("run", spec_file(tmp_path, {"model": four_head_model(tmp_path), "tensor-parallel-size": 3}))
    assert (code, err) == (2, "error: TP 3 does not divide the model's 4 attention heads (its config.json); "
                              "pick TP 1, 2 or 4.\n")


def test_several_problems_are_listed_one_a_line(cli, tmp_path: Path):
    code, _, err = cli("run", spec_file(tmp_path, {"tensor-parallel-size": 8, "decode-context-parallel-size": 2}))
    assert code == 2
    assert err == (f"error: 2 problems:\n  - {CPU_DCP}\n  - TP×PP×DP = 8×1×1 = 8 ranks, but this machine has no GPU "
                   "and vLLM's CPU backend runs one rank per core on its 2 cores; lower the sizes to fit 2, or queue it "
                   "for a worker on a machine with 8 GPUs.\n")


def test_sweep_refuses_a_cell_that_cannot_run_here(cli, tmp_path: Path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"launch": {"model": "org/m"}, "matrix": {"decode-context-parallel-size": [1, 2],
                                                                              "tensor-parallel-size": [2]}}))
    code, _, err = cli("sweep", str(path))
    assert (code, err) == (2, f"error: {CPU_DCP}\n")
    assert api.open_store(str(tmp_path / "servelab.db")).list_runs() == []


def test_for_another_worker_queues_what_this_machine_cannot_run(cli, tmp_path: Path):
    code, out, err = cli("run", spec_file(tmp_path, {"tensor-parallel-size": 8}), "--for-another-worker")
    assert (code, out, err) == (0, "queued run 1 for another worker\n", "")
    [run] = api.open_store(str(tmp_path / "servelab.db")).list_runs()
    assert (run.status, run.tensor_parallel_size, json.loads(run.spec_json)["other_worker"]) == (
        RunStatus.queued, 8, True)


def test_this_host_on_the_cpu_backend_counts_the_usable_cores(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SERVELAB_BACKEND", "cpu")
    assert api.this_host() == Host(cpu_backend=True, cores=len(os.sched_getaffinity(0)))


def test_a_problem_repeated_by_a_load_list_is_said_once(tmp_path):
    spec = tmp_path / "loads.yaml"
    spec.write_text("launch: {model: org/m}\nbench: {request-rate: [1, 2, 4], extra-args: [--num-warmups, '2']}\n")
    result = CliRunner().invoke(app, ["--db", str(tmp_path / "s.db"), "run", str(spec)])
    assert result.exit_code == 2
    assert result.stderr.count("`--num-warmups` in extra args repeats the spec field `num_warmups`") == 1
