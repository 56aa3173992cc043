#!/usr/bin/env bash
# The engine benchmark on one GPU (H100/H200), prepared to fit one 10-minute device run:
#   run bash bench/fetch_gpu_wheels.sh here first, then on the device machine, with carry [".whl"]:
#   bash bench/gpu_engine.sh
# Prints ours and MONAI side by side for the issue's H200 case: input 1x1x512x512x256,
# roi 96^3, sw_batch 4, Gaussian weights, 14 classes, overlap 0.5, bf16 autocast;
# SwinUNETR (feature 48) and UNETR, stitched output on the GPU and on the CPU.
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
for model in swin_unetr unetr; do
  for where in cuda cpu; do
    timeout 200 python3 -c "
import json, sys
from pipelines.bench_engine import Case, compare, format_result, machine
case = Case(model='$model', shape=(512, 512, 256), classes=14, overlap=0.5, batch=4, our_batch=4,
            device='cuda', amp=True, output_device='$where')
res = compare(case); res['machine'] = machine()
print('machine:', res['machine']); print('MONAI output on: $where'); print(format_result(res))
json.dump(res, open('$out/gpu_${model}_${where}.json', 'w'), indent=1)
" || echo "$model/$where: failed or timed out"
  done
done
