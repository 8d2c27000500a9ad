#!/usr/bin/env bash
# On the H200 host, after gpu_install.sh: one arm of benchmarks/peer.py (issue 17: servelab against
# `vllm bench sweep serve`, the `gpu` matrix) per call — a lent machine runs a command for at most 10 minutes.
# usage: bash scripts/gpu_peer.sh servelab|peer NAME [peer.py options]
# Brings back $OUT/NAME.json (the arm's figures, for `peer.py --combine`), $OUT/NAME.log and, for servelab,
# $OUT/NAME.db (its store: each run's phases, e.g. launched → ready).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
arm=${1:?usage: gpu_peer.sh servelab|peer NAME}
name=${2:?usage: gpu_peer.sh servelab|peer NAME}
shift 2
export TMPDIR="$WORK/tmp/$name"
mkdir -p "$TMPDIR"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python3 benchmarks/peer.py --gpu --matrix gpu --lock '' --quiet-wait 5 --arm "$arm" --save "$OUT/$name.json" "$@" \
  2>&1 | tee "$OUT/$name.log"
db=$(find "$TMPDIR" -name servelab.db | head -1)
[ -n "$db" ] && cp "$db" "$OUT/$name.db"
ls -l "$OUT"
