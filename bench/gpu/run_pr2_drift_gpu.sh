#!/usr/bin/env bash
# PR2 where the CPU evidence could not show it: the README's main job (off-4, seed 1) on a MoE
# with Qwen3-30B-A3B's layer widths (hidden 2048, 16 heads, 128 experts top-8, expert FFN 768;
# 4 layers, random init + the task's supervised warm start) for r2, pr2 and pr2_r3, with the
# drift probe and route traces, then `pr2 analyze` (predicted vs stale routes per horizon, drift
# cosines) and `pr2 compare`. Meant for a lent single-GPU machine (about 10 minutes planned,
# never run on one yet); the same command runs on CPU at a small shape for a smoke check:
#   SHAPE="" EXTRA="grpo.max_num_steps=2 grpo.sft_warmup_steps=2 grpo.num_prompts_per_step=2" \
#     bash bench/gpu/run_pr2_drift_gpu.sh
# Wheels for missing packages go in .whl/ beforehand (see run_lent_gpu.sh); logs land in $OUT.
set -u
source bench/gpu/lent_machine_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PYTHON=${PYTHON:-python3}
SHAPE=${SHAPE-policy.num_layers=4 policy.hidden_size=2048 policy.ffn_hidden_size=768 \
policy.num_attention_heads=16 policy.num_moe_experts=128 policy.moe_router_topk=8}
MODES=${MODES:-r2 pr2 pr2_r3}
pr2() { "$PYTHON" -c "from megatron_pr2.cli import main; main()" "$@"; }  # no install needed
status=0
for mode in $MODES; do
    # shellcheck disable=SC2086  # SHAPE and EXTRA are lists of overrides
    timeout "${RUN_TIMEOUT:-180}" "$PYTHON" examples/train.py examples/tiny/grpo_off4.yaml \
        policy.router_replay.mode="$mode" $SHAPE ${EXTRA:-} \
        logger.drift_probe_tokens=256 logger.route_traces=true logger.progress_bar=false \
        logger.log_dir="$OUT/$mode" > "$OUT/$mode.log" 2>&1
    rc=$?
    echo "$mode exit $rc ($(grep -c . "$OUT/$mode/metrics.jsonl" 2>/dev/null || echo 0) steps)"
    [ "$rc" = 0 ] || { status=1; tail -20 "$OUT/$mode.log"; continue; }
    pr2 analyze "$OUT/$mode" > "$OUT/$mode.analyze.log" 2>&1 \
        || { status=1; tail -20 "$OUT/$mode.analyze.log"; }
done
runs=()
for mode in $MODES; do [ -s "$OUT/$mode/metrics.jsonl" ] && runs+=("$OUT/$mode"); done
if [ ${#runs[@]} -gt 0 ]; then
    pr2 compare "${runs[@]}" --out "$OUT/comparison" \
        > "$OUT/compare.log" 2>&1 || status=1
fi
exit $status
