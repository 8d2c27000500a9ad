"""A process group's guard: ends the group when the process that started it dies without stopping it.

`python -I guard.py PGID GRACE_S`, started by `runner.server.GroupGuard` in a session of its own, with the
read end of a pipe as its stdin; the owner keeps the write end. The guard forks and its first process exits
at once, so that it is no child of its owner (Ray kills the direct children of a worker process that exits).
When the owner stops the group itself it writes one byte and the guard exits; when the owner dies any other
way (SIGKILL, a Ray task whose node or driver went away), the kernel closes the pipe and the guard ends the
group with `end_group`: SIGTERM to every process of it, GRACE_S seconds, then SIGKILL.

Needed because a run's processes live in sessions of their own (so that a stop reaches the whole tree): nothing
else ends vLLM's engine processes when their executor dies. A plain script on the standard library (`-I`: no
site, no PYTHONPATH) so that it starts in milliseconds; `runner.server.kill_group` imports it for `end_group`, so
it imports nothing from the package nor outside the standard library (pyproject's import-linter contract and
tests/test_architecture.py hold that).
"""

import os
import signal
import sys
import time
from collections.abc import Callable


def group_alive(pgid: int) -> bool:
    """Whether a live process (a zombie is not) is in group `pgid`: the owner that would reap them is dead."""
    try:
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except OSError:  # no /proc: ask the kernel, zombies included
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, …
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def end_group(pgid: int, grace_s: float, alive: Callable[[int], bool] = group_alive, poll_s: float = 0.1) -> bool:
    """SIGTERM to process group `pgid`, up to `grace_s` seconds for `alive(pgid)` to turn false (asked every
    `poll_s`), then SIGKILL to what is left. True when the SIGKILL was sent; False when the group was gone (or
    not ours to signal) before it."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return False
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not alive(pgid):
            return False
        time.sleep(poll_s)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def main() -> None:
    pgid, grace_s = int(sys.argv[1]), float(sys.argv[2])
    if os.fork():
        os._exit(0)
    if sys.stdin.buffer.read(1):  # the owner stopped the group itself
        return
    end_group(pgid, grace_s)


if __name__ == "__main__":
    main()
