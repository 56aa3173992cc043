#!/usr/bin/env bash
# Download, here, the pure-Python wheels the GPU machine's image lacks (it has torch, einops,
# typer, tqdm, safetensors, scipy, pyyaml but not monai, pydantic or nibabel) into .whl/,
# which bench/gpu_engine.sh installs there. .whl/ is kept out of git.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d .whl "$@"; }
get monai==1.6.1 nibabel pydantic pydantic-core annotated-types typing-inspection
ls -la .whl
