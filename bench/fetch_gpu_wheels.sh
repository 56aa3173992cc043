#!/usr/bin/env bash
# Download, here, the wheels the GPU machine's image lacks (it has torch, einops, typer, tqdm,
# safetensors, scipy, pyyaml but not monai, pydantic, nibabel or laspy) into .whl/, which
# bench/gpu_engine.sh and bench/gpu_lidar.sh install there; with --spconv also spconv-cu126
# and its runtime (about 40 MB). .whl/ is kept out of git.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d .whl "$@"; }
get monai==1.6.1 nibabel pydantic pydantic-core annotated-types typing-inspection typing-extensions laspy
if [ "${1:-}" = "--spconv" ]; then
  # 100 MB of wheels: too much for the 64 MiB that travels, so they go unpacked into one tar.xz
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d "$tmp" spconv-cu126==2.3.8 cumm-cu126 pccm ccimport lark fire termcolor
  for w in "$tmp"/*.whl; do python3 -m zipfile -e "$w" "$tmp/site"; done
  tar -cJf .whl/spconv-site.tar.xz -C "$tmp/site" .
  rm -rf "$tmp"
fi
ls -la .whl
