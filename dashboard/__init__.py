"""servelab's Streamlit dashboard: pages over `runner.api`, pure chart builders in `charts`."""
