"""What the dashboard and the CLI call: import, queue, cancel, delete, list, compare, export.

Plain arguments in, values out; errors are `ServelabError`s with messages meant for a person.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa

from runner import compare as cmp
from runner.config import LaunchSpec, RunSpec, Settings, SweepSpec
from runner.errors import ParseError, StoreError
from runner.execute import INTERNAL_ENV
from runner.models import ACTIVE, TERMINAL, Run, RunSource, RunStatus, utcnow
from runner.parsers import (
    BenchParse,
    EvalScore,
    KvCapacity,
    detect_kind,
    parse_bench_json,
    parse_bench_text,
    parse_lm_eval_json,
    parse_lm_eval_table,
    parse_startup_log,
)
from runner.store import Store, default_db_url

MAX_IMPORT_BYTES = 64 * 1024 * 1024


def open_store(db: str | None = None) -> Store:
    """The store at `db` (path or SQLAlchemy URL), else SERVELAB_DB, else data/servelab.db."""
    try:
        return Store(db)
    except sa.exc.SQLAlchemyError as exc:  # no driver for the URL, a file that is not a database, …
        where = db or default_db_url()
        raise StoreError(f"cannot open the database {where}: {exc.args[0] if exc.args else exc}; "
                         "pass a SQLite file path or a SQLAlchemy URL whose driver is installed") from None


# -- import ---------------------------------------------------------------------------------------
@dataclass
class ImportItem:
    name: str
    kind: str
    text: str
    bench: BenchParse | None = None
    scores: list[EvalScore] | None = None
    kv: KvCapacity | None = None


def parse_import(name: str, data: bytes | str) -> ImportItem:
    """Understand one file to import (type detected from content) without touching the store."""
    if isinstance(data, bytes):
        if len(data) > MAX_IMPORT_BYTES:
            raise ParseError(f"{name}: {len(data) / 2**20:.0f} MiB is over the {MAX_IMPORT_BYTES // 2**20} MiB import limit.")
        text = data.decode("utf-8", "replace")
    else:
        text = data
    try:
        kind = detect_kind(text)
        item = ImportItem(name, kind, text)
        if kind == "bench_json":
            item.bench = parse_bench_json(text)
        elif kind == "bench_text":
            item.bench = parse_bench_text(text)
        elif kind == "lm_eval_json":
            item.scores = parse_lm_eval_json(text)
        elif kind == "lm_eval_table":
            item.scores = parse_lm_eval_table(text)
        else:
            item.kv = parse_startup_log(text)
            if item.kv.kv_cache_tokens is None and item.kv.kv_cache_gib is None:
                raise ParseError("no KV-cache lines found in this server log")
    except ParseError as exc:
        raise ParseError(f"{name}: {exc}") from None
    return item


def import_files(store: Store, files: list[tuple[str, bytes | str]], label: str | None = None,
                 settings: Settings | None = None, into: int | None = None) -> list[int]:
    """Import (name, content) pairs: one new run each, or all into the existing run `into` (say, a
    bench block and the GSM8K table of the same configuration). Every file is parsed before anything
    is written, so a bad file creates nothing. Returns the ids of the runs written."""
    items = [parse_import(name, data) for name, data in files]
    settings = settings or Settings.from_env()
    target = store.get_run(into) if into is not None else None
    if target is not None and target.status in ACTIVE:
        raise StoreError(f"run {into} is {target.status.value}; import into it once it has ended")
    ids = []
    for item in items:
        fields: dict[str, Any] = {}
        if item.bench is not None:
            fields["model"] = item.bench.info.get("model_id")
        if item.kv is not None:
            fields.update(kv_cache_tokens=item.kv.kv_cache_tokens, kv_cache_gib=item.kv.kv_cache_gib,
                          max_concurrency=item.kv.max_concurrency, dcp_multiplier=item.kv.dcp_multiplier,
                          vllm_version=item.kv.vllm_version)
        fields = {k: v for k, v in fields.items() if v is not None}
        if target is None:
            run = store.create_run(label=label or Path(item.name).stem, source=RunSource.imported,
                                   status=RunStatus.succeeded, finished_at=utcnow(), progress=1.0,
                                   phase=f"imported {item.kind}", **fields)
        else:
            current = store.get_run(target.id)  # fill only what the run does not know yet
            run = store.update_run(target.id, **{k: v for k, v in fields.items() if getattr(current, k) is None})
        run_dir = run_folder(run, settings)  # never a folder outside the data folder that the store names
        if run_dir is None:
            run_dir = settings.data_dir / "runs" / str(run.id)
            run_dir.mkdir(parents=True, exist_ok=True)
            run = store.update_run(run.id, run_dir=str(run_dir))
        raw = run_dir / ("imported-" + _safe_name(item.name))
        raw.write_text(item.text)
        if item.bench is not None:
            store.add_bench_result(run.id, item.bench.metrics, repeat=len(store.bench_results(run.id)),
                                   raw_path=str(raw))
        if item.scores is not None:
            store.add_eval_results(run.id, [{**asdict(s), "raw_path": str(raw)} for s in item.scores])
        if run.id not in ids:
            ids.append(run.id)
    return ids


def _safe_name(name: str) -> str:
    """A file name that stays inside the run folder whatever the upload was called."""
    base = Path(name.replace("\\", "/")).name or "upload"
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in base).lstrip(".")
    return cleaned[:100] or "upload"


# -- queue ----------------------------------------------------------------------------------------
def _run_fields(spec: RunSpec) -> dict[str, Any]:
    launch = spec.launch
    return dict(
        label=spec.display_label, model=launch.model, tensor_parallel_size=launch.tensor_parallel_size,
        decode_context_parallel_size=launch.decode_context_parallel_size,
        pipeline_parallel_size=launch.pipeline_parallel_size, data_parallel_size=launch.data_parallel_size,
        spec_json=spec.model_dump_json(), status=RunStatus.queued, phase="queued",
    )


def queue_run(store: Store, spec: RunSpec, gpu_count: int | None = None, **fields: Any) -> Run:
    """Validate `spec` (raises SpecError listing every problem) and queue it."""
    spec.check(gpu_count)
    return store.create_run(**{**_run_fields(spec), **fields})


def queue_sweep(store: Store, sweep: SweepSpec, gpu_count: int | None = None) -> tuple[int, list[Run]]:
    """Queue the runs of a sweep. Re-queuing the same sweep (same name and spec) resumes it: cells
    that succeeded or are still queued/running are kept, the others get a new run."""
    cells = sweep.cells()
    for _, spec in cells:  # every cell valid before any is queued
        spec.check(gpu_count)
    spec_json = sweep.model_dump_json()
    existing = next((s for s in store.list_sweeps() if s.name == sweep.name and s.spec_json == spec_json), None)
    sweep_row = existing or store.create_sweep(sweep.name, spec_json)
    keep = {RunStatus.succeeded, RunStatus.queued, *ACTIVE}
    done = {r.sweep_cell for r in store.list_runs(sweep_id=sweep_row.id) if r.status in keep}
    queued = [
        queue_run(store, spec, gpu_count, sweep_id=sweep_row.id, sweep_cell=cell, label=cell_label(sweep, spec))
        for cell, spec in cells
        if cell not in done
    ]
    return sweep_row.id, queued


def cell_label(sweep: SweepSpec, spec: RunSpec) -> str:
    """`name: TP2+DCP2`, plus the other launch values the matrix varies (`name: TP1 max-num-seqs=128`),
    so that no two cells of a sweep share a label."""
    varied = [k for k in sweep.matrix if k in LaunchSpec.model_fields and k not in LaunchSpec.SHORT_LABEL_FIELDS]
    extra = "".join(f" {k.replace('_', '-')}={getattr(spec.launch, k)}" for k in varied)
    return f"{sweep.name}: {spec.launch.short_label()}{extra}"


def cancel(store: Store, run_id: int) -> Run:
    """Cancel a run in any phase: a queued run at once, a running one at the executor's next tick."""
    run = store.get_run(run_id)
    if run.status in TERMINAL:
        raise StoreError(f"run {run_id} already ended ({run.status.value}); nothing to cancel")
    if run.status == RunStatus.queued:
        return store.update_run(run_id, status=RunStatus.cancelled, phase="cancelled", finished_at=utcnow(),
                                failure_reason="cancelled while queued")
    return store.update_run(run_id, cancel_requested=True, phase="cancelling")


def delete_run(store: Store, run_id: int) -> None:
    """Delete a finished run, its rows and its folder. A running run must be cancelled first."""
    run = store.get_run(run_id)
    if run.status in ACTIVE:
        raise StoreError(f"run {run_id} is {run.status.value}; cancel it before deleting it")
    store.delete_run(run_id)
    if (folder := run_folder(run)) is not None:
        shutil.rmtree(folder, ignore_errors=True)


def run_folder(run: Run, settings: Settings | None = None) -> Path | None:
    """A run's folder, resolved, when it is a folder inside the data folder (symlinks resolved on both
    sides); else None. servelab deletes and serves files of run folders only through this: a store made
    elsewhere (the committed GPU stores name another host's folders) or edited by hand can name any path."""
    if not run.run_dir:
        return None
    data = (settings or Settings.from_env()).data_dir.resolve()
    folder = Path(run.run_dir).resolve()
    if folder == data or not folder.is_relative_to(data) or not folder.is_dir():
        return None
    return folder


def run_files(run: Run, settings: Settings | None = None) -> dict[str, Path]:
    """The downloadable files of a run's folder (bench JSON, logs, lm-eval output, imports): name → path.
    Only regular files that are inside the folder once symlinks are resolved; none when `run_folder` is None."""
    folder = run_folder(run, settings)
    if folder is None:
        return {}
    files = {}
    for path in sorted(folder.rglob("*")):
        real = path.resolve()
        if real.is_file() and real.is_relative_to(folder):
            files[path.name] = real
    return files


def reproduce_env(run: Run) -> dict[str, str]:
    """The environment a run's server got, without servelab's own bookkeeping variables."""
    env = json.loads(run.env_json) if run.env_json else {}
    return {k: v for k, v in env.items() if k not in INTERNAL_ENV}


# -- compare and export ---------------------------------------------------------------------------
def label_of(run: Run) -> str:
    return run.label or f"run {run.id}"


def compare_runs(store: Store, baseline: int, candidate: int) -> tuple[list[cmp.GainRow], str, str]:
    """The gain table of `candidate` against `baseline`, with the two column labels."""
    a, b = store.get_run(baseline), store.get_run(candidate)
    ma, mb = store.run_metrics(baseline), store.run_metrics(candidate)
    if not ma or not mb:
        missing = baseline if not ma else candidate
        raise StoreError(f"run {missing} has no benchmark results to compare; import or run a benchmark first")
    a_label, b_label = label_of(a), label_of(b)
    if a_label == b_label:
        a_label, b_label = f"{a_label} (#{a.id})", f"{b_label} (#{b.id})"
    return cmp.gain_table(ma, mb), a_label, b_label


def compare_accuracy(store: Store, baseline: int, candidate: int) -> list[dict[str, Any]]:
    """Accuracy of `candidate` against `baseline` per task, filter and metric: both values with their
    stderr, the delta, the combined stderr, and whether the drop exceeds twice that (flagged)."""
    a = {(e.task, e.filter, e.metric): e for e in store.eval_results(baseline)}
    rows = []
    for e in store.eval_results(candidate):
        base = a.get((e.task, e.filter, e.metric))
        if base is None:
            continue
        delta = cmp.accuracy_delta(base.value, base.stderr, e.value, e.stderr)
        rows.append({"task": e.task, "filter": e.filter, "metric": e.metric, "n_shot": e.n_shot,
                     "a": base.value, "a_stderr": base.stderr, "b": e.value, "b_stderr": e.stderr, **delta})
    return rows


def render_accuracy(rows: list[dict[str, Any]], a_label: str, b_label: str) -> str:
    """The accuracy comparison as a Markdown table (value ± stderr, delta, flag)."""
    def pm(v: float, se: float | None) -> str:
        return f"{v:.4f} ± {se:.4f}" if se is not None else f"{v:.4f}"

    lines = [f"| Task | Filter | Metric | {a_label} | {b_label} | Change | Drop > 2σ |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        flag = "n/a" if r["flagged"] is None else ("yes" if r["flagged"] else "no")
        lines.append(f"| {r['task']} | {r['filter']} | {r['metric']} | {pm(r['a'], r['a_stderr'])} | "
                     f"{pm(r['b'], r['b_stderr'])} | {r['delta']:+.4f} | {flag} |")
    return "\n".join(lines)


def eval_table(store: Store, run_id: int) -> str:
    """A run's accuracy in lm-eval's own printed form, as in the seed."""
    lines = ["|Tasks|Version| Filter |n-shot| Metric | |Value | |Stderr|",
             "|-----|------:|--------|-----:|--------|---|-----:|---|-----:|"]
    last_task = None
    for e in store.eval_results(run_id):
        task = e.task if e.task != last_task else ""
        last_task = e.task
        stderr = f"{e.stderr:.4f}" if e.stderr is not None else "N/A"
        shots = "" if e.n_shot is None else str(e.n_shot)
        version = " " if not task else "-"
        lines.append(f"|{task or ' '}|{version}|{e.filter}|{shots}|{e.metric}|↑ |{e.value:.4f}|± |{stderr}|")
    return "\n".join(lines)


def render_gain_table(rows: list[cmp.GainRow], a_label: str, b_label: str, fmt: str = "table") -> str:
    if fmt == "markdown":
        return cmp.to_markdown(rows, a_label, b_label)
    if fmt == "csv":
        return cmp.to_csv(rows, a_label, b_label)
    frame = cmp.to_frame(rows, a_label, b_label)
    return frame.to_string(index=False)


RUN_COLUMNS = ["id", "label", "status", "source", "model", "tensor_parallel_size", "decode_context_parallel_size",
               "output_throughput", "request_throughput", "median_ttft_ms", "median_tpot_ms", "kv_cache_tokens",
               "created_at", "started_at", "finished_at", "failure_reason"]


def runs_table(store: Store, **filters: Any) -> pd.DataFrame:
    """The Runs table: the columns of `RUN_COLUMNS` only, read as such (quick with thousands of runs)."""
    frame = store.runs_frame(columns=RUN_COLUMNS, **filters)
    return frame[[c for c in RUN_COLUMNS if c in frame.columns]]


def results_frame(store: Store, run_ids: list[int] | None = None) -> pd.DataFrame:
    """One row per bench execution with every scalar metric, and one per eval score."""
    runs = [store.get_run(r) for r in run_ids] if run_ids else store.list_runs()
    rows = []
    for run in runs:
        for br in store.bench_results(run.id):
            rows.append({"run_id": run.id, "label": label_of(run), "kind": "bench", "repeat": br.repeat,
                         **json.loads(br.metrics_json)})
        for er in store.eval_results(run.id):
            rows.append({"run_id": run.id, "label": label_of(run), "kind": "eval", "task": er.task,
                         "filter": er.filter, "metric": er.metric, "value": er.value, "stderr": er.stderr,
                         "n_shot": er.n_shot, "samples": er.samples})
    return pd.DataFrame(rows)


def export_csv(store: Store, what: str, run_ids: list[int] | None, out: Path) -> int:
    """Write runs, samples or results as CSV; return the number of data rows written."""
    if what == "runs":
        frame = store.runs_frame()
        if run_ids:
            frame = frame[frame["id"].isin(run_ids)]
    elif what == "samples":
        # streamed from the database to the file: millions of rows never become a DataFrame
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="", buffering=1 << 20) as f:
            writer = csv.writer(f, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")  # as pandas writes
            writer.writerow(store.sample_columns())
            count = 0
            for batch in store.sample_batches(run_ids or None):
                writer.writerows(batch)
                count += len(batch)
        return count
    elif what == "results":
        frame = results_frame(store, run_ids)
    else:
        raise StoreError(f"cannot export {what!r}; choose runs, samples or results")
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False, quoting=csv.QUOTE_MINIMAL)
    return len(frame)


def frame_to_csv(frame: pd.DataFrame) -> str:
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    return buf.getvalue()
