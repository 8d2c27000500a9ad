"""The Launch page's logic without its layout: form state ⇄ RunSpec/SweepSpec, problems, command lines.

`state` is `st.session_state` on the page and a plain dict in tests.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from dashboard import presets
from dashboard import spec_form as form
from dashboard.run_view import lm_eval_command
from runner.commands import bench_argv, display, serve_argv
from runner.config import BenchSpec, EvalSpec, LaunchSpec, RunSpec, SweepSpec
from runner.errors import RunError, SpecError
from runner.evaluate import check_dataset, local_tasks

RUN_DIR = "data/runs/<run id>"  # shown in commands before the run exists
SWEEPABLE = [
    *(n for n, i in LaunchSpec.model_fields.items() if form.field_kind(i) not in ("list", "dict")),
    *(n for n, i in BenchSpec.model_fields.items() if form.field_kind(i) not in ("list", "dict") and n != "repeats"),
]


def apply(spec: RunSpec, state: MutableMapping[str, Any]) -> None:
    """Fill the whole form from `spec` (a preset)."""
    form.load(spec.launch, "launch", state)
    form.load(spec.bench[0] if spec.bench else BenchSpec(), "bench", state)
    form.load(spec.eval or EvalSpec(), "eval", state)
    state["eval.enabled"] = spec.eval is not None
    state["run.label"] = spec.label or ""


def apply_command(command: str, state: MutableMapping[str, Any]) -> None:
    """Fill the launch part of the form from a pasted `vllm serve …` line (raises SpecError)."""
    launch = LaunchSpec.from_command(command)
    form.load(launch, "launch", state)
    state["run.label"] = ""


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class Checked:
    """The form read back: a spec when it parses, the problems that block queueing, and notes."""

    spec: RunSpec | None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def read(state: MutableMapping[str, Any], gpu_count: int | None, offered_tp: list[int]) -> Checked:
    launch, problems = form.collect(LaunchSpec, "launch", state)
    bench, more = form.collect(BenchSpec, "bench", state)
    problems += more
    evaluation = None
    if state.get("eval.enabled"):
        evaluation, more = form.collect(EvalSpec, "eval", state)
        problems += more
    if problems:
        return Checked(None, problems)
    data = {"label": (state.get("run.label") or "").strip() or None, "launch": launch, "bench": [bench],
            "eval": evaluation}
    try:
        spec = RunSpec.parse(data)
    except SpecError as exc:
        return Checked(None, exc.problems)
    return check(spec, gpu_count, offered_tp)


def check(spec: RunSpec, gpu_count: int | None, offered_tp: list[int]) -> Checked:
    notes = []
    problems = spec.problems(gpu_count) + eval_problems(spec.eval)
    if presets.is_missing_demo_model(spec.launch.model):
        problems = [p for p in problems if not p.startswith("Model path")]
        notes.append("The demo model is written to this path when you queue the run (first use only, ~10 s).")
    if gpu_count is None and spec.launch.tensor_parallel_size > max(offered_tp):
        notes.append(f"TP {spec.launch.tensor_parallel_size} is more than this machine offers "
                     f"({', '.join(map(str, offered_tp))}); the run is meant for a machine with that many GPUs.")
    return Checked(spec, problems, notes)


def eval_problems(evaluation: EvalSpec | None) -> list[str]:
    """What would stop the eval phase's local dataset, said before queueing rather than after the benchmark."""
    if evaluation is None or not evaluation.dataset_path:
        return []
    try:
        local_tasks(evaluation.tasks)
        count = check_dataset(Path(evaluation.dataset_path).expanduser().resolve())
    except RunError as exc:
        return [str(exc)]
    if evaluation.num_fewshot >= count:
        return [f"Eval dataset {evaluation.dataset_path} has {count} questions, too few for "
                f"{evaluation.num_fewshot}-shot prompts drawn from the other questions; use at most {count - 1} "
                "few-shot examples or add questions."]
    return []


def commands(spec: RunSpec) -> dict[str, str]:
    """The exact serve, bench and eval command lines the run will execute (`vllm` for the interpreter)."""
    launch = spec.launch
    base = f"http://{launch.host}:{launch.port}"
    out = {"vllm serve": display(serve_argv(launch), launch.env)}
    for i, bench in enumerate(spec.bench):
        out[f"vllm bench serve (benchmark {i + 1})" if len(spec.bench) > 1 else "vllm bench serve"] = display(
            bench_argv(bench, launch, base, RUN_DIR, f"bench-{i}-0.json"))
    if spec.eval is not None:
        out["lm_eval"] = lm_eval_command(spec.eval, launch, base, RUN_DIR)
    return out


def parse_values(text: str) -> list[str]:
    """`0.8, 0.9` → ["0.8", "0.9"]; the spec types them."""
    return [v.strip() for v in text.split(",") if v.strip()]


def sweep(name: str, base: RunSpec, matrix: dict[str, list[Any]]) -> SweepSpec:
    """A sweep over `matrix` around the form's run (raises SpecError for an unusable matrix)."""
    matrix = {k: v for k, v in matrix.items() if v}
    return SweepSpec.parse({"name": name.strip() or "sweep", "launch": base.launch.model_dump(),
                            "bench": [b.model_dump() for b in base.bench],
                            "eval": base.eval.model_dump() if base.eval else None, "matrix": matrix})


def sweep_cells(sweep_spec: SweepSpec, gpu_count: int | None, offered_tp: list[int]) -> pd.DataFrame:
    """One row per run of the sweep with what is wrong with it (empty when it can be queued)."""
    rows = []
    for cell, spec in sweep_spec.cells():
        checked = check(spec, gpu_count, offered_tp)
        rows.append({"cell": cell, "run": spec.launch.short_label(), "benchmarks": len(spec.bench),
                     "problems": " ".join(checked.problems)})
    return pd.DataFrame(rows, columns=["cell", "run", "benchmarks", "problems"])


def ensure_demo_model(spec: RunSpec) -> bool:
    """Write the demo model if this run needs it and it is not there yet; True when it was written."""
    if not presets.is_missing_demo_model(spec.launch.model):
        return False
    from runner.demo_model import write_demo_model

    write_demo_model(presets.demo_model_path())
    return True
