"""servelab runner: specs, command builders, parsers, store and the vLLM process lifecycle.

Never imports Streamlit: the dashboard depends on the runner, not the other way round.
"""

__version__ = "0.1.0"
