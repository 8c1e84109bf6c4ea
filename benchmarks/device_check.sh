#!/usr/bin/env bash
# Everything a GPU session checks, as one command for the device tool (a session has 15
# minutes of device time, the machine's start included): the test suite with CuPy, the
# CUDA bench with PyTorch eager alternated in the same process, a tiny fine-tune on the GPU,
# all written by benchmarks/gpu_report.py to <gpu-name>.json in $OUT (else benchmarks/results).
#
# Here, first: the device machine gets the repository but not ../shared, so copy the data
# into .device/ (git-ignored) and carry it:
#     bash benchmarks/device_check.sh --prepare
# Then, on the device (its python3 has CuPy, PyTorch, pytest: nothing is installed):
#     run(command="bash benchmarks/device_check.sh", carry=[".device"], timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prepare" ]; then
    rm -rf .device/data && mkdir -p .device
    cp -r "${MINILORA_SHARED_DATA:-../shared/data}" .device/data
    du -sh .device/data
    exit 0
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHON=python3
export MINILORA_SHARED_DATA="$PWD/.device/data" MINILORA_HOME="${MINILORA_HOME:-/tmp/minilora-home}"
bash .ci/seed-cache
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import cupy, torch; print('cupy', cupy.__version__, 'torch', torch.__version__, torch.cuda.is_available())"
python3 -m minilora gradcheck --device cuda || true  # printed, and the suite's GPU tests check it too
python3 benchmarks/gpu_report.py --out "${OUT:-benchmarks/results}"
