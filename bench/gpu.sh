#!/usr/bin/env bash
# The one GPU call: every figure bench/RESULTS.md owes, beside the PyTorch references, in one
# run that fits 8 minutes on an H100 or H200 (so that a rerun fits a 15-minute lease).
#
#   bench/gpu.sh OUT              on the GPU machine, from the checkout (gpu-bundle/ carried)
#   bench/gpu.sh --dry-run OUT    the same steps on this CPU with tiny models (the suite runs it)
#
# Each step runs under its own time budget (cut to what is left of the whole), in the order of
# value; a step that fails or runs out of time is recorded and the next one runs. OUT gets a
# log per step and results.json (bench/gpu_results.py): the card, the versions, each step's
# exit code, seconds and printed lines, and the measured inference times over the compile
# plan's roofline bounds (bench/compile.json).
set -u
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:?usage: bench/gpu.sh [--dry-run] OUT}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUNDLE=$ROOT/gpu-bundle
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
START=$(date +%s)

if [ $DRY = 1 ]; then
  PY=${PYTHON:-$ROOT/.venv/bin/python}
  export JAX_PLATFORMS=cpu
  TOTAL=${GPU_SH_TOTAL:-900}
  # tiny models, few iterations; the official tiny step takes 7 minutes on 2 cores: left out
  INFER=(--tiny --iters 2 --case "128² b1" --case "256² b1 tiled")
  TRAIN=(--tiny --batch 2 --dasm 1 --steps 2)
else
  PY=${PYTHON:-python3}
  TOTAL=${GPU_SH_TOTAL:-480}
  INFER=(--case "512² b1" --case "512² b8" --case "1024² b1")
  TRAIN=(--batch 2 --dasm 1,4 --steps 3 --reference "$BUNDLE/shared-bench/baseline_train_torch.py")
  REFS=$BUNDLE/shared-bench
  [ -d "$BUNDLE/wheels" ] || { echo "error: $BUNDLE/wheels: missing (make gpu-bundle, and carry gpu-bundle)" >&2; exit 2; }
  SITE=$(mktemp -d)
  # the packages the GPU machine lacks, at the versions our compile checks use; nothing fetched
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$BUNDLE"/wheels/*.whl \
    > "$OUT/install.log" 2>&1 || { echo "error: installing the bundle failed: $OUT/install.log" >&2; exit 2; }
  export PYTHONPATH=$SITE
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export JAX_COMPILATION_CACHE_DIR=$OUT/jax-cache   # the second inference run reads it
export XLA_PYTHON_CLIENT_PREALLOCATE=false         # each process's peak is its own
cd "$ROOT"

# step NAME BUDGET_S COMMAND...: runs it under min(BUDGET_S, what is left), logs to OUT/NAME.log
step() {
  local name=$1 budget=$2 left
  shift 2
  left=$((TOTAL - ($(date +%s) - START)))
  [ "$budget" -gt "$left" ] && budget=$left
  if [ "$budget" -lt 10 ]; then
    echo "{\"step\": \"$name\", \"skipped\": \"no time left\"}" > "$OUT/$name.status"
    return
  fi
  local t0=$(date +%s)
  timeout --kill-after=10 "$budget" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '{"step": "%s", "rc": %d, "seconds": %d, "budget": %d, "command": "%s"}\n' \
    "$name" "$rc" "$(( $(date +%s) - t0 ))" "$budget" "$*" > "$OUT/$name.status"
  echo "$name: exit $rc in $(( $(date +%s) - t0 )) s (budget $budget s)"
}

step infer 150 "$PY" bench/infer.py "${INFER[@]}"
step infer_cached 90 "$PY" bench/infer.py "${INFER[@]}"   # the persistent cache warm
if [ $DRY = 1 ]; then
  echo '{"step": "torch_infer", "skipped": "needs a GPU"}' > "$OUT/torch_infer.status"
else
  step torch_infer 90 "$PY" "$REFS/baseline_torch.py"
fi
step train 150 "$PY" bench/train.py --remat none "${TRAIN[@]}"   # configs/tsd.py's remat
step models 60 "$PY" bench/models.py $([ $DRY = 1 ] && echo --tiny)
if [ $DRY = 1 ]; then
  echo '{"step": "torch_best", "skipped": "needs a GPU"}' > "$OUT/torch_best.status"
else
  step torch_best 240 "$PY" "$REFS/baseline_torch_best.py"   # compiles for ~4 min: last
fi
"$PY" bench/gpu_results.py "$OUT" $([ $DRY = 1 ] && echo --dry-run)
