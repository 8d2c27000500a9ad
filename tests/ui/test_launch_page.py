"""Launch page through Streamlit's AppTest: generated form, presets, paste box, validation, commands, queueing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runner.config import CPU_DCP, BenchSpec, EvalSpec, LaunchSpec
from runner.models import RunStatus


def labels(at) -> set[str]:
    widgets = [*at.text_input, *at.number_input, *at.selectbox, *at.checkbox, *at.text_area]
    return {w.label for w in widgets}


def errors(at) -> list[str]:
    return [e.value for e in at.error]


def beside(at, key: str) -> list[str]:
    """The error messages drawn right under the widget of `key`, in the same block (its grid cell, or its row)."""
    def walk(block) -> list[str] | None:
        kids = [block.children[i] for i in sorted(block.children)]
        for i, node in enumerate(kids):
            if getattr(node, "key", None) == key:
                out = []
                for after in kids[i + 1:]:
                    if getattr(after, "type", None) != "error":
                        break
                    out.append(after.value)
                return out
            if hasattr(node, "children") and (found := walk(node)) is not None:
                return found
        return None

    found = walk(at._tree)
    assert found is not None, f"no widget {key}"
    return found


def summary(at) -> str:
    """The summary of problems next to the Queue button."""
    return next(e.value for e in at.error if "keep this run from queueing" in e.value
                or "keeps this run from queueing" in e.value)


def test_form_is_generated_from_the_specs_with_vllm_flag_names(open_page, data_dir: Path) -> None:
    at = open_page()
    assert not at.exception
    shown = labels(at)
    for model in (LaunchSpec, BenchSpec):
        for name in model.model_fields:
            assert name.replace("_", "-") in shown, name
    tp = at.selectbox(key="launch.tensor_parallel_size")
    assert tp.options == ["1", "2"]  # CPU backend: 1–2
    assert "Tensor-parallel size" in tp.help
    assert any("no GPU — CPU backend with the demo model" in i.value for i in at.info)


def test_cpu_demo_preset_is_ready_on_first_visit(open_page, data_dir: Path) -> None:
    at = open_page()
    assert at.selectbox(key="form.preset").value.startswith("CPU demo")
    demo = str((data_dir / "models" / "demo").resolve())
    assert at.text_input(key="launch.model").value == demo
    assert at.checkbox(key="launch.enforce_eager").value is True
    codes = [c.value for c in at.code]
    assert codes[0] == (f"vllm serve {demo} --host 127.0.0.1 --port 8000 --tensor-parallel-size 1 "
                        "--max-model-len 2048 --enforce-eager")
    assert "--random-input-len 128 --random-output-len 32 --num-prompts 160 --request-rate 40" in codes[1]
    assert not errors(at)
    assert any("written to this path when you queue" in i.value for i in at.info)
    queue = next(b for b in at.button if b.label == "Queue run")
    assert not queue.disabled


def test_seed_presets_fill_launch_bench_and_eval(open_page, data_dir: Path) -> None:
    at = open_page()
    at.selectbox(key="form.preset").select_index(2).run()  # TP8+DCP8 high throughput
    assert at.text_input(key="launch.model").value == "moonshotai/Kimi-K2-Thinking"
    assert at.selectbox(key="launch.tensor_parallel_size").value == 8
    assert at.selectbox(key="launch.decode_context_parallel_size").value == 8
    assert at.number_input(key="bench.random_input_len").value == 8000
    assert at.number_input(key="bench.random_output_len").value == 4000
    assert at.text_input(key="bench.request_rate").value == "100"
    assert at.number_input(key="bench.num_prompts").value == 1000
    assert at.checkbox(key="eval.enabled").value is True
    assert at.number_input(key="eval.num_fewshot").value == 5
    # meant for 8 GPUs: this CPU-only machine cannot run it; queueing it for another worker is the way
    ranks = (f"TP×PP×DP = 8×1×1 = 8 ranks, but this machine has no GPU and vLLM's CPU backend runs one rank per "
             f"core on its {len(os.sched_getaffinity(0))} cores; lower the sizes to fit "
             f"{len(os.sched_getaffinity(0))}, or queue it for a worker on a machine with 8 GPUs.")
    assert beside(at, "launch.tensor_parallel_size") == [ranks]
    assert beside(at, "launch.decode_context_parallel_size") == [CPU_DCP]
    assert next(b for b in at.button if b.label == "Queue run").disabled
    at.checkbox(key="run.other_worker").check().run()
    assert not errors(at) and not next(b for b in at.button if b.label == "Queue run").disabled
    assert any("Queued for another worker" in i.value and "8 GPUs" in i.value for i in at.info)
    codes = [c.value for c in at.code]
    assert codes[0] == ("vllm serve moonshotai/Kimi-K2-Thinking --host 127.0.0.1 --port 8000 --tensor-parallel-size 8 "
                        "--decode-context-parallel-size 8 --reasoning-parser kimi_k2 --tool-call-parser kimi_k2 "
                        "--trust-remote-code --enable-auto-tool-choice")
    assert "--random-input-len 8000 --random-output-len 4000 --num-prompts 1000 --request-rate 100" in codes[1]
    assert codes[2].startswith("lm_eval --model local-completions") and "--tasks gsm8k --num_fewshot 5" in codes[2]

    at.selectbox(key="form.preset").select_index(1).run()  # TP8 low latency
    assert at.selectbox(key="launch.decode_context_parallel_size").value == 1
    assert at.checkbox(key="run.other_worker").value is False  # a preset starts from this machine again
    at.checkbox(key="run.other_worker").check().run()
    assert "--decode-context-parallel-size" not in at.code[0].value


def test_accuracy_section_has_every_eval_field_and_shows_the_lm_eval_line(open_page, data_dir: Path) -> None:
    at = open_page()
    assert "num-fewshot" not in labels(at)  # the CPU demo has no evaluation
    at.checkbox(key="eval.enabled").check().run()
    shown = labels(at)
    for name in EvalSpec.model_fields:
        assert name.replace("_", "-") in shown, name
    line = next(c.value for c in at.code if c.value.startswith("lm_eval"))
    assert "--tasks gsm8k --num_fewshot 5" in line and "base_url=http://127.0.0.1:8000/v1/completions" in line

    at.text_input(key="eval.dataset_path").set_value(str(data_dir / "missing.jsonl")).run()
    assert any(e.startswith("Cannot read the eval dataset") for e in errors(at))
    assert next(b for b in at.button if b.label == "Queue run").disabled
    questions = data_dir / "mine.jsonl"
    questions.write_text("".join(f'{{"question": "{i} + 1?", "answer": "#### {i + 1}"}}\n' for i in range(4)))
    at.text_input(key="eval.dataset_path").set_value(str(questions)).run()
    assert any("too few for 5-shot" in e for e in errors(at))
    at.number_input(key="eval.num_fewshot").set_value(2).run()
    assert not errors(at)
    line = next(c.value for c in at.code if c.value.startswith("lm_eval"))
    assert "--tasks gsm8k_local --num_fewshot 2" in line and "--include_path 'data/runs/<run id>/eval_tasks'" in line


@pytest.fixture(scope="module", autouse=True)
def vllm_parser() -> None:
    """vLLM's own parser, loaded before any page run is timed: its first import loads torch (tens of seconds on
    a busy machine), which the dashboard pays once per process, on the first paste."""
    from runner.vllm_args import serve_parser

    assert serve_parser() is not None


def paste(at, command: str):
    at.text_area(key="form.paste").set_value(command)
    return next(b for b in at.button if b.label.startswith("Fill the form")).click().run()


def test_pasted_command_fills_the_form_and_bad_dcp_is_explained_before_queueing(open_page, data_dir: Path) -> None:
    at = paste(open_page(), "vllm serve moonshotai/Kimi-K2-Thinking -tp 2 -dcp 3 --max-num-seqs 64 "
                            "--enable-auto-tool-choice")
    assert at.text_input(key="launch.model").value == "moonshotai/Kimi-K2-Thinking"
    assert at.text_input(key="launch.max_num_seqs").value == "64"
    assert at.text_input(key="launch.extra_args").value == "--enable-auto-tool-choice"
    dcp = at.selectbox(key="launch.decode_context_parallel_size")
    assert dcp.value == 3 and "3 — does not divide TP 2" in dcp.options
    assert beside(at, "launch.decode_context_parallel_size") == [
        "DCP size 3 does not divide TP size 2; pick one of 1, 2.", CPU_DCP]
    assert summary(at).startswith("**2 problems keep this run from queueing**")
    assert next(b for b in at.button if b.label == "Queue run").disabled
    assert not at.code  # no commands for a launch that cannot run

    dcp.set_value(1).run()
    assert not errors(at)
    assert at.code[0].value.endswith("--tensor-parallel-size 2 --max-num-seqs 64 --enable-auto-tool-choice")


def test_paste_with_options_before_the_model_fills_the_form(open_page, data_dir: Path) -> None:
    at = paste(open_page(), "vllm serve --enable-prefix-caching org/m -tp 2")
    assert not errors(at)
    assert (at.text_input(key="launch.model").value, at.selectbox(key="launch.tensor_parallel_size").value,
            at.text_input(key="launch.extra_args").value) == ("org/m", 2, "--enable-prefix-caching")
    assert at.code[0].value == ("vllm serve org/m --host 127.0.0.1 --port 8000 --tensor-parallel-size 2 "
                                "--enable-prefix-caching")


def test_bad_values_are_explained_beside_their_fields(open_page, data_dir: Path, demo_model: Path) -> None:
    (demo_model / "config.json").write_text('{"num_attention_heads": 4, "num_key_value_heads": 4}')
    at = paste(open_page(), f"vllm serve {demo_model} -tp 3")
    assert beside(at, "launch.tensor_parallel_size") == [
        f"TP×PP×DP = 3×1×1 = 3 ranks, but this machine has no GPU and vLLM's CPU backend runs one rank per core on "
        f"its {len(os.sched_getaffinity(0))} cores; lower the sizes to fit {len(os.sched_getaffinity(0))}, or queue "
        "it for a worker on a machine with 3 GPUs.",
        "TP 3 does not divide the model's 4 attention heads (its config.json); pick TP 1, 2 or 4."]
    at.number_input(key="bench.num_prompts").set_value(999999999999)
    at.text_input(key="launch.model").set_value("").run()
    assert beside(at, "launch.model") == ["Model: enter a model name (a Hugging Face id such as org/name) or a local "
                                          "path."]
    assert beside(at, "bench.num_prompts") == ["num-prompts must be between 1 and 1,000,000; it is 999,999,999,999."]
    assert beside(at, "launch.tensor_parallel_size") == []  # without a model, nothing to check TP against
    assert summary(at) == (
        "**2 problems keep this run from queueing** (each is also shown beside its field):\n"
        "- Model: enter a model name (a Hugging Face id such as org/name) or a local path.\n"
        "- num-prompts must be between 1 and 1,000,000; it is 999,999,999,999.")
    assert next(b for b in at.button if b.label == "Queue run").disabled


def test_paste_errors_and_field_errors_name_the_value_and_the_fix(open_page, data_dir: Path) -> None:
    at = paste(open_page(), "python -m vllm serve x")
    assert "A pasted command must start with `vllm serve`; e.g. `vllm serve MODEL -tp 8`." in errors(at)
    at = paste(open_page(), "vllm serve org/m --no-such-flag")
    assert "vLLM refuses this command: unrecognized arguments: --no-such-flag" in errors(at)

    at = open_page()
    at.text_input(key="launch.max_model_len").set_value("lots").run()
    assert beside(at, "launch.max_model_len") == ["max-model-len must be a whole number; 'lots' is not."]
    at.text_input(key="launch.max_model_len").set_value("2048").run()
    at.text_input(key="launch.env").set_value("JUSTANAME").run()
    assert beside(at, "launch.env") == ["env: 'JUSTANAME' is not NAME=value; write e.g. VLLM_LOGGING_LEVEL=DEBUG."]


def test_dcp_offers_the_divisors_of_tp(open_page, data_dir: Path) -> None:
    at = open_page()
    assert at.selectbox(key="launch.decode_context_parallel_size").options == ["1"]
    at.selectbox(key="launch.tensor_parallel_size").set_value(2).run()
    assert at.selectbox(key="launch.decode_context_parallel_size").options == ["1", "2"]


def test_queue_run_creates_a_queued_run(open_page, seeded, demo_model: Path) -> None:
    at = open_page()
    at.text_input(key="run.label").set_value("demo A")
    at.number_input(key="launch.port").set_value(8710)
    next(b for b in at.button if b.label == "Queue run").click().run()
    assert not at.exception
    assert any(s.value.startswith("Queued run #3") for s in at.success)
    run = seeded.get_run(3)
    assert run.status == RunStatus.queued and run.label == "demo A" and run.model == str(demo_model.resolve())
    assert '"port":8710' in run.spec_json


def test_queue_sweep_over_tp_dcp_and_another_field(open_page, seeded, demo_model: Path) -> None:
    at = open_page()
    at.text_input(key="run.label").set_value("demo A")  # the runs of the sweep are named after it
    at.text_input(key="sweep.name").set_value("grid")
    at.multiselect(key="sweep.tp").set_value([1, 2])
    at.multiselect(key="sweep.dcp").set_value([1, 2]).run()
    assert any("2 of 4 combinations cannot run" in e for e in errors(at))
    cells = at.dataframe[-1].value
    assert list(cells["run"]) == ["TP1", "TP1+DCP2", "TP2", "TP2+DCP2"]
    assert "DCP size 2 does not divide TP size 1" in cells["problems"].iloc[1]
    assert cells["problems"].iloc[3] == CPU_DCP  # the CPU backend's reason, not the GQA rule's
    assert next(b for b in at.button if b.label.startswith("Queue sweep")).disabled

    at.multiselect(key="sweep.dcp").set_value([1])
    at.selectbox(key="sweep.field0").set_value("max_num_seqs")
    at.text_input(key="sweep.values0").set_value("8, 16").run()
    sweep_button = next(b for b in at.button if b.label.startswith("Queue sweep"))
    assert sweep_button.label == "Queue sweep (4 runs)" and not sweep_button.disabled
    assert list(at.dataframe[-1].value["label"]) == [f"demo A: TP{t} max-num-seqs={n}" for t in (1, 2) for n in (8, 16)]
    sweep_button.click().run()
    assert any("queued 4 runs" in s.value for s in at.success)
    runs = [r for r in seeded.list_runs() if r.sweep_id is not None]
    assert sorted(r.sweep_cell for r in runs) == sorted(
        f"tensor_parallel_size={t},decode_context_parallel_size=1,max_num_seqs={n}"
        for t in (1, 2) for n in ("8", "16"))
    assert sorted(r.label for r in runs) == sorted(f"demo A: TP{t} max-num-seqs={n}" for t in (1, 2) for n in (8, 16))
    assert [s.name for s in seeded.list_sweeps()] == ["grid"]


@pytest.mark.parametrize("preset", [0, 1, 2])
def test_every_preset_renders_without_exceptions(open_page, data_dir: Path, preset: int) -> None:
    at = open_page()
    at.selectbox(key="form.preset").select_index(preset).run()
    assert not at.exception


def test_form_values_survive_a_visit_to_another_page(open_page, data_dir: Path) -> None:
    at = open_page()
    at.text_input(key="run.label").set_value("kept")
    at.text_input(key="launch.max_num_seqs").set_value("7").run()
    at.switch_page("app_pages/runs.py").run()
    at.switch_page("app_pages/launch.py").run()
    assert at.text_input(key="run.label").value == "kept"
    assert at.text_input(key="launch.max_num_seqs").value == "7"
