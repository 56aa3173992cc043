#!/usr/bin/env bash
# The next GPU run, prepared to fit one 10-minute device call: what the H200 run of 2026-11-27
# left open. First ConDaFormer's smallest window group against scan latency (its grouped sweep
# ran slower there than the H100's single padded group), then where compiled SwinUNETR leaves
# bf16 tolerance (bench/compile_bisect.py, until the time is up).
# Here, first: bash bench/fetch_gpu_wheels.sh --spconv, and the .gpu_data link (see gpu_lidar.sh);
# then with carry [".whl", ".gpu_data/mmdet3d/demo/data"]: bash bench/gpu_next.sh 2>&1 | tee $OUT/gpu_next.log
# MEDVIT_GPU_SMALL=1 runs the same steps small on the CPU (a dry run; MEDVIT_GPU_TOTAL_S bounds it).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
source bench/gpu_env.sh
dev=cuda; fs=48; batch=8; sizes=2,8,32,128,1048576; extra=()
if [ "${MEDVIT_GPU_SMALL:-0}" = 1 ]; then dev=cpu; fs=12; batch=2; sizes=2,8; extra=(--parts out); fi
timeout 90 python3 bench/condaformer_groups.py --device "$dev" --data .gpu_data --sizes "$sizes" \
  --json "$out/condaformer_groups.json" || echo "condaformer groups: failed or timed out"
left=$(( ${MEDVIT_GPU_TOTAL_S:-570} - ($(date +%s) - start) ))
timeout "$left" python3 bench/compile_bisect.py --device "$dev" --feature-size "$fs" --batch "$batch" \
  --time-limit $(( left - 30 )) --json "$out/compile_bisect.json" "${extra[@]}" || echo "compile bisect: failed or timed out"
