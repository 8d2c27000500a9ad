#!/usr/bin/env bash
# On a several-GPU H200 host, after gpu_install.sh: servelab sweeps across GPUs (issue 9).
#   bash scripts/gpu_multi.sh dcp    # scripts/gpu/mla_dcp_sweep.yaml: MLA TP=2 vs TP=2+DCP=2
#   bash scripts/gpu_multi.sh pack   # scripts/gpu/pack_sweep.yaml: two TP=1 runs packed side by side
# Appends to one store under WORK (default .gpu/work in the repo: store, models, exports); every result goes
# under $OUT.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv | tee "$OUT/nvidia-smi-$1.csv"
demo_models
spec=$([ "$1" = dcp ] && echo mla_dcp_sweep || echo pack_sweep)
t0=$SECONDS
sl sweep "scripts/gpu/$spec.yaml" --set "model=$(model_of "$spec")" > "$WORK/$1.out" 2>&1
echo "$1 sweep: exit $? after $((SECONDS - t0)) s"; tr '\r' '\n' < "$WORK/$1.out" | tail -n 4
sl runs --format csv | tee "$OUT/runs.csv"
python3 - "$1" <<'PY' | tee -a "$OUT/checks.txt"
import json, sys
from runner.store import Store
store = Store()  # SERVELAB_DB
sweeps = {}
for r in store.list_runs():
    sweeps.setdefault(r.sweep_id, []).append(r)
for sid, runs in sweeps.items():
    runs.sort(key=lambda r: r.id)
    for r in runs:
        ph = {p.phase: p.t for p in store.phases(r.id)}
        print(f"sweep {sid} run {r.id} {r.label!r}: {r.status.value} tp={r.tensor_parallel_size} "
              f"dcp={r.decode_context_parallel_size} gpus={r.gpu_ids_json} port={r.port} kv_tokens={r.kv_cache_tokens} "
              f"kv_gib={r.kv_cache_gib} dcp_multiplier={r.dcp_multiplier} max_conc={r.max_concurrency} "
              f"bench {ph.get('bench_start', 0) - ph.get('launched', 0):.0f}..{ph.get('bench_end', 0) - ph.get('launched', 0):.0f} s "
              f"after launch; reason={(r.failure_reason or '')[:300]!r}")
    if len(runs) == 2 and all(r.kv_cache_tokens for r in runs):
        print(f"sweep {sid}: KV tokens ratio run {runs[1].id}/run {runs[0].id} = {runs[1].kv_cache_tokens / runs[0].kv_cache_tokens:.3f}")
    if len(runs) == 2:
        a, b = ({p.phase: p.t for p in store.phases(r.id)} for r in runs)
        if "launched" in a and "launched" in b:
            lo, hi = max(a["launched"], b["launched"]), min(a.get("stopped", 0), b.get("stopped", 0))
            print(f"sweep {sid}: the two runs overlapped for {max(0.0, hi - lo):.1f} s "
                  f"(launched {abs(a['launched'] - b['launched']):.1f} s apart)")
        gpus = [s for s in (store.samples_frame([r.id]) for r in runs)]
        for r, s in zip(runs, gpus):
            g = s[s.gpu_index.notna()]
            print(f"  run {r.id}: NVML rows {len(g)} on GPU indices {sorted(set(g.gpu_index.astype(int)))}, "
                  f"max util {g.util_pct.max()} %, max memory {g.mem_used_mib.max()} MiB")
PY
ids=$(python3 -c "from runner.store import Store; print(*sorted(r.id for r in Store().list_runs()))")
set -- $ids
[ $# -ge 2 ] && sl compare "$1" "$2" --format markdown | tee "$OUT/compare-dcp.md"
[ $# -ge 4 ] && sl compare "$3" "$4" --format markdown > "$OUT/compare-pack.md"
sl export runs --out "$WORK/export/runs.csv" && sl export samples --out "$WORK/export/samples.csv" \
  && sl export results --out "$WORK/export/results.csv"
nvidia-smi --query-gpu=index,memory.used --format=csv | tee "$OUT/nvidia-smi-after.csv"
tar czf "$OUT/servelab-gpu.tgz" -C "$WORK" data export
for d in "$WORK"/data/runs/*/; do grep -h -E "KV cache|dcp|DCP|Multiplying|Error|error" "$d/server.log" | tail -n 12 | sed "s|^|$(basename $d): |"; done > "$OUT/kv-lines.txt"
ls -la "$OUT"
