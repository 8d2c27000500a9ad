"""The Launch page's logic without its layout: form state ⇄ RunSpec/SweepSpec, problems, command lines.

`state` is `st.session_state` on the page and a plain dict in tests.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd

from dashboard import presets
from dashboard import spec_form as form
from dashboard.run_view import lm_eval_command
from runner.commands import bench_argv, display, serve_argv
from runner.config import BenchSpec, EvalSpec, Host, LaunchSpec, RunSpec, SweepSpec
from runner.errors import Problem, RunError, SpecError
from runner.evaluate import check_dataset, local_tasks

Spec = TypeVar("Spec", LaunchSpec, BenchSpec, EvalSpec)
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
    state["run.other_worker"] = spec.other_worker


def apply_command(command: str, state: MutableMapping[str, Any]) -> None:
    """Fill the launch part of the form from a pasted `vllm serve …` line (raises SpecError)."""
    launch = LaunchSpec.from_command(command)
    form.load(launch, "launch", state)
    state["run.label"] = ""


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class Checked:
    """The form read back: a spec when every section parses, the problems that block queueing (each with
    the form key of its field when it has one), and notes."""

    spec: RunSpec | None
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def by_field(self) -> dict[str, list[str]]:
        """Form key (`launch.model`) → the problems shown beside that field."""
        out: dict[str, list[str]] = {}
        for p in self.problems:
            if p.field:
                out.setdefault(p.field, []).append(str(p))
        return out


def _section(model: type[Spec], prefix: str, state: MutableMapping[str, Any]) -> tuple[Spec | None, list[Problem]]:
    """One section of the form as its spec, and its problems named by form key."""
    data, problems = form.collect(model, prefix, state)
    try:
        return model.parse(data), problems
    except SpecError as exc:
        return None, problems + [p.under(prefix) if isinstance(p, Problem) else Problem(p) for p in exc.problems]


def read(state: MutableMapping[str, Any], host: Host | None) -> Checked:
    """Every section checked on its own, so each field with a problem shows it at once."""
    other_worker = bool(state.get("run.other_worker"))
    launch, problems = _section(LaunchSpec, "launch", state)
    bench, more = _section(BenchSpec, "bench", state)
    problems += more
    evaluation = None
    if state.get("eval.enabled"):
        evaluation, more = _section(EvalSpec, "eval", state)
        problems += more
    if launch is None or bench is None or (state.get("eval.enabled") and evaluation is None):
        if launch is not None:  # what is wrong with the launch is worth saying meanwhile
            problems += [p.under("launch") for p in launch.problems(None if other_worker else host)]
        return Checked(None, problems)
    spec = RunSpec(label=(state.get("run.label") or "").strip() or None, launch=launch, bench=[bench],
                   eval=evaluation, other_worker=other_worker)
    checked = check(spec, host)
    checked.problems[:0] = problems
    return checked


def check(spec: RunSpec, host: Host | None) -> Checked:
    notes = []
    problems = spec.problems(host) + eval_problems(spec.eval)
    if presets.is_missing_demo_model(spec.launch.model):
        problems = [p for p in problems if not p.startswith("Model path")]
        notes.append("The demo model is written to this path when you queue the run (first use only, ~10 s).")
    if spec.other_worker:
        notes.append(f"Queued for another worker: this machine's worker leaves it queued until a worker with "
                     f"{spec.launch.gpus_needed} GPUs (same database) claims it.")
    return Checked(spec, problems, notes)


def cannot_run_here(spec: RunSpec | None, host: Host | None) -> bool:
    """Whether this machine is what stops `spec` (so queueing it for another worker is an option)."""
    return spec is not None and host is not None and bool(host.problems(spec.launch))


def eval_problems(evaluation: EvalSpec | None) -> list[Problem]:
    """What would stop the eval phase's local dataset, said before queueing rather than after the benchmark."""
    if evaluation is None or not evaluation.dataset_path:
        return []
    try:
        local_tasks(evaluation.tasks)
        count = check_dataset(Path(evaluation.dataset_path).expanduser().resolve())
    except RunError as exc:
        return [Problem(str(exc), "eval.dataset_path")]
    if evaluation.num_fewshot >= count:
        return [Problem(f"Eval dataset {evaluation.dataset_path} has {count} questions, too few for "
                        f"{evaluation.num_fewshot}-shot prompts drawn from the other questions; use at most "
                        f"{count - 1} few-shot examples or add questions.", "eval.num_fewshot")]
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
                            "eval": base.eval.model_dump() if base.eval else None, "matrix": matrix,
                            "other_worker": base.other_worker})


def sweep_cells(sweep_spec: SweepSpec, host: Host | None) -> pd.DataFrame:
    """One row per run of the sweep with what is wrong with it (empty when it can be queued)."""
    rows = []
    for cell, spec in sweep_spec.cells():
        checked = check(spec, host)
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
