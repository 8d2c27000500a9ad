"""A benchmark window: readings of vLLM's `/metrics` and NVML's energy counter at its start and end.

The sampler asks vLLM for a few gauges every tick; a window reads the whole `/metrics` page twice per
benchmark (a few milliseconds each) and turns the differences into what the benchmark alone did to the
server: prefix-cache hit rate, preemptions, tokens, spec-decode acceptance, finished requests by reason,
queue/prefill/decode time percentiles estimated from histogram buckets, and energy per output token.

`WindowProbe` does the reading (I/O); `window_metrics` is pure and is what the tests pin.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from runner.commands import MAIN_RUN_LINE
from runner.parsers import prometheus_families
from runner.telemetry import GpuReader, MetricsReader, load_nvml

# Canonical counter → metric family names, newest first. vLLM 0.24 and 0.32 expose the same names
# (tests/fixtures/{gpu_0.24,cpu_0.32}/metrics_busy.txt); vLLM ≤ 0.9's V1 engine said `gpu_prefix_cache_*`.
# Spec-decode counters appear only on a server launched with a speculative config.
COUNTERS: dict[str, tuple[str, ...]] = {
    "prefix_cache_queries": ("vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries"),
    "prefix_cache_hits": ("vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits"),
    "preemptions": ("vllm:num_preemptions",),
    "server_prompt_tokens": ("vllm:prompt_tokens",),
    "server_generation_tokens": ("vllm:generation_tokens",),
    "spec_decode_drafts": ("vllm:spec_decode_num_drafts",),
    "spec_decode_draft_tokens": ("vllm:spec_decode_num_draft_tokens",),
    "spec_decode_accepted_tokens": ("vllm:spec_decode_num_accepted_tokens",),
}
FINISHED = "vllm:request_success"  # counter labelled by finished_reason (stop, length, abort, error, …)
HISTOGRAMS: dict[str, str] = {
    "queue": "vllm:request_queue_time_seconds",
    "prefill": "vllm:request_prefill_time_seconds",
    "decode": "vllm:request_decode_time_seconds",
}
QUANTILES = (50, 99)

ENERGY_KEYS = ("energy_j", "j_per_output_token", "mean_power_w_per_gpu", "output_tok_per_s_per_w")


@dataclass
class Snapshot:
    """One `/metrics` page, summed over engines and models: counters, finished requests, histogram buckets."""

    counters: dict[str, float] = field(default_factory=dict)
    finished: dict[str, float] = field(default_factory=dict)
    buckets: dict[str, dict[float, float]] = field(default_factory=dict)  # name → upper bound → cumulative count
    sums: dict[str, tuple[float, float]] = field(default_factory=dict)  # name → (sum s, count)


@dataclass
class Reading:
    """One end of a window: when, the server's counters, and each GPU's energy counter (mJ, None if unread)."""

    t: float  # epoch seconds, like Sample.t
    snapshot: Snapshot | None
    energy_mj: dict[int, float | None] = field(default_factory=dict)
    note: str | None = None


def parse_snapshot(text: str) -> Snapshot:
    """The counters and histograms a window needs from a Prometheus page (`parsers.prometheus_families`)."""
    by_family: dict[str, str] = {name: key for key, names in COUNTERS.items() for name in names}
    hist_key = {name: key for key, name in HISTOGRAMS.items()}
    snap = Snapshot()
    found: dict[str, str] = {}  # canonical key → family that gave it (newest name wins)
    for fam in prometheus_families(text):
        key = by_family.get(fam.name)
        if key is not None:
            if key in found and COUNTERS[key].index(found[key]) < COUNTERS[key].index(fam.name):
                continue
            found[key] = fam.name
            snap.counters[key] = sum(s.value for s in fam.samples if s.name.endswith("_total"))
        elif fam.name == FINISHED:
            for s in fam.samples:
                if s.name.endswith("_total"):
                    reason = s.labels.get("finished_reason", "unknown")
                    snap.finished[reason] = snap.finished.get(reason, 0.0) + s.value
        elif fam.name in hist_key:
            name = hist_key[fam.name]
            cumulative: dict[float, float] = {}
            total = count = 0.0
            for s in fam.samples:
                if s.name.endswith("_bucket"):
                    le = float(s.labels["le"])
                    cumulative[le] = cumulative.get(le, 0.0) + s.value
                elif s.name.endswith("_sum"):
                    total += s.value
                elif s.name.endswith("_count"):
                    count += s.value
            snap.buckets[name] = cumulative
            snap.sums[name] = (total, count)
    return snap


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """Prometheus's `histogram_quantile` over cumulative bucket counts: linear inside the bucket that
    holds the rank, the highest finite bound when the rank falls in +Inf. An estimate: its error is the
    width of that bucket. None for an empty histogram."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    lower, below = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return lower
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


def quantile_bucket(q: float, buckets: Mapping[float, float]) -> tuple[float, float] | None:
    """The bounds (lower, upper) of the bucket that holds the rank `q` of a cumulative histogram: the
    true quantile lies between them, whatever `histogram_quantile` interpolates. The first bucket's lower
    bound is 0 (durations); the +Inf bucket's upper bound is inf. None for an empty histogram."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower = 0.0
    for le in bounds:
        if buckets[le] >= rank:
            return lower, le
        lower = le
    return lower, math.inf


def estimate(q: float, buckets: Mapping[float, float]) -> tuple[float, float, float | None] | None:
    """(value, lower bound, upper bound or None for +Inf) of the `q` quantile, in the histogram's unit.

    Inside a bucket with both bounds the value is Prometheus's linear interpolation. When the rank falls in
    the lowest bucket, nothing says where inside it the requests lie: the value is that bucket's upper bound,
    an upper bound (≤), never an interpolation from 0 (which read 150 ms for requests that all took
    under 0.3 s). In +Inf it is the highest finite bound, a lower bound (≥), as Prometheus returns."""
    value, bucket = histogram_quantile(q, buckets), quantile_bucket(q, buckets)
    if value is None or bucket is None:
        return None
    lo, hi = bucket
    if lo == 0.0 and math.isfinite(hi):
        return hi, 0.0, hi
    return value, lo, hi if math.isfinite(hi) else None


def read_energy_mj(gpus: GpuReader) -> dict[int, float | None]:
    """Each GPU's energy counter since the driver loaded (mJ); None where NVML does not support it."""
    out: dict[int, float | None] = {}
    for i, handle in gpus.handles.items():
        try:
            out[i] = float(gpus.nvml.nvmlDeviceGetTotalEnergyConsumption(handle))  # type: ignore[union-attr]
        except gpus.nvml.NVMLError:  # type: ignore[union-attr]  # NotSupported before Volta, a lost GPU, …
            out[i] = None
    return out


class WindowProbe:
    """Takes `Reading`s of one server and its GPUs. NVML is injectable, like the sampler's."""

    def __init__(self, metrics_url: str, gpu_indices: list[int], nvml: ModuleType | None | bool = True,
                 timeout_s: float = 5.0):
        self.metrics = MetricsReader(metrics_url, timeout_s=timeout_s)  # no names: the whole page
        self.gpus = GpuReader(load_nvml() if nvml is True else (nvml or None), gpu_indices) if gpu_indices else None

    def read(self) -> Reading:
        t = time.time()
        energy = read_energy_mj(self.gpus) if self.gpus is not None else {}
        try:
            return Reading(t, parse_snapshot(self.metrics.get()), energy)
        except Exception as exc:  # a failed read leaves the window's counters blank, never the run failed
            return Reading(t, None, energy, note=f"/metrics unreadable: {type(exc).__name__}: {exc}")

    def close(self) -> None:
        self.metrics.close()
        if self.gpus is not None:
            self.gpus.close()


def integrate_power(samples: Iterable[tuple[float, int, float | None]], t0: float, t1: float) -> dict[int, float]:
    """Joules per GPU between t0 and t1 from (t, gpu, watts) samples, trapezoids clipped to the window.
    A GPU with fewer than two samples in the window is left out: one point is no integral."""
    series: dict[int, list[tuple[float, float]]] = {}
    for t, gpu, watts in samples:
        if watts is not None and t0 <= t <= t1:
            series.setdefault(gpu, []).append((t, watts))
    out: dict[int, float] = {}
    for gpu, points in series.items():
        points.sort()
        if len(points) < 2:
            continue
        joules = sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in itertools.pairwise(points))
        # the edges: hold the first and last readings out to the window's bounds
        joules += (points[0][0] - t0) * points[0][1] + (t1 - points[-1][0]) * points[-1][1]
        out[gpu] = joules
    return out


def _delta(start: float | None, end: float | None) -> float | None:
    if start is None or end is None or end < start:  # a counter that went down: the server restarted
        return None
    return end - start


def _ratio(num: float | None, den: float | None, scale: float = 1.0) -> float | None:
    if num is None or not den:
        return None
    return num / den * scale


def counter_metrics(start: Snapshot, end: Snapshot) -> dict[str, float | None]:
    """What happened on the server between two snapshots, as scalars for the bench result."""
    out: dict[str, float | None] = {}
    for key in COUNTERS:
        if key in start.counters or key in end.counters:
            out[key] = _delta(start.counters.get(key), end.counters.get(key))
    if "prefix_cache_queries" in out:
        out["prefix_cache_hit_pct"] = _ratio(out.get("prefix_cache_hits"), out["prefix_cache_queries"], 100.0)
    if "spec_decode_draft_tokens" in out:
        out["spec_decode_acceptance_pct"] = _ratio(out.get("spec_decode_accepted_tokens"),
                                                   out["spec_decode_draft_tokens"], 100.0)
        accepted = _ratio(out.get("spec_decode_accepted_tokens"), out.get("spec_decode_drafts"))
        out["spec_decode_mean_acceptance_len"] = None if accepted is None else 1.0 + accepted
    for reason in sorted(set(start.finished) | set(end.finished)):
        out[f"finished_{reason}"] = _delta(start.finished.get(reason, 0.0), end.finished.get(reason))
    for name in HISTOGRAMS:
        a, b = start.buckets.get(name, {}), end.buckets.get(name)
        if b is None:
            continue
        diff = {le: b[le] - a.get(le, 0.0) for le in b}
        valid = all(v >= 0 for v in diff.values())
        for q in QUANTILES:
            est = estimate(q / 100, diff) if valid else None
            value, lo, hi = (None, None, None) if est is None else est
            key = f"est_p{q}_{name}"
            out[f"{key}_ms"] = None if value is None else value * 1000.0
            # the bucket the rank lies in: lo 0 marks an upper bound (≤ hi), hi None with a lo a lower bound
            out[f"{key}_lo_ms"] = None if lo is None else lo * 1000.0
            out[f"{key}_hi_ms"] = None if hi is None else hi * 1000.0
        (s0, c0), (s1, c1) = start.sums.get(name, (0.0, 0.0)), end.sums[name]
        out[f"server_mean_{name}_ms"] = _ratio(s1 - s0, c1 - c0, 1000.0) if c1 >= c0 and valid else None
    return out


def energy_metrics(
    start: Reading,
    end: Reading,
    output_tokens: float | None,
    output_throughput: float | None,
    power_samples: Iterable[tuple[float, int, float | None]] = (),
) -> tuple[dict[str, float | None], dict[str, Any]]:
    """Energy of the window on the run's GPUs: NVML's counter where both ends read it, else the
    integral of the sampler's power readings. Blank (None), never 0, without GPUs or readings.

    Returns the scalars for the bench result and the detail (counter values per GPU, the source)."""
    blank: dict[str, float | None] = dict.fromkeys(ENERGY_KEYS)
    gpus = sorted(set(start.energy_mj) | set(end.energy_mj))
    if not gpus:
        return blank, {}
    window_s = end.t - start.t
    per_gpu: dict[int, float] = {}
    source: dict[int, str] = {}
    for g in gpus:
        d = _delta(start.energy_mj.get(g), end.energy_mj.get(g))
        if d is not None:
            per_gpu[g], source[g] = d / 1000.0, "nvml energy counter"
    missing = [g for g in gpus if g not in per_gpu]
    if missing:
        integrated = integrate_power(power_samples, start.t, end.t)
        for g in missing:
            if g in integrated:
                per_gpu[g], source[g] = integrated[g], "integrated power samples"
    detail = {
        "window_s": window_s,
        "gpus": {str(g): {"start_mj": start.energy_mj.get(g), "end_mj": end.energy_mj.get(g),
                          "joules": per_gpu.get(g), "source": source.get(g)} for g in gpus},
    }
    if len(per_gpu) < len(gpus) or window_s <= 0:  # a GPU without energy would make the total a lie
        return blank, detail
    joules = sum(per_gpu.values())
    watts = joules / window_s
    return {
        "energy_j": joules,
        "j_per_output_token": _ratio(joules, output_tokens),
        "mean_power_w_per_gpu": watts / len(gpus),
        "output_tok_per_s_per_w": _ratio(output_throughput, watts),
    }, detail


def window_metrics(
    start: Reading,
    end: Reading,
    bench: Mapping[str, Any],
    power_samples: Iterable[tuple[float, int, float | None]] = (),
) -> tuple[dict[str, float | None], dict[str, Any]]:
    """Everything a window adds to a bench result: (scalars merged into its metrics, detail kept beside it)."""
    scalars: dict[str, float | None] = {}
    detail: dict[str, Any] = {"start_t": start.t, "end_t": end.t}
    if start.snapshot is not None and end.snapshot is not None:
        scalars.update(counter_metrics(start.snapshot, end.snapshot))
    notes = [n for n in (start.note, end.note) if n]
    if notes:
        detail["notes"] = notes
    energy, energy_detail = energy_metrics(start, end, bench.get("total_output_tokens"),
                                           bench.get("output_throughput"), power_samples)
    scalars.update(energy)
    if energy_detail:
        detail["energy"] = energy_detail
    return scalars, detail


def main_run_started(log_tail: str) -> bool:
    """True once `vllm bench serve`'s log says its measured requests have started."""
    return MAIN_RUN_LINE in log_tail


def needs_power_samples(start: Reading, end: Reading) -> bool:
    """True when some GPU's energy counter was not read at both ends: the power samples must fill in."""
    return any(r.energy_mj.get(g) is None for g in set(start.energy_mj) | set(end.energy_mj) for r in (start, end))


def dev_mode_env(prefix_cache_states: Iterable[str]) -> dict[str, str]:
    """`VLLM_SERVER_DEV_MODE=1` when a benchmark wants a cold cache: vLLM serves `/reset_prefix_cache`
    only in dev mode (which also exposes its other dev endpoints, such as /sleep, on the server's port)."""
    return {"VLLM_SERVER_DEV_MODE": "1"} if "cold" in set(prefix_cache_states) else {}


def reset_prefix_cache(base_url: str, timeout_s: float = 30.0) -> float:
    """Empty the server's prefix cache; returns the seconds it took. vLLM 0.32 answers `{"success": false}`
    while blocks are still held (requests finishing), so it is asked again until the deadline; vLLM 0.24
    answers 200 with an empty body."""
    import httpx

    from runner.errors import RunError

    t0 = time.monotonic()
    deadline = t0 + timeout_s
    with httpx.Client(timeout=10.0) as client:
        while True:
            try:
                resp = client.post(base_url.rstrip("/") + "/reset_prefix_cache")
            except httpx.HTTPError as exc:
                raise RunError(f"resetting the prefix cache failed: {exc}") from None
            if resp.status_code == 404:
                raise RunError("the server does not serve POST /reset_prefix_cache (404); it needs "
                               "VLLM_SERVER_DEV_MODE=1, which servelab sets for runs with a cold benchmark")
            # vLLM 0.24 answers an empty 200; 0.32 answers {"success": bool}
            if resp.status_code == 200 and (not resp.content.strip() or resp.json().get("success", True)):
                return time.monotonic() - t0
            if time.monotonic() >= deadline:
                raise RunError(f"the prefix cache was not reset within {timeout_s:.0f} s "
                               f"(HTTP {resp.status_code}: {resp.text[:200]})")
            time.sleep(0.2)
