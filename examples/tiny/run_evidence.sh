#!/usr/bin/env bash
# The evidence run: every replay mode at off-4 (grpo_off4.yaml) with 3 seeds, then
# `pr2 compare` writes the table and figure to docs/results/. Run from the repository root:
#   bash examples/tiny/run_evidence.sh            # JOBS=2 runs at a time by default
# Extra arguments are passed to every run as overrides (e.g. grpo.max_num_steps=10).
# MODES / SEEDS pick a subset (e.g. MODES="pr2 pr2_r3" to rerun only the predictor modes);
# a subset writes its comparison into RUNS unless OUT is given.
# CONFIG / VARIANT run another config, e.g. the README's main job, the Qwen3-30B-A3B recipe's
# tiny variant (after tools/make_smoke_assets.py; docs/results/recipe_tiny):
#   CONFIG=examples/recipes/qwen3_30b_a3b/pr2.yaml VARIANT=tiny RUNS=logs/evidence_recipe_tiny \
#     OUT=docs/results/recipe_tiny bash examples/tiny/run_evidence.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
PR2=${PR2:-.venv/bin/pr2}
CONFIG=${CONFIG:-examples/tiny/grpo_off4.yaml}
VARIANT=${VARIANT:-}
RUNS=${RUNS:-logs/evidence_off4}
JOBS=${JOBS:-2}
MODES=${MODES:-none r2 r3 pr2 pr2_r3}
SEEDS=${SEEDS:-1 2 3}
# Only the full run replaces the committed docs/results; a subset compares into its RUNS folder.
if [ "$MODES" = "none r2 r3 pr2 pr2_r3" ] && [ "$SEEDS" = "1 2 3" ] \
  && [ "$CONFIG" = examples/tiny/grpo_off4.yaml ]; then
  OUT=${OUT:-docs/results}
else
  OUT=${OUT:-$RUNS}
fi
export OMP_NUM_THREADS=1 TORCHDYNAMO_DISABLE=1
mkdir -p "$RUNS"
jobs_file=$(mktemp)
for seed in $SEEDS; do
  for mode in $MODES; do
    echo "$mode $seed${*:+ $*}" >> "$jobs_file"  # no trailing blank: xargs -L joins such lines
  done
done
run_one() {  # mode seed [overrides...]
  local mode=$1 seed=$2; shift 2
  "$PYTHON" examples/train.py "$CONFIG" ${VARIANT:+--variant "$VARIANT"} \
    policy.router_replay.mode="$mode" grpo.seed="$seed" \
    logger.log_dir="$RUNS/$mode-seed$seed" logger.progress_bar=false "$@" \
    > "$RUNS/$mode-seed$seed.log" 2>&1 || { echo "FAILED $mode seed $seed: see $RUNS/$mode-seed$seed.log"; return 255; }
  echo "done $mode seed $seed"
}
export -f run_one
export PYTHON RUNS CONFIG VARIANT
xargs -P "$JOBS" -L 1 bash -c 'run_one "$0" "$@"' < "$jobs_file"
rm -f "$jobs_file"
"$PR2" compare "$RUNS"/*-seed*/ --out "$OUT"
