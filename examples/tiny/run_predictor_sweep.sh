#!/usr/bin/env bash
# Why PR2 does or does not beat R2 on the tiny task: PR2 at off-4 with the predictor learning
# rate multiplier swept, route traces on, then `pr2 analyze` per run (predictive top-k accuracy
# vs horizon against the stale R2 route). Run from the repository root:
#   bash examples/tiny/run_predictor_sweep.sh [overrides...]
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
PR2=${PR2:-.venv/bin/pr2}
RUNS=${RUNS:-logs/predictor_sweep}
export OMP_NUM_THREADS=1 TORCHDYNAMO_DISABLE=1
for mult in ${MULTS:-0.5 10 100}; do
  "$PYTHON" examples/train.py examples/tiny/grpo_off4.yaml policy.router_replay.mode=pr2 \
    policy.router_replay.predictor.lr_mult="$mult" grpo.max_num_steps=15 \
    logger.route_traces=true logger.progress_bar=false logger.tensorboard_enabled=false \
    logger.log_dir="$RUNS/lr_mult_$mult" "$@" > "$RUNS-lr_mult_$mult.log" 2>&1 &
done
wait
for mult in ${MULTS:-0.5 10 100}; do
  "$PR2" analyze "$RUNS/lr_mult_$mult" > /dev/null
  echo "== lr_mult $mult: $RUNS/lr_mult_$mult/analysis/analysis.md"
done
