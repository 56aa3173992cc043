#!/usr/bin/env bash
# Both GPU benchmarks in one device run of under 10 minutes, most wanted first: the whole LiDAR
# bench, then the engine's SwinUNETR job (SDPA, batch sweep, MONAI with output on GPU and CPU),
# its compile job, and UNETR, each only when at least its minimum time is left (else it says
# so; run it on its own, see gpu_engine.sh). Carry [".whl", ".gpu_data/mmdet3d/demo/data"].
cd "$(dirname "$0")/.."
start=$(date +%s)
total=${MEDVIT_GPU_TOTAL_S:-570}
left() { echo $(( total - ($(date +%s) - start) )); }
MEDVIT_GPU_LIDAR_S=${MEDVIT_GPU_LIDAR_S:-330} bash bench/gpu_lidar.sh
engine_job() {  # the job's time-limit variable, the least time worth starting it with, its usual limit
  local l cap=${!1:-$3}; l=$(left)
  if [ "$cap" -le 0 ]; then echo "== $1: skipped (0 s allowed)"; return 0; fi
  if [ "$l" -lt "$2" ]; then echo "== $1: not run, $l s left (needs $2 s)"; return 0; fi
  echo "== $1: $l s left"
  env MEDVIT_GPU_SWIN_S=0 MEDVIT_GPU_UNETR_S=0 MEDVIT_GPU_COMPILE_S=0 "$1=$(( l < cap ? l : cap ))" bash bench/gpu_engine.sh
}
engine_job MEDVIT_GPU_SWIN_S 150 200
engine_job MEDVIT_GPU_COMPILE_S 180 240
engine_job MEDVIT_GPU_UNETR_S 100 120
