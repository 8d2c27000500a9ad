"""The dashboard's pure helpers: form conversions, presets, launch-form reading, gain colours, run descriptions."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from dashboard import launch_form as lf
from dashboard import presets, tables
from dashboard import spec_form as form
from runner import api
from runner.config import BenchSpec, EvalSpec, Host, LaunchSpec, RunSpec
from runner.errors import SpecError, StoreError


@pytest.mark.parametrize(("model", "name", "kind"), [
    (LaunchSpec, "model", "text"), (LaunchSpec, "tensor_parallel_size", "int"), (LaunchSpec, "max_model_len", "text"),
    (LaunchSpec, "trust_remote_code", "bool"), (LaunchSpec, "extra_args", "list"), (LaunchSpec, "env", "dict"),
    (BenchSpec, "dataset_name", "choice"), (BenchSpec, "request_rate", "text"), (EvalSpec, "temperature", "text"),
])  # fmt: skip
def test_field_kinds(model, name, kind) -> None:
    assert form.field_kind(model.model_fields[name]) == kind


def test_every_spec_survives_the_form_round_trip() -> None:
    for spec in [*presets.presets().values(),
                 RunSpec(launch=LaunchSpec(model="m", env={"A": "x y"}, extra_args=["--x", "a b"]), bench=[])]:
        state: dict = {}
        lf.apply(spec, state)
        checked = lf.read(state, Host(gpus=8))
        assert checked.spec is not None, checked.problems
        assert checked.spec.launch == spec.launch
        if spec.bench:
            assert checked.spec.bench == spec.bench
        assert checked.spec.eval == spec.eval


def test_widget_values() -> None:
    rate = BenchSpec.model_fields["request_rate"]
    assert form.to_widget(math.inf, "text") == "inf" and form.to_widget(100.0, "text") == "100"
    assert form.from_widget(" inf ", "text", rate) == "inf"
    assert form.from_widget("", "text", LaunchSpec.model_fields["max_model_len"]) is None
    env = LaunchSpec.model_fields["env"]
    assert form.from_widget("A=1 B='x y'", "dict", env) == {"A": "1", "B": "x y"}
    with pytest.raises(ValueError, match="NAME=value"):
        form.from_widget("A", "dict", env)
    with pytest.raises(ValueError, match="quotes"):
        form.from_widget("--x 'open", "list", LaunchSpec.model_fields["extra_args"])


def test_presets_are_the_seeds_launches_and_the_cpu_demo(data_dir: Path) -> None:
    p = presets.presets()
    dcp8 = p[presets.TP8_DCP8]
    assert (dcp8.launch.model, dcp8.launch.tensor_parallel_size, dcp8.launch.decode_context_parallel_size) == (
        "moonshotai/Kimi-K2-Thinking", 8, 8)
    b = dcp8.bench[0]
    assert (b.random_input_len, b.random_output_len, b.request_rate, b.num_prompts) == (8000, 4000, 100, 1000)
    assert dcp8.eval.num_fewshot == 5 and p[presets.TP8].launch.decode_context_parallel_size == 1
    demo = p[presets.CPU_DEMO]
    assert demo.launch.model == str(data_dir.resolve() / "models" / "demo")
    assert demo.launch.enforce_eager and demo.launch.max_model_len == 2048
    assert (demo.bench[0].random_input_len, demo.bench[0].random_output_len, demo.bench[0].num_prompts) == (128, 32, 160)
    assert demo.bench[0].request_rate == 40
    assert presets.default_preset(None) == presets.CPU_DEMO and presets.default_preset(8) == presets.TP8
    for spec in (p[presets.TP8], dcp8):
        assert spec.problems(Host(gpus=8)) == []


def test_commands_are_the_exact_lines() -> None:
    spec = presets.presets()[presets.TP8]
    cmds = lf.commands(spec)
    assert list(cmds) == ["vllm serve", "vllm bench serve", "lm_eval"]
    assert cmds["vllm bench serve"].startswith("vllm bench serve --model moonshotai/Kimi-K2-Thinking "
                                               "--base-url http://127.0.0.1:8000 --dataset-name random")
    base = "--model_args model=moonshotai/Kimi-K2-Thinking,base_url=http://127.0.0.1:8000/v1/completions"
    assert base in cmds["lm_eval"]


def _colours(rows, a: str, b: str) -> dict[str, str]:
    styler = tables.gain_styler(rows, a, b)
    styles = styler._compute().ctx  # {(row, col): [(prop, value)]}
    change = list(styler.data.columns).index("Change")
    return {r.label: (styles.get((i, change)) or [("", "")])[0][1] for i, r in enumerate(rows)}


def test_only_changes_beyond_noise_are_coloured(seeded, store) -> None:
    rows, a, b = api.compare_runs(seeded, 1, 2)  # the seed: single runs, no per-request data, so no CI
    assert set(_colours(rows, a, b).values()) == {""}
    assert [r.key for r in tables.pick_rows(rows, True)] == tables.HEADLINE
    # two repeats a side: Welch intervals; coloured by the direction of better where beyond noise
    base = [{"output_throughput": 100.0, "mean_tpot_ms": 10.0, "failed": 0, "median_ttft_ms": 100.0,
             "total_input_tokens": 5000}, {"output_throughput": 101.0, "mean_tpot_ms": 10.2, "failed": 0,
                                            "median_ttft_ms": 140.0, "total_input_tokens": 5000}]
    cand = [{"output_throughput": 120.0, "mean_tpot_ms": 12.0, "failed": 3, "median_ttft_ms": 110.0,
             "total_input_tokens": 5100}, {"output_throughput": 121.0, "mean_tpot_ms": 12.1, "failed": 3,
                                            "median_ttft_ms": 130.0, "total_input_tokens": 5300}]
    for label, side in (("base", base), ("cand", cand)):
        run = store.create_run(label=label)
        for i, m in enumerate(side):
            store.add_bench_result(run.id, m, repeat=i)
    rows, a, b = api.compare_runs(store, 3, 4)
    assert {r.label: r.verdict for r in rows} == {
        "Output Token Throughput (tok/s)": "beyond noise", "Failed Requests": "beyond noise",
        "Total Input Tokens": "within noise", "Median TTFT (ms)": "within noise", "Mean TPOT (ms)": "beyond noise"}
    colours = _colours(rows, a, b)
    assert "46, 160, 67" in colours["Output Token Throughput (tok/s)"]  # higher is better: green
    assert "248, 81, 73" in colours["Failed Requests"]  # more failures: red
    assert "248, 81, 73" in colours["Mean TPOT (ms)"]  # higher latency: red
    assert colours["Median TTFT (ms)"] == ""  # better on average, within noise: plain
    assert colours["Total Input Tokens"] == ""  # no direction: plain


def test_describe_imported_runs(seeded) -> None:
    api.describe_imported(seeded, [2], "moonshotai/Kimi-K2-Thinking", 8, 8)
    run = seeded.get_run(2)
    assert (run.model, run.tensor_parallel_size, run.decode_context_parallel_size) == (
        "moonshotai/Kimi-K2-Thinking", 8, 8)
    with pytest.raises(SpecError, match="DCP size 3 does not divide TP size 8; pick one of 1, 2, 4, 8."):
        api.describe_imported(seeded, [1], None, 8, 3)
    with pytest.raises(SpecError, match="needs the TP size"):
        api.describe_imported(seeded, [1], None, None, 2)
    launched = seeded.create_run(label="here")
    with pytest.raises(StoreError, match="was launched here"):
        api.describe_imported(seeded, [launched.id], None, 2, 1)


def test_time_series_line_up_on_the_first_request_not_on_the_bench_process_start(tmp_path: Path) -> None:
    from dashboard import data
    from runner.store import Store

    store = Store(tmp_path / "s.db")
    run = store.create_run(label="demo")
    # `vllm bench` started at 100, imported for 11 s, sent requests for 4 s, exited at 115.5
    for phase, t in (("launched", 60.0), ("ready", 99.9), ("bench_start", 100.0), ("bench_end", 115.5)):
        store.add_phase(run.id, phase, t=t)
    store.add_bench_result(run.id, {"duration": 4.0, "completed": 160.0})
    store.add_samples([{"run_id": run.id, "t": float(t), "num_requests_running": 0.0, "generation_tokens": 10.0 * t}
                       for t in range(60, 117)])
    aligned = data.aligned_samples(store, [run.id])
    assert aligned.loc[aligned["t"] == 112.0, "t_s"].tolist() == [0.5] and aligned["t_s"].min() == 60 - 111.5
    assert aligned["bench_end_s"].iloc[0] == 4.0  # 115.5 − (115.5 − 4.0)
    assert data.load_start([100.0], [115.5], [{"duration": 4.0}]) == 111.5
    assert data.load_start([100.0], [115.5], []) == 100.0  # no result (failed benchmark): the process start
    assert data.load_start([100.0], [115.5], [{"duration": 30.0}]) == 100.0  # impossible duration: ignored
    # its timeline (stored before the measured start was marked) splits the start-up off the same way
    from dashboard import charts

    phases = data.phases_frame(store, run.id)
    assert list(zip(phases["phase"], phases["t"])) == [("launched", 60.0), ("ready", 99.9), ("bench_start", 100.0),
                                                       ("bench_measured", 111.5), ("bench_end", 115.5)]
    assert phases["detail"].iloc[3] == data.ESTIMATED_START
    assert [t.name for t in charts.phase_timeline(phases).data][2:4] == [
        "benchmark client start-up (not measured)", "benchmark"]
    store.close()
