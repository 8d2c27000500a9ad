"""`servelab` command line: a thin typer front over `runner.api`, the worker and the dashboard."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import typer

from runner import api, views
from runner.config import BenchSpec, EvalSpec, LaunchSpec, load_run_spec, load_sweep_spec
from runner.errors import ServelabError, SpecError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Launch, benchmark and compare vLLM configs.")
_state: dict[str, str | None] = {"db": None}


def _store():
    return api.open_store(_state["db"])


def _fail(exc: Exception, code: int = 2) -> None:
    problems = exc.problems if isinstance(exc, SpecError) else []
    if len(problems) > 1:
        typer.echo(f"error: {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems), err=True)
    else:
        typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(code)


@app.callback()
def main(db: str | None = typer.Option(None, "--db", help="Database path or SQLAlchemy URL (or SERVELAB_DB).")):
    _state["db"] = db


@app.command("import")
def import_(
    files: list[Path] = typer.Argument(..., help="Bench JSON, bench text block, lm-eval JSON/table or server log."),
    label: str | None = typer.Option(None, help="Label of the imported runs (default: file name)."),
    into: int | None = typer.Option(None, "--into", help="Add the results to this existing run instead."),
):
    """Import existing results; prints one run id per line (each created run, or the --into run). A page quoting
    several runs' results (bench blocks under their names, lm-eval tables labelled with them) becomes one run per
    block; what it became is said on stderr."""
    try:
        contents = []
        for f in files:
            try:
                contents.append((f.name, f.read_bytes()))
            except OSError as exc:
                raise ServelabError(f"cannot read {f}: {exc.strerror}") from None
        ids = api.import_files(_store(), contents, label=label, into=into)
    except ServelabError as exc:
        _fail(exc)
    for run_id in ids:
        typer.echo(run_id)
    for line in api.import_summary(api.parse_imports(contents), ids):  # a page of several runs: what became of it
        typer.echo(line, err=True)


@app.command()
def runs(fmt: str = typer.Option("table", "--format", help="table (fits 120 columns), csv or json")):
    """List runs, newest first: one line a run."""
    try:
        frame = api.runs_table(_store())
    except ServelabError as exc:
        _fail(exc)
    if fmt == "csv":
        typer.echo(api.frame_to_csv(frame), nl=False)
    elif fmt == "json":
        typer.echo(frame.to_json(orient="records", date_format="iso"))
    else:
        typer.echo(views.runs_text(frame) if len(frame) else "no runs yet")


@app.command()
def show(run_id: int, as_json: bool = typer.Option(False, "--json", help="Every stored field as JSON.")):
    """Show one run: state, launch, commands, KV capacity, headline metrics, accuracy, failure reason."""
    try:
        store = _store()
        if as_json:
            typer.echo(json.dumps(views.run_record(store, run_id), indent=2, default=str))
        else:
            typer.echo(views.run_text(store, run_id))
    except ServelabError as exc:
        _fail(exc)


@app.command()
def compare(
    baseline: int | None = typer.Argument(None, help="Baseline run (default: the older of the two newest "
                                          "succeeded runs)."),
    candidates: list[int] | None = typer.Argument(None, help="Candidate runs (default: the newest succeeded)."),
    fmt: str = typer.Option("table", "--format", help="table, markdown or csv"),
):
    """Each candidate against the baseline: benchmark gain table (95 % CIs, noise verdict, flags), accuracy,
    KV capacity. CSV puts every section in one table with a `section` column."""
    try:
        store = _store()
        if baseline is None:
            pair = api.default_pair(store)
            if pair is None:
                raise ServelabError("no two runs to compare yet; give BASELINE CANDIDATE")
            baseline, candidates = pair[0], [pair[1]]
        if not candidates:
            raise ServelabError("give at least one candidate run after the baseline")
        reports = [api.compare_report(store, baseline, cand) for cand in candidates]
    except ServelabError as exc:
        _fail(exc)
    if fmt == "csv":
        text = api.comparison_csv(reports)
        if not text:
            candidates_text = ", ".join(str(r.candidate) for r in reports)
            _fail(ServelabError(f"runs {baseline} and {candidates_text} have no benchmark, "
                                "accuracy or KV capacity in common"), code=1)
        typer.echo(text, nl=False)
        return
    try:
        texts = [api.render_comparison(r, fmt) for r in reports]
    except ServelabError as exc:
        _fail(exc)
    typer.echo("\n".join(texts), nl=False)
    if all(r.empty for r in reports):
        raise typer.Exit(1)


@app.command()
def recommend(
    runs: list[int] | None = typer.Argument(None, help="Runs to rank (default: every run with results)."),
    slos: list[str] = typer.Option(..., "--slo", help="An SLO: METRIC:STAT<=MS, e.g. ttft:p99<=2000 (repeatable), "
                                   "or vLLM's goodput form ttft:2000 (P99)."),
):
    """Rank runs by output tok/s per GPU at the highest load that meets every SLO."""
    try:
        recs = api.recommend(_store(), slos, runs or None)
        typer.echo(api.render_recommendations(recs, slos))
    except ServelabError as exc:
        _fail(exc)


@app.command()
def export(
    what: str = typer.Argument(..., help="runs, samples or results"),
    run: list[int] | None = typer.Option(None, "--run", help="Only these runs (repeatable)."),
    out: Path = typer.Option(..., "--out", help="CSV file to write."),
):
    """Export runs, telemetry samples or results as CSV."""
    try:
        n = api.export_csv(_store(), what, run or None, out)
    except ServelabError as exc:
        _fail(exc)
    typer.echo(f"wrote {n} rows to {out}")


def _headline(store, run_id: int) -> str:
    run = store.get_run(run_id)
    parts = [f"run {run.id} {run.status.value}: {run.label}"]
    head = api.run_headline(store, run_id)
    if head is not None:
        m = head.metrics
        at = head.text or f"at {head.point}" + (f", mean of {head.repeats} repeats" if head.repeats > 1 else "")
        parts.append(f"{at}: {m.get('completed') or 0:.0f} requests, output {m.get('output_throughput') or 0:.1f} "
                     f"tok/s, median TTFT {m.get('median_ttft_ms') or 0:.1f} ms, "
                     f"median TPOT {m.get('median_tpot_ms') or 0:.2f} ms")
    if run.kv_cache_tokens:
        parts.append(f"KV cache {run.kv_cache_tokens:,} tokens")
    if run.failure_reason:
        parts.append(f"reason: {run.failure_reason}")
    return " — ".join(parts)


def _drive_or_follow(store, run_ids: list[int]) -> None:
    """Execute the runs here, or, when a Ray worker is configured (SERVELAB_RAY_ADDRESS), follow them while it
    executes them on the cluster (they were checked against the cluster's shape)."""
    if not (address := api.ray_address()):
        _drive(store, run_ids)
        return
    from runner.models import LIVE

    typer.echo(f"queued {', '.join(f'#{r}' for r in run_ids)} for the Ray worker of {address}", err=True)
    try:
        while any((run := store.get_run(r)).status in LIVE for r in run_ids):
            typer.echo(f"#{run.id} {run.progress * 100:3.0f}% {run.phase}", err=True)
            threading.Event().wait(2.0)
    except KeyboardInterrupt:
        for r in run_ids:
            try:
                api.cancel(store, r)
            except ServelabError:
                pass


def _drive(store, run_ids: list[int], gpu_ids: list[int] | None = None) -> None:
    """Execute queued runs in this process with a progress line until all have ended."""
    from runner.models import LIVE
    from runner.worker import Worker

    worker = Worker(store, gpu_ids=gpu_ids)
    pending = set(run_ids)
    done = lambda: all(store.get_run(r).status not in LIVE for r in pending)  # noqa: E731
    thread = threading.Thread(target=worker.run_forever, kwargs={"until": done}, daemon=True)
    # SIGTERM ends the runs `interrupted` (their processes stopped), then this command; Ctrl-C cancels them
    previous = signal.signal(signal.SIGTERM, lambda *_: worker.interrupt("SIGTERM"))
    thread.start()
    tty = sys.stderr.isatty()
    try:
        while thread.is_alive():
            thread.join(1.0)
            states = [store.get_run(r) for r in sorted(pending)]
            line = " | ".join(f"#{r.id} {r.progress * 100:3.0f}% {r.phase}" for r in states)
            typer.echo(("\r" if tty else "") + line[:200], err=True, nl=not tty)
    except KeyboardInterrupt:
        for r in pending:
            try:
                api.cancel(store, r)
            except ServelabError:
                pass
        worker.stop()
        thread.join()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if tty:
        typer.echo("", err=True)


_SET_HELP = ("Override a field: FIELD=VALUE with vLLM's flag names, "
             "e.g. --set tensor-parallel-size=2 --set bench.num-prompts=50.")


_ELSEWHERE_HELP = ("Queue the run for a worker on another machine with the GPUs this one lacks (same --db), "
                   "and exit without running it here.")


@app.command()
def run(
    spec_file: Path = typer.Argument(..., help="YAML/JSON with launch:, bench:, eval: sections."),
    overrides: list[str] | None = typer.Option(None, "--set", help=_SET_HELP),
    other_worker: bool = typer.Option(False, "--for-another-worker", help=_ELSEWHERE_HELP),
):
    """Launch, benchmark (and evaluate) one run; exits non-zero when it fails or cannot run here."""
    from runner.models import RunStatus

    try:
        store = _store()
        spec = load_run_spec(spec_file, overrides)
        if other_worker:
            spec = spec.model_copy(update={"other_worker": True})
        queued = api.queue_run(store, spec, api.this_host())
        if other_worker:
            typer.echo(f"queued run {queued.id} for another worker")
            return
        _drive_or_follow(store, [queued.id])
        final = store.get_run(queued.id)
    except ServelabError as exc:
        _fail(exc)
    typer.echo(_headline(store, final.id))
    if final.status != RunStatus.succeeded:
        raise typer.Exit(1)


@app.command()
def sweep(
    spec_file: Path = typer.Argument(..., help="YAML/JSON with launch:, bench:, matrix: sections."),
    overrides: list[str] | None = typer.Option(None, "--set", help=_SET_HELP),
    other_worker: bool = typer.Option(False, "--for-another-worker", help=_ELSEWHERE_HELP),
):
    """Run every cell of a sweep (re-running resumes: finished cells are kept)."""
    from runner.models import RunStatus

    try:
        store = _store()
        spec = load_sweep_spec(spec_file, overrides)
        if other_worker:
            spec = spec.model_copy(update={"other_worker": True})
        sweep_id, queued = api.queue_sweep(store, spec, api.this_host())
        if other_worker:
            typer.echo(f"queued sweep {sweep_id} ({len(queued)} runs) for another worker")
            return
        _drive_or_follow(store, [r.id for r in queued])
        runs = store.list_runs(sweep_id=sweep_id)
    except ServelabError as exc:
        _fail(exc)
    for r in reversed(runs):
        typer.echo(_headline(store, r.id))
    if any(r.status != RunStatus.succeeded for r in runs):
        raise typer.Exit(1)


@app.command()
def worker(
    poll: float = typer.Option(1.0, help="Seconds between queue checks."),
    ray: bool = typer.Option(False, "--ray", help="Place runs on the nodes of a Ray cluster (SERVELAB_RAY_ADDRESS "
                             "or --address; `auto`: the cluster this machine joined)."),
    address: str | None = typer.Option(None, help="Ray cluster address for --ray (default SERVELAB_RAY_ADDRESS, "
                                       "else auto)."),
):
    """Execute queued runs until interrupted (reconciles interrupted runs first)."""
    from runner.config import Settings
    from runner.worker import Worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env()
    if ray or address or settings.ray_address:
        from runner.ray_worker import RayWorker

        try:
            rw = RayWorker(_store(), settings, address=address, poll_s=poll)
        except ServelabError as exc:
            _fail(exc)
        typer.echo(f"Ray worker {rw.worker_id}: {len(rw.alive_nodes())} nodes, at most {rw.max_node_gpus()} GPUs "
                   "on one node", err=True)
        signal.signal(signal.SIGTERM, lambda *_: rw.stop())
        try:
            rw.run_forever()
        except KeyboardInterrupt:
            rw.stop()
        return
    w = Worker(_store(), poll_s=poll)
    typer.echo(f"worker {w.worker_id}: GPUs {w.allocator.gpu_ids or 'none (CPU backend)'}", err=True)
    # SIGTERM (kill, systemd, the dashboard going away) and SIGINT (Ctrl-C) stop the runs in flight cleanly: their
    # processes are stopped and they end `interrupted` naming the signal, never left running or marked active. A
    # handler, not KeyboardInterrupt: that is raised at whatever line runs, and one between a run's claim and its
    # thread's start would leave it claimed and never run.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _: w.interrupt(signal.Signals(signum).name))
    w.run_forever()  # returns once every run in flight has ended


@app.command()
def cancel(run_id: int):
    """Cancel a run in any phase."""
    try:
        r = api.cancel(_store(), run_id)
    except ServelabError as exc:
        _fail(exc)
    typer.echo(f"run {r.id}: {r.phase}")


@app.command("demo-model")
def demo_model(
    path: Path = typer.Argument(Path("data/models/demo"), help="Folder to write the model into."),
    kind: str = typer.Option("llama", help="llama: tiny random-weight Llama (serves on CPU and GPU); "
                             "mla: DeepSeek-V2-shaped config + tokenizer for --load-format dummy."),
):
    """Write a tiny model (config, tokenizer, weights) that vLLM serves without any download."""

    if kind not in {"llama", "mla"}:
        _fail(ServelabError(f"unknown kind {kind!r}; choose llama or mla"))
    typer.echo(api.write_demo_model(path, mla=kind == "mla"))


@app.command()
def fields():
    """The spec fields (launch, bench, eval) with their descriptions: the names the YAML files use."""
    for section, model in (("launch", LaunchSpec), ("bench", BenchSpec), ("eval", EvalSpec)):
        typer.echo(f"{section}:")
        for name, f in model.model_fields.items():
            default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
            typer.echo(f"  {name.replace('_', '-'):32} {default:14} {f.description or ''}")


@app.command()
def dashboard(
    host: str = typer.Option("127.0.0.1", help="Address to bind; 0.0.0.0 exposes it to the network."),
    port: int = typer.Option(8501, help="Dashboard port."),
    worker_too: bool = typer.Option(True, "--worker/--no-worker", help="Run the queue worker alongside."),
):
    """Start the Streamlit dashboard (and the queue worker) on the default store."""
    import subprocess

    app_path = Path(__file__).resolve().parent.parent / "dashboard" / "streamlit_app.py"
    env = dict(os.environ)
    if _state["db"]:
        env["SERVELAB_DB"] = _state["db"]
    argv = [sys.executable, "-m", "streamlit", "run", str(app_path), "--server.address", host,
            "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
            # a product, not a dev server: no module reloads when files change under it
            "--server.fileWatcherType", "none", "--server.runOnSave", "false",
            "--client.toolbarMode", "minimal"]  # no "Deploy" button: this is not a Streamlit app to publish
    worker_proc = None
    # The worker and Streamlit live and die with this process: SIGTERM runs the `finally` below, and on
    # Linux the kernel sends them SIGTERM when it dies any other way (even SIGKILL), so a restarted
    # dashboard finds its port free and no second worker; the worker interrupts its runs truthfully.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if worker_too:
        worker_proc = subprocess.Popen([sys.executable, "-m", "runner.cli", "worker"], env=env,
                                       preexec_fn=_die_with_parent)
    typer.echo(f"servelab dashboard on http://{host}:{port}", err=True)
    try:
        subprocess.run(argv, env=env, check=False, preexec_fn=_die_with_parent)
    finally:
        if worker_proc is not None:
            worker_proc.terminate()
            worker_proc.wait(timeout=60)


def _die_with_parent() -> None:
    """In the child before exec: ask Linux for SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the `finally` of `dashboard` still covers SIGTERM
        pass


if __name__ == "__main__":
    app()
