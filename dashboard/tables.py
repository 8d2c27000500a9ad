"""Tables as shown: the gain table with direction-aware colour. Pure pandas, no Streamlit."""

from __future__ import annotations

import pandas as pd
from pandas.io.formats.style import Styler

from runner import compare as cmp

HEADLINE = ["request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms"]
"""The rows of the seed's "DCP Gain Analysis" table."""
BETTER, WORSE = "background-color: rgba(46, 160, 67, 0.22)", "background-color: rgba(248, 81, 73, 0.22)"
FLAGGED = "color: #9a6700"


def pick_rows(rows: list[cmp.GainRow], headline_only: bool) -> list[cmp.GainRow]:
    if not headline_only:
        return rows
    by_key = {r.key: r for r in rows}
    return [by_key[k] for k in HEADLINE if k in by_key]


def gain_frame(rows: list[cmp.GainRow], a_label: str, b_label: str) -> pd.DataFrame:
    """The seed's columns (Metric, A, B, Change, Improvement(%)) as display strings."""
    return cmp.to_frame(rows, a_label, b_label)


def gain_styler(rows: list[cmp.GainRow], a_label: str, b_label: str) -> Styler:
    """Change and Improvement(%) tinted green where the candidate is better, red where worse, and only where
    the change is beyond the noise (`GainRow.colored`); flags in amber."""
    frame = gain_frame(rows, a_label, b_label)
    colour = [(BETTER if r.better else WORSE) if r.colored else "" for r in rows]
    flagged = [FLAGGED if r.flags else "" for r in rows]

    def tint(column: pd.Series) -> list[str]:
        if column.name in ("Change", "Improvement(%)"):
            return colour
        return flagged if column.name == cmp.FLAGS_COLUMN else [""] * len(column)

    return frame.style.apply(tint, axis=0).hide(axis="index")


DROP, WITHIN, GAIN, UNKNOWN = cmp.ACC_DROP, cmp.ACC_WITHIN, cmp.ACC_GAIN, cmp.ACC_UNKNOWN
accuracy_verdict = cmp.accuracy_verdict


def accuracy_frame(rows: list[dict], a_label: str, b_label: str) -> pd.DataFrame:
    """`api.compare_accuracy` rows as shown: value ± stderr on both sides, change, combined stderr, flag."""
    def pm(value: float, stderr: float | None) -> str:
        return f"{value:.4f} ± {stderr:.4f}" if stderr is not None else f"{value:.4f}"

    a_col, b_col = (a_label, b_label) if a_label != b_label else (f"{a_label} (baseline)", b_label)
    return pd.DataFrame([{
        "Task": r["task"], "Filter": r["filter"], "Metric": r["metric"],
        "n-shot": "" if r["n_shot"] is None else str(r["n_shot"]),
        a_col: pm(r["a"], r["a_stderr"]), b_col: pm(r["b"], r["b_stderr"]), "Change": f"{r['delta']:+.4f}",
        "Combined stderr": "—" if r["stderr"] is None else f"{r['stderr']:.4f}", "Check": accuracy_verdict(r),
    } for r in rows], columns=["Task", "Filter", "Metric", "n-shot", a_col, b_col, "Change", "Combined stderr",
                               "Check"])  # fmt: skip


def accuracy_styler(frame: pd.DataFrame) -> Styler:
    """Check (and Change) red on a drop beyond 2σ, green on a gain beyond it, plain within the noise."""
    colour = [WORSE if v == DROP else BETTER if v == GAIN else "" for v in frame["Check"]]
    flag = [f"{c}; color: #b42318; font-weight: 600" if v == DROP else c for c, v in zip(colour, frame["Check"])]

    def tint(column: pd.Series) -> list[str]:
        return flag if column.name == "Check" else colour if column.name == "Change" else [""] * len(column)

    return frame.style.apply(tint, axis=0).hide(axis="index")
