#!/usr/bin/env bash
# The engine benchmark on one GPU (H100/H200), prepared to fit one 10-minute device run.
# Here, first: bash bench/fetch_gpu_wheels.sh (monai, pydantic, nibabel, laspy wheels into .whl/);
# then on the device machine, with carry [".whl"]: bash bench/gpu_engine.sh
# Prints ours and MONAI side by side for the issue's H200 case: input 1x1x512x512x256, roi 96^3,
# sw_batch 4, Gaussian weights, 14 classes, overlap 0.5, bf16 autocast; MONAI with its stitched
# output on the GPU and on the CPU; ours plain, then with model speed-ups (SDPA attention, then
# torch.compile), each timed on one batch and checked against the unmodified net in fp32: a step
# counts only when its error is within bf16's own (see pipelines/bench/engine.py, within_bf16_tolerance).
# Channels-last is left out: it made SwinUNETR slower on a GPU (docs/benchmarks.md).
# MEDVIT_GPU_SMALL=1 runs the same steps on a small case on the CPU (a dry run).
# Per-job time limits: MEDVIT_GPU_SWIN_S, MEDVIT_GPU_UNETR_S, MEDVIT_GPU_COMPILE_S (0 skips a job).
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
shape=512,512,256; model_swin=swin_unetr; model_unetr=unetr; dev=cuda; amp=--amp; where=both; sweep=8,16; cbatch=8
if [ "${MEDVIT_GPU_SMALL:-0}" = 1 ]; then shape=100,120,90; model_swin=small; model_unetr=small; dev=cpu; where=cpu; sweep=8; cbatch=2; fi
cbatch=${MEDVIT_GPU_COMPILE_BATCH:-$cbatch}
run() {  # model, speed-ups, seconds allowed (0: skip this job), json name, windows a pass, extra options
  [ "$3" -gt 0 ] || { echo "engine bench $4: skipped (0 s allowed)"; return 0; }
  timeout "$3" python3 -m pipelines.cli bench engine --model "$1" --shape "$shape" --classes 14 --overlap 0.5 \
    --batch "$5" --our-batch "$5" --device "$dev" $amp --output-device "$where" --speedups "$2" --json "$out/$4.json" "${@:6}" \
    || echo "engine bench $4: failed or timed out after $3 s"
}
# ours and MONAI (output on the GPU, then on the CPU); ours again with SDPA, at the batch size
# (4, 8 or 16 windows a pass) that ran fastest per window
run "$model_swin" sdpa "${MEDVIT_GPU_SWIN_S:-200}" gpu_engine_swin_unetr 4 --batch-sweep "$sweep"
run "$model_unetr" sdpa "${MEDVIT_GPU_UNETR_S:-120}" gpu_engine_unetr 4 --batch-sweep "$sweep"
# torch.compile on top, ours only, with our fp32 run as the labels' reference: compiling takes
# minutes, so it runs apart and last, at one batch size (MEDVIT_GPU_COMPILE_BATCH, default 8, the
# faster per window of 4 and 8 on the GPU); the engine fills its last batch, so the net is compiled once
run "$model_swin" sdpa,compile "${MEDVIT_GPU_COMPILE_S:-240}" gpu_engine_swin_unetr_compile "$cbatch" \
  --no-peer --fp32-reference
