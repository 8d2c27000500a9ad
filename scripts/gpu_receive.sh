#!/usr/bin/env bash
# On the device host: copy one carried bundle part folder (.gpu/pN) into BUNDLE (default .gpu/bundle), where the
# parts gather across calls.
# usage: bash scripts/gpu_receive.sh pN
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${BUNDLE:-$PWD/.gpu/bundle}
d=".gpu/${1:?usage: gpu_receive.sh pN}"
ls "$d"/part* >/dev/null   # fails loudly when the folder was not carried
mkdir -p "$BUNDLE"
cp "$d"/part* "$BUNDLE/"
ls -l "$BUNDLE/"
