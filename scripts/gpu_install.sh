#!/usr/bin/env bash
# On the device host, once every part is in /root/bundle: join, verify, untar, pip install into /root/site.
# usage: eval "$(bash scripts/gpu_install.sh [SHA256])"   (default: hash from a carried .gpu/SHA256SUMS)
# Progress goes to stderr; stdout is only the export line. Idempotent: skips when /root/site/vllm exists.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /root/site/vllm ]; then
    sum="${1:-$(cut -d' ' -f1 .gpu/SHA256SUMS)}"
    cat /root/bundle/part* > /root/bundle.tar
    echo "$sum  /root/bundle.tar" | sha256sum -c - >&2
    rm -rf /root/wheels && mkdir -p /root/wheels
    tar -xf /root/bundle.tar -C /root/wheels --strip-components=1
    python3 -m pip install -q --no-index --no-deps --no-compile --target /root/site /root/wheels/*.whl >&2
    rm -f /root/bundle.tar
    PYTHONPATH=/root/site python3 -c "import typing_extensions, importlib.metadata as m, pydantic, sqlmodel, vllm
print('installed: vllm', vllm.__version__, 'pydantic', pydantic.VERSION, 'sqlmodel', sqlmodel.__version__, 'typing_extensions', m.version('typing_extensions'))" >&2 \
        || echo "WARNING: import check failed (see above); pydantic 2.14 needs typing_extensions>=4.14 from the host" >&2
else
    echo "skip: /root/site/vllm exists" >&2
fi
echo "export PYTHONPATH=/root/site:$PWD PATH=/root/site/bin:\$PATH HF_HUB_OFFLINE=1"
