"""servelab dashboard: navigation, and a password gate when SERVELAB_PASSWORD is set."""

from __future__ import annotations

import hmac
import sys
from pathlib import Path

import streamlit as st

# Use the runner and dashboard beside this file, whichever checkout an editable install points at.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from dashboard.state import PAGES, keep_form_state  # noqa: E402
from runner.config import Settings  # noqa: E402

st.set_page_config(page_title="servelab", page_icon=":material/science:", layout="wide")


def _sign_in() -> None:
    st.title("servelab")
    given = st.text_input("Password", type="password", help="The dashboard's password (SERVELAB_PASSWORD).")
    if given:
        if hmac.compare_digest(given.encode(), (Settings.from_env().password or "").encode()):
            st.session_state["authenticated"] = True
            st.rerun()
        st.error("Wrong password; ask whoever started the dashboard for SERVELAB_PASSWORD.")


if Settings.from_env().password and not st.session_state.get("authenticated"):
    st.navigation([st.Page(_sign_in, title="Sign in")], position="hidden").run()
    st.stop()

def _home() -> None:
    # Streamlit serves its default page at `/` only; Launch is a page of its own so that `/launch` works
    st.switch_page(PAGES["launch"], query_params=st.query_params.to_dict())


keep_form_state()
pages = [
    st.Page(_home, title="servelab", url_path="home", default=True, visibility="hidden"),
    st.Page(PAGES["launch"], title="Launch", icon=":material/rocket_launch:", url_path="launch"),
    st.Page(PAGES["runs"], title="Runs", icon=":material/table_rows:", url_path="runs"),
    st.Page(PAGES["run"], title="Run", icon=":material/monitoring:", url_path="run"),
    st.Page(PAGES["compare"], title="Compare", icon=":material/compare_arrows:", url_path="compare"),
    st.Page(PAGES["import"], title="Import", icon=":material/upload_file:", url_path="import"),
    st.Page(PAGES["cluster"], title="Cluster", icon=":material/hub:", url_path="cluster"),
]
st.navigation(pages).run()
