#!/usr/bin/env bash
# The LiDAR benchmark on one GPU (H100/H200), prepared to fit one 10-minute device run.
# Here, first: bash bench/fetch_gpu_wheels.sh --spconv (wheels, and spconv-cu126 with its runtime
# unpacked into .whl/spconv-site.tar.xz), and make the real scans reachable without copying them:
#   ln -s ../shared/data .gpu_data && echo /.gpu_data >> .git/info/exclude
# then on the device machine, with carry [".whl", ".gpu_data/mmdet3d/demo/data"]: bash bench/gpu_lidar.sh
# On CUDA the sparse convs run through spconv where it imports, else through our torch kernels.
# The JSON is rewritten after every measurement, so a run cut short keeps what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
dev=cuda; sizes=${MEDVIT_GPU_LIDAR_SIZES:-1000000,4000000,10000000}
if [ "${MEDVIT_GPU_SMALL:-0}" = 1 ]; then dev=cpu; sizes=200000; fi
python3 -c "from pointcloud.sparse.spconv_compat import spconv_available as a; print('spconv imports:', a())"
timeout "${MEDVIT_GPU_LIDAR_S:-560}" python3 -m pipelines.cli bench lidar --device "$dev" --data .gpu_data --sizes "$sizes" \
  --json "$out/gpu_lidar.json" || echo "bench lidar failed or timed out (the JSON holds what finished)"
