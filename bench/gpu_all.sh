#!/usr/bin/env bash
# Both GPU benchmarks in one device run of under 10 minutes (engine first, then LiDAR with
# what time is left). Carry [".whl", ".gpu_data/mmdet3d/demo/data"]; see the two scripts.
cd "$(dirname "$0")/.."
start=$(date +%s)
bash bench/gpu_engine.sh
left=$(( ${MEDVIT_GPU_TOTAL_S:-570} - ($(date +%s) - start) ))
echo "== lidar: $left s left"
if [ "$left" -gt 60 ]; then MEDVIT_GPU_LIDAR_S=$((left - 15)) bash bench/gpu_lidar.sh; fi
