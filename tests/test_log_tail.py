"""The Run page's server log: the last lines worth reading, without vLLM's ASCII logo."""

from __future__ import annotations

from pathlib import Path

from runner import api

FIXTURES = Path(__file__).parent / "fixtures"


def test_log_tail_skips_the_logo_and_its_empty_frame(tmp_path: Path) -> None:
    start = (FIXTURES / "cpu_0.32" / "server_tp1.log").read_text().splitlines()[:9]  # a real vLLM 0.32 start
    log = tmp_path / "server.log"
    log.write_text("\n".join(start) + "\n")
    assert api.log_tail(log, 40).splitlines() == [start[0], *start[7:9]]
    assert start[0] == "Triton is installed, but doesn't include CPU backend. Disabling Triton."
    assert start[7].endswith("'max_model_len': 2048, 'enforce_eager': True}")  # non-default args
    assert api.log_tail(log, 1) == start[8]


def test_log_tail_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    assert api.log_tail(tmp_path / "nowhere.log") == ""
