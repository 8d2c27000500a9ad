"""What the dashboard and the CLI call: import, queue, cancel, delete, list, read, compare, export.

The one door to the rest of runner: the dashboard imports this module and the pure value modules
(config, errors, models, compare) only; `lint-imports` holds it to that (pyproject's importlinter contracts).
Plain arguments in, values out; errors are `ServelabError`s with messages meant for a person.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa
from pydantic import ValidationError

from runner import compare as cmp
from runner import noise, points, slo
from runner.cluster import ClusterState, snapshot
from runner.commands import bench_argv, display, lm_eval_argv, serve_argv
from runner.config import EvalSpec, Host, LaunchSpec, RunSpec, Settings, SweepSpec, Target
from runner.errors import ParseError, Problem, ServelabError, SpecError, StoreError
from runner.evaluate import LOG_NAME, OUTPUT_DIR, TASK_DIR, local_eval_problem, local_tasks
from runner.execute import INTERNAL_ENV, cpu_backend
from runner.loads import STOP_PHASE, PointKey, format_load, load_of, point_key
from runner.models import (
    ACTIVE,
    BENCH_COLUMNS,
    TERMINAL,
    BenchResult,
    BenchWindow,
    EvalResult,
    PhaseEvent,
    Run,
    RunSource,
    RunStatus,
    Sweep,
    WorkerError,
    utcnow,
)
from runner.outputs import FLAG_BELOW_PCT, OutputAgreement, compare_answers
from runner.page import split_page
from runner.parsers import (
    BenchParse,
    EvalScore,
    KvCapacity,
    bench_blocks,
    detect_kind,
    has_lm_eval_table,
    parse_bench_json,
    parse_bench_text,
    parse_lm_eval_json,
    parse_lm_eval_table,
    parse_startup_log,
)
from runner.server import tail
from runner.store import Store, default_db_url
from runner.telemetry import GpuReader, load_nvml

MAX_IMPORT_BYTES = 64 * 1024 * 1024


def open_store(db: str | None = None) -> Store:
    """The store at `db` (path or SQLAlchemy URL), else SERVELAB_DB, else data/servelab.db."""
    try:
        return Store(db)
    except sa.exc.SQLAlchemyError as exc:  # no driver for the URL, a file that is not a database, …
        where = db or default_db_url()
        raise StoreError(f"cannot open the database {where}: {exc.args[0] if exc.args else exc}; "
                         "pass a SQLite file path or a SQLAlchemy URL whose driver is installed") from None


# -- import ----------------------------------------------------------------------------------------
@dataclass
class ImportItem:
    """One result to import: a file, or one run's share of a page quoting several runs (`part` names it)."""

    name: str
    kind: str
    text: str
    bench: BenchParse | None = None
    scores: list[EvalScore] | None = None
    kv: KvCapacity | None = None
    part: str | None = None  # the run's name on a page of several runs ("TP8")
    notes: list[str] = dataclasses.field(default_factory=list)  # what the page split left out, and why


def parse_import(name: str, data: bytes | str) -> list[ImportItem]:
    """Understand one file to import (type detected from content) without touching the store: one item, or one
    per run of a page quoting several runs' results (each bench block with the lm-eval table and startup lines
    that carry its name; `runner.page`)."""
    if isinstance(data, bytes):
        if len(data) > MAX_IMPORT_BYTES:
            raise ParseError(f"{name}: {len(data) / 2**20:.0f} MiB is over the "
                             f"{MAX_IMPORT_BYTES // 2**20} MiB import limit.")
        text = data.decode("utf-8", "replace")
    else:
        text = data
    try:
        kind = detect_kind(text)
        item = ImportItem(name, kind, text)
        if kind == "bench_text" and len(bench_blocks(text)) > 1:
            return _page_items(name, text)
        if kind == "bench_json":
            item.bench = parse_bench_json(text)
        elif kind == "bench_text":
            item.bench = parse_bench_text(text)
            _one_result_only(text)
        elif kind == "lm_eval_json":
            item.scores = parse_lm_eval_json(text)
        elif kind == "lm_eval_table":
            item.scores = parse_lm_eval_table(text)
            _one_result_only(text, item.scores)
        else:
            item.kv = parse_startup_log(text)
            if item.kv.kv_cache_tokens is None and item.kv.kv_cache_gib is None:
                raise ParseError("no KV-cache lines found in this server log")
    except ParseError as exc:
        raise ParseError(f"{name}: {exc}") from None
    return [item]


def parse_imports(files: Sequence[tuple[str, bytes | str]]) -> list[ImportItem]:
    """`parse_import` of every (name, content) pair, in order."""
    return [item for name, data in files for item in parse_import(name, data)]


def _page_items(name: str, text: str) -> list[ImportItem]:
    try:
        split = split_page(text)
    except ParseError as exc:
        raise ParseError(_several_results(text, why=str(exc)) or str(exc)) from None
    parts = split.parts if split is not None else []
    return [ImportItem(name, "bench_text", part.text, bench=parse_bench_text(part.block),
                       scores=parse_lm_eval_table(part.table) if part.table else None,
                       kv=parse_startup_log(part.log) if part.log else None, part=part.label,
                       notes=split.notes if split is not None else [])
            for part in parts]


def _one_result_only(text: str, scores: list[EvalScore] | None = None) -> None:
    """Refuse a text that holds several runs' results the page split does not take (a bench block with an lm-eval
    table, tables alone): a file is imported as one run, and the parsers would keep one block, or two values of
    one score."""
    if message := _several_results(text, scores):
        raise ParseError(message)


def _several_results(text: str, scores: list[EvalScore] | None = None, why: str | None = None) -> str | None:
    blocks = bench_blocks(text)
    found = []
    if len(blocks) > 1:
        found.append(f"{len(blocks)} 'Serving Benchmark Result' blocks (" + "; ".join(
            f"{b.get('completed') or 0:.0f} requests, {b.get('output_throughput') or 0:,.2f} output tok/s"
            for b in (parse_bench_text(block).metrics for block in blocks)) + ")")
    if blocks and has_lm_eval_table(text):
        found += [*([] if found else ["a 'Serving Benchmark Result' block"]), "an lm-eval table"]
    keys = [(s.task, s.filter, s.metric) for s in scores or []]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        task, filt, metric = twice[0]
        values = ", ".join(f"{s.value:g}" for s in scores or [] if (s.task, s.filter, s.metric) == twice[0])
        found.append(f"{keys.count(twice[0])} values of {task} {filt} {metric} ({values}): several runs' tables")
    if not found:
        return None
    said = (f"{why}, so it is not split into runs by the names it gives them" if why
            else "a file is imported as one run's result")
    return (f"holds {' and '.join(found)}; {said}. Import each benchmark block and each lm-eval table on its own "
            "(a file each, or paste one at a time), adding a table to its block's run with 'Add to an existing "
            "run' (`--into`).")


def describe_item(item: ImportItem) -> str:
    """What an import item holds, in a few words: `994 requests, 695.13 output tok/s`; a page's run adds its first
    score and KV capacity (`…, gsm8k flexible-extract 0.9386, KV cache 5,721,088 tokens`)."""
    said = []
    if item.bench is not None:
        m = item.bench.metrics
        said.append(f"{m.get('completed') or 0:.0f} requests, {m.get('output_throughput') or 0:,.2f} output tok/s")
    elif item.scores:
        return "; ".join(f"{s.task} {s.filter} {s.metric} = {s.value:.4f}" for s in item.scores[:3])
    elif item.kv is not None:
        return f"KV cache {item.kv.kv_cache_tokens or 0:,} tokens"
    said += [f"{s.task} {s.filter} {s.value:.4f}" for s in (item.scores or [])[:1]]
    if item.kv is not None and item.kv.kv_cache_tokens is not None:
        said.append(f"KV cache {item.kv.kv_cache_tokens:,} tokens")
    return ", ".join(said)


def import_summary(items: Sequence[ImportItem], ids: Sequence[int] | None = None) -> list[str]:
    """One sentence per page that became several runs (none for files of one result): `2 runs from one page
    (seed.txt): #1 TP8 (998 requests, …), #2 TP8+DCP8 (…). TP8: no startup-log lines on the page.` `ids`: the
    runs `import_files` made of `items`, in order."""
    pages: dict[str, list[tuple[ImportItem, int | None]]] = {}
    for index, item in enumerate(items):
        if item.part is not None:
            run_id = ids[index] if ids is not None and index < len(ids) else None
            pages.setdefault(item.name, []).append((item, run_id))
    out = []
    for name, parts in pages.items():
        runs = ", ".join(f"{'' if i is None else f'#{i} '}{p.part} ({describe_item(p)})" for p, i in parts)
        notes = "".join(f" {n[0].upper()}{n[1:]}." for n in parts[0][0].notes)
        out.append(f"{len(parts)} runs from one page ({name}): {runs}.{notes}")
    return out


def import_files(store: Store, files: Sequence[tuple[str, bytes | str]], label: str | None = None,
                 settings: Settings | None = None, into: int | None = None) -> list[int]:
    """Import (name, content) pairs: one new run each (a page of several runs' results: one per run, named as
    the page names it, after `label` if given), or all into the existing run `into` (say, a bench block and the
    GSM8K table of the same configuration). Every file is parsed before anything is written, so a bad file
    creates nothing. Returns the ids of the runs written."""
    items = parse_imports(files)
    settings = settings or Settings.from_env()
    if into is not None and (parts := [i for i in items if i.part is not None]):
        raise ParseError(f"{parts[0].name}: holds {len(parts)} runs' results ({', '.join(str(p.part) for p in parts)}"
                         f"); a page of several runs is imported as new runs, not into run {into}.")
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
            name = label or Path(item.name).stem
            if item.part is not None:
                name = f"{label} {item.part}" if label else item.part
            run = store.create_run(label=name, source=RunSource.imported,
                                   status=RunStatus.succeeded, finished_at=utcnow(), progress=1.0,
                                   phase=f"imported {'page part' if item.part else item.kind}", **fields)
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


def this_host(settings: Settings | None = None) -> Target:
    """What launches are checked against: the Ray cluster's shape when a Ray worker is configured
    (SERVELAB_RAY_ADDRESS), else this machine: its GPUs (NVML), or vLLM's CPU backend and its cores."""
    settings = settings or Settings.from_env()
    if settings.ray_address:
        state = cluster_state(settings.ray_address)
        if state.error:
            raise ServelabError(f"{state.error}; launches are checked against the cluster a Ray worker schedules "
                                "onto (SERVELAB_RAY_ADDRESS): start it, or unset SERVELAB_RAY_ADDRESS")
        return state.shape(cpu_backend(settings))
    if cpu_backend(settings):
        return Host(cpu_backend=True, cores=len(os.sched_getaffinity(0)))
    reader = GpuReader(load_nvml())
    try:
        return Host(gpus=len(reader.handles))
    finally:
        reader.close()


def queue_run(store: Store, spec: RunSpec, host: Target | None = None, **fields: Any) -> Run:
    """Validate `spec` for `host` (raises SpecError listing every problem) and queue it. A run for
    another worker (`spec.other_worker`) is checked without this machine."""
    spec.check(host)
    return store.create_run(**{**_run_fields(spec), **fields})


def queue_sweep(store: Store, sweep: SweepSpec, host: Target | None = None) -> tuple[int, list[Run]]:
    """Queue the runs of a sweep. Re-queuing the same sweep (same name and spec) resumes it: cells
    that succeeded or are still queued/running are kept, the others get a new run."""
    cells = sweep.cells()
    for _, spec in cells:  # every cell valid before any is queued
        spec.check(host)
    existing = next((s for s in store.list_sweeps() if _same_sweep(s, sweep)), None)
    sweep_row = existing or store.create_sweep(sweep.name, sweep.model_dump_json())
    keep = {RunStatus.succeeded, RunStatus.queued, *ACTIVE}
    done = {r.sweep_cell for r in store.list_runs(sweep_id=sweep_row.id) if r.status in keep}
    queued = [
        queue_run(store, spec, host, sweep_id=sweep_row.id, sweep_cell=cell, label=cell_label(sweep, spec))
        for cell, spec in cells
        if cell not in done
    ]
    return sweep_row.id, queued


def _same_sweep(row: Sweep, sweep: SweepSpec) -> bool:
    """Whether a stored sweep is `sweep` (compared as specs: one stored before a field existed still matches)."""
    if row.name != sweep.name:
        return False
    try:
        return SweepSpec.model_validate_json(row.spec_json) == sweep
    except ValidationError:
        return False


def cell_label(sweep: SweepSpec, spec: RunSpec) -> str:
    """`label: TP2+DCP2` (the sweep's label, else its name), plus the other launch values the matrix varies
    (`label: TP1 max-num-seqs=128`), so that no two cells of a sweep share a label."""
    varied = [k for k in sweep.matrix if k in LaunchSpec.model_fields and k not in LaunchSpec.SHORT_LABEL_FIELDS]
    extra = "".join(f" {k.replace('_', '-')}={getattr(spec.launch, k)}" for k in varied)
    return f"{sweep.label or sweep.name}: {spec.launch.short_label()}{extra}"


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


def default_pair(store: Store) -> tuple[int, int] | None:
    """The pair a comparison opens on: the two newest succeeded runs (older as baseline). With one
    succeeded run, it is the baseline against the newest other run; a failed run is never the baseline."""
    runs = store.list_runs()  # newest first
    done = [r.id for r in runs if r.status == RunStatus.succeeded and r.id is not None]
    if len(done) >= 2:
        return done[1], done[0]
    others = [r.id for r in runs if done and r.id != done[0] and r.id is not None]
    return (done[0], others[0]) if others else None


@lru_cache(maxsize=64)
def _requests_of_file(path: str, mtime_ns: int, size: int) -> noise.Requests | None:
    try:
        return noise.requests_from_arrays(parse_bench_json(Path(path).read_bytes()).arrays)
    except (OSError, ParseError):
        return None


def bench_requests(store: Store, run_id: int) -> list[noise.Requests | None]:
    """Per bench execution of a run, its per-request data (`--save-detailed` arrays of the stored result
    file), or None where the result was a printed block, lacks the arrays, or its file is gone."""
    return _requests(store.bench_results(run_id))


def _requests(results: list[BenchResult]) -> list[noise.Requests | None]:
    out: list[noise.Requests | None] = []
    for br in results:
        path = Path(br.raw_path) if br.raw_path else None
        try:
            st = path.stat() if path is not None else None
        except OSError:
            st = None
        out.append(_requests_of_file(str(path), st.st_mtime_ns, st.st_size) if path and st else None)
    return out


def run_intervals(store: Store, run_id: int, keys: list[str]) -> dict[str, tuple[float, float]]:
    """Bootstrap 95 % intervals of a run's latency statistics `keys` at its headline point (`run_headline`: the
    mean over that point's repeats, as in the gain table; a load sweep's other loads are not pooled in); empty
    unless every bench execution of that point kept its per-request data."""
    results = store.bench_results(run_id)
    head = points.headline((point_key(load_fields(br)), json.loads(br.metrics_json)) for br in results)
    if head is None:
        return {}
    reqs = _requests([br for br in results if point_key(load_fields(br)) == head.key])
    if not reqs or any(r is None for r in reqs):
        return {}
    boot = noise.Bootstrap([r for r in reqs if r is not None], keys)
    return {k: noise.interval(reps) for k in keys if (reps := boot.replicates(k)) is not None}


def _sides(store: Store, run_id: int) -> dict[PointKey, cmp.Side]:
    """A run's results by point (workload and load): the repeats of each, with their per-request data."""
    results = store.bench_results(run_id)
    groups: dict[PointKey, tuple[list[dict[str, float | None]], list[noise.Requests | None]]] = {}
    for br, reqs in zip(results, _requests(results), strict=True):
        metrics, detailed = groups.setdefault(point_key(load_fields(br)), ([], []))
        metrics.append(json.loads(br.metrics_json))
        detailed.append(reqs)
    return {k: cmp.Side(m, r) for k, (m, r) in groups.items()}


def _labels(a: Run, b: Run) -> tuple[str, str]:
    a_label, b_label = label_of(a), label_of(b)
    if a_label == b_label:
        a_label, b_label = f"{a_label} (#{a.id})", f"{b_label} (#{b.id})"
    return a_label, b_label


def compare_runs(store: Store, baseline: int, candidate: int) -> tuple[list[cmp.GainRow], str, str]:
    """The gain table of `candidate` against `baseline` at the one load both measured (with CIs, noise verdicts
    and flags), with the two column labels. Runs that share several loads have a table per load:
    `compare_report`."""
    a, b = store.get_run(baseline), store.get_run(candidate)
    sa, sb = _sides(store, baseline), _sides(store, candidate)
    if not sa or not sb:
        missing = baseline if not sa else candidate
        raise StoreError(f"run {missing} has no benchmark results to compare; import or run a benchmark first")
    gains, _ = points.pair_points(sa, sb)
    if len(gains) != 1:
        loads = ", ".join(g.title for g in gains) or "none"
        raise StoreError(f"runs {baseline} and {candidate} share {len(gains)} loads ({loads}), not one; "
                         "compare them load by load with `servelab compare` or the Compare page")
    return gains[0].rows, *_labels(a, b)


@dataclass
class Comparison:
    """Everything one candidate is compared on against a baseline; an empty section is one that either side
    lacks."""

    baseline: int
    candidate: int
    a_label: str
    b_label: str
    bench: list[points.LoadGain]  # one gain table per load (and workload) both runs measured
    notes: list[str]  # loads only one side has, settings that differ
    accuracy: list[dict[str, Any]]
    kv: list[cmp.GainRow]
    outputs: OutputAgreement | None = None  # the output check (runner.outputs)

    @property
    def empty(self) -> bool:
        return not (self.bench or self.accuracy or self.kv or self.outputs)


_KV_FIELDS = {"kv_cache_tokens": "kv_cache_tokens", "kv_cache_gib": "kv_cache_gib",
              "max_concurrency": "kv_max_concurrency"}


def compare_report(store: Store, baseline: int, candidate: int) -> Comparison:
    """The benchmark gain tables (one per load both runs measured: repeats of a load pooled, loads never), the
    accuracy comparison, the KV capacity and the output check of `candidate` against `baseline`."""
    a, b = store.get_run(baseline), store.get_run(candidate)
    sa, sb = _sides(store, baseline), _sides(store, candidate)
    bench, notes = points.pair_points(sa, sb) if sa and sb else ([], [])
    kv_a = {k: getattr(a, f) for f, k in _KV_FIELDS.items() if getattr(a, f) is not None}
    kv_b = {k: getattr(b, f) for f, k in _KV_FIELDS.items() if getattr(b, f) is not None}
    kv = [dataclasses.replace(r, verdict="", flags=()) for r in cmp.gain_table([kv_a], [kv_b])
          if r.key in _KV_FIELDS.values()] if kv_a and kv_b else []  # what vLLM computed: exact, no noise
    return Comparison(baseline, candidate, *_labels(a, b), bench, notes, compare_accuracy(store, baseline, candidate),
                      kv, compare_outputs(store, baseline, candidate))


def compare_accuracy(store: Store, baseline: int, candidate: int) -> list[dict[str, Any]]:
    """Accuracy of `candidate` against `baseline` per task, filter and metric: both values with their
    stderr, the delta, the combined stderr, whether the drop exceeds twice that (flagged), and the verdict."""
    a = {(e.task, e.filter, e.metric): e for e in store.eval_results(baseline)}
    rows = []
    for e in store.eval_results(candidate):
        base = a.get((e.task, e.filter, e.metric))
        if base is None:
            continue
        delta = cmp.accuracy_delta(base.value, base.stderr, e.value, e.stderr)
        row = {"task": e.task, "filter": e.filter, "metric": e.metric, "n_shot": e.n_shot,
               "a": base.value, "a_stderr": base.stderr, "b": e.value, "b_stderr": e.stderr, **delta}
        rows.append({**row, "verdict": cmp.accuracy_verdict(row)})
    return rows


def compare_outputs(store: Store, baseline: int, candidate: int,
                    threshold_pct: float | None = None) -> OutputAgreement | None:
    """The candidate's output-check answers against the baseline's: share identical, median position of
    the first differing token, flagged below `threshold_pct` (default 90 %). None when either run has no
    answers or they answered different prompt sets (another count, seed or token budget)."""
    a, b = store.output_answers(baseline), store.output_answers(candidate)
    if not a or not b or (a[0].seed, a[0].max_tokens) != (b[0].seed, b[0].max_tokens):
        return None
    return compare_answers({x.idx: (x.prompt, json.loads(x.token_ids_json)) for x in a},
                           {x.idx: (x.prompt, json.loads(x.token_ids_json)) for x in b},
                           FLAG_BELOW_PCT if threshold_pct is None else threshold_pct)


def output_answers(store: Store, run_id: int) -> list[dict[str, Any]]:
    """A run's output-check answers as rows: prompt, answer text, tokens, finish reason."""
    return [{"#": a.idx, "prompt": a.prompt, "answer": a.text, "tokens": len(json.loads(a.token_ids_json)),
             "finish reason": a.finish_reason} for a in store.output_answers(run_id)]


def output_check_summary(agreement: OutputAgreement | None, a_label: str, b_label: str) -> str:
    """One line for the CLI and the Compare page."""
    if agreement is None:
        return "Output check: no common answers (a run without the check, or checks with other settings)."
    first = ("" if agreement.median_first_diff is None
             else f"; differing answers first differ at token {agreement.median_first_diff:g} (median)")
    flag = f" — FLAGGED: below {agreement.threshold_pct:g} % identical" if agreement.flagged else ""
    note = f" ({agreement.note})" if agreement.note else ""
    return (f"Output check, {b_label} against {a_label}: {agreement.identical}/{agreement.compared} answers "
            f"identical ({agreement.identical_pct:.1f} %){first}{flag}{note}.")


def render_accuracy(rows: list[dict[str, Any]], a_label: str, b_label: str) -> str:
    """The accuracy comparison as a Markdown table (value ± stderr, delta, flag)."""
    def pm(v: float, se: float | None) -> str:
        return f"{v:.4f} ± {se:.4f}" if se is not None else f"{v:.4f}"

    lines = [f"| Task | Filter | Metric | {a_label} | {b_label} | Change | Drop > 2σ |",
             "|---|---|---|---|---|---|---|"]
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
    if fmt != "table":
        raise StoreError(f"unknown format {fmt!r}; choose table, markdown or csv")
    frame = cmp.to_frame(rows, a_label, b_label)
    return frame.to_string(index=False)


def _accuracy_records(c: Comparison) -> list[dict[str, Any]]:
    ca, cb = cmp.csv_fields(c.a_label, c.b_label)[3:5]
    return [{"Metric": f"{r['task']} {r['filter']} {r['metric']}", "key": f"{r['task']}/{r['filter']}/{r['metric']}",
             "unit": "", ca: r["a"], cb: r["b"], "Change": r["delta"], f"{ca} stderr": r["a_stderr"],
             f"{cb} stderr": r["b_stderr"], "stderr of change": r["stderr"], "noise": r["verdict"],
             "flags": "drop > 2σ" if r["flagged"] else ""} for r in c.accuracy]


def _output_records(c: Comparison) -> list[dict[str, Any]]:
    o = c.outputs
    if o is None:
        return []
    ca, cb = cmp.csv_fields(c.a_label, c.b_label)[3:5]
    return [{"Metric": "Identical answers", "key": "output_identical_pct", "unit": "%", ca: 100.0, cb: o.identical_pct,
             "Change": o.identical_pct - 100.0, "compared": o.compared,
             "median first differing token": o.median_first_diff,
             "flags": f"below {o.threshold_pct:g} % identical" if o.flagged else ""}]


LOAD_CSV_COLUMNS = ["load_kind", "load", "workload"]
"""Where a benchmark row of a comparison CSV was measured: `request-rate` or `max-concurrency`, its value
(inf: all at once), and what told its workload apart (blank when one)."""


def load_columns(gain: points.LoadGain) -> dict[str, Any]:
    return {"load_kind": gain.load_kind, "load": gain.load, "workload": gain.workload}


def gain_csv(c: Comparison, gain: points.LoadGain, rows: list[cmp.GainRow] | None = None) -> str:
    """One load's gain table as CSV (`rows`: a subset of its rows), the load in columns of its own."""
    return cmp.to_csv(gain.rows if rows is None else rows, c.a_label, c.b_label, load_columns(gain))


def comparison_csv(comparisons: list[Comparison]) -> str:
    """Every section of every comparison as one CSV: `section` (benchmark, accuracy, kv_capacity, output_check),
    the baseline and candidate ids, the load of benchmark rows (`load_kind`, `load`, `workload`; one gain table
    per load), then the gain-table columns (numbers in canonical units)."""
    frames = []
    for c in comparisons:
        parts = [("benchmark", cmp.csv_records(g.rows, c.a_label, c.b_label, load_columns(g))) for g in c.bench]
        parts += [("benchmark_note", [{"Metric": "note", "flags": n} for n in c.notes]),
                  ("accuracy", _accuracy_records(c)), ("kv_capacity", cmp.csv_records(c.kv, c.a_label, c.b_label)),
                  ("output_check", _output_records(c))]
        for section, records in parts:
            if records:
                frame = pd.DataFrame(records)
                for col in LOAD_CSV_COLUMNS:
                    if col not in frame:
                        frame.insert(0, col, None)
                frame = frame[[*LOAD_CSV_COLUMNS, *(x for x in frame.columns if x not in LOAD_CSV_COLUMNS)]]
                frame.insert(0, "candidate", c.candidate)
                frame.insert(0, "baseline", c.baseline)
                frame.insert(0, "section", section)
                frames.append(frame)
    if not frames:
        return ""
    return frame_to_csv(pd.concat(frames, ignore_index=True))


def render_comparison(c: Comparison, fmt: str = "table") -> str:
    """One comparison as text (`table`, `markdown`) with a heading per section present, or as CSV."""
    if fmt == "csv":
        return comparison_csv([c])
    if fmt not in ("table", "markdown"):
        raise StoreError(f"unknown format {fmt!r}; choose table, markdown or csv")
    md = fmt == "markdown"
    out = [f"{'## ' if md else ''}{c.b_label} vs {c.a_label}"]
    out += [f"{'> ' if md else ''}note: {n}" for n in c.notes]
    for gain in c.bench:
        out.append(f"{'### ' if md else ''}Benchmark at {gain.title}")
        out += [f"{'> ' if md else ''}flag: {n}" for n in gain.flags]
        out.append(render_gain_table(gain.rows, c.a_label, c.b_label, fmt).rstrip("\n"))
    if c.accuracy:
        out.append(f"{'### ' if md else ''}Accuracy")
        out.append(render_accuracy(c.accuracy, c.a_label, c.b_label))
    if c.kv:
        out.append(f"{'### ' if md else ''}KV capacity")
        out.append(render_gain_table(c.kv, c.a_label, c.b_label, fmt).rstrip("\n"))
    if c.outputs is not None:
        out.append(f"{'### ' if md else ''}Output check")
        out.append(output_check_summary(c.outputs, c.a_label, c.b_label))
    if c.empty:
        out.append("nothing in common to compare: no benchmark, accuracy or KV capacity on both runs")
    return "\n\n".join(out) + "\n"


HEADLINE_COLUMNS = ["loads", "metrics_at"]
"""Beside a run's metric columns: how many loads (points) it measured, and the load its metrics are from (of a
load sweep, its peak output throughput's)."""


RUN_COLUMNS = ["id", "label", "status", "source", "model", "tensor_parallel_size", "decode_context_parallel_size",
               *HEADLINE_COLUMNS, "output_throughput", "request_throughput", "median_ttft_ms", "median_tpot_ms",
               "kv_cache_tokens", "created_at", "started_at", "finished_at", "failure_reason"]


def one_line(text: object) -> object:
    """Text with its line breaks shown as ⏎, so a CSV row stays one physical line; other values as they are."""
    if not isinstance(text, str):
        return text
    return " ⏎ ".join(part.strip() for part in text.strip().splitlines() if part.strip())


def runs_table(store: Store, **filters: Any) -> pd.DataFrame:
    """The Runs table: the columns of `RUN_COLUMNS` only, read as such (quick with thousands of runs); a
    multi-line failure reason on one line. Metrics are each run's headline (`run_headline`): for a load sweep,
    its peak-throughput load's, with `loads` and `metrics_at` saying so."""
    frame = store.runs_frame(columns=[c for c in RUN_COLUMNS if c not in BENCH_COLUMNS and c not in HEADLINE_COLUMNS],
                             with_metrics=False, **filters)
    frame = _with_headlines(store, frame, [c for c in RUN_COLUMNS if c in BENCH_COLUMNS])
    frame = frame[[c for c in RUN_COLUMNS if c in frame.columns]]
    if "failure_reason" in frame:
        frame = frame.assign(failure_reason=frame["failure_reason"].map(one_line))
    return frame


def command_lines(spec: RunSpec, run_dir: Path | str, env: dict[str, str] | None = None) -> dict[str, str]:
    """Title → the command line each phase of `spec` runs with today's code (`vllm serve`, every `vllm bench
    serve`, `lm_eval`), with the run's folder `run_dir` (a placeholder before the run exists) and the server's
    environment `env` (default the spec's). A run's own are `run_commands`."""
    launch = spec.launch
    base = f"http://{launch.host}:{launch.port}"
    run_dir = Path(run_dir)
    out = {"vllm serve": display(serve_argv(launch), launch.env if env is None else env)}
    for i, bench in enumerate(spec.bench):
        title = f"vllm bench serve ({i + 1} of {len(spec.bench)})" if len(spec.bench) > 1 else "vllm bench serve"
        out[title] = display(bench_argv(bench, launch, base, run_dir, f"bench-{i}-0.json"))
    if spec.eval is not None:
        ev, include = spec.eval, None
        if ev.dataset_path:
            try:
                ev = ev.model_copy(update={"tasks": local_tasks(ev.tasks)})
            except ServelabError:
                pass  # shown as given; the form says why
            include = run_dir / TASK_DIR
        out["lm_eval"] = display(lm_eval_argv(ev, launch, base, run_dir / OUTPUT_DIR, include_path=include))
    return out


RE_RENDERED = "re-rendered by today's servelab; not the command this run ran"


def run_commands(run: Run) -> dict[str, str]:
    """Title → command line of a launched run. What it ran is shown from the argv it stored as it ran it
    (`vllm serve`, each `vllm bench serve` with its warm-ups, `lm_eval`). What it never stored (runs from
    before servelab stored them, phases it did not reach) is rebuilt from its spec by today's code, and once
    the run has started its title says so (`RE_RENDERED`): today's flags may not be the ones it ran."""
    if not run.spec_json:
        return {}
    spec = RunSpec.model_validate_json(run.spec_json)
    if run.port:
        spec = spec.model_copy(update={"launch": spec.launch.model_copy(update={"port": run.port})})
    run_dir = Path(run.run_dir or f"data/runs/{run.id}")
    env = reproduce_env(run) or None
    rendered = command_lines(spec, run_dir, env=env)
    mark = "" if run.status == RunStatus.queued else f" — {RE_RENDERED}"
    ran = json.loads(run.commands_json) if run.commands_json else []
    out = {}
    if run.serve_argv_json:
        out["vllm serve"] = display(json.loads(run.serve_argv_json), spec.launch.env if env is None else env)
    else:
        out["vllm serve" + mark] = rendered["vllm serve"]
    benches = [c for c in ran if c["name"] != "lm_eval"]
    for c in benches:
        out[f"vllm bench serve ({c['name']})"] = display(c["argv"])
    if not benches:
        out.update({title + mark: line for title, line in rendered.items() if title.startswith("vllm bench")})
    evaluated = [c for c in ran if c["name"] == "lm_eval"]
    if evaluated:
        out["lm_eval"] = display(evaluated[-1]["argv"])
    elif "lm_eval" in rendered:
        logged = _logged_command(run_dir / LOG_NAME)  # runs from before the argv was stored logged it
        out["lm_eval" if logged else "lm_eval" + mark] = logged or rendered["lm_eval"]
    return out


def _logged_command(log: Path) -> str | None:
    """The command line the eval phase wrote at the top of its log (`$ lm_eval …`), if it ran."""
    try:
        with open(log, encoding="utf-8", errors="replace") as f:
            first = f.readline()
    except OSError:
        return None
    return first[2:].strip() if first.startswith("$ ") else None


def results_frame(store: Store, run_ids: list[int] | None = None) -> pd.DataFrame:
    """One row per bench execution with every scalar metric and its load (`load_kind`, `load`; `load_text` adds
    what tells the run's workloads apart, e.g. `40 req/s (max-concurrency 4)`), and one per eval score."""
    runs = [store.get_run(r) for r in run_ids] if run_ids else store.list_runs()
    rows = []
    for run in runs:
        windows = store.bench_windows(run.id)
        results = store.bench_results(run.id)
        keys = [point_key(load_fields(br)) for br in results]
        workloads = {k[0] for k in keys}
        for br, (_, kind, load) in zip(results, keys, strict=True):
            metrics = json.loads(br.metrics_json)
            rows.append({"run_id": run.id, "label": label_of(run), "kind": "bench", "load_kind": kind, "load": load,
                         "load_text": points.point_text((_, kind, load), workloads), "repeat": br.repeat,
                         **metrics, **window_columns(windows.get(br.id))})
        for er in store.eval_results(run.id):
            rows.append({"run_id": run.id, "label": label_of(run), "kind": "eval", "task": er.task,
                         "filter": er.filter, "metric": er.metric, "value": er.value, "stderr": er.stderr,
                         "n_shot": er.n_shot, "samples": er.samples})
    return pd.DataFrame(rows)


def cache_state_text(state: str | None) -> str:
    """How a result's prefix-cache state reads beside it: as-is and results without a window are unknown."""
    if state in ("cold", "warm"):
        return state
    if state == "as-is":
        return "unknown (as-is)"
    return "unknown"


def window_columns(window: BenchWindow | None) -> dict[str, Any]:
    """A bench result's window facts as export columns: cache state, energy source and counter values."""
    if window is None:
        return {"prefix_cache_state": cache_state_text(None)}
    detail = json.loads(window.detail_json)
    gpus = (detail.get("energy") or {}).get("gpus") or {}
    sources = sorted({g["source"] for g in gpus.values() if g.get("source")})
    counters = "; ".join(f"GPU {i}: {g['start_mj']:.0f} → {g['end_mj']:.0f} mJ" for i, g in gpus.items()
                         if g.get("start_mj") is not None and g.get("end_mj") is not None)
    return {"prefix_cache_state": cache_state_text(window.prefix_cache_state),
            "energy_source": ", ".join(sources) or None, "energy_counters": counters or None}


ESTIMATE_KEYS = [f"est_p{q}_{phase}" for phase in ("queue", "prefill", "decode") for q in (50, 99)]
WINDOW_COLUMNS = ["label", "load_kind", "load", "load_text", "repeat", "prefix_cache_state", "prefix_cache_hit_pct",
                  "preemptions", "finished_stop", "finished_length", "finished_abort", "finished_error",
                  *(f"{k}{end}" for k in ESTIMATE_KEYS for end in ("_ms", "_lo_ms", "_hi_ms")),
                  "spec_decode_acceptance_pct", "j_per_output_token", "mean_power_w_per_gpu", "output_tok_per_s_per_w",
                  "energy_source"]
"""A benchmark window's columns: each histogram estimate with the bounds of the bucket it lies in (`_lo_ms`
0: the value is an upper bound; `_hi_ms` blank beside a `_lo_ms`: a lower bound; runner.window.estimate)."""


def window_frame(store: Store, run_ids: list[int]) -> pd.DataFrame:
    """One row per bench execution: its cache state and what its window measured (server counters,
    histogram estimates, energy). Missing values stay NaN: blank, never 0."""
    frame = results_frame(store, run_ids)
    if frame.empty or "kind" not in frame:
        return pd.DataFrame(columns=WINDOW_COLUMNS)
    frame = frame[frame["kind"] == "bench"]
    return frame.reindex(columns=["run_id", *WINDOW_COLUMNS]).reset_index(drop=True)


def export_csv(store: Store, what: str, run_ids: list[int] | None, out: Path) -> int:
    """Write runs, samples or results as CSV; return the number of data rows written."""
    if what == "runs":
        frame = runs_frame(store)
        if run_ids:
            frame = frame[frame["id"].isin(run_ids)]
        frame = frame.assign(**{c: frame[c].map(one_line) for c in frame.columns
                                if frame[c].map(lambda v: isinstance(v, str)).any()})
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
    tidy_floats(frame).to_csv(out, index=False, quoting=csv.QUOTE_MINIMAL)
    return len(frame)


def frame_to_csv(frame: pd.DataFrame) -> str:
    """A frame as CSV text, its floats without arithmetic noise (`compare.csv_number`)."""
    buf = io.StringIO()
    tidy_floats(frame).to_csv(buf, index=False)
    return buf.getvalue()


def tidy_floats(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with the cells of its float columns through `compare.csv_number` (other columns as they are)."""
    floats = [c for c in frame.columns if pd.api.types.is_float_dtype(frame[c])]
    return frame.assign(**{c: frame[c].map(lambda v, c=c: cmp.csv_number(v, c)).astype(object) for c in floats})


# -- reads ----------------------------------------------------------------------------------------
def database_url() -> str:
    """The database `open_store()` opens: SERVELAB_DB, else the SQLite file in the data folder."""
    return default_db_url()


def get_run(store: Store, run_id: int) -> Run:
    return store.get_run(run_id)


def list_runs(store: Store, status: RunStatus | None = None) -> list[Run]:
    """Every run (or those in `status`), newest first."""
    return store.list_runs(status=status) if status is not None else store.list_runs()


def queued_ahead(store: Store, run_id: int) -> int:
    """Queued runs a worker picks before `run_id` (the queue is served oldest first)."""
    return sum(1 for r in store.list_runs(status=RunStatus.queued) if r.id < run_id)


def run_metrics(store: Store, run_id: int) -> list[dict[str, float | None]]:
    """The bench metrics of each execution of a run, in order."""
    return store.run_metrics(run_id)


def eval_results(store: Store, run_id: int) -> list[EvalResult]:
    return store.eval_results(run_id)


def phases(store: Store, run_id: int) -> list[PhaseEvent]:
    return store.phases(run_id)


def samples_frame(store: Store, run_ids: list[int], max_points: int | None = None) -> pd.DataFrame:
    """Telemetry of `run_ids`, down-sampled to about `max_points` times per run when given."""
    return store.samples_frame(run_ids, max_points=max_points)


def runs_frame(store: Store, with_metrics: bool = True) -> pd.DataFrame:
    """Every run as a row; with `with_metrics`, its headline bench metrics (`run_headline`: one load's, never
    an average across a load sweep's loads) and `HEADLINE_COLUMNS`."""
    frame = store.runs_frame(with_metrics=False)
    return _with_headlines(store, frame, BENCH_COLUMNS) if with_metrics else frame


def worker_errors(store: Store, within_s: float = 3600.0, limit: int = 5) -> list[WorkerError]:
    """What workers caught in the last `within_s` seconds outside a run's own failure, newest first."""
    return store.worker_errors(since=time.time() - within_s, limit=limit)


_LOGO = re.compile("[█▄▀]")  # vLLM's ASCII logo at startup: block characters only it prints
_EMPTY_RECORD = re.compile(r"\[[\w.]+:\d+\]\s*$")  # a log record with no message (the logo's frame)


def log_tail(path: Path, lines: int = 40) -> str:
    """The last `lines` lines of a server log worth reading, vLLM's ASCII logo and empty records left out;
    empty when it cannot be read."""
    kept = [line for line in tail(path, lines + 200).splitlines()
            if not _LOGO.search(line) and not _EMPTY_RECORD.search(line)]
    return "\n".join(kept[-lines:])


def describe_imported(
    store: Store,
    run_ids: list[int],
    model: str | None = None,
    tensor_parallel_size: int | None = None,
    decode_context_parallel_size: int | None = None,
) -> list[Run]:
    """Record the configuration of imported results, which the files themselves rarely state
    (a printed bench block names no TP size), so tables, labels and per-GPU charts can use it.

    Only imported runs can be described: a launched run's configuration is what it ran with.
    """
    tp, dcp = tensor_parallel_size, decode_context_parallel_size
    if dcp is not None and tp is None:
        raise SpecError("A DCP size needs the TP size it divides; give the TP size too.")
    fields: dict[str, object] = {}
    if model:
        fields["model"] = model.strip()
    if tp is not None:
        check = LaunchSpec.parse({"model": "imported", "tensor_parallel_size": tp,
                                  "decode_context_parallel_size": dcp or 1})
        if problems := check.problems():
            raise SpecError(problems)
        fields.update(tensor_parallel_size=tp, decode_context_parallel_size=dcp or 1)
    runs = [store.get_run(r) for r in run_ids]
    for run in runs:
        if run.source != RunSource.imported:
            raise StoreError(f"run {run.id} was launched here; its configuration is the one it ran with")
    return [store.update_run(run.id, **fields) for run in runs] if fields else runs


# -- the Ray cluster ------------------------------------------------------------------------------
_CLUSTER_CACHE: dict[str, ClusterState] = {}


def cluster_state(address: str, max_age_s: float = 10.0) -> ClusterState:
    """The Ray cluster at `address`: its nodes (alive, GPUs total and free), which run's placement group holds
    each, and the Ray worker's card; read at most every `max_age_s` seconds by a short child process (this
    process never joins the cluster). Never raises: `error` says why a cluster cannot be read."""
    known = _CLUSTER_CACHE.get(address)
    if known is None or time.time() - known.read_at > max_age_s:
        known = _CLUSTER_CACHE[address] = snapshot(address)
    return known


def ray_address(settings: Settings | None = None) -> str | None:
    """The Ray cluster a Ray worker schedules onto, when one is configured (SERVELAB_RAY_ADDRESS)."""
    return (settings or Settings.from_env()).ray_address


def runs_by_id(store: Store, run_ids: Sequence[int]) -> dict[int, Run]:
    """The runs of `run_ids` that the store knows (a cluster may hold groups of another store's runs)."""
    out = {}
    for run_id in set(run_ids):
        try:
            out[run_id] = store.get_run(run_id)
        except StoreError:
            continue
    return out


def cluster_nodes_frame(store: Store, state: ClusterState) -> pd.DataFrame:
    """The Cluster page's table: a row per node (alive first) with its GPUs total/free/busy and the runs whose
    placement group holds part of it (`#12 TP16 (benchmarking)`; a run of another store: `#12 (not in this
    store)`)."""
    runs = runs_by_id(store, [r for n in state.nodes for r in n.runs])

    def said(run_id: int) -> str:
        run = runs.get(run_id)
        return f"#{run_id} {label_of(run)} ({run.status.value})" if run else f"#{run_id} (not in this store)"

    return pd.DataFrame([{
        "Node": n.name, "IP": n.ip, "Alive": n.alive, "GPUs": n.gpus_total, "GPUs free": n.gpus_free,
        "GPUs busy": n.gpus_busy, "CPUs": n.cpus_total, "Runs": ", ".join(said(r) for r in n.runs),
        "Ray node id": n.node_id,
    } for n in state.nodes], columns=["Node", "IP", "Alive", "GPUs", "GPUs free", "GPUs busy", "CPUs", "Runs",
                                      "Ray node id"])


# -- this machine ---------------------------------------------------------------------------------
@dataclass
class Inventory:
    """What this machine offers to runs: the CPU backend, or NVML's GPUs (`note` says why there are none)."""

    cpu: bool
    gpus: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    note: str | None = None


def inventory(settings: Settings | None = None) -> Inventory:
    """The CPU backend when vLLM's CPU build is installed (or SERVELAB_BACKEND says cpu), else the GPUs
    NVML sees now."""
    if cpu_backend(settings):
        return Inventory(cpu=True, note="no GPU — CPU backend with the demo model")
    reader = GpuReader(load_nvml())
    try:
        gpus = reader.inventory()
    finally:
        reader.close()
    return Inventory(cpu=False, gpus=gpus, note=reader.note)


def write_demo_model(path: Path, mla: bool = False) -> Path:
    """Write the tiny generated model the CPU backend serves (seconds; needs torch and transformers), or its
    MLA (DeepSeek-V2 form) sibling; return the folder."""
    from runner import demo_model  # torch is slow to import: only when asked

    return demo_model.write_mla_model(path) if mla else demo_model.write_demo_model(path)


def eval_dataset_problems(evaluation: EvalSpec | None) -> list[Problem]:
    """What would stop the eval phase's local dataset (`eval.`-prefixed fields), said before queueing rather
    than after the benchmark: tasks without gsm8k, an unreadable or malformed file, too few questions."""
    problem = local_eval_problem(evaluation) if evaluation is not None else None
    return [problem.under("eval")] if problem else []


# -- load curves and SLOs -------------------------------------------------------------------------
def gpus_of(run: Run) -> int | None:
    """GPUs a run used (TP×PP×DP), None when its configuration is unknown (e.g. an imported result)."""
    if run.tensor_parallel_size is None:
        return None
    return run.tensor_parallel_size * (run.pipeline_parallel_size or 1) * (run.data_parallel_size or 1)


_LOAD_FIELDS = {"request_rate", "max_concurrency", "repeats", "stop_early"}
"""Bench fields that make a load of a workload, or repeat it, rather than another workload."""


def load_fields(br: BenchResult, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """A stored result's `workload` (its bench fields other than the load, as sorted JSON; `{}` for imported
    results) and its load (`request_rate`, `max_concurrency`: from its bench spec, else from the result's own
    values). `runner.loads.point_key` of this is the point every view groups results by."""
    metrics = json.loads(br.metrics_json) if metrics is None else metrics
    spec = json.loads(br.bench_spec_json) if br.bench_spec_json else {}
    rate = spec.get("request_rate", metrics.get("request_rate"))
    rate = float(rate) if rate is not None else None  # "Infinity" → inf
    cap = spec.get("max_concurrency", metrics.get("max_concurrency"))
    workload = {k: v for k, v in spec.items() if k not in _LOAD_FIELDS}
    if cap is not None and "max_concurrency" in spec and load_of(rate, cap)[0] == "request-rate":
        # at a finite rate the load is the rate and the cap a setting of the workload: benchmarks at one rate
        # with caps 1, 4, 16 are three points, never three repeats of one
        workload["max_concurrency"] = cap
    return {"workload": json.dumps(workload, sort_keys=True), "request_rate": rate, "max_concurrency": cap}


def load_rows(store: Store, run_ids: list[int] | None = None) -> list[dict[str, Any]]:
    """One row per stored benchmark result: run id, label, GPUs, its workload and load (`load_fields`) and its
    metrics — what `runner.slo` reads."""
    runs = [store.get_run(r) for r in run_ids] if run_ids else store.list_runs()
    rows = []
    for run in runs:
        for br in store.bench_results(run.id):
            metrics = json.loads(br.metrics_json)
            rows.append({**metrics, "run_id": run.id, "label": label_of(run), "gpus": gpus_of(run),
                         **load_fields(br, metrics)})
    return rows


def run_headline(store: Store, run_id: int) -> points.Headline | None:
    """What one line may say of a run's benchmarks: the mean of its repeats when it measured one load; for a
    load sweep, its peak-throughput load with the count of loads — never an average across loads."""
    return _headlines(store.bench_results_of([run_id])).get(run_id)


def load_text(load_kind: str, load: float) -> str:
    """A load as people read it: `16 req/s`, `inf req/s`, `concurrency 64` (from a frame's `load_kind`, `load`)."""
    return format_load(load_kind, load)


def run_points(store: Store, run_id: int) -> list[dict[str, Any]]:
    """A run's results by point, in order: `load` (text, with what tells its workload apart when the run ran
    several), `repeats`, and the mean of each metric over those repeats; one row per load of a load sweep."""
    groups: dict[PointKey, list[dict[str, Any]]] = {}
    for br in store.bench_results(run_id):
        metrics = json.loads(br.metrics_json)
        groups.setdefault(point_key(load_fields(br, metrics)), []).append(metrics)
    order = points.ordered(groups)
    workloads = {k[0] for k in order}
    return [{"load": points.point_text(k, workloads), "repeats": len(groups[k]), **points.mean_metrics(groups[k])}
            for k in order]


def result_loads(store: Store, run_id: int) -> list[str]:
    """The load of each of a run's bench executions, in their order (`4 req/s`)."""
    keys = [point_key(load_fields(br)) for br in store.bench_results(run_id)]
    workloads = {k[0] for k in keys}
    return [points.point_text(k, workloads) for k in keys]


def _headlines(results: list[BenchResult]) -> dict[int, points.Headline]:
    by_run: dict[int, list[tuple[PointKey, dict[str, Any]]]] = {}
    for br in results:
        metrics = json.loads(br.metrics_json)
        by_run.setdefault(br.run_id, []).append((point_key(load_fields(br, metrics)), metrics))
    return {run_id: head for run_id, rows in by_run.items() if (head := points.headline(rows)) is not None}


def _with_headlines(store: Store, frame: pd.DataFrame, metric_cols: Sequence[str]) -> pd.DataFrame:
    """`frame` (one row per run, an `id` column) with each run's headline metrics (`run_headline`) and
    `HEADLINE_COLUMNS`; blank for runs without results."""
    heads = _headlines(store.bench_results_of(None if len(frame) > 500 else [int(i) for i in frame["id"]]))
    ids = [int(i) for i in frame["id"]]
    extra: dict[str, Any] = {
        "loads": pd.Series([heads[i].points if i in heads else None for i in ids], index=frame.index, dtype="Int64"),
        "metrics_at": [heads[i].point if i in heads else "" for i in ids]}
    for col in metric_cols:
        extra[col] = pd.Series([heads[i].metrics.get(col) if i in heads else None for i in ids], index=frame.index,
                               dtype=float)
    return frame.assign(**extra)


def load_curves(store: Store, run_ids: list[int], slo_texts: list[str] | None = None) -> pd.DataFrame:
    """One row per run and load (means over repeats), with `meets_slo` and `knee` under the SLOs given."""
    try:
        slos = slo.parse_slos(slo_texts or [])
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    points = slo.curves(load_rows(store, run_ids), slos)
    return pd.DataFrame([{
        "run_id": p.run_id, "label": p.label, "gpus": p.gpus, "load_kind": p.load_kind, "load": p.load,
        "load_text": p.load_text, "repeats": p.repeats, "output_throughput": p.tok_s,
        "tok_s_per_gpu": p.tok_s_per_gpu, "p99_ttft_ms": p.metrics.get("p99_ttft_ms"),
        "p99_tpot_ms": p.metrics.get("p99_tpot_ms"), "failed": p.metrics.get("failed"),
        "meets_slo": p.meets, "knee": p.knee,
        **{k: p.metrics.get(k) for k in WINDOW_CURVE_COLUMNS},
    } for p in points], columns=LOAD_CURVE_COLUMNS)  # fmt: skip


WINDOW_CURVE_COLUMNS = ["j_per_output_token", "output_tok_per_s_per_w", "prefix_cache_hit_pct"]
"""What each load's benchmark windows measured (runner.window): blank on the CPU and for imported results."""
LOAD_CURVE_COLUMNS = ["run_id", "label", "gpus", "load_kind", "load", "load_text", "repeats", "output_throughput",
                      "tok_s_per_gpu", "p99_ttft_ms", "p99_tpot_ms", "failed", "meets_slo", "knee",
                      *WINDOW_CURVE_COLUMNS]


def recommend(store: Store, slo_texts: list[str], run_ids: list[int] | None = None) -> list[slo.Recommendation]:
    """Runs ranked by output tok/s per GPU at the highest load meeting every SLO (`runner.slo.rank`)."""
    try:
        slos = slo.parse_slos(slo_texts)
        return slo.rank(load_rows(store, run_ids), slos)
    except ValueError as exc:
        raise SpecError(str(exc)) from None


def render_recommendations(recs: list[slo.Recommendation], slo_texts: list[str]) -> str:
    return slo.render(recs, slo.parse_slos(slo_texts))


def load_sweep_stops(store: Store, run_id: int) -> list[str]:
    """Why each load sweep of a run stopped before its last load (none when every load ran)."""
    return [p.detail or "" for p in store.phases(run_id) if p.phase == STOP_PHASE]


def recommendations_table(recs: list[slo.Recommendation], slo_texts: list[str]) -> pd.DataFrame:
    return pd.DataFrame(slo.table(recs, slo.parse_slos(slo_texts)))
