#!/usr/bin/env bash
# Build the offline wheel bundle for the H200 host.
# usage: bash scripts/gpu_bundle.sh WHEELHOUSE_DIR   (the folder holding wheelhouse.py, host-packages.txt and
#        the recipe's README.md; not part of this repository)
# Output (git-ignored): .gpu/wheels/*.whl, .gpu/p0/part0, .gpu/p1/part1, ... (<= 55 MiB each: the working tree travels beside one, 64 MiB a call), .gpu/SHA256SUMS
set -euo pipefail
GPU=$(cd "${1:?usage: gpu_bundle.sh WHEELHOUSE_DIR (with wheelhouse.py and host-packages.txt)}" && pwd)
cd "$(dirname "$0")/.."
OUT=.gpu
rm -rf "$OUT/wheels" "$OUT"/p[0-9]* "$OUT/bundle.tar" && mkdir -p "$OUT/wheels"   # fresh: wheelhouse.py reuses any wheel by name
# servelab runner extras after vllm; pydantic-core is left to pydantic's exact pin.
# greenlet: only sqlalchemy[asyncio] needs it (runner is sync).
python3 "$GPU/wheelhouse.py" "$OUT/wheels" "$GPU/host-packages.txt" \
    "apache-tvm-ffi==0.1.11" "vllm==0.24.0" \
    sqlmodel sqlalchemy pydantic typing-inspection annotated-types alembic mako pydantic-settings python-dotenv psutil \
    --skip torch,torchvision,torchaudio,flashinfer-cubin,tilelang,nvidia-cutlass-dsl,quack-kernels,tokenspeed-mla,humming-kernels,fastsafetensors,nvidia-cudnn-frontend,cuda-tile
tar -cf "$OUT/bundle.tar" -C "$OUT" wheels
(cd "$OUT" && sha256sum bundle.tar > SHA256SUMS)
split -b 55M -d -a 1 "$OUT/bundle.tar" "$OUT/part"
for f in "$OUT"/part[0-9]; do n=${f##*part}; mkdir -p "$OUT/p$n"; mv "$f" "$OUT/p$n/part$n"; done
rm "$OUT/bundle.tar"
echo "wheels: $(ls "$OUT"/wheels/*.whl | wc -l), $(du -sh "$OUT/wheels" | cut -f1); parts: $(ls -d "$OUT"/p[0-9]* | wc -l)"
cat "$OUT/SHA256SUMS"
