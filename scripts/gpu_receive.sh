#!/usr/bin/env bash
# On the device host: copy one carried bundle part folder (.gpu/pN) into /root/bundle/.
# usage: bash scripts/gpu_receive.sh pN
set -euo pipefail
cd "$(dirname "$0")/.."
d=".gpu/${1:?usage: gpu_receive.sh pN}"
ls "$d"/part* >/dev/null   # fails loudly when the folder was not carried
mkdir -p /root/bundle
cp "$d"/part* /root/bundle/
ls -l /root/bundle/
