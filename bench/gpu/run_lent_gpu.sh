#!/usr/bin/env bash
# Every GPU check of the project in one short command, for a lent single-GPU machine that has
# PyTorch but neither megatron-core nor Transformer Engine (see bench/gpu/README.md):
#   1. bench_replay_gpu.py: routing-replay overhead on a Qwen3-30B-A3B-shaped MoE layer
#      (TE spec when Transformer Engine imports, megatron-core's local spec otherwise);
#   2. bench_loop.py on CUDA: the GRPO loop in every replay mode (the CUDA smoke test of the
#      trainer) with its step times side by side, and pr2/r2 stepped pairs on two shapes.
# Wheels for missing packages (megatron-core for the machine's Python) go in .whl/ beforehand:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.16.1
# Logs land in $OUT (the device tool's output folder) or bench/gpu/out.
set -u
source bench/gpu/lent_machine_env.sh

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, megatron.core as m; print('torch', torch.__version__, 'mcore', m.__version__)"

timeout "${REPLAY_TIMEOUT:-150}" torchrun --nproc-per-node 1 bench/gpu/bench_replay_gpu.py \
    --reps "${REPS:-40}" 2>&1 | grep -v -i warn | tee "$OUT/bench_replay_gpu.log"
echo "bench_replay_gpu exit ${PIPESTATUS[0]}"

# Every mode once on `tiny` (the CUDA smoke test), then pr2/r2 stepped pairs (one process steps
# both trainers alternately: the measure issue 5's target is judged by) on `tiny` and `wide`.
timeout "${LOOP_TIMEOUT:-150}" python3 bench/bench_loop.py --shapes tiny --steps 4 \
    --repeats 1 --sft-steps 50 --pair-rounds 2 2>&1 | grep -v -i warn | tee "$OUT/bench_loop.log"
echo "bench_loop tiny exit ${PIPESTATUS[0]}"
timeout "${LOOP_TIMEOUT:-150}" python3 bench/bench_loop.py --shapes wide --modes r2,pr2 \
    --steps 6 --repeats 1 --sft-steps 50 --pair-rounds 2 2>&1 | grep -v -i warn \
    | tee "$OUT/bench_loop_wide.log"
echo "bench_loop wide exit ${PIPESTATUS[0]}"
