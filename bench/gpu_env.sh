# Sourced by the bench/gpu_*.sh scripts: installs what .whl/ carries (bench/fetch_gpu_wheels.sh)
# into /tmp/site, sets PYTHONPATH and prints the machine.
if [ "${MEDVIT_GPU_SMALL:-0}" = 1 ]; then
  export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD  # a dry run here: use this machine's environment
elif [ -d /tmp/site/monai ]; then
  export PYTHONPATH=/tmp/site:$PWD  # installed by an earlier script of this run
elif [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  if [ -f .whl/spconv-site.tar.xz ]; then tar -xJf .whl/spconv-site.tar.xz -C /tmp/site || exit 1; fi
  # bytecode once for every worker process: where PYTHONDONTWRITEBYTECODE is set (it is on the
  # CPU box) each process would compile the carried packages again at import
  python3 -m compileall -q -j 0 /tmp/site medvit pointcloud pipelines >/dev/null || true
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
