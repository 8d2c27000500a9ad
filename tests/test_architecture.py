"""The shape of the project: dependencies point dashboard → runner, no shell, documented specs, two commands."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from runner.config import BenchSpec, EvalSpec, LaunchSpec, Settings

ROOT = Path(__file__).resolve().parent.parent


def test_the_runner_does_not_load_streamlit() -> None:
    code = (
        "import sys, runner, runner.cli, runner.api, runner.worker, runner.execute\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'streamlit'))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_no_shell_true() -> None:
    sources = [p for folder in ("runner", "dashboard") for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(sources) > 10
    hits = [
        f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
        for p in sources
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"shell\s*=\s*True", line)
    ]
    assert hits == []


@pytest.mark.parametrize("spec", [LaunchSpec, BenchSpec, EvalSpec], ids=lambda s: s.__name__)
def test_every_spec_field_has_a_description(spec) -> None:
    assert [name for name, f in spec.model_fields.items() if not (f.description or "").strip()] == []


def test_the_readme_two_commands_and_ci_runs_the_tests() -> None:
    readme = (ROOT / "README.md").read_text()
    for command in ("./dev.sh start", "./dev.sh test"):
        assert re.search(rf"^{re.escape(command)}\b", readme, re.M), f"README lacks `{command}`"
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if not line.lstrip().startswith("#")]
    assert any(re.search(r"(^|\s)\./dev\.sh test\b", line) for line in ci)


def test_the_readme_environment_table_is_the_settings() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Environment", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `(SERVELAB_\w+)` \|", section, re.M)
    assert sorted(documented) == sorted([*Settings.env_names().values(), "SERVELAB_VENV"])


def test_settings_read_their_documented_variables(monkeypatch, tmp_path) -> None:
    values = {"SERVELAB_DB": "postgresql://h/db", "SERVELAB_DATA": str(tmp_path), "SERVELAB_SAMPLE_INTERVAL": "0.5",
              "SERVELAB_STARTUP_TIMEOUT": "90", "SERVELAB_PASSWORD": "pw", "SERVELAB_BACKEND": "cpu",
              "SERVELAB_BENCH_CLIENT": "0", "SERVELAB_PRESTART_NEXT": "on", "SERVELAB_RAY_ADDRESS": "head:6379"}
    assert sorted(values) == sorted(Settings.env_names().values())
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SERVELAB_RUN_ID", "7")  # a run's mark in its server's environment, not a setting
    assert Settings.from_env() == Settings(db="postgresql://h/db", data_dir=tmp_path, sample_interval_s=0.5,
                                           startup_timeout_s=90.0, password="pw", backend="cpu", bench_client=False,
                                           prestart_next="on", ray_address="head:6379")
    for name in values:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SERVELAB_DB", "")  # empty is unset
    assert Settings.from_env() == Settings(db=None, data_dir=Path("data"), sample_interval_s=1.0,
                                           startup_timeout_s=1800.0, password=None, backend="auto", bench_client=True,
                                           prestart_next="auto", ray_address=None)


def test_the_dashboard_imports_runner_api_and_the_value_modules_only() -> None:
    """What import-linter's forbidden contract lists, held for modules added later too."""
    allowed = {"runner", "runner.api", "runner.config", "runner.errors", "runner.models", "runner.compare"}
    found = set()
    for path in sorted((ROOT / "dashboard").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "runner":
                found |= {node.module} if node.module != "runner" else {f"runner.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.split(".")[0] == "runner"}
    assert found - allowed == set()
    assert "runner.api" in found


def test_the_guard_script_imports_the_standard_library_only() -> None:
    """runner/guard.py runs as `python -I runner/guard.py` (no site, no PYTHONPATH, ~70 ms) and is imported by
    runner.server for `end_group`: anything but the standard library would fail it as a script, or slow it."""
    modules = set()
    for node in ast.walk(ast.parse((ROOT / "runner" / "guard.py").read_text())):
        if isinstance(node, ast.ImportFrom):
            modules.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            modules |= {a.name for a in node.names}
    assert modules and {m for m in modules if m.split(".")[0] not in sys.stdlib_module_names} == set()
    out = subprocess.run([sys.executable, "-I", str(ROOT / "runner" / "guard.py"), "x"], capture_output=True,
                         text=True, timeout=30)  # as a script: it gets as far as reading its arguments
    assert out.returncode == 1
    assert out.stderr.rstrip().endswith("ValueError: invalid literal for int() with base 10: 'x'")
