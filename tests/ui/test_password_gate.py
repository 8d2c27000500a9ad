"""SERVELAB_PASSWORD gates every page."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[2] / "dashboard" / "streamlit_app.py")


@pytest.fixture
def gated(data_dir, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv("SERVELAB_PASSWORD", "s3cret")
    return AppTest.from_file(APP, default_timeout=60).run()


def test_nothing_but_the_password_box_until_signed_in(gated: AppTest) -> None:
    assert [t.value for t in gated.title] == ["servelab"]
    assert [w.label for w in gated.text_input] == ["Password"]
    assert not gated.button and not gated.get("plotly_chart")


def test_wrong_password_is_refused_and_the_right_one_opens_launch(gated: AppTest) -> None:
    gated.text_input[0].set_value("guess").run()
    assert "Wrong password" in gated.error[0].value
    gated.text_input[0].set_value("s3cret").run()
    assert gated.title[0].value == "Launch a run"
