"""scripts/: no machine's absolute paths; every GPU spec loads with the model folder its script passes."""

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from runner.config import load_run_spec, load_sweep_spec

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
SPECS = sorted(p.stem for p in (SCRIPTS / "gpu").glob("*.yaml"))
MACHINE_PATH = re.compile(r"(?<![\w$}.])/(root|work|home|tmp|mnt|opt)/")


def test_scripts_name_no_folder_of_one_machine() -> None:
    found = [f"{p.relative_to(REPO)}:{n}: {line.strip()}"
             for p in sorted(SCRIPTS.rglob("*")) if p.is_file()
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if MACHINE_PATH.search(line)]
    assert found == []


@pytest.mark.parametrize("script", ["gpu_validate.sh", "gpu_multi.sh"])
def test_gpu_run_scripts_share_one_setup(script: str) -> None:
    text = (SCRIPTS / script).read_text(encoding="utf-8")
    assert 'source "$(dirname "$0")/gpu_env.sh"' in text
    assert not re.search(r"^(WORK|OUT|REPO)=|^sl\(\)|^model_of\(\)", text, re.M)  # gpu_env.sh's, not a copy


@pytest.mark.parametrize("spec", SPECS)
def test_gpu_spec_loads_with_the_model_folder_its_script_passes(spec: str, tmp_path: Path) -> None:
    # the scripts' `model_of` (gpu_env.sh), run by bash from another folder
    model = subprocess.run(
        ["bash", "-c", f'WORK="$1" OUT="$1/out"; source {SCRIPTS / "gpu_env.sh"}; model_of "$2"', "-", str(tmp_path),
         spec],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    ).stdout.strip()
    path = SCRIPTS / "gpu" / f"{spec}.yaml"
    data = yaml.safe_load(path.read_text())
    assert data["launch"]["model"] in ("models/tiny", "models/mla") and model == str(tmp_path / data["launch"]["model"])
    load = load_sweep_spec if "matrix" in data else load_run_spec
    assert load(path, [f"model={model}"]).launch.model == model
