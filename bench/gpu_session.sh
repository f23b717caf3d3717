#!/usr/bin/env bash
# Device session 2: install, the kernel tests at 8 and 4 warps, the model and pixel-shuffle CUDA tests.
set -u
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
S=$OUT/setup.log
{ echo "commit: ${FASTDRN_COMMIT:-unknown}"; date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv;
  python3 -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } > $S 2>&1
t0=$(date +%s)
FASTDRN_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout 100 python3 -m pip install --no-build-isolation --no-deps -e . >> $S 2>&1 || echo "INSTALL FAILED rc=$?" | tee -a $S
echo "install: $(( $(date +%s) - t0 )) s" | tee -a $S
run() { local name=$1 warps=$2 limit=$3; shift 3; local t0=$(date +%s)
  FASTDRN_NUM_WARPS=$warps timeout $limit python3 -m pytest -q -p no:cacheprovider -rf "$@" > $OUT/$name.log 2>&1
  echo "$name (FASTDRN_NUM_WARPS=$warps) rc=$? $(( $(date +%s) - t0 )) s"; grep -E "passed|failed|^FAILED|relative error|Error" $OUT/$name.log | head -12; }
run tests_kernels_w8 8 90 tests/test_compress_skip.py tests/test_residual_distill.py
run tests_kernels_w4 4 90 tests/test_compress_skip.py tests/test_residual_distill.py
run tests_model_w4 4 90 tests/test_model.py
run tests_pixel_shuffle_gpu 4 45 -m gpu tests/test_pixel_shuffle.py
