"""Import: bench JSON, the printed bench block, lm-eval output (JSON or table), server logs → runs."""

import pandas as pd
import streamlit as st

from dashboard import launch_form as lf
from dashboard.state import PAGES, run_title, store
from runner import api
from runner.errors import ParseError, ServelabError
from runner.models import TERMINAL, RunSource

KINDS = {
    "bench_json": "benchmark result (JSON)", "bench_text": "benchmark result (printed block)",
    "lm_eval_json": "lm-eval results (JSON)", "lm_eval_table": "lm-eval results (table)",
    "server_log": "vLLM server log (KV capacity)",
}  # fmt: skip
ss = st.session_state
db = store()


def _files() -> list[tuple[str, bytes | str]]:
    uploads = ss.get(f"import.files.{ss.get('import.gen', 0)}") or []
    files: list[tuple[str, bytes | str]] = [(u.name, u.getvalue()) for u in uploads]
    if (ss.get("import.text") or "").strip():
        files.append(((ss.get("import.name") or "").strip() or "pasted.txt", ss["import.text"]))
    return files


def _import() -> None:
    """Runs before the page draws, so it may clear the inputs once the files are in."""
    into, files = ss.get("import.into") or None, _files()
    try:
        ids = api.import_files(db, files, label=(ss.get("import.label") or "").strip() or None, into=into)
    except ServelabError as exc:
        ss["import.result"] = ("error", str(exc))
        return
    tp, dcp, model = ss.get("import.tp"), ss.get("import.dcp"), (ss.get("import.model") or "").strip()
    try:
        if into is None or api.get_run(db, into).source == RunSource.imported:  # a launched run keeps its own
            api.describe_imported(db, ids, model or None, tp, dcp if tp else None)
    except ServelabError as exc:
        ss["import.result"] = ("warning", f"Imported runs {ids}, but their configuration was not recorded: {exc}")
        return
    ss["import.result"] = ("ok", ids, into, len(files), api.import_summary(api.parse_imports(files), ids))
    ss["import.gen"] = ss.get("import.gen", 0) + 1  # a fresh, empty uploader
    ss["import.text"] = ""
    ss["import.name"] = ""


st.title("Import results")
st.caption("Bring in results made elsewhere: `vllm bench serve --save-result` JSON, the printed “Serving Benchmark "
           "Result” block, lm-eval results (JSON or the printed table), or a vLLM server log (for the KV-cache "
           "capacity). Each file becomes a run of its own (a page quoting several runs — bench blocks under "
           "their names, lm-eval tables labelled with them — one run per block), or all of them join an existing run "
           "— say, the GSM8K table of the configuration whose bench block you imported. Every file is checked "
           "before anything is stored: a bad file changes nothing.")
st.file_uploader("Files", accept_multiple_files=True, key=f"import.files.{ss.get('import.gen', 0)}")
st.text_area("…or paste text", key="import.text", height=180,
             placeholder="============ Serving Benchmark Result ============\nSuccessful requests: 998\n…")
NEW = 0  # the "no" choice (None would show as an empty selectbox)
finished = [r for r in api.list_runs(db) if r.status in TERMINAL]
titles = {r.id: run_title(r) for r in finished}
if ss.get("import.into") not in titles:
    ss["import.into"] = NEW  # first visit, or the run was deleted meanwhile
into = st.selectbox("Add to an existing run", [NEW, *titles], key="import.into",
                    format_func=lambda i: "no — a new run per file" if i == NEW else titles[i],
                    help="Finished runs. Their results gain these files' results: a benchmark becomes another "
                         "execution, lm-eval scores are added, a server log fills in the KV-cache capacity.") or None
c1, c2 = st.columns(2)
c1.text_input("Name of the pasted text", key="import.name", placeholder="pasted.txt")
c2.text_input("Label", key="import.label", placeholder="default: the file name", disabled=into is not None,
              help="Name of the new runs in tables (an existing run keeps its own).")
launched_target = into is not None and api.get_run(db, into).source != RunSource.imported
with st.expander("Configuration of these results (optional: printed results rarely state it)"):
    if launched_target:
        st.caption(f"Run #{into} was launched here: it keeps the configuration it ran with.")
    m1, m2, m3 = st.columns(3)
    m1.text_input("model", key="import.model", placeholder="moonshotai/Kimi-K2-Thinking", disabled=launched_target)
    tp = m2.selectbox("tensor-parallel-size", [None, 1, 2, 4, 8, 16, 32, 64], key="import.tp",
                      format_func=lambda v: "unknown" if v is None else str(v), disabled=launched_target)
    # The DCP choices follow the TP size; Streamlit keeps a selectbox's value when its options change, even one
    # no longer offered (shown blank), so the value is set here from the DCP last picked, before it is drawn.
    ss["import.dcp"] = lf.dcp_for(tp, ss.get("import.dcp_picked"))
    m3.selectbox("decode-context-parallel-size", lf.divisors(tp) if tp else [None], key="import.dcp",
                 format_func=lambda v: "—" if v is None else str(v), help="Divisors of the TP size.",
                 placeholder="—", disabled=launched_target,
                 on_change=lambda: ss.update({"import.dcp_picked": ss["import.dcp"]}))

files = _files()
problems, items = [], []
if files:
    preview = []
    for name, content in files:
        try:
            parts = api.parse_import(name, content)
        except ParseError as exc:
            problems.append(str(exc))
            preview.append({"file": name, "detected": "not understood", "content": ""})
            continue
        items += parts
        preview += [{"file": name, "detected": KINDS.get(item.kind, item.kind) if item.part is None else
                     f"run “{item.part}” of a page of {len(parts)}", "content": api.describe_item(item)}
                    for item in parts]
    st.dataframe(pd.DataFrame(preview), hide_index=True)
    for problem in problems:
        st.error(problem)
    for line in api.import_summary(items) if not problems else []:
        st.info(line)
runs = len(items) if not problems and len(items) != len(files) else None
st.button(f"Import {len(files)} file(s)" + (f" as {runs} runs" if runs and into is None else "")
          + (f" into run #{into}" if into is not None else ""), type="primary",
          disabled=not files or bool(problems), on_click=_import)

result = ss.pop("import.result", None)
if result and result[0] == "ok":
    _, ids, target, count, summary = result
    if target is None:
        st.success(f"Imported {len(ids)} run(s): {', '.join(f'#{i}' for i in ids)}.")
    else:
        st.success(f"Added {count} file(s) to run #{target}.")
    for line in summary:
        st.info(line)
    for run_id in ids:
        st.page_link(PAGES["run"], label=f"Open run #{run_id} →", query_params={"run": run_id})
    if len(ids) >= 2:
        st.page_link(PAGES["compare"], label="Compare them →",
                     query_params={"a": ids[0], "b": ",".join(map(str, ids[1:]))})
elif result:
    (st.error if result[0] == "error" else st.warning)(result[1])
