#!/usr/bin/env bash
# DDP training on two GPUs, prepared for the day a machine with at least two is lent (the device
# machines here have one). Here, first: bash bench/fetch_gpu_wheels.sh; then on the device machine,
# with carry [".whl"]: bash bench/gpu_ddp.sh
# A tiny UNETR on synthetic phantoms, trained three ways: one process of batch 4, torchrun with two
# processes (NCCL, cuda:0 and cuda:1) of batch 2 each (the same global batch: the losses should
# agree to the GPU kernels' nondeterminism), and the two-process run resumed for a third epoch.
# Prints every run's metrics.jsonl (loss, seconds, validation Dice per epoch) and copies them to $OUT.
# MEDVIT_GPU_SMALL=1 runs the same on this machine's CPU (gloo).
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
dev=cuda
if [ "${MEDVIT_GPU_SMALL:-0}" = 1 ]; then
  dev=cpu; export OMP_NUM_THREADS=1
elif [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -lt 2 ]; then
  echo "gpu_ddp: this machine has fewer than two GPUs; nothing to do"; exit 0
fi
work=$(mktemp -d)
python3 - "$work" <<'PY' || exit 1
import sys
from pathlib import Path
from tests.helpers import tiny_config, write_tiny_set
w = Path(sys.argv[1])
dl = write_tiny_set(w, n_train=8, n_val=2, n_test=0)
for name, batch in (("one", 4), ("two", 2)):
    tiny_config(w, dl, out=name, epochs=2, batch_size=batch, lr=1e-3, warmup_epochs=0)
PY
train() {  # number of processes, config, more options
  timeout 200 python3 -m torch.distributed.run --standalone --nproc_per_node="$1" -m pipelines.cli train "$2" \
    --device "$dev" --no-progress "${@:3}" || echo "gpu_ddp: train $2 on $1 process(es) failed"
}
train 1 "$work/one.yaml"
train 2 "$work/two.yaml"
python3 -c "import sys, yaml; p = sys.argv[1]; c = yaml.safe_load(open(p)); c['train']['epochs'] = 3; yaml.safe_dump(c, open(p, 'w'))" \
  "$work/two.yaml"
train 2 "$work/two.yaml" --resume
for name in one two; do
  echo "== $name"; cat "$work/$name/metrics.jsonl" 2>/dev/null
  cp "$work/$name/metrics.jsonl" "${OUT:-/tmp}/ddp_$name.jsonl" 2>/dev/null
done
