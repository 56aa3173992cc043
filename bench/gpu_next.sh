#!/usr/bin/env bash
# The next GPU run, prepared to fit one 10-minute device call: what the last GPU run left open
# for the issue's last GPU target (SwinUNETR bf16 at 2x MONAI with its output on the GPU; the
# engine's time is within a few per cent of the model's own, so the rest is the net's):
# 1. bench/profile_swin.py: where one batch of 16 spends its time, per part and per op, with
#    cuDNN's default algorithms and with its algorithm search (cudnn_benchmark);
# 2. the engine bench with SDPA + cudnn_benchmark against MONAI (output on the GPU), batch swept;
# 3. ConDaFormer's smallest window group against scan latency (on a GPU fewer, padded groups
#    may beat the CPU's best);
# 4. bench/compile_bisect.py (where compiled SwinUNETR leaves bf16 tolerance) until the time is up.
# Here, first: bash bench/fetch_gpu_wheels.sh --spconv, and the .gpu_data link (see gpu_lidar.sh);
# then with carry [".whl", ".gpu_data/mmdet3d/demo/data"]: bash bench/gpu_next.sh 2>&1 | tee $OUT/gpu_next.log
# MEDVIT_GPU_SMALL=1 runs the same steps small on the CPU (a dry run; MEDVIT_GPU_TOTAL_S bounds it).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
source bench/gpu_env.sh
dev=cuda; fs=48; batch=8; pbatch=16; sizes=2,8,32,128,1048576; extra=(); pextra=()
model=swin_unetr; shape=512,512,256; sweep=8,16; where=cuda
if [ "${MEDVIT_GPU_SMALL:-0}" = 1 ]; then
  dev=cpu; fs=12; batch=2; pbatch=1; sizes=2,8; extra=(--parts out); pextra=(--reps 1 --top 10 --speedups sdpa)
  model=small; shape=100,120,90; sweep=2; where=cpu
fi
timeout 90 python3 bench/profile_swin.py --device "$dev" --feature-size "$fs" --batch "$pbatch" "${pextra[@]}" \
  --json "$out/profile_swin.json" || echo "profile: failed or timed out"
timeout 150 python3 -m pipelines.cli bench engine --model "$model" --shape "$shape" --classes 14 --overlap 0.5 \
  --batch 4 --our-batch 4 --device "$dev" --amp --output-device "$where" --speedups sdpa,cudnn_benchmark \
  --batch-sweep "$sweep" --json "$out/gpu_engine_swin_unetr_cudnn.json" || echo "engine bench (cudnn): failed or timed out"
timeout 90 python3 bench/condaformer_groups.py --device "$dev" --data .gpu_data --sizes "$sizes" \
  --json "$out/condaformer_groups.json" || echo "condaformer groups: failed or timed out"
left=$(( ${MEDVIT_GPU_TOTAL_S:-570} - ($(date +%s) - start) ))
timeout "$left" python3 bench/compile_bisect.py --device "$dev" --feature-size "$fs" --batch "$batch" \
  --time-limit $(( left - 30 )) --json "$out/compile_bisect.json" "${extra[@]}" || echo "compile bisect: failed or timed out"
