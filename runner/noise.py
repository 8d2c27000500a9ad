"""The noise of one benchmark: its per-request latencies, bootstrap confidence intervals, a first-request stall.

Pure (numpy): the per-request arrays of `vllm bench serve --save-detailed` in, numbers out.

A latency statistic of one execution (median, P90, P99 or mean of TTFT, TPOT, ITL, E2EL) gets a percentile
bootstrap interval: the execution's requests are resampled with replacement `RESAMPLES` times from a fixed seed,
the statistic is recomputed on each resample, and the 2.5 % and 97.5 % points of those values bound it. Requests,
not tokens, are resampled for ITL: the inter-token gaps of one request are not independent of each other, so a
resampled request brings all of its gaps into the pool (a cluster bootstrap). For executions repeated on a
side, each repeat is resampled on its own and the statistic is the mean over repeats, as in the gain table.
The interval of a change (candidate − baseline) resamples the two sides independently (a seed each) and takes
the difference resample by resample.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
SEED = 0
CONFIDENCE = 0.95
STALL_FACTOR = 5.0
"""A first request slower to its first token than this many times the median of the others is a stall."""
MAX_WORK = 200_000_000
"""Resamples × pooled values above which a bootstrap is not computed (a page must stay responsive)."""

_STAT_KEY = re.compile(r"^(mean|median|p\d+(?:\.\d+)?)_(ttft|tpot|itl|e2el)_ms$")


@dataclass(frozen=True)
class Requests:
    """The successful requests of one bench execution in the order they were sent; latencies in ms."""

    ttft_ms: np.ndarray
    e2el_ms: np.ndarray | None  # None for results written without `latencies` (vLLM ≤ 0.11)
    output_lens: np.ndarray
    itl_ms: tuple[np.ndarray, ...]
    failed: int = 0

    @property
    def n(self) -> int:
        return len(self.ttft_ms)

    def clusters(self, latency: str) -> list[np.ndarray] | None:
        """The values of `latency` grouped by request (one each, except ITL); None if not recorded."""
        if latency == "ttft":
            return [np.array([v]) for v in self.ttft_ms]
        if latency == "itl":
            return list(self.itl_ms) if self.itl_ms else None
        if self.e2el_ms is None:
            return None
        if latency == "e2el":
            return [np.array([v]) for v in self.e2el_ms]
        # vLLM's TPOT: time after the first token over the tokens after it, for requests of > 1 token
        many = self.output_lens > 1
        tpot = (self.e2el_ms[many] - self.ttft_ms[many]) / (self.output_lens[many] - 1)
        return [np.array([v]) for v in tpot]


def requests_from_arrays(arrays: Mapping[str, Sequence]) -> Requests | None:
    """The `Requests` of a `--save-detailed` result's arrays (`ttfts`, `itls`, `output_lens`, `latencies`,
    `errors`, `start_times`, in seconds); None when the result holds no per-request TTFTs."""
    ttfts = arrays.get("ttfts")
    lens = arrays.get("output_lens")
    if not ttfts or lens is None or len(lens) != len(ttfts):
        return None
    n = len(ttfts)
    errors = arrays.get("errors")
    ok = np.array([not e for e in errors]) if errors is not None and len(errors) == n else np.ones(n, dtype=bool)
    starts = arrays.get("start_times")
    order = np.argsort(np.asarray(starts, dtype=float), kind="stable") if starts and len(starts) == n else np.arange(n)
    order = order[ok[order]]
    lat = arrays.get("latencies")
    itls = arrays.get("itls")
    return Requests(
        ttft_ms=np.asarray(ttfts, dtype=float)[order] * 1000.0,
        e2el_ms=np.asarray(lat, dtype=float)[order] * 1000.0 if lat is not None and len(lat) == n else None,
        output_lens=np.asarray(lens, dtype=float)[order],
        itl_ms=tuple(np.asarray(itls[i], dtype=float) * 1000.0 for i in order) if itls and len(itls) == n else (),
        failed=int((~ok).sum()),
    )


def statistic_of(key: str) -> tuple[str, str] | None:
    """`median_ttft_ms` → ("median", "ttft"); None for keys without a bootstrap (std, throughputs, counts)."""
    m = _STAT_KEY.match(key)
    return (m.group(1), m.group(2)) if m else None


class _Pool:
    """One execution's values of a latency, sorted, each with the index of the request it came from."""

    def __init__(self, clusters: list[np.ndarray]) -> None:
        self.n = len(clusters)
        values = np.concatenate(clusters) if clusters else np.empty(0)
        owner = np.repeat(np.arange(self.n), [len(c) for c in clusters])
        order = np.argsort(values, kind="stable")
        self.values, self.owner = values[order], owner[order]

    def statistics(self, stats: Sequence[str], counts: np.ndarray) -> dict[str, np.ndarray]:
        """Each of `stats` per resample, given how often each request was drawn (`counts`: resamples ×
        requests). Percentiles interpolate linearly, as `np.percentile` (and vLLM) do on the pooled values."""
        weights = counts[:, self.owner]
        cum = np.cumsum(weights, axis=1)
        total = cum[:, -1]
        out = {}
        for stat in stats:
            if stat == "mean":
                out[stat] = (weights * self.values).sum(axis=1) / total
                continue
            q = 50.0 if stat == "median" else float(stat[1:])
            pos = q / 100.0 * (total - 1)
            lo = np.floor(pos)
            hi = np.minimum(lo + 1, total - 1)
            at_lo = self.values[(cum <= lo[:, None]).sum(axis=1)]
            at_hi = self.values[(cum <= hi[:, None]).sum(axis=1)]
            out[stat] = at_lo + (pos - lo) * (at_hi - at_lo)
        return out


def _pools(side: Sequence[Requests], latency: str) -> list[_Pool] | None:
    pools = []
    for reqs in side:
        clusters = reqs.clusters(latency)
        if not clusters or not sum(len(c) for c in clusters):
            return None
        pools.append(_Pool(clusters))
    return pools or None


def _replicates(pools: list[_Pool], stats: Sequence[str], rng: np.random.Generator,
                resamples: int) -> dict[str, np.ndarray]:
    """The bootstrap distribution of the mean over `pools` of each of `stats`, all from the same resamples;
    each pool's draws in turn from `rng`."""
    total = {stat: np.zeros(resamples) for stat in stats}
    for pool in pools:
        idx = rng.integers(0, pool.n, (resamples, pool.n))  # one draw, as scipy.stats.bootstrap makes it
        chunk = max(1, 4_000_000 // max(1, len(pool.values)))
        for start in range(0, resamples, chunk):
            part = idx[start:start + chunk]
            rows = np.arange(len(part))[:, None] * pool.n
            counts = np.bincount((part + rows).ravel(), minlength=len(part) * pool.n).reshape(len(part), pool.n)
            for stat, values in pool.statistics(stats, counts).items():
                total[stat][start:start + chunk] += values
    return {stat: values / len(pools) for stat, values in total.items()}


def interval(replicates: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The percentile interval of a bootstrap distribution."""
    alpha = (1.0 - confidence) / 2.0
    low, high = np.percentile(replicates, [alpha * 100.0, (1.0 - alpha) * 100.0])
    return float(low), float(high)


class Bootstrap:
    """The bootstrap distributions of the latency statistics `keys` of one side, each latency's computed
    once (all its statistics from the same resamples), when first asked for."""

    def __init__(self, side: Sequence[Requests], keys: Sequence[str], *, seed: int = SEED,
                 resamples: int = RESAMPLES) -> None:
        self.side, self.seed, self.resamples = list(side), seed, resamples
        self.wanted: dict[str, list[str]] = {}
        for key in keys:
            if which := statistic_of(key):
                self.wanted.setdefault(which[1], []).append(which[0])
        self._done: dict[str, dict[str, np.ndarray] | None] = {}

    def replicates(self, key: str) -> np.ndarray | None:
        """The distribution of `key` over the resamples; None where it cannot be computed here."""
        which = statistic_of(key)
        if which is None or which[0] not in self.wanted.get(which[1], []):
            return None
        stat, latency = which
        if latency not in self._done:
            pools = _pools(self.side, latency)
            work = sum(len(p.values) for p in pools or []) * self.resamples
            self._done[latency] = None if pools is None or work > MAX_WORK else _replicates(
                pools, sorted(set(self.wanted[latency])), np.random.default_rng(self.seed), self.resamples)
        done = self._done[latency]
        return None if done is None else done[stat]


def point(side: Sequence[Requests], key: str) -> float | None:
    """The statistic `key` of the requests themselves (the mean over repeats), as vLLM reports it."""
    which = statistic_of(key)
    pools = _pools(side, which[1]) if which else None
    if which is None or pools is None:
        return None
    return float(np.mean([p.statistics([which[0]], np.ones((1, p.n)))[which[0]][0] for p in pools]))


def side_ci(side: Sequence[Requests], key: str, *, resamples: int = RESAMPLES, seed: int = SEED,
            confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the statistic `key` of one side; None where it cannot be computed."""
    reps = Bootstrap(side, [key], seed=seed, resamples=resamples).replicates(key)
    return None if reps is None else interval(reps, confidence)


def diff_ci(baseline: Bootstrap, candidate: Bootstrap, key: str,
            confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Percentile bootstrap interval of candidate − baseline for `key`: the two sides resampled independently
    (give them different seeds), the difference taken resample by resample."""
    a, b = baseline.replicates(key), candidate.replicates(key)
    return None if a is None or b is None else interval(b - a, confidence)


def first_request_stall(reqs: Requests, factor: float = STALL_FACTOR) -> tuple[float, float] | None:
    """(first request's TTFT, median TTFT of the others) in ms when the first is over `factor` × that median."""
    if reqs.n < 2:
        return None
    first, rest = float(reqs.ttft_ms[0]), float(np.median(reqs.ttft_ms[1:]))
    return (first, rest) if first > factor * rest else None

