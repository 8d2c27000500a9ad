#!/usr/bin/env bash
# On the device host, once every part is in BUNDLE (default .gpu/bundle): join, verify, untar, pip install into
# SITE (default .gpu/site).
# usage: eval "$(bash scripts/gpu_install.sh [SHA256])"   (default: hash from a carried .gpu/SHA256SUMS)
# Progress goes to stderr; stdout is only the export line. Idempotent: skips when $SITE/vllm exists.
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${BUNDLE:-$PWD/.gpu/bundle}
SITE=${SITE:-$PWD/.gpu/site}
if [ ! -d "$SITE/vllm" ]; then
    sum="${1:-$(cut -d' ' -f1 .gpu/SHA256SUMS)}"
    wheels="$BUNDLE/wheels"
    cat "$BUNDLE"/part* > "$BUNDLE/bundle.tar"
    echo "$sum  $BUNDLE/bundle.tar" | sha256sum -c - >&2
    rm -rf "$wheels" && mkdir -p "$wheels"
    tar -xf "$BUNDLE/bundle.tar" -C "$wheels" --strip-components=1
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$wheels"/*.whl >&2
    rm -f "$BUNDLE/bundle.tar"
    PYTHONPATH="$SITE" python3 -c "import typing_extensions, importlib.metadata as m, pydantic, sqlmodel, vllm
print('installed: vllm', vllm.__version__, 'pydantic', pydantic.VERSION, 'sqlmodel', sqlmodel.__version__, 'typing_extensions', m.version('typing_extensions'))" >&2 \
        || echo "WARNING: import check failed (see above); pydantic 2.14 needs typing_extensions>=4.14 from the host" >&2
else
    echo "skip: $SITE/vllm exists" >&2
fi
echo "export PYTHONPATH=$SITE:$PWD PATH=$SITE/bin:\$PATH HF_HUB_OFFLINE=1"
