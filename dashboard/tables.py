"""Tables as shown: the gain table with direction-aware colour. Pure pandas, no Streamlit."""

from __future__ import annotations

import pandas as pd
from pandas.io.formats.style import Styler

from runner import compare as cmp

HEADLINE = ["request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms"]
"""The rows of the seed's "DCP Gain Analysis" table."""
BETTER, WORSE = "background-color: rgba(46, 160, 67, 0.22)", "background-color: rgba(248, 81, 73, 0.22)"


def pick_rows(rows: list[cmp.GainRow], headline_only: bool) -> list[cmp.GainRow]:
    if not headline_only:
        return rows
    by_key = {r.key: r for r in rows}
    return [by_key[k] for k in HEADLINE if k in by_key]


def gain_frame(rows: list[cmp.GainRow], a_label: str, b_label: str) -> pd.DataFrame:
    """The seed's columns (Metric, A, B, Change, Improvement(%)) as display strings."""
    return cmp.to_frame(rows, a_label, b_label)


def gain_styler(rows: list[cmp.GainRow], a_label: str, b_label: str) -> Styler:
    """Change and Improvement(%) tinted green where the candidate is better, red where worse; metrics with
    no direction (token counts, spreads) stay plain."""
    frame = gain_frame(rows, a_label, b_label)
    colour = [BETTER if r.better else WORSE if r.better is False and r.change != 0 else "" for r in rows]

    def tint(column: pd.Series) -> list[str]:
        return colour if column.name in ("Change", "Improvement(%)") else [""] * len(column)

    return frame.style.apply(tint, axis=0).hide(axis="index")
