# Sourced by the GPU run scripts (gpu_validate.sh, gpu_multi.sh): the repo as working folder, WORK (the store,
# the generated models, the exports; default .gpu/work in the repo) and OUT (every result to bring back;
# default .gpu/out), servelab's environment, `sl` (the CLI of this checkout) and the demo models.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
WORK=${WORK:-$REPO/.gpu/work}
OUT=${OUT:-$REPO/.gpu/out}
mkdir -p "$OUT" "$WORK/export"
export SERVELAB_DATA="$WORK/data" SERVELAB_DB="$WORK/data/servelab.db" SERVELAB_STARTUP_TIMEOUT=500
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
sl() { python3 -m runner.cli "$@"; }
# a spec's model folder (`model: models/tiny`) under WORK
model_of() { echo "$WORK/$(sed -n 's/^  model: \([^ #]*\).*/\1/p' "scripts/gpu/$1.yaml")"; }
# the two demo models the specs name, written once
demo_models() {
  [ -f "$WORK/models/tiny/config.json" ] || sl demo-model "$WORK/models/tiny"
  [ -f "$WORK/models/mla/config.json" ] || sl demo-model "$WORK/models/mla" --kind mla
}
