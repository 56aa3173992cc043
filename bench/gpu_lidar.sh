#!/usr/bin/env bash
# The LiDAR benchmark on one GPU (H100/H200), prepared to fit one 10-minute device run.
# Here, first: bash bench/fetch_gpu_wheels.sh (monai, pydantic, nibabel wheels into .whl/),
# and make the real scans reachable without copying them into the repository:
#   ln -s ../shared/data .gpu_data && echo /.gpu_data >> .git/info/exclude
# then run on the device machine with carry [".whl", ".gpu_data/mmdet3d/demo/data"]:
#   bash bench/gpu_lidar.sh
# On CUDA the sparse convs run through spconv where it imports (carry spconv-cu126 and
# cumm-cu126 wheels in .whl/ for that), else through our plain-torch kernels.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 560 python3 -m pipelines.cli bench lidar --device cuda --data .gpu_data --json "$out/gpu_lidar.json" \
  || echo "bench lidar failed or timed out"
