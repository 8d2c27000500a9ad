"""The Launch page's logic without its layout: form state ⇄ RunSpec/SweepSpec, problems, command lines.

`state` is `st.session_state` on the page and a plain dict in tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

import pandas as pd

from dashboard import presets
from dashboard import spec_form as form
from dashboard.spec_form import FormState
from runner import api
from runner.config import BenchSpec, EvalSpec, LaunchSpec, RunSpec, SweepSpec, Target
from runner.errors import Problem, SpecError

Spec = TypeVar("Spec", LaunchSpec, BenchSpec, EvalSpec)
RUN_DIR = "data/runs/<run id>"  # shown in commands before the run exists
SWEEPABLE = [
    *(n for n, i in LaunchSpec.model_fields.items() if form.field_kind(i) not in ("list", "dict")),
    *(n for n, i in BenchSpec.model_fields.items() if form.field_kind(i) not in ("list", "dict") and n != "repeats"),
]


def apply(spec: RunSpec, state: FormState) -> None:
    """Fill the whole form from `spec` (a preset)."""
    form.load(spec.launch, "launch", state)
    form.load(spec.bench[0] if spec.bench else BenchSpec(), "bench", state)
    form.load(spec.eval or EvalSpec(), "eval", state)
    state["eval.enabled"] = spec.eval is not None
    state["run.label"] = spec.label or ""
    state["run.other_worker"] = spec.other_worker


def apply_command(command: str, state: FormState) -> None:
    """Fill the launch part of the form from a pasted `vllm serve …` line (raises SpecError)."""
    launch = LaunchSpec.from_command(command)
    form.load(launch, "launch", state)
    state["run.label"] = ""


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def dcp_for(tp: int | None, wanted: int | None) -> int | None:
    """The DCP size a form shows for TP size `tp`: the one last picked (`wanted`) when it divides `tp`, else the
    largest divisor of `tp` below it (1 when none was picked); None while the TP size is unknown. So a change of
    TP keeps the DCP picked, or comes as near as `tp` allows, and a TP changed back brings it back."""
    if not tp:
        return None
    return max(d for d in divisors(tp) if d <= (wanted or 1))


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


def _section(model: type[Spec], prefix: str, state: FormState) -> tuple[Spec | None, list[Problem]]:
    """One section of the form as its spec, and its problems named by form key."""
    data, problems = form.collect(model, prefix, state)
    try:
        return model.parse(data), problems
    except SpecError as exc:
        return None, problems + [p.under(prefix) if isinstance(p, Problem) else Problem(p) for p in exc.problems]


def read(state: FormState, host: Target | None) -> Checked:
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


def check(spec: RunSpec, host: Target | None) -> Checked:
    notes = []
    problems = spec.problems(host) + api.eval_dataset_problems(spec.eval)
    if presets.is_missing_demo_model(spec.launch.model):
        problems = [p for p in problems if not p.startswith("Model path")]
        notes.append("The demo model is written to this path when you queue the run (first use only, ~10 s).")
    if spec.other_worker:
        notes.append(f"Queued for another worker: this machine's worker leaves it queued until a worker with "
                     f"{spec.launch.gpus_needed} GPUs (same database) claims it.")
    return Checked(spec, problems, notes)


def cannot_run_here(spec: RunSpec | None, host: Target | None) -> bool:
    """Whether this machine is what stops `spec` (so queueing it for another worker is an option)."""
    return spec is not None and host is not None and bool(host.problems(spec.launch))


def commands(spec: RunSpec) -> dict[str, str]:
    """The exact serve, bench and eval command lines the run will execute (`vllm` for the interpreter)."""
    return api.command_lines(spec, RUN_DIR)


def parse_values(text: str) -> list[str]:
    """`0.8, 0.9` → ["0.8", "0.9"]; the spec types them."""
    return [v.strip() for v in text.split(",") if v.strip()]


def sweep(name: str, base: RunSpec, matrix: dict[str, list[Any]]) -> SweepSpec:
    """A sweep over `matrix` around the form's run, its runs labelled after the form's label (raises SpecError
    for an unusable matrix)."""
    matrix = {k: v for k, v in matrix.items() if v}
    return SweepSpec.parse({"name": name.strip() or "sweep", "label": base.label, "launch": base.launch.model_dump(),
                            "bench": [b.model_dump() for b in base.bench],
                            "eval": base.eval.model_dump() if base.eval else None, "matrix": matrix,
                            "other_worker": base.other_worker})


def sweep_cells(sweep_spec: SweepSpec, host: Target | None) -> pd.DataFrame:
    """One row per run of the sweep with what is wrong with it (empty when it can be queued)."""
    rows = []
    for cell, spec in sweep_spec.cells():
        checked = check(spec, host)
        rows.append({"cell": cell, "run": spec.launch.short_label(), "label": api.cell_label(sweep_spec, spec),
                     "benchmarks": len(spec.bench), "problems": " ".join(checked.problems)})
    return pd.DataFrame(rows, columns=["cell", "run", "label", "benchmarks", "problems"])


def ensure_demo_model(spec: RunSpec) -> bool:
    """Write the demo model if this run needs it and it is not there yet; True when it was written."""
    if not presets.is_missing_demo_model(spec.launch.model):
        return False
    api.write_demo_model(presets.demo_model_path())
    return True
