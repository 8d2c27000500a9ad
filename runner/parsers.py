"""Text → values: bench results, startup logs, lm-eval output, Prometheus text.

Pure functions: the caller reads the file or HTTP body and passes the text in. Benchmark metrics are keyed by
the `vllm bench serve --save-result` JSON names everywhere (see docs/architecture.md); the printed result block
maps onto the same keys. Text that cannot be understood raises `runner.errors.ParseError` naming what was
expected and what was found. Wordings were checked against vLLM's own source (benchmarks/serve.py,
v1/core/kv_cache_utils.py, v1/engine/core.py) from 0.11 to 0.32.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from runner.errors import ParseError

KINDS = ("bench_json", "bench_text", "lm_eval_json", "lm_eval_table", "server_log")

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_NUM = r"[-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"


def _preview(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _describe(data: Any) -> str:
    return f"keys {sorted(data)[:12]}" if isinstance(data, Mapping) else type(data).__name__


def _to_float(raw: str) -> float | None:
    """`1,048,576` → 1048576.0, `inf` → inf, `None`/`N/A`/`-` → None; else ValueError."""
    raw = raw.strip()
    if raw.lower() in ("none", "null", "n/a", "-", ""):
        return None
    return float(raw.replace(",", ""))


def _optional_float(raw: Any) -> float | None:
    """Like `_to_float` for any value, but None instead of an error (and for NaN, bools)."""
    if raw is None or isinstance(raw, bool):
        return None
    try:
        value = _to_float(str(raw))
    except ValueError:
        return None
    return None if value is None or math.isnan(value) else value


def _to_int(raw: Any) -> int | None:
    value = _optional_float(raw)
    return int(value) if value is not None and math.isfinite(value) else None


def _last(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    matches = list(pattern.finditer(text))
    return matches[-1] if matches else None


def _load_json(text: str | bytes, what: str) -> Any:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if not text.strip():
        raise ParseError(f"Expected {what}, found empty text.")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        cut = exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string")
        raise ParseError(
            f"Expected {what}, found text that is not valid JSON"
            f"{' (truncated file?)' if cut else ''}: {exc.msg} at line {exc.lineno} column "
            f"{exc.colno}; it starts {_preview(text)}."
        ) from None


# ---------------------------------------------------------------- benchmark results


@dataclass(frozen=True)
class BenchParse:
    """One `vllm bench serve` result.

    `metrics`: every numeric scalar by its `--save-result` JSON key (None where vLLM wrote null, e.g.
    `request_goodput` without `--goodput`). `info`: other scalars (date, backend, model_id, label, `--metadata`
    values, ...). `arrays`: per-request lists (ttfts, itls, errors, ...). `raw`: the JSON as loaded, or
    `{"text": block}` for a printed block.
    """

    metrics: dict[str, float | None] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, list] = field(default_factory=dict)
    raw: dict = field(default_factory=dict)


# Keys that stay metrics when vLLM writes them as null or "inf".
_NULLABLE_METRICS = {"request_goodput", "max_concurrency", "request_rate", "rtfx"}
_STAT_KEY = re.compile(r"^(?:mean|median|std|p\d+(?:\.\d+)?)_\w+_ms$")


def _is_bench_dict(data: Any) -> bool:
    return isinstance(data, Mapping) and "completed" in data and ("duration" in data or "request_throughput" in data)


def parse_bench_json(text_or_dict: str | bytes | Mapping[str, Any]) -> BenchParse:
    """Parse a `vllm bench serve --save-result` JSON file (its text) or the loaded dict.

    Tolerates older files (0.11 has no `failed`, `latencies`, `start_times`), a null `request_goodput`,
    `request_rate: "inf"` (→ `float("inf")`) and `p<N>_<metric>_ms` for any N. Raises ParseError for invalid
    JSON or JSON that is not a bench result.
    """
    what = "a `vllm bench serve --save-result` JSON object"
    data = text_or_dict if isinstance(text_or_dict, Mapping) else _load_json(text_or_dict, what)
    if not _is_bench_dict(data):
        raise ParseError(
            f"Expected {what} with key 'completed' and 'duration' or 'request_throughput'; found {_describe(data)}."
        )
    metrics: dict[str, float | None] = {}
    info: dict[str, Any] = {}
    arrays: dict[str, list] = {}
    for key, value in data.items():
        if isinstance(value, list):
            arrays[key] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[key] = float(value)
        elif (key in _NULLABLE_METRICS or _STAT_KEY.match(key)) and (
            value is None or _optional_float(value) is not None
        ):
            metrics[key] = _optional_float(value)
        else:
            info[key] = value
    return BenchParse(metrics=metrics, info=info, arrays=arrays, raw=dict(data))


# Printed label, lower-cased → JSON key (labels from vllm/benchmarks/serve.py). Lower-casing
# also joins 0.11's "Total Token throughput" with the later "Total token throughput".
_TEXT_LABELS = {
    "successful requests": "completed",
    "failed requests": "failed",
    "maximum request concurrency": "max_concurrency",
    "request rate configured (rps)": "request_rate",
    "benchmark duration (s)": "duration",
    "total input tokens": "total_input_tokens",
    "total generated tokens": "total_output_tokens",
    "request throughput (req/s)": "request_throughput",
    "input throughput (inputs/s)": "input_sequence_throughput",
    "request goodput (req/s)": "request_goodput",
    "output token throughput (tok/s)": "output_throughput",
    "peak output token throughput (tok/s)": "max_output_tokens_per_s",
    "peak concurrent requests": "max_concurrent_requests",
    "rtfx (inverse real-time factor)": "rtfx",
    "total token throughput (tok/s)": "total_token_throughput",
    "probe requests completed": "probe_completed",
    "probe requests failed": "probe_failed",
    "median probe e2el (ms)": "probe_median_e2el_ms",
    "p99 probe e2el (ms)": "probe_p99_e2el_ms",
    "max probe e2el (ms)": "probe_max_e2el_ms",
    "acceptance rate (%)": "spec_decode_acceptance_rate",
    "acceptance length": "spec_decode_acceptance_length",
    "drafts": "spec_decode_num_drafts",
    "draft tokens": "spec_decode_draft_tokens",
    "accepted tokens": "spec_decode_accepted_tokens",
}
# "Mean TTFT (ms)" → mean_ttft_ms, "P99.9 E2EL incl. Client Queue (ms)" →
# p99.9_e2el_including_client_queue_ms: the keys vLLM's process_one_metric writes.
_STAT_LABEL = re.compile(r"^(mean|median|std|p\d+(?:\.\d+)?) ([\w .]+) \(ms\)$")
_TEXT_LINE = re.compile(r"^\s*([^:]+?)\s*:\s*(\S+)\s*$")
_BLOCK_HEADER = "Serving Benchmark Result"


def _text_key(label: str) -> str | None:
    label = " ".join(label.lower().split())
    if label in _TEXT_LABELS:
        return _TEXT_LABELS[label]
    if match := _STAT_LABEL.match(label):
        name = match.group(2).replace(" incl. ", "_including_").replace(" ", "_")
        return f"{match.group(1)}_{name}_ms"
    return None


def text_lines(text: str) -> list[str]:
    """`text` as the lines the printed-result readers see: ANSI codes dropped, carriage returns as line ends."""
    return _ANSI.sub("", text or "").replace("\r", "\n").split("\n")


def bench_block_spans(lines: list[str]) -> list[tuple[int, int]]:
    """(first, last) line index of every printed result block: its header through its closing `=====` line."""
    spans = []
    for start in (i for i, line in enumerate(lines) if _BLOCK_HEADER in line):
        end = next((j for j in range(start + 1, len(lines)) if re.fullmatch(r"\s*={10,}\s*", lines[j])),
                   len(lines) - 1)
        spans.append((start, end))
    return spans


def bench_blocks(text: str) -> list[str]:
    """Every printed result block of `text` in order, each from its header through its closing `=====` line."""
    lines = text_lines(text)
    return ["\n".join(lines[a : b + 1]) for a, b in bench_block_spans(lines)]


def _bench_block(text: str) -> str:
    """The last result block (or the whole text)."""
    blocks = bench_blocks(text)
    return blocks[-1] if blocks else text


def parse_bench_text(text: str) -> BenchParse:
    """Parse the "Serving Benchmark Result" block that `vllm bench serve` prints.

    Each line maps to its JSON key (`Successful requests` → `completed`, `P99 TTFT (ms)` → `p99_ttft_ms`, `Mean
    E2EL incl. Client Queue (ms)` → ...). Whitespace-tolerant; unknown lines are ignored; of several blocks the
    last is parsed. vLLM prints `Request rate configured` only for a finite rate, so `request_rate` is absent
    for `inf` runs.
    """
    text = _ANSI.sub("", text or "")
    block = _bench_block(text)
    metrics: dict[str, float | None] = {}
    for line in block.split("\n"):
        match = _TEXT_LINE.match(line)
        if not match or (key := _text_key(match.group(1))) is None:
            continue
        try:
            metrics[key] = _to_float(match.group(2))
        except ValueError:
            raise ParseError(
                f"Benchmark result line {line.strip()!r}: expected a number after the colon, found {match.group(2)!r}."
            ) from None
    if "completed" not in metrics:
        raise ParseError(
            f"Expected a printed '{_BLOCK_HEADER}' block with a 'Successful requests:' line; "
            f"found {len(metrics)} known lines in text that starts {_preview(text)}."
        )
    return BenchParse(metrics=metrics, raw={"text": block})


# ---------------------------------------------------------------- startup logs


@dataclass(frozen=True)
class KvCapacity:
    """What a vLLM server says about its KV cache at startup; None where the log is silent.

    `backend` is the device word of the size line ("GPU", "CPU", ...). `kv_cache_tokens` already includes the
    context-parallel multiplier, as vLLM logs it. `kv_cache_gib` is per worker: `Available KV cache memory`, or
    on CPU `Auto set (X/Y) GiB for KV cache`.
    """

    backend: str | None = None
    kv_cache_tokens: int | None = None
    kv_cache_gib: float | None = None
    max_concurrency: float | None = None
    max_concurrency_tokens_per_request: int | None = None
    dcp_multiplier: int | None = None
    pcp_multiplier: int | None = None
    engine_init_s: float | None = None
    vllm_version: str | None = None


_KV_SIZE = re.compile(r"\b([A-Z]{3})(?: \+ host)? KV cache size:\s*([\d,]+) tokens")
_KV_CONCURRENCY = re.compile(rf"Maximum concurrency for ([\d,]+) tokens per request:\s*({_NUM})x")
_KV_GIB = re.compile(
    rf"Available KV cache memory:\s*({_NUM})\s*GiB"
    rf"|(?:Auto|Explicitly) set \(({_NUM})/{_NUM}\) GiB for KV cache"
)
_DCP_ONLY = re.compile(r"KV cache size by the dcp_world_size (\d+)")  # 0.11
_CP = re.compile(r"by the cp_world_size \d+ \(pcp_world_size (\d+) \* dcp_world_size (\d+)\)")
_INIT = re.compile(rf"init engine \(profile, create kv cache, warmup model\) took ({_NUM}) s")
_VERSIONS = (
    re.compile(r"vLLM (?:API )?server version v?([\w.+-]+)"),  # 0.32: "vLLM server version"
    re.compile(r"LLM engine \(v([^)\s]+)\)"),  # "Initializing a V1 LLM engine (v0.11.0) ..."
    re.compile(r"█\s+version\s+v?([\w.+-]+)"),  # the 0.3x logo banner
)


def parse_startup_log(text: str) -> KvCapacity:
    """Read KV cache capacity, context-parallel multipliers, init time and version from a log.

    Knows `Multiplying the GPU KV cache size by the dcp_world_size N.` (0.11), `... by the cp_world_size N
    (pcp_world_size P * dcp_world_size D).` (0.12+), separate `GPU KV cache size: N tokens` / `Maximum
    concurrency for T tokens per request: Cx` lines, and the merged `CPU KV cache size: N tokens, Maximum
    concurrency ...` line (0.30+). Lines may carry `(EngineCore_DP0 pid=1) INFO 11-06 15:34:59 [file.py:1]`
    prefixes or run together. When a value is logged several times (one engine per DP rank, one worker per TP
    rank, a restart), the last occurrence wins. A log without these lines gives all None.
    """
    text = _ANSI.sub("", text or "")
    values: dict[str, Any] = {}
    if size := _last(_KV_SIZE, text):
        values["backend"], values["kv_cache_tokens"] = size.group(1), _to_int(size.group(2))
    if conc := _last(_KV_CONCURRENCY, text):
        values["max_concurrency_tokens_per_request"] = _to_int(conc.group(1))
        values["max_concurrency"] = _optional_float(conc.group(2))
    if gib := _last(_KV_GIB, text):
        values["kv_cache_gib"] = _optional_float(gib.group(1) or gib.group(2))
    cp, dcp_only = _last(_CP, text), _last(_DCP_ONLY, text)
    if cp and (not dcp_only or cp.start() > dcp_only.start()):
        values["pcp_multiplier"], values["dcp_multiplier"] = int(cp.group(1)), int(cp.group(2))
    elif dcp_only:
        values["dcp_multiplier"] = int(dcp_only.group(1))
    if init := _last(_INIT, text):
        values["engine_init_s"] = _optional_float(init.group(1))
    for pattern in _VERSIONS:
        if version := pattern.search(text):
            values["vllm_version"] = version.group(1).rstrip(".,")
            break
    return KvCapacity(**values)


_LOG_PREFIX = re.compile(
    r"^(?:\d{4}-\d\d-\d\d[T ][\d:.,]+Z?\s*\|?\s*)?"  # docker / journald timestamp
    r"(?:\([\w.-]+ pid=\d+\)\s*)?"  # (EngineCore_DP0 pid=666657)
    r"(?:(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+\d\d-\d\d\s+[\d:.]+\s+"  # INFO 11-06 15:34:59
    r"(?:\[?[\w./-]+:\d+\]\s*)?)?"  # [kv_cache_utils.py:1229], before 0.8 without "["
)
_EXCEPTION = re.compile(r"^(?:[A-Za-z_]\w*\.)*\w*(?:Error|Exception|Exit|Interrupt)(?::\s*.*)?$")
_ARGPARSE = re.compile(r"^[\w.-]+(?: [\w-]+)?: error: .+$")
# Wrappers that only point at the real cause printed earlier.
_WRAPPERS = (
    "see root cause above",
    "engine core initialization failed",
    "encountered an issue. see stack trace",
    "initialization failed due to an exception in a background process",
    "please check the stack trace above for the root cause",  # "Worker failed with error '...'"
)
_PYDANTIC_KINDS = {"Value error": "ValueError", "Assertion failed": "AssertionError"}


def _validation_cause(lines: list[str], start: int) -> str | None:
    """pydantic prints `1 validation error for VllmConfig`, the complaint on the lines after."""
    parts: list[str] = []
    for line in lines[start + 1 : start + 6]:
        parts.append(line)
        if "[type=" in line:
            break
    message = " ".join(" ".join(parts).split(" [type=")[0].split())
    kind, comma, rest = message.partition(", ")
    return f"{_PYDANTIC_KINDS[kind]}: {rest}" if comma and kind in _PYDANTIC_KINDS else message


# Lines that never explain a failure: nanobind's leak report at interpreter exit, vLLM's ASCII logo, tqdm
# progress bars, multiprocessing's resource_tracker warnings and the route table.
_NOISE = re.compile(
    r"^(?:nanobind: |- leaked (?:instance|type|function) |- \.\.\. skipped remainder"
    r"|See https://nanobind\.readthedocs\.io"
    r"|.*resource_tracker: |warnings\.warn\("
    r"|[\s█▄▀▌▐▘▝▖▗]*$"  # the logo's block characters (or nothing at all)
    r"|[▄█▀].*(?:version|model)\s"  # the logo lines that carry version and model
    r"|Route: \S+, Methods: )"
)
_PROGRESS_BAR = re.compile(r"\d+%\|.*\|\s*\d+/\d+")  # tqdm: " 45%|####5     | 72/160 [00:03<00:04, 19.1it/s]"
# vLLM's own words when its port is taken: the launcher's warning naming the holder, or the socket error.
_PORT_USED = re.compile(r"^port \d+ is used by process ")
_ADDRESS_IN_USE = "[Errno 98] Address already in use"


def _log_lines(log_text: str) -> list[tuple[str | None, str]]:
    """(level, message) of each line: ANSI codes and log prefixes stripped, carriage-return redraws split."""
    out = []
    for raw in _ANSI.sub("", log_text or "").replace("\r", "\n").split("\n"):
        prefix = _LOG_PREFIX.match(raw)  # every part of it is optional: it matches every line
        out.append((prefix.group(1), raw[prefix.end() :].strip()) if prefix else (None, raw.strip()))
    return out


def is_noise(line: str) -> bool:
    """True for a log line that never explains a failure (leak reports, logo, progress bars, route table)."""
    line = line.strip()
    return bool(_NOISE.match(line) or _PROGRESS_BAR.search(line))


def meaningful_tail(log_text: str, lines: int = 8) -> str:
    """The last `lines` lines of a log that say something: prefixes kept, noise and blank lines dropped."""
    kept = []
    for raw in _ANSI.sub("", log_text or "").replace("\r", "\n").split("\n"):
        prefix = _LOG_PREFIX.match(raw)
        if raw.strip() and not is_noise(raw[prefix.end() :] if prefix else raw):
            kept.append(raw.rstrip())
    return "\n".join(kept[-lines:])


def port_conflict(log_text: str) -> str | None:
    """vLLM's line saying its port is taken: the launcher's `port N is used by process …` (it names the
    holder), else the `[Errno 98] Address already in use` error; None if neither."""
    lines = [line for _, line in _log_lines(log_text)]
    named = [line.rstrip(":") for line in lines if _PORT_USED.match(line)]
    errno = [line for line in lines if _ADDRESS_IN_USE in line]
    found = named or errno
    return found[-1] if found else None


def find_failure_reason(log_text: str) -> str | None:
    """The root-cause line of a failed vLLM startup, log prefixes stripped; None if none.

    A port conflict wins (vLLM's `port N is used by process …`, or `Address already in use`): whatever fails
    after it is its consequence. Otherwise the last exception line (`SomeError: message`) that is not one of
    vLLM's wrappers ("Engine core initialization failed. See root cause above"); for a pydantic
    `ValidationError` (config checks) the complaint below it, as `ValueError: ...`. Falls back to an argparse
    `error:` line, then to the last ERROR line. Noise (nanobind leak reports, the logo, progress bars) is
    never chosen.
    """
    levels_and_lines = [(level, line) for level, line in _log_lines(log_text) if not is_noise(line)]
    if conflict := port_conflict(log_text):
        return conflict
    lines = [line for _, line in levels_and_lines]
    reason: str | None = None
    for index, line in enumerate(lines):
        if _EXCEPTION.match(line) and not any(w in line.lower() for w in _WRAPPERS):
            is_pydantic = "ValidationError: " in line and " validation error" in line
            reason = (_validation_cause(lines, index) if is_pydantic else None) or line
        elif _ARGPARSE.match(line):
            reason = line
    errors = [line for level, line in levels_and_lines if level in ("ERROR", "CRITICAL") and line]
    return reason or (errors[-1] if errors else None)


# ---------------------------------------------------------------- lm-eval


@dataclass(frozen=True)
class EvalScore:
    """One lm-eval score: `value ± stderr` of `metric` under `filter` for `task`."""

    task: str
    filter: str
    metric: str
    value: float
    stderr: float | None = None
    n_shot: int | None = None
    version: str | None = None
    samples: int | None = None


def _version_str(raw: Any) -> str | None:
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)  # lm-eval writes 3.0 in JSON and 3 in its table
    text = "" if raw is None else str(raw).strip()
    return None if text in ("", "N/A") else text


def parse_lm_eval_json(text: str | bytes | Mapping[str, Any]) -> list[EvalScore]:
    """Parse an lm-eval (0.4+) results JSON: one EvalScore per `"<metric>,<filter>"` key.

    Stderr from `"<metric>_stderr,<filter>"` ("N/A" → None), n-shot from `n-shot` (else the task config's
    `num_fewshot`), samples from `n-samples.<task>.effective`, version from `versions`. Scores under `groups`
    (older 0.4.x) are included; `alias` is skipped.
    """
    what = "an lm-eval results JSON object with a 'results' mapping"
    data = text if isinstance(text, Mapping) else _load_json(text, what)
    if not isinstance(data, Mapping) or not isinstance(data.get("results"), Mapping):
        raise ParseError(f"Expected {what}; found {_describe(data)}.")
    n_shots, versions = data.get("n-shot") or {}, data.get("versions") or {}
    n_samples, configs = data.get("n-samples") or {}, data.get("configs") or {}
    scores: list[EvalScore] = []
    seen: set[str] = set()
    for section in (data["results"], data.get("groups") or {}):
        for task, entries in section.items():
            if task in seen or not isinstance(entries, Mapping):
                continue
            seen.add(task)
            n_shot = n_shots.get(task, (configs.get(task) or {}).get("num_fewshot"))
            samples = n_samples.get(task)
            for key, raw in entries.items():
                metric, comma, filter_name = key.partition(",")
                value = _optional_float(raw)
                if not comma or metric.endswith("_stderr") or value is None:
                    continue  # alias, sample_len, stderr entries, "N/A" values
                scores.append(
                    EvalScore(
                        task=task,
                        filter=filter_name,
                        metric=metric,
                        value=value,
                        stderr=_optional_float(entries.get(f"{metric}_stderr,{filter_name}")),
                        n_shot=_to_int(n_shot),
                        version=_version_str(versions.get(task)),
                        samples=_to_int(samples.get("effective")) if isinstance(samples, Mapping) else None,
                    )
                )
    if not scores:
        raise ParseError(
            f"Expected lm-eval scores ('<metric>,<filter>' keys) under 'results'; found "
            f"tasks {sorted(data['results'])[:12]} without any."
        )
    return scores


_TABLE_HEADER = re.compile(r"^\|\s*(Tasks|Groups)\s*\|\s*Version\s*\|", re.IGNORECASE)


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def lm_eval_table_spans(lines: list[str]) -> list[tuple[int, int]]:
    """(header, last row) line index of every table lm-eval prints: its header through its last `|` line."""
    spans = []
    for start in (i for i, line in enumerate(lines) if _TABLE_HEADER.match(line.strip())):
        end = start
        while end + 1 < len(lines) and lines[end + 1].strip().startswith("|") \
                and not _TABLE_HEADER.match(lines[end + 1].strip()):
            end += 1
        spans.append((start, end))
    return spans


def has_lm_eval_table(text: str) -> bool:
    """Whether `text` holds the header of a table lm-eval prints."""
    return any(_TABLE_HEADER.match(line.strip()) for line in _ANSI.sub("", text or "").splitlines())


def parse_lm_eval_table(text: str) -> list[EvalScore]:
    """Parse the markdown table(s) lm-eval prints (`|Tasks|Version|Filter|n-shot|Metric|...`).

    A blank task cell continues the task above (lm-eval prints further filters that way); `" - humanities"`
    sub-task cells lose their dash. Rows of a `Groups` table already in the `Tasks` table are skipped. Raises
    ParseError when no row parses.
    """
    scores: list[EvalScore] = []
    seen: set[tuple[str, str, str]] = set()
    columns: dict[str, int] = {}
    in_groups = False
    task, version, n_shot = "", None, None
    for line in _ANSI.sub("", text or "").splitlines():
        line = line.strip()
        if _TABLE_HEADER.match(line):
            header = [cell.lower() for cell in _cells(line)]
            columns = {name: index for index, name in enumerate(header) if name}
            in_groups = header[0] == "groups"
            continue
        cells = _cells(line)
        if not columns or not line.startswith("|") or len(cells) <= max(columns.values()):
            continue
        row = {name: cells[index] for name, index in columns.items()}
        if cells[0]:
            task = cells[0].lstrip("- ").strip()
            version, n_shot = _version_str(row.get("version")), _to_int(row.get("n-shot"))
        elif row.get("n-shot"):
            n_shot = _to_int(row["n-shot"])
        value = _optional_float(row.get("value"))
        key = (task, row.get("filter", ""), row.get("metric", ""))
        if value is None or not task or (in_groups and key in seen):
            continue  # the |---| row, an unscored row, or a group repeated from Tasks
        seen.add(key)
        stderr = _optional_float(row.get("stderr"))
        scores.append(EvalScore(task, key[1], key[2], value, stderr, n_shot, version))
    if not scores:
        raise ParseError(
            "Expected an lm-eval results table with a '|Tasks|Version|Filter|n-shot|Metric|' "
            f"header and at least one score row; found none in {_preview(text or '')}."
        )
    return scores


# ---------------------------------------------------------------- Prometheus, progress, kind


_PROM_DROPPED = ("_bucket", "_created")


def prometheus_families(text: str) -> list[Metric]:
    """Prometheus text (vLLM's `/metrics`) as metric families, read by prometheus_client's own parser: the one
    reader of `/metrics` in servelab (the sampler's values below, the benchmark window's counters and
    histograms). Raises ParseError for text that is not Prometheus exposition or holds no samples."""
    try:
        families = list(text_string_to_metric_families(text or ""))
    except (ValueError, IndexError, KeyError) as exc:
        raise ParseError(f"Expected Prometheus text exposition (vLLM /metrics); found {_preview(text)}: "
                         f"{exc or type(exc).__name__}.") from None
    if not any(f.samples for f in families):
        raise ParseError(f"Expected Prometheus samples; found none in {_preview(text)}.")
    return families


def parse_prometheus(text: str) -> dict[str, float]:
    """Parse Prometheus text (vLLM's `/metrics`) into `{sample name: value}`.

    Values are summed across label sets (one per engine and model). Histogram `_sum` and `_count` are kept;
    `_bucket` and the `_created` timestamps are dropped. Raises ParseError as `prometheus_families` does.

    The sampler reads the page of its 8 metrics (`/metrics/?name[]=…`, ~2 KB): 0.1 ms a parse; vLLM's whole
    63 KiB page, read where the filter is not honoured, 10 ms (a hand-written line scanner took 0.26 ms, but
    a second grammar of vLLM's page is one too many: docs/performance.md).
    """
    totals: dict[str, float] = {}
    for family in prometheus_families(text):
        for sample in family.samples:
            if not sample.name.endswith(_PROM_DROPPED):
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


_PROGRESS = re.compile(r"\d+%\|[^|\r\n]*\|\s*(\d+)/(\d+)\b")


def parse_bench_progress(text: str) -> tuple[int, int] | None:
    """`(done, total)` from the last tqdm bar in a chunk of `vllm bench serve` output.

    tqdm redraws after carriage returns: ` 45%|████▌ | 90/200 [00:10<00:12, 8.9it/s]`. None when the chunk holds
    no bar.
    """
    match = _last(_PROGRESS, _ANSI.sub("", text or ""))
    return (int(match.group(1)), int(match.group(2))) if match else None


def _parses_as_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _is_lm_eval_dict(data: Any) -> bool:
    results = data.get("results") if isinstance(data, Mapping) else None
    return isinstance(results, Mapping) and any(
        isinstance(entries, Mapping) and any("," in key for key in entries) for entries in results.values()
    )


_LOG_MARKERS = re.compile(
    r"(?:^|\s)(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+\d\d-\d\d\s+\d\d:\d\d:\d\d"
    r"|vLLM (?:API )?server version|KV cache size:|Traceback \(most recent call last\)",
    re.MULTILINE,
)


def detect_kind(text: str) -> str:
    """Say what a pasted or uploaded text is, as one of `KINDS`.

    "bench_json", "bench_text" (a printed result block), "lm_eval_json", "lm_eval_table" or "server_log". Raises
    ParseError for empty or unrecognised text and for JSON that is neither a bench result nor lm-eval results.
    """
    accepted = (
        "a `vllm bench serve --save-result` JSON, a printed 'Serving Benchmark Result' "
        "block, an lm-eval results JSON or table, or a vLLM server log"
    )
    body = _ANSI.sub("", text or "").strip()
    if not body:
        raise ParseError(f"Found empty text; expected {accepted}.")
    # "[" also opens log lines ("[rank0]: Traceback ..."), so only "{" insists on JSON.
    if body[0] == "{" or (body[0] == "[" and _parses_as_json(body)):
        data = _load_json(body, accepted)
        if _is_bench_dict(data):
            return "bench_json"
        if _is_lm_eval_dict(data):
            return "lm_eval_json"
        raise ParseError(f"Found JSON with {_describe(data)}; expected {accepted}.")
    if _BLOCK_HEADER in body or re.search(r"^\s*Successful requests:", body, re.MULTILINE):
        return "bench_text"
    if any(_TABLE_HEADER.match(line.strip()) for line in body.splitlines()):
        return "lm_eval_table"
    if _LOG_MARKERS.search(body):
        return "server_log"
    raise ParseError(f"Found text that starts {_preview(body)}; expected {accepted}.")
