"""Scale: a store of 10,000 runs and 5 million samples stays quick to browse.

Generates a SQLite store (runs, one or two bench results each, telemetry), then times what the
dashboard and the CLI do with it:

- the Runs table (`api.runs_table`), target < 1 s;
- a 10-run comparison (`api.compare_runs` of 9 candidates against a baseline) and its time series
  (`store.samples_frame(ids, max_points=600)`), target < 1.5 s;
- a 1-million-row CSV export (`api.export_csv(store, "samples", ids, out)`), target < 5 s.

Ten of the runs are long 8-GPU runs (9 telemetry rows a tick) holding 1 million samples between them:
they are the comparison set and the export. The other samples are spread over the remaining runs.

    python benchmarks/scale.py            # 10,000 runs, 5,000,000 samples
    python benchmarks/scale.py --quick    # 1,000 runs, 500,000 samples (the export is then 100,000 rows)

Last line: `scale ratio=<x>`, the slowest of the three as a fraction of its target (< 1 meets all).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sqlite3
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

from _common import ROOT, Foreign, best_of, figure, say, spread, wait_quiet

from runner import api
from runner.config import BenchSpec, LaunchSpec, RunSpec
from runner.models import BENCH_COLUMNS, Run, Sample
from runner.parsers import parse_bench_json
from runner.store import Store

TARGETS = {"runs_table": 1.0, "compare": 1.5, "export": 5.0}
LONG_RUNS = 10
GPU_ROWS = 8  # a long run samples 8 GPUs and the host every tick
MODELS = ["meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen3-30B-A3B", "deepseek-ai/DeepSeek-V3",
          "openai/gpt-oss-120b", "mistralai/Mistral-Small-24B"]
STATUSES = ["succeeded"] * 17 + ["failed", "cancelled", "interrupted"]


def _run_rows(n: int, t0: datetime) -> list[dict]:
    """Runs as the worker leaves them: a full spec, argv, env and results per row."""
    rng = random.Random(1)
    rows = []
    for i in range(n):
        tp = rng.choice([1, 2, 4, 8])
        launch = LaunchSpec(model=MODELS[i % len(MODELS)], tensor_parallel_size=tp, max_model_len=8192,
                            port=8000 + i % 8)
        spec = RunSpec(launch=launch, bench=[BenchSpec(num_prompts=200, request_rate=rng.choice([1, 4, 16]))],
                       label=f"run {i}")
        created = t0 + timedelta(minutes=10 * i)
        status = rng.choice(STATUSES)
        rows.append(dict(
            label=f"{launch.short_label()} #{i}", source="launched", status=status, model=launch.model,
            tensor_parallel_size=tp, decode_context_parallel_size=1, pipeline_parallel_size=1, data_parallel_size=1,
            spec_json=spec.model_dump_json(), serve_argv_json=json.dumps(["vllm", "serve", launch.model, "-tp", str(tp)]),
            env_json=json.dumps({"CUDA_VISIBLE_DEVICES": ",".join(map(str, range(tp)))}), vllm_version="0.11.0",
            host="gpu-node-1", gpu_ids_json=json.dumps(list(range(tp))), port=8000 + i % 8, worker_id="gpu-node-1:1:1",
            created_at=created, started_at=created, ready_at=created + timedelta(seconds=60),
            finished_at=created + timedelta(minutes=8), kv_cache_tokens=1_000_000 * tp, kv_cache_gib=40.0 * tp,
            max_concurrency=12.5 * tp, failure_reason=None if status == "succeeded" else "vLLM exited: CUDA out of memory",
            run_dir=f"/data/runs/{i + 1}", progress=1.0, phase=status, cancel_requested=False,
        ))
    return rows


def _bench_rows(run_ids: list[int]) -> list[dict]:
    base = parse_bench_json((ROOT / "tests/fixtures/cpu_0.32/bench.json").read_text()).metrics
    rng = random.Random(2)
    rows = []
    for run_id in run_ids:
        for repeat in range(1 + (run_id % 4 == 0)):  # a quarter of the runs repeated their benchmark
            m = {k: (v * rng.uniform(0.8, 1.2) if isinstance(v, float) else v) for k, v in base.items()}
            rows.append(dict(run_id=run_id, repeat=repeat, bench_spec_json=BenchSpec().model_dump_json(),
                             metrics_json=json.dumps(m), raw_path=f"/data/runs/{run_id}/bench-0-{repeat}.json",
                             **{c: m.get(c) for c in BENCH_COLUMNS}))
    return rows


def _samples(run_id: int, count: int, gpus: int, start: float):
    """`count` telemetry rows of one run: per tick a host row, then one per GPU."""
    per_tick = gpus + 1
    for k in range(count):
        tick, g = divmod(k, per_tick)
        t = start + tick
        if g == 0:
            yield (run_id, t, None, None, None, None, None, None, None, None, 180.0 + tick % 7, 9000.0, 41.5,
                   0.42, 12.0, 1.0, 0.0, 1000.0 * tick, 500.0 * tick, 800.0 * tick, 200.0 * tick, None)
        else:
            yield (run_id, t, g - 1, 97.0, 70_000.0, 81_559.0, 650.0 + g, 61.0, 1980.0, 69_000.0,
                   None, None, None, None, None, None, None, None, None, None, None, None)


def generate(path: Path, runs: int, samples: int) -> list[int]:
    """Write the store; return the ids of the long runs (the comparison set)."""
    with Store(path) as store:  # creates the schema and indexes
        pass
    t0 = datetime(2025, 1, 1)
    eng = Store(path)
    with eng.engine.begin() as conn:
        conn.execute(Run.__table__.insert(), _run_rows(runs, t0))
        ids = [r[0] for r in conn.exec_driver_sql("SELECT id FROM run ORDER BY id")]
        from runner.models import BenchResult

        conn.execute(BenchResult.__table__.insert(), _bench_rows(ids))
    eng.close()
    long_ids = ids[-LONG_RUNS:]  # the newest runs: what a person compares first
    short_ids = ids[:-LONG_RUNS]
    long_each = samples // 5 // LONG_RUNS  # a fifth of the telemetry (1M of 5M) in the long runs
    rest = samples - long_each * LONG_RUNS
    cols = [c.name for c in Sample.__table__.columns if c.name != "id"]
    sql = f"INSERT INTO sample ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
    con = sqlite3.connect(path)
    con.execute("PRAGMA synchronous=OFF")
    with con:
        for i, run_id in enumerate(short_ids):
            n = rest // len(short_ids) + (i < rest % len(short_ids))
            con.executemany(sql, _samples(run_id, n, 1, 1.7e9 + 600 * i))
        for run_id in long_ids:
            con.executemany(sql, _samples(run_id, long_each, GPU_ROWS, 1.8e9 + 20_000 * run_id))
    got = con.execute("SELECT count(*) FROM sample").fetchone()[0]
    con.close()
    assert got == samples, (got, samples)
    return long_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1,000 runs and 500,000 samples")
    ap.add_argument("--repeat", type=int, default=3, help="timings per figure (the best is reported)")
    ap.add_argument("--keep", type=Path, help="write the store here and keep it")
    args = ap.parse_args()
    runs, samples = (1_000, 500_000) if args.quick else (10_000, 5_000_000)

    tmp = Path(tempfile.mkdtemp(prefix="servelab-scale-"))
    path = args.keep or tmp / "scale.db"
    if path.exists():
        path.unlink()
    say(f"generating {runs:,} runs and {samples:,} samples in {path} …")
    start = time.perf_counter()
    long_ids = generate(path, runs, samples)
    say(f"  generated in {time.perf_counter() - start:.1f} s ({path.stat().st_size / 2**20:.0f} MiB)")

    results: dict[str, float] = {}
    store = Store(path)

    def runs_table():
        frame = api.runs_table(store)
        assert len(frame) == runs

    def compare():
        baseline, *candidates = long_ids
        for c in candidates:
            api.compare_runs(store, baseline, c)
        frame = store.samples_frame(long_ids, max_points=600)
        assert frame["run_id"].nunique() == LONG_RUNS and frame.groupby("run_id")["t"].nunique().max() <= 600

    out = tmp / "samples.csv"

    def export():
        n = api.export_csv(store, "samples", long_ids, out)
        assert n == samples // 5, n

    try:
        for name, fn in (("runs_table", runs_table), ("compare", compare), ("export", export)):
            wait_quiet(30)
            with Foreign() as f:
                best, times = best_of(args.repeat, fn)
            results[name] = best
            say(f"{name}: best {best:.3f} s, all {spread(times)} (target {TARGETS[name]} s); "
                f"other work {f.cores:.2f} cores meanwhile")
        say(f"  export wrote {out.stat().st_size / 2**20:.0f} MiB of CSV")
    finally:
        store.close()
        shutil.rmtree(tmp, ignore_errors=True)

    for name, seconds in results.items():
        figure(f"scale_{name}", seconds=seconds)
    figure("scale", ratio=max(results[k] / TARGETS[k] for k in results))


if __name__ == "__main__":
    main()
