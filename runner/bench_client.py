"""One benchmark client process per server: vLLM's own `vllm bench serve` code, imported once.

Each `vllm bench serve` process spends its first seconds importing vLLM (24–35 s on the H200 host, about
10 s here) before its first request. `python -m runner.bench_client` imports `vllm.benchmarks.serve` once,
then runs one benchmark per JSON line on stdin — `{"id": …, "argv": [the arguments after "bench serve"],
"log": path}` — through the module's own `add_cli_args(parser)` and `main(args)`, exactly what the `vllm
bench serve` command calls: the same parser, the same result JSON file (`--save-result`). Each benchmark's
output (vLLM's print-out, its progress bar) goes to its own log file, as a process's would; the answer is
one JSON line on stdout: `{"id": …, "code": 0 or the exit code the command would have, "error": …}`.

The window gate: at vLLM's main-run line (after the warm-ups, before the first measured request) the client
answers `{"id": …, "main_run": true}` and waits, at most `GATE_S`, for `{"go": id}` on stdin, so that the
executor reads the server's counters before any measured request has been sent (a window opened from polling
the log could open after the first short requests had finished).

The first line the client writes says whether it can: `{"ready": true, "import_s": …}`, or
`{"unsupported": "…"}` for a vLLM without that entry point. `BenchClients` (the executor's side) then falls
back to one `vllm bench serve` process per benchmark, as before. `SERVELAB_BENCH_CLIENT=0`
(`Settings.bench_client`) asks for that.
"""

from __future__ import annotations

import builtins
import contextlib
import importlib
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from runner.commands import MAIN_RUN_LINE
from runner.server import GroupGuard, ManagedProcess, kill_group

log = logging.getLogger(__name__)
def bench_args(argv: list[str]) -> list[str]:
    """The arguments after `bench serve` of a `vllm bench serve` argv (whatever prefix invokes vLLM)."""
    for i in range(len(argv) - 1):
        if argv[i] == "bench" and argv[i + 1] == "serve":
            return list(argv[i + 2 :])
    raise ValueError(f"not a `vllm bench serve` command: {argv[:6]}")


# -- the client process -----------------------------------------------------------------------------
@contextlib.contextmanager
def _output_to(path: str) -> Iterator[None]:
    """Point this process's stdout and stderr (the file descriptors, so vLLM's loggers and tqdm follow) at `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


def _load_vllm_bench() -> tuple[Any, Any, type]:
    # first, as for the CLI: the CPU wheel's version lookups and AMX permission (only in this process: the
    # executor's own `vllm` lookups must stay unpatched)
    importlib.import_module("runner.vllm_entry")
    from vllm.benchmarks.serve import add_cli_args, main

    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:  # older vLLM
        from vllm.utils import FlexibleArgumentParser  # type: ignore[attr-defined,no-redef]
    # what `vllm bench …` sets up before dispatching (vllm/entrypoints/cli/main.py)
    from vllm import platforms

    if platforms.current_platform.is_unspecified():
        from vllm.platforms.cpu import CpuPlatform

        platforms.current_platform = CpuPlatform()
    return add_cli_args, main, FlexibleArgumentParser


def _answer(out: IO[str], **fields: Any) -> None:
    out.write(json.dumps(fields) + "\n")
    out.flush()


GATE_S = 10.0
"""The longest a benchmark waits at its main-run line for the executor's go (then it goes on regardless)."""


class _Gate:
    """`print` for vLLM's serve module: at the main-run line of the current job, say so and wait for the go."""

    def __init__(self, out: IO[str]):
        self.out = out
        self.job: Any = None  # the id of the job whose main run has not started yet
        self.go: queue.Queue[Any] = queue.Queue()

    def arm(self, job_id: Any) -> None:
        self.job = job_id
        while not self.go.empty():  # a go that came too late for the previous job
            self.go.get_nowait()

    def print(self, *args: Any, **kwargs: Any) -> None:
        builtins.print(*args, **kwargs)
        if self.job is not None and args and str(args[0]).startswith(MAIN_RUN_LINE):
            job, self.job = self.job, None
            sys.stdout.flush()
            _answer(self.out, id=job, main_run=True)
            with contextlib.suppress(queue.Empty):  # no measured request is in flight while this blocks
                while self.go.get(timeout=GATE_S) != job:
                    pass


def _read_jobs(stdin: IO[str], jobs: queue.Queue[Any], gate: _Gate) -> None:
    """Jobs into `jobs` (None at EOF); go lines to the gate."""
    for line in stdin:
        if line.strip():
            msg = json.loads(line)
            if "go" in msg:
                gate.go.put(msg["go"])
            else:
                jobs.put(msg)
    jobs.put(None)


def serve(stdin: IO[str], out: IO[str]) -> None:
    """The client's loop: a handshake line, then one answer per job line until stdin closes."""
    t0 = time.monotonic()
    try:
        add_cli_args, bench_main, parser_cls = _load_vllm_bench()
    except (ImportError, AttributeError) as exc:
        _answer(out, unsupported=f"{type(exc).__name__}: {exc}")
        return
    gate = _Gate(out)
    # vLLM's serve module prints its main-run line with the builtin print: a module global of that name wins
    serve_module = sys.modules[bench_main.__module__]
    serve_module.print = gate.print  # type: ignore[attr-defined]
    import gc

    # vLLM's main freezes the heap before each benchmark after a full collection (`freeze_gc_heap`), about 1 s
    # over the 740,000 objects of an imported vLLM here. Frozen once now and left frozen, each benchmark's
    # collection scans only what came since: the import is not paid again in collections either. What a job
    # built before its own freeze (its arguments and prompts) stays in memory for the client's life: a load
    # sweep's worth of prompts.
    gc.freeze()
    _answer(out, ready=True, import_s=round(time.monotonic() - t0, 3))
    jobs: queue.Queue[Any] = queue.Queue()
    threading.Thread(target=_read_jobs, args=(stdin, jobs, gate), daemon=True).start()
    while (job := jobs.get()) is not None:
        code, error, started = 0, None, time.monotonic()
        gate.arm(job["id"])
        with _output_to(job["log"]):
            try:
                parser = parser_cls(description="vllm bench serve")
                add_cli_args(parser)
                bench_main(parser.parse_args(job["argv"]))
            except SystemExit as exc:  # argparse refusing the arguments: the command's exit code
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                error = f"exit {code}" if code else None
            except Exception as exc:  # noqa: BLE001  one bad benchmark must not end the client
                traceback.print_exc()  # as the command would print it, into the benchmark's log
                code, error = 1, f"{type(exc).__name__}: {exc}"
        _answer(out, id=job["id"], code=code, error=error, seconds=round(time.monotonic() - started, 3))


def main() -> None:
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    serve(sys.stdin, answers)


# -- the executor's side ----------------------------------------------------------------------------
class _Client:
    """A running `python -m runner.bench_client`, its answers read by a thread into a queue."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env = dict(env)  # what it was started with, on top of servelab's own (a prestarted one is matched by it)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as err:
            self.proc = subprocess.Popen(
                # unbuffered: each line reaches the benchmark's log when printed, as from a process of its own
                [sys.executable, "-m", "runner.bench_client"], env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=err, start_new_session=True, text=True, bufsize=1,
            )
        self.guard = GroupGuard(self.proc.pid)
        self.answers: queue.Queue[dict[str, Any]] = queue.Queue()
        self.ready: bool | None = None  # None until the handshake line
        self.unsupported: str | None = None
        self.import_s: float | None = None
        self.imported = threading.Event()  # the handshake line came: the client reads its jobs
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout or ():
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict) and ("ready" in msg or "unsupported" in msg):
                self.imported.set()
            self.answers.put(msg)
        self.answers.put({"eof": True})

    def submit(self, job: dict[str, Any]) -> None:
        if self.proc.stdin is None:
            raise RuntimeError("the benchmark client has no stdin")
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()

    def next_answer(self, timeout_s: float) -> dict[str, Any] | None:
        try:
            msg = self.answers.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            return None
        if "ready" in msg or "unsupported" in msg:
            self.ready = bool(msg.get("ready"))
            self.unsupported = msg.get("unsupported")
            self.import_s = msg.get("import_s")
        return msg

    def end_input(self) -> None:
        """No more jobs: the client's loop ends at EOF, and the process exits by itself."""
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdin:
                self.proc.stdin.close()

    def close(self, grace_s: float = 5.0) -> None:
        self.end_input()
        try:
            # a client still importing vLLM (started at launch, its server gone early) reads no EOF: ended at once
            self.proc.wait(timeout=grace_s if self.imported.is_set() else 0.0)
        except subprocess.TimeoutExpired:
            pass
        kill_group(self.proc.pid, grace_s=grace_s)
        self.guard.release()


class ClientJob:
    """One benchmark in the client, with a process's face (`poll`, `wait`, `stop`, `log_path`) so the executor's
    loop treats it as it treats a `vllm bench serve` process. Falls back to such a process when the client
    answers that it cannot."""

    def __init__(self, owner: BenchClients, argv: list[str], env: dict[str, str], log_path: Path, job_id: int):
        self.owner, self.argv, self.env, self.log_path, self.id = owner, argv, env, Path(log_path), job_id
        self.returncode: int | None = None
        self.fallback: ManagedProcess | None = None
        self.on_main_run: Callable[[], None] | None = None
        """Called when the benchmark waits at its main-run line (no measured request sent yet); it goes on after."""

    def start(self) -> int:
        client = self.owner.client(self.env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.touch()
        client.submit({"id": self.id, "argv": bench_args(self.argv), "log": str(self.log_path)})
        return client.proc.pid

    def poll(self) -> int | None:
        return self.wait(0.0)

    def wait(self, timeout_s: float) -> int | None:
        if self.fallback is not None:
            return self.fallback.wait(timeout_s)
        if self.returncode is not None:
            return self.returncode
        client = self.owner.current
        if client is None:
            return self.returncode
        deadline = time.monotonic() + timeout_s
        while True:
            msg = client.next_answer(deadline - time.monotonic())
            if msg is None:
                return None
            if msg.get("unsupported"):
                log.info("bench client unsupported (%s): one process per benchmark", msg["unsupported"])
                self.owner.give_up(msg["unsupported"])
                self.fallback = ManagedProcess(self.argv, self.env, self.log_path)
                self.fallback.start()
                return self.fallback.wait(max(0.0, deadline - time.monotonic()))
            if msg.get("eof"):
                code = client.proc.wait()
                self.returncode = code or 1
                with open(self.log_path, "a") as f:
                    f.write(f"\nthe benchmark client exited ({code}); its log: {client.log_path}\n"
                            + _tail(client.log_path))
                self.owner.forget()
                return self.returncode
            if msg.get("id") == self.id and msg.get("main_run"):
                try:
                    if self.on_main_run is not None:
                        self.on_main_run()
                finally:
                    client.submit({"go": self.id})
                continue
            if msg.get("id") == self.id:
                self.returncode = int(msg.get("code", 1))
                with open(self.log_path, "a") as f:
                    f.write(f"\n{msg['error']}\n" if msg.get("error") else "")
                    f.write(f"[servelab] ran in the benchmark client ({client.proc.pid}): {msg.get('seconds')} s "
                            "in vLLM's benchmark main\n")
                return self.returncode

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop the benchmark if it still runs: the client goes with it (the next benchmark starts a new one)."""
        if self.fallback is not None:
            self.fallback.stop(grace_s)
        elif self.returncode is None and self.owner.current is not None:
            kill_group(self.owner.current.proc.pid, grace_s)
            self.owner.forget()


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class BenchClients:
    """The benchmark processes of one run: one long-lived client for all of its benchmarks where vLLM allows,
    else one `vllm bench serve` process each. `close()` ends the client."""

    def __init__(self, log_path: Path, use_client: bool = True):
        self.log_path = Path(log_path)
        self.use_client = use_client
        self.current: _Client | None = None
        self.unsupported: str | None = None
        self._ids = 0

    def job(self, argv: list[str], env: dict[str, str], log_path: Path) -> ClientJob | ManagedProcess:
        """A not yet started benchmark of `argv` (a `vllm bench serve` argv) writing its output to `log_path`."""
        if not self.use_client or self.unsupported is not None:
            return ManagedProcess(argv, env, log_path)
        self._ids += 1
        return ClientJob(self, argv, env, log_path, self._ids)

    def client(self, env: dict[str, str]) -> _Client:
        if self.current is None or self.current.proc.poll() is not None:
            self.close()  # an exited client: what is left of its group ends, its guard goes
            self.current = _Client(env, self.log_path)
        return self.current

    def prestart(self, env: dict[str, str]) -> None:
        """Start the client now, so that its import of vLLM overlaps the server's startup instead of following
        it (its first job finds it ready); nothing when benchmarks run as processes of their own."""
        if self.use_client and self.unsupported is None:
            self.client(env)

    def adopt(self, other: BenchClients) -> None:
        """Use `other`'s client, started before this run was given its place (runner/prestart.py), as this run's."""
        self.close()
        self.current, other.current = other.current, None

    def give_up(self, reason: str) -> None:
        self.unsupported = reason
        self.close()

    def forget(self) -> None:
        """The client's group has ended (it exited, or was stopped): its guard goes; the next job starts a new one."""
        if self.current is not None:
            self.current.guard.release()
        self.current = None

    def end_input(self) -> None:
        """Tell the client that no job follows, without waiting for it: it exits while the server stops."""
        if self.current is not None:
            self.current.end_input()

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None


if __name__ == "__main__":
    main()
