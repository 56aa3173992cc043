#!/usr/bin/env bash
# Sets up .venv for medvit: system libraries (when root), torch first from the pin, then the
# project with its extras. Idempotent; `make` reruns it only when its inputs change.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# open3d imports only with libusb; headless rendering wants a Vulkan driver (it aborts
# the process without one). Installed here when we may; named in the README otherwise.
# dicom3tools gives dciodvfy, the validator the DICOM SEG/RTSTRUCT tests run.
apt_pkgs=(libusb-1.0-0 libvulkan1 mesa-vulkan-drivers dicom3tools)
missing=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing system packages: ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: warning: missing system packages ${missing[*]} (open3d needs the first three; dciodvfy comes from dicom3tools); install them with apt" >&2
  fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip

# Torch goes in first and pinned: an open range would let pip take a multi-GB CUDA build.
# MEDVIT_TORCH_SPEC replaces the pin (for example a CUDA build on a GPU workstation,
# with PIP_EXTRA_INDEX_URL pointing at its index).
cons=$(mktemp)
trap 'rm -f "$cons"' EXIT
if [ -n "${MEDVIT_TORCH_SPEC:-}" ]; then
  echo "$MEDVIT_TORCH_SPEC" > "$cons"
else
  grep -v '^#' constraints.txt > "$cons"
fi
.venv/bin/python -m pip install -q -c "$cons" "$(head -n1 "$cons")"
.venv/bin/python -m pip install -q -c "$cons" -e ".[all]"
# rt-utils (RTSTRUCT) without its requirements: they name the GUI opencv-python, and the
# project depends on opencv-python-headless, which provides the same cv2.
.venv/bin/python -m pip install -q --no-deps "rt-utils==1.2.7"
.venv/bin/python -c "import torch, monai, medvit, pipelines; print('setup: torch', torch.__version__, '| monai', monai.__version__)"
touch .venv/.installed
