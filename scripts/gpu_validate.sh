#!/usr/bin/env bash
# On the H200 host, after gpu_install.sh has put vLLM 0.24 on PYTHONPATH: servelab's runner against
# real CUDA vLLM. Runs through the CLI (SPECS, default "tiny mla": scripts/gpu/<spec>.yaml, appended to
# the same store), their comparison and exports, everything under $OUT.
# WORK (default .gpu/work in the repo) holds the store, the generated models and the exports.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv | tee "$OUT/nvidia-smi.csv"
python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)" | tee "$OUT/versions.txt"
demo_models
# raw /metrics text while a server is up, for parser fixtures
( for i in $(seq 1 400); do curl -s -m 1 'localhost:8000/metrics?by=fixture-capture' > "$WORK/m.txt" 2>/dev/null \
    && grep -q 'num_requests_running{[^}]*} [1-9]' "$WORK/m.txt" && cp "$WORK/m.txt" "$OUT/metrics_busy.txt"; sleep 1; done ) &
scraper=$!
for spec in ${SPECS:-tiny mla}; do
  t0=$SECONDS
  sl run "scripts/gpu/$spec.yaml" --set "model=$(model_of "$spec")" > "$WORK/$spec.out" 2>&1
  echo "$spec: exit $? after $((SECONDS - t0)) s"; tr '\r' '\n' < "$WORK/$spec.out" | tail -n 3
done
kill $scraper 2>/dev/null
sl runs
sl compare 1 2 --format markdown | tee "$OUT/compare.md"
n=$(ls "$WORK/data/runs" | wc -l)
[ "$n" -ge 3 ] && sl compare 1 3 --format markdown | tee "$OUT/compare-eager-vs-graphs.md"
# what the sampler asked vLLM for, and whether the bench kept its per-request arrays
for d in "$WORK"/data/runs/*/; do
  python3 - "$d" <<'PY' | tee -a "$OUT/checks.txt"
import json, pathlib, re, sys
d = pathlib.Path(sys.argv[1])
log = (d / "server.log").read_text(errors="replace")
filtered = len(re.findall(r'"GET /metrics/\?name%5B%5D=\S+ HTTP/1.1" 200', log))
full = log.count('"GET /metrics HTTP/1.1"')
bench = json.loads((d / "bench-0-0.json").read_text()) if (d / "bench-0-0.json").exists() else {}
print(f"run {d.name}: filtered /metrics/?name[]= scrapes answered 200: {filtered}, whole-page scrapes: {full}; "
      f"bench JSON per-request arrays: " + ", ".join(f"{k}={len(bench[k])}" for k in ("ttfts", "itls", "output_lens") if k in bench))
PY
done
sl export runs --out "$WORK/export/runs.csv" && sl export samples --out "$WORK/export/samples.csv" \
  && sl export results --out "$WORK/export/results.csv"
sl show 1 > "$WORK/export/show1.json"; sl show 2 > "$WORK/export/show2.json"
nvidia-smi --query-gpu=memory.used --format=csv | tee "$OUT/nvidia-smi-after.csv"
tar czf "$OUT/servelab-gpu.tgz" -C "$WORK" data export
ls -la "$OUT"
