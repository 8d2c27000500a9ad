"""The bad-input matrix: what a person can hand servelab wrongly, through the CLI (a real subprocess), the specs,
the import API, the worker, the executor and the dashboard (Streamlit AppTest).

A refused input gets a message naming the value and the fix, starts no process and leaves the store's rows and
the data folder exactly as they were. An accepted one (shell characters, an old bench JSON, Unicode) arrives
literally and round-trips. Every case is a row of docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from runner import api
from runner.commands import serve_argv
from runner.config import CPU_DCP, Host, LaunchSpec, RunSpec, SweepSpec, load_run_spec
from runner.errors import ServelabError
from runner.execute import Allocation, RunExecutor, server_env
from runner.models import RunStatus
from runner.server import ManagedProcess
from runner.store import Store
from runner.vllm_args import serve_parser
from runner.worker import Worker
from tests.reliability.conftest import REPO, Untouched

CLI = [sys.executable, "-m", "runner.cli"]
FIXTURES = REPO / "tests" / "fixtures"
APP = str(REPO / "dashboard" / "streamlit_app.py")
ECHO = "import json, os, sys\nprint(json.dumps({'argv': sys.argv[1:], 'env': {k: v for k, v in os.environ.items() " \
       "if k.startswith('RELIABILITY_')}}))\n"
UNICODE_LABEL = "TP8 — débit ✓ 测试 🚀 <b>"
MIB = 1024 * 1024
GARBAGE = bytes(range(256)) * 16  # binary, and the same every run, so the document does not churn


@dataclass
class Ctx:
    data: Path
    store: Store
    tmp: Path
    monkeypatch: pytest.MonkeyPatch

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=dict(os.environ),
                              cwd=REPO)

    def file(self, name: str, content: str | bytes) -> Path:
        """A file outside the data folder, as a user's file would be."""
        path = self.tmp / "inputs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def yaml(self, data: Any) -> Path:
        return self.file("run.yaml", yaml.safe_dump(data, allow_unicode=True))

    def model(self, kv_heads: int = 4) -> Path:
        """A local model folder with a GQA config.json (servelab reads only its KV heads before launch)."""
        path = self.tmp / "models" / f"gqa{kv_heads}"
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                      "num_attention_heads": 16, "num_key_value_heads": kv_heads}))
        return path

    def echo(self, argv: list[str], env: dict[str, str]) -> dict[str, Any]:
        """Run `argv` for real through ManagedProcess (no shell) with a script that prints its argv and env."""
        script = self.file("echo.py", ECHO)
        proc = ManagedProcess([sys.executable, str(script), *argv], env, self.tmp / "echo.log")
        proc.start()
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() == 0, (self.tmp / "echo.log").read_text()
        return json.loads((self.tmp / "echo.log").read_text().splitlines()[-1])

    def page(self, name: str | None = None):
        from streamlit.testing.v1 import AppTest

        self.monkeypatch.setenv("SERVELAB_BACKEND", "cpu")
        self.monkeypatch.delenv("SERVELAB_PASSWORD", raising=False)
        at = AppTest.from_file(APP, default_timeout=60)
        at.run()
        if name:
            at.switch_page(f"app_pages/{name}.py").run()
        assert not at.exception, at.exception
        return at


@dataclass
class Outcome:
    """What a case observed: the message shown (refused) or what was accepted, and what it legitimately wrote."""

    observed: str
    rows: dict[str, int] = field(default_factory=dict)
    files: int = 0


@dataclass
class Case:
    id: str
    surface: str
    expected: str
    act: Callable[[Ctx], Outcome]


def first_lines(text: str, n: int = 2, width: int = 220) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    out = " / ".join(lines[:n])
    return out if len(out) <= width else out[: width - 1] + "…"


def refused(call: Callable[[], Any], *must: str) -> Outcome:
    """`call` raises a ServelabError whose message holds every string of `must`."""
    with pytest.raises(ServelabError) as info:
        call()
    message = str(info.value)
    for text in must:
        assert text in message, f"{text!r} not in {message!r}"
    return Outcome(first_lines(message))


def cli_refused(c: Ctx, args: list[str], *must: str, code: int = 2) -> Outcome:
    """`servelab ARGS` exits with `code` and an error on stderr holding every string of `must`, no traceback."""
    proc = c.cli(*args)
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    for text in must:
        assert text in proc.stderr, f"{text!r} not in {proc.stderr!r}"
    assert "Traceback" not in proc.stderr
    shown = next((line.strip(" │╭╰─") for line in proc.stderr.splitlines() if must and must[0] in line), proc.stderr)
    return Outcome(f"exit {proc.returncode}: " + first_lines(shown))


def spec(launch: dict | None = None, **sections: Any) -> dict:
    return {"launch": {"model": "org/model", **(launch or {})}, **sections}


def check_spec(data: dict, host: Host | None = None) -> Callable[[], Any]:
    return lambda: RunSpec.parse(data).check(host)


# -- accepted inputs --------------------------------------------------------------------------------------
def shell_characters_in_extra_args(c: Ctx) -> Outcome:
    marker = c.tmp / "pwned"
    evil = [f"$(touch {marker})", f"`touch {marker}`", f"; touch {marker}", f"| touch {marker}",
            f"&& touch {marker} &", "> /dev/null 2>&1", "'single' \"double\"", "*", "~", "${HOME}", "a\\b"]
    launch = RunSpec.parse(spec({"extra-args": ["--chat-template", *evil]})).check().launch
    argv = serve_argv(launch, prefix=[])
    seen = c.echo(argv, {})
    assert seen["argv"] == argv and argv[-len(evil):] == evil
    assert not marker.exists()
    return Outcome(f"{len(evil)} items arrived verbatim as argv[{len(argv) - len(evil)}:]; nothing ran ({marker.name} "
                   "absent)")


def shell_characters_and_newlines_in_env(c: Ctx) -> Outcome:
    marker = c.tmp / "pwned"
    values = {"RELIABILITY_SUBST": f"$(touch {marker}); `touch {marker}`",
              "RELIABILITY_LINES": f"first line\nsecond | touch {marker} > x",
              "RELIABILITY_QUOTES": "' \" \\ * ~ ${HOME}"}
    launch = RunSpec.parse(spec({"env": values})).check().launch
    seen = c.echo(["serve"], server_env(launch, [], cpu=True))
    assert seen["env"] == values
    assert not marker.exists()
    return Outcome(f"{len(values)} variables arrived byte for byte (newline kept); nothing ran")


def quoted_newline_in_pasted_command(c: Ctx) -> Outcome:
    launch = LaunchSpec.from_command("vllm serve org/model --chat-template 'line one\nline two' "
                                     "--served-model-name 'a b' -tp 2")
    assert launch.extra_args == ["--chat-template", "line one\nline two"]
    assert (launch.served_model_name, launch.tensor_parallel_size) == ("a b", 2)
    argv = serve_argv(launch, prefix=[])
    assert c.echo(argv, {})["argv"] == argv
    return Outcome("extra-args == ['--chat-template', 'line one\\nline two'], one argv item each, as pasted")


def old_vllm_bench_json(c: Ctx) -> Outcome:
    data = json.loads((FIXTURES / "parsers" / "bench_0.11.json").read_text())
    dropped = [k for k in data if k.startswith(("std_", "p90_")) or k in
               {"max_output_tokens_per_s", "max_concurrent_requests", "request_goodput", "burstiness", "ttfts",
                "itls", "generated_texts", "errors"}]
    for key in dropped:
        del data[key]
    (run_id,) = api.import_files(c.store, [("bench_old.json", json.dumps(data))])
    [metrics] = c.store.run_metrics(run_id)
    assert metrics["completed"] == data["completed"] and metrics["output_throughput"] == data["output_throughput"]
    assert not any(k in metrics for k in dropped) and "failed" not in metrics
    row = c.store.bench_results(run_id)[0]
    assert row.max_output_tokens_per_s is None and row.median_ttft_ms == data["median_ttft_ms"]
    return Outcome(f"accepted as run {run_id} without {len(dropped)} keys (no `failed`, no peaks, no std/p90); "
                   f"completed={metrics['completed']:.0f}", rows={"run": 1, "benchresult": 1}, files=1)


def unicode_label_import(c: Ctx) -> Outcome:
    name = "résultats_测试.txt"
    (run_id,) = api.import_files(c.store, [(name, (FIXTURES / "seed" / "tp8.txt").read_bytes())], label=UNICODE_LABEL)
    assert c.store.get_run(run_id).label == UNICODE_LABEL
    shown = c.cli("show", str(run_id), "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["label"] == UNICODE_LABEL
    listed = c.cli("runs", "--format", "json")
    assert [r["label"] for r in json.loads(listed.stdout)] == [UNICODE_LABEL]
    raw = Path(c.store.get_run(run_id).run_dir) / f"imported-{name}"
    assert raw.is_file()
    return Outcome(f"label {UNICODE_LABEL!r} identical in the store, `show` and `runs --format json`; "
                   f"file stored as {raw.name}", rows={"run": 1, "benchresult": 1}, files=1)


def unicode_label_queued(c: Ctx) -> Outcome:
    run = api.queue_run(c.store, RunSpec.parse({**spec(), "label": UNICODE_LABEL}))
    out = c.cli("runs", "--format", "csv")
    assert out.returncode == 0 and UNICODE_LABEL in out.stdout
    return Outcome(f"queued as run {run.id}; `runs --format csv` prints {UNICODE_LABEL!r} as written",
                   rows={"run": 1})


# -- the worker and the executor --------------------------------------------------------------------------
def tp_larger_than_the_workers_gpus(c: Ctx) -> Outcome:
    run = api.queue_run(c.store, RunSpec.parse(spec({"tensor-parallel-size": 4})))  # queued where GPUs are unknown
    worker = Worker(c.store, gpu_ids=[0, 1])
    assert worker.step() == [] and not worker.threads
    failed = c.store.get_run(run.id)
    assert failed.status == RunStatus.failed and failed.finished_at is not None and failed.server_pid is None
    assert failed.failure_reason == ("cannot run on this machine: TP×PP×DP = 4×1×1 = 4 ranks, but this machine has "
                                     "2 GPUs; lower the sizes to fit 2, or queue it for a worker on a machine with 4 "
                                     "GPUs.")
    return Outcome(f"run {run.id} failed before start: {failed.failure_reason}", rows={"run": 1})


def taken_port(c: Ctx) -> Outcome:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        run = api.queue_run(c.store, RunSpec.parse(spec({"model": str(c.model()), "port": port})))
        status = RunExecutor(c.store, run.id, Allocation([], port)).execute()
        final = c.store.get_run(run.id)
        assert status == RunStatus.failed and final.status == RunStatus.failed and final.server_pid is None
        assert f"Port {port} is already in use; stop what holds it or choose another port." in final.failure_reason
        assert not (Path(final.run_dir) / "server.log").exists()  # vLLM never started
        with socket.create_connection(("127.0.0.1", port), timeout=2):  # its owner still has it
            pass
    finally:
        holder.close()
    return Outcome(f"failed before vLLM started: {final.failure_reason}", rows={"run": 1})


CASES = [
    # -- specs ------------------------------------------------------------------------------------------
    Case("dcp-does-not-divide-tp", "spec", "refused: DCP 3 does not divide TP 8, divisors offered",
         lambda c: refused(check_spec(spec({"tensor-parallel-size": 8, "decode-context-parallel-size": 3})),
                           "DCP size 3 does not divide TP size 8; pick one of 1, 2, 4, 8.")),
    Case("tp-larger-than-gpus", "spec", "refused: TP 8 on 2 visible GPUs, says to lower the sizes",
         lambda c: refused(check_spec(spec({"tensor-parallel-size": 8}), Host(gpus=2)),
                           "= 8 ranks, but this machine has 2 GPUs; lower the sizes to fit 2, or queue it for a "
                           "worker on a machine with 8 GPUs.")),
    Case("tp-larger-than-cpu-cores", "spec", "refused: TP 8 on a CPU-only machine of 2 cores, the way out named",
         lambda c: refused(check_spec(spec({"tensor-parallel-size": 8}), Host(cpu_backend=True, cores=2)),
                           "= 8 ranks, but this machine has no GPU and vLLM's CPU backend runs one rank per core on "
                           "its 2 cores; lower the sizes to fit 2, or queue it for a worker on a machine with 8 GPUs.")),
    Case("dcp-on-the-cpu-backend", "spec", "refused: the CPU backend's attention returns no LSE; DCP needs a GPU",
         lambda c: refused(check_spec(spec({"tensor-parallel-size": 2, "decode-context-parallel-size": 2}),
                                      Host(cpu_backend=True, cores=2)), CPU_DCP)),
    Case("tp-does-not-divide-heads", "spec", "refused: TP 3 for 16 attention heads, the TP sizes that fit named",
         lambda c: refused(check_spec(spec({"model": str(c.model(4)), "tensor-parallel-size": 3})),
                           "TP 3 does not divide the model's 16 attention heads (its config.json); pick TP 1, 2, 4, "
                           "8 or 16.")),
    Case("num-prompts-absurd", "spec", "refused: 999,999,999,999 prompts, the bound of 1,000,000 said",
         lambda c: refused(check_spec(spec(bench={"num-prompts": 999999999999})),
                           "num-prompts must be between 1 and 1,000,000; it is 999,999,999,999.")),
    Case("dcp-on-gqa-model", "spec", "refused: DCP 2 with TP 4 ≤ the model's 8 KV heads (local config.json)",
         lambda c: refused(check_spec(spec({"model": str(c.model(8)), "tensor-parallel-size": 4,
                                            "decode-context-parallel-size": 2})),
                           "DCP 2 needs TP greater than the model's 8 KV heads (GQA/MQA), but TP is 4; "
                           "raise TP above 8 or set DCP to 1.")),
    Case("missing-model-path", "spec", "refused: the path is named, with the fix",
         lambda c: refused(check_spec(spec({"model": "/nonexistent/servelab-model"})),
                           "Model path /nonexistent/servelab-model does not exist; give an existing folder or a "
                           "Hugging Face id.")),
    Case("tp-not-a-number", "spec", "refused: 'eight' named, an integer asked for",
         lambda c: refused(check_spec(spec({"tensor-parallel-size": "eight"})),
                           "tensor-parallel-size must be a whole number; 'eight' is not.")),
    Case("tp-fractional", "spec", "refused: 2.5 is not a whole GPU count",
         lambda c: refused(check_spec(spec({"tensor-parallel-size": 2.5})),
                           "tensor-parallel-size must be a whole number; 2.5 is not.")),
    Case("tp-zero", "spec", "refused: 0 named, the bound ≥ 1 given",
         lambda c: refused(check_spec(spec({"tensor-parallel-size": 0})),
                           "tensor-parallel-size must be between 1 and 64; it is 0.")),
    Case("negative-num-prompts", "spec", "refused: -5 named, the bound ≥ 1 given",
         lambda c: refused(check_spec(spec(bench={"num-prompts": -5})),
                           "num-prompts must be between 1 and 1,000,000; it is -5.")),
    Case("gpu-memory-utilization-over-1", "spec", "refused: 1.5 named, the bound ≤ 1 given",
         lambda c: refused(check_spec(spec({"gpu-memory-utilization": 1.5})),
                           "gpu-memory-utilization must be at most 1; it is 1.5.")),
    Case("privileged-port", "spec", "refused: port 80 named, the bound ≥ 1024 given",
         lambda c: refused(check_spec(spec({"port": 80})),
                           "port must be between 1024 and 65535; it is 80.")),
    Case("request-rate-not-a-number", "spec", "refused: 'fast' named, a number asked for",
         lambda c: refused(check_spec(spec(bench={"request-rate": "fast"})),
                           "request-rate must be a number (or inf where allowed); 'fast' is not.")),
    Case("request-rate-negative-infinity", "spec", "refused: '-inf' named, > 0 asked for",
         lambda c: refused(check_spec(spec(bench={"request-rate": "-inf"})),
                           "request-rate must be above 0; it is -inf.")),
    Case("bad-percentiles", "spec", "refused: 'abc' named, an example given",
         lambda c: refused(check_spec(spec(bench={"metric-percentiles": "50,abc"})),
                           "percentile 'abc' is not a number between 0 and 100; write e.g. 50,90,99")),
    Case("unknown-launch-key", "spec", "refused: the misspelt key named, `servelab fields` pointed to",
         lambda c: refused(check_spec(spec({"tensor-paralel-size": 2})),
                           "Unknown key `launch.tensor_paralel_size` in RunSpec; check the spelling against "
                           "`servelab fields`.")),
    Case("unknown-section", "spec", "refused: the unknown section named",
         lambda c: refused(check_spec(spec(benchmark={"num-prompts": 5})), "Unknown key `benchmark` in RunSpec")),
    Case("flag-repeated-in-extra-args", "spec", "refused: the flag named and the spec field to set instead",
         lambda c: refused(check_spec(spec({"tensor-parallel-size": 2,
                                            "extra-args": ["--tensor-parallel-size", "4"]})),
                           "`--tensor-parallel-size` in extra args repeats the spec field `tensor_parallel_size`; "
                           "set `tensor_parallel_size` instead of passing it twice.")),
    Case("flag-repeated-in-bench-extra-args", "spec", "refused: `--num-prompts=5` named",
         lambda c: refused(check_spec(spec(bench={"extra-args": ["--num-prompts=5"]})),
                           "`--num-prompts=5` in extra args repeats the spec field `num_prompts`")),
    Case("bad-env-name", "spec", "refused: the variable name named, the allowed characters given",
         lambda c: refused(check_spec(spec({"env": {"BAD-NAME": "1"}})),
                           "environment variable name 'BAD-NAME' is not valid; use letters, digits and _")),
    Case("nul-byte-in-extra-args", "spec", "refused: argv cannot carry NUL",
         lambda c: refused(check_spec(spec({"extra-args": ["a\x00b"]})), "extra args may not contain NUL bytes")),
    Case("blank-model", "spec", "refused: a model id or path asked for",
         lambda c: refused(check_spec(spec({"model": "   "})),
                           "Model: enter a model name (a Hugging Face id such as org/name) or a local path.")),
    Case("comma-in-model-name", "spec", "refused: lm-eval cannot pass it; served-model-name suggested",
         lambda c: refused(check_spec(spec({"model": "org/a,b"})),
                           "Model name 'org/a,b' contains a comma, which lm-eval cannot pass; set served-model-name.")),
    Case("sharegpt-without-path", "spec", "refused: the dataset path asked for",
         lambda c: refused(check_spec(spec(bench={"dataset-name": "sharegpt"})),
                           "Dataset sharegpt needs dataset-path; give the file or use the random dataset.")),
    Case("nothing-to-run", "spec", "refused: a bench or eval section asked for",
         lambda c: refused(check_spec(spec(bench=[], **{"output-check": "off"})),
                           "The run has neither a benchmark nor an evaluation nor an output check; "
                           "add a bench: or eval: section.")),
    Case("sweep-matrix-unknown-key", "spec", "refused: the matrix key named",
         lambda c: refused(lambda: SweepSpec.parse({**spec(), "matrix": {"tp": [1, 2]}}),
                           "matrix key 'tp' is neither a launch nor a bench field")),
    Case("pasted-command-unbalanced-quote", "spec", "refused: check its quotes",
         lambda c: refused(lambda: LaunchSpec.from_command("vllm serve org/model --chat-template 'oops"),
                           "Could not split the command (No closing quotation); check its quotes.")),
    Case("pasted-command-not-vllm-serve", "spec", "refused: an example of the expected form",
         lambda c: refused(lambda: LaunchSpec.from_command("python -m vllm serve org/model"),
                           "A pasted command must start with `vllm serve`; e.g. `vllm serve MODEL -tp 8`.")),
    Case("pasted-flag-without-value", "spec", "refused by vLLM's own parser: the flag named",
         lambda c: refused(lambda: LaunchSpec.from_command("vllm serve org/model -tp"),
                           "vLLM refuses this command: argument --tensor-parallel-size/-tp: expected one argument")),
    Case("pasted-command-without-model", "spec", "refused: the form with MODEL shown",
         lambda c: refused(lambda: LaunchSpec.from_command("vllm serve --enforce-eager"),
                           "No model in the command; write `vllm serve MODEL …`.")),
    Case("shell-characters-in-extra-args", "spec → real process", "accepted; each item reaches the process "
         "verbatim as one argv item, no shell runs", shell_characters_in_extra_args),
    Case("shell-characters-and-newlines-in-env", "spec → real process", "accepted; the values reach the "
         "process environment verbatim", shell_characters_and_newlines_in_env),
    Case("quoted-newline-in-pasted-command", "spec → real process", "accepted; the quoted newline stays inside "
         "one argv item", quoted_newline_in_pasted_command),
    Case("unicode-label-queued", "api + CLI", "accepted; the label round-trips through the store and the CLI",
         unicode_label_queued),
    # -- the worker and the executor ---------------------------------------------------------------------
    Case("tp-larger-than-the-workers-gpus", "worker", "a run queued elsewhere with TP 4 fails on a 2-GPU worker "
         "before anything starts, with the reason", tp_larger_than_the_workers_gpus),
    Case("taken-port", "executor", "a port held by a real listening socket: the run fails before vLLM starts, "
         "naming the port (the worker itself moves runs off ports it sees taken)", taken_port),
    # -- import ------------------------------------------------------------------------------------------
    Case("import-empty-file", "import", "refused: the file named, what is accepted listed",
         lambda c: refused(lambda: api.import_files(c.store, [("empty.json", b"")]),
                           "empty.json: Found empty text; expected a `vllm bench serve --save-result` JSON")),
    Case("import-garbage-bytes", "import", "refused: the file named, its start shown",
         lambda c: refused(lambda: api.import_files(c.store, [("garbage.bin", GARBAGE)]),
                           "garbage.bin: Found text that starts")),
    Case("import-truncated-json", "import", "refused: 'truncated file?' and the position",
         lambda c: refused(lambda: api.import_files(c.store, [("cut.json", (FIXTURES / "cpu_0.32" / "bench.json")
                                                                .read_bytes()[:700])]),
                           "cut.json:", "not valid JSON (truncated file?)")),
    Case("import-huge-file", "import", "refused: over the 64 MiB limit, size named",
         lambda c: refused(lambda: api.import_files(c.store, [("huge.json", b"{" + b" " * (65 * MIB))]),
                           "huge.json: 65 MiB is over the 64 MiB import limit.")),
    Case("import-json-of-another-kind", "import", "refused: the keys found named",
         lambda c: refused(lambda: api.import_files(c.store, [("notes.json", b'{"hello": "world"}')]),
                           "notes.json: Found JSON with keys ['hello']")),
    Case("import-log-without-kv-lines", "import", "refused: no KV-cache lines",
         lambda c: refused(lambda: api.import_files(c.store, [("server.log", b"INFO vLLM API server version 0.32.0\n"
                                                                 b"INFO Application startup complete.\n")]),
                           "server.log: no KV-cache lines found in this server log")),
    Case("import-one-bad-among-good", "import", "refused as a whole: nothing of the good files is stored",
         lambda c: refused(lambda: api.import_files(c.store, [
             ("tp8.txt", (FIXTURES / "seed" / "tp8.txt").read_bytes()), ("bad.json", b"{"),
             ("tp8_dcp8.txt", (FIXTURES / "seed" / "tp8_dcp8.txt").read_bytes())]), "bad.json:")),
    Case("import-old-vllm-bench-json", "import", "accepted: a vLLM 0.11 bench JSON with keys missing; the missing "
         "metrics stay empty", old_vllm_bench_json),
    Case("import-unicode-label-and-name", "import + CLI", "accepted: the label and file name round-trip through "
         "the store, `show` and `runs`", unicode_label_import),
    # -- the CLI, a real subprocess ------------------------------------------------------------------------
    Case("cli-run-dcp-does-not-divide", "CLI", "exit 2, the divisors offered, no run queued",
         lambda c: cli_refused(c, ["run", str(c.yaml(spec({"tensor-parallel-size": 4,
                                                           "decode-context-parallel-size": 3})))],
                               "DCP size 3 does not divide TP size 4; pick one of 1, 2, 4.")),
    Case("cli-run-missing-model", "CLI", "exit 2, the path named",
         lambda c: cli_refused(c, ["run", str(c.yaml(spec({"model": "/nonexistent/servelab-model"})))],
                               "Model path /nonexistent/servelab-model does not exist")),
    Case("cli-run-unknown-yaml-key", "CLI", "exit 2, the key named",
         lambda c: cli_refused(c, ["run", str(c.yaml(spec({"max-model-length": 2048})))],
                               "Unknown key `launch.max_model_length` in RunSpec")),
    Case("cli-run-flag-repeated", "CLI", "exit 2, the repeated flag named",
         lambda c: cli_refused(c, ["run", str(c.yaml(spec({"extra-args": ["--port", "9000"]})))],
                               "`--port` in extra args repeats the spec field `port`")),
    Case("cli-run-non-numeric-override", "CLI", "exit 2, the value named",
         lambda c: cli_refused(c, ["run", str(c.yaml(spec())), "--set", "tensor-parallel-size=abc"],
                               "tensor-parallel-size must be a whole number; 'abc' is not.")),
    Case("cli-run-negative-override", "CLI", "exit 2, the value and bound named",
         lambda c: cli_refused(c, ["run", str(c.yaml(spec())), "--set", "bench.num-prompts=-1"],
                               "num-prompts must be between 1 and 1,000,000; it is -1.")),
    Case("cli-run-unknown-override", "CLI", "exit 2, `servelab fields` pointed to",
         lambda c: cli_refused(c, ["run", str(c.yaml(spec())), "--set", "no-such-field=1"],
                               "`--set no-such-field`: no such launch, bench or eval field; `servelab fields` lists "
                               "them.")),
    Case("cli-run-missing-file", "CLI", "exit 2, the path named, check it",
         lambda c: cli_refused(c, ["run", str(c.tmp / "nowhere.yaml")], "Cannot read spec file", "check the path")),
    Case("cli-run-garbage-yaml", "CLI", "exit 2, not valid YAML/JSON",
         lambda c: cli_refused(c, ["run", str(c.file("bad.yaml", "launch: [unclosed\n  model: x"))],
                               "is not valid YAML/JSON")),
    Case("cli-run-yaml-not-a-mapping", "CLI", "exit 2, the sections expected named",
         lambda c: cli_refused(c, ["run", str(c.file("list.yaml", "- launch\n- bench\n"))],
                               "must hold a mapping with launch:, bench:, eval: sections")),
    Case("cli-import-empty-file", "CLI", "exit 2, the file named",
         lambda c: cli_refused(c, ["import", str(c.file("empty.json", b""))], "empty.json: Found empty text")),
    Case("cli-import-huge-file", "CLI", "exit 2, over the 64 MiB limit",
         lambda c: cli_refused(c, ["import", str(c.file("huge.txt", b"x" * (65 * MIB)))],
                               "huge.txt: 65 MiB is over the 64 MiB import limit.")),
    Case("cli-import-missing-file", "CLI", "exit 2, the path named",
         lambda c: cli_refused(c, ["import", str(c.tmp / "gone.json")], "cannot read", "gone.json")),
    Case("cli-cancel-unknown-run", "CLI", "exit 2, how to list runs",
         lambda c: cli_refused(c, ["cancel", "999"], "no run 999; `servelab runs` lists them")),
    Case("cli-show-non-numeric-id", "CLI", "exit 2, the value named",
         lambda c: cli_refused(c, ["show", "abc"], "Invalid value for 'run_id'")),
    Case("cli-export-unknown-kind", "CLI", "exit 2, the choices listed",
         lambda c: cli_refused(c, ["export", "bogus", "--out", str(c.tmp / "x.csv")],
                               "cannot export 'bogus'; choose runs, samples or results")),
    Case("cli-db-url-without-driver", "CLI", "exit 2, the URL named, no traceback",
         lambda c: cli_refused(c, ["--db", "nosuch://host/db", "runs"],
                               "cannot open the database nosuch://host/db", "whose driver is installed")),
    Case("cli-db-file-not-a-database", "CLI", "exit 2, the file named and left as it was",
         lambda c: not_a_database(c)),
    # -- the dashboard -----------------------------------------------------------------------------------
    Case("dashboard-pasted-dcp-does-not-divide", "dashboard", "error shown, Queue disabled",
         lambda c: dashboard_refused(c, paste="vllm serve org/model -tp 8 -dcp 3",
                                     must="DCP size 3 does not divide TP size 8; pick one of 1, 2, 4, 8.")),
    Case("dashboard-non-numeric-field", "dashboard", "error naming 'lots', Queue disabled",
         lambda c: dashboard_refused(c, fields={"launch.max_model_len": "lots"}, must="'lots'")),
    Case("dashboard-negative-field", "dashboard", "error naming -3 and the bound, Queue disabled",
         lambda c: dashboard_refused(c, fields={"launch.max_num_seqs": "-3"},
                                     must="max-num-seqs must be between 1 and 65536; it is -3.")),
    Case("dashboard-unbalanced-quote-in-extra-args", "dashboard", "error: check its quotes, Queue disabled",
         lambda c: dashboard_refused(c, fields={"launch.extra_args": "--chat-template 'oops"},
                                     must="check its quotes")),
    Case("dashboard-flag-repeated", "dashboard", "error naming the flag, Queue disabled",
         lambda c: dashboard_refused(c, fields={"launch.extra_args": "--port 9000"},
                                     must="`--port` in extra args repeats the spec field `port`")),
    Case("dashboard-missing-model-path", "dashboard", "error naming the path, Queue disabled",
         lambda c: dashboard_refused(c, fields={"launch.model": "/nonexistent/servelab-model"},
                                     must="Model path /nonexistent/servelab-model does not exist")),
    Case("dashboard-import-garbage-upload", "dashboard", "the file named, Import disabled",
         lambda c: dashboard_import_refused(c, upload=("garbage.bin", GARBAGE),
                                            must="garbage.bin: Found text that starts")),
    Case("dashboard-import-truncated-paste", "dashboard", "the paste named, Import disabled",
         lambda c: dashboard_import_refused(c, paste=(FIXTURES / "cpu_0.32" / "bench.json").read_text()[:600],
                                            must="pasted.txt:")),
    Case("dashboard-unicode-label", "dashboard", "accepted: queued with the label as typed",
         lambda c: dashboard_unicode_label(c)),
]


def not_a_database(c: Ctx) -> Outcome:
    garbage = c.file("notes.db", "these are notes, not a database\n" * 40)
    before = garbage.read_bytes()
    out = cli_refused(c, ["--db", str(garbage), "runs"], f"cannot open the database {garbage}",
                      "file is not a database")
    assert garbage.read_bytes() == before
    return out


def _launch_errors(at) -> list[str]:
    return [e.value for e in at.error]


def _queue_button(at):
    return next(b for b in at.button if b.label == "Queue run")


def dashboard_refused(c: Ctx, must: str, paste: str | None = None, fields: dict[str, str] | None = None) -> Outcome:
    at = c.page()
    if paste is not None:
        serve_parser()  # vLLM's parser loaded before the page run is timed (its first import takes seconds)
        at.text_area(key="form.paste").set_value(paste)
        next(b for b in at.button if b.label.startswith("Fill the form")).click().run()
    for key, value in (fields or {}).items():
        at.text_input(key=key).set_value(value)
    at.run()
    errors = _launch_errors(at)
    shown = next((e for e in errors if must in e), None)
    assert shown is not None, errors
    assert _queue_button(at).disabled and not at.code  # no command lines for a launch that cannot run
    return Outcome(f"st.error: {first_lines(shown)}; Queue run disabled")


def dashboard_import_refused(c: Ctx, must: str, upload: tuple[str, bytes] | None = None,
                             paste: str | None = None) -> Outcome:
    at = c.page("import_results")
    if upload is not None:
        at.file_uploader[0].set_value([(upload[0], upload[1], "application/octet-stream")])
    if paste is not None:
        at.text_area(key="import.text").set_value(paste)
    at.run()
    shown = next((e.value for e in at.error if must in e.value), None)
    assert shown is not None, [e.value for e in at.error]
    button = next(b for b in at.button if b.label.startswith("Import"))
    assert button.disabled
    return Outcome(f"st.error: {first_lines(shown, width=160)}; Import disabled")


def dashboard_unicode_label(c: Ctx) -> Outcome:
    at = c.page()
    at.text_input(key="launch.model").set_value(str(c.model()))
    at.text_input(key="run.label").set_value(UNICODE_LABEL)
    at.run()
    assert not _launch_errors(at)
    _queue_button(at).click().run()
    assert any(s.value.startswith("Queued run #1") for s in at.success), [s.value for s in at.success]
    run = c.store.get_run(1)
    assert run.label == UNICODE_LABEL and run.status == RunStatus.queued
    return Outcome(f"queued run #1 labelled {UNICODE_LABEL!r}, byte for byte", rows={"run": 1})


@pytest.fixture
def ctx(env: Path, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Ctx:
    return Ctx(env, store, tmp_path, monkeypatch)


def test_the_matrix_is_large_and_covers_every_surface() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 25
    assert {c.surface.split(" ")[0] for c in CASES} >= {"spec", "CLI", "import", "dashboard", "worker", "executor"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, ctx: Ctx, untouched: Untouched, record) -> None:
    outcome = case.act(ctx)
    summary = untouched.check(outcome.rows, outcome.files)
    record("bad-input", case.id, case.expected, f"{outcome.observed} — {summary}", surface=case.surface)
