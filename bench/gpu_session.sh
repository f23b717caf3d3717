#!/usr/bin/env bash
# One lent-GPU session in two device calls, each under 9 minutes, everything written to $OUT:
#   bash bench/gpu_session.sh a   install; kernel tests at 8 warps; model tests (torch.compile, CUDA
#                                 graph, autocast); pixel-shuffle CUDA tests and bandwidth; the model
#                                 benchmark (bf16: eager, fastdrn, fastdrn in one CUDA graph)
#   bash bench/gpu_session.sh b   install; kernel tests at 4 warps; the RDB and compress_skip
#                                 benchmarks; the model benchmark's torch.compile baselines
# Call a first: it answers the open questions (CUDA tests after the 3xTF32 and config changes,
# whether the training step is bound by host launch costs). The machine is bare each call.
set -u
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
stage=${1:-a}
S=$OUT/setup-$stage.log
{ echo "commit: ${FASTDRN_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"; date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } > $S 2>&1
t0=$(date +%s)
FASTDRN_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout 100 python3 -m pip install --no-build-isolation --no-deps -e . >> $S 2>&1 || echo "INSTALL FAILED rc=$?" | tee -a $S
echo "install: $(( $(date +%s) - t0 )) s" | tee -a $S

# pytest-xdist spreads the tests, and so Triton's first-use compiles, over the 16 cores.
run() { local name=$1 warps=$2 limit=$3; shift 3; local t0=$(date +%s)
  FASTDRN_NUM_WARPS=$warps timeout $limit python3 -m pytest -q -p no:cacheprovider -rf -n ${JOBS:-14} "$@" > $OUT/$name.log 2>&1
  echo "$name (FASTDRN_NUM_WARPS=$warps) rc=$? $(( $(date +%s) - t0 )) s"; grep -E "passed|failed|^FAILED|relative error|Error" $OUT/$name.log | head -12; }
bench() { local name=$1 limit=$2; shift 2; local t0=$(date +%s)
  FASTDRN_AUTOTUNE=0 timeout $limit python3 "$@" --out $OUT/results-$stage.jsonl > $OUT/$name.log 2>&1
  echo "$name rc=$? $(( $(date +%s) - t0 )) s"; tail -3 $OUT/$name.log; }

if [ "$stage" = one ]; then   # everything that fits one call, tests first
  run tests-kernels-w8 8 110 tests/test_compress_skip.py tests/test_residual_distill.py
  run tests-kernels-w4 4 90 tests/test_compress_skip.py tests/test_residual_distill.py
  run tests-model 8 100 tests/test_model.py
  run tests-pixel-shuffle-gpu 4 40 -m gpu tests/test_pixel_shuffle.py
  bench bench-model 100 bench/bench_model.py --quick --no-compile --dtypes bf16 --time-budget 85
elif [ "$stage" = a ]; then
  run tests-kernels-w8 8 150 tests/test_compress_skip.py tests/test_residual_distill.py
  run tests-model 8 110 tests/test_model.py
  run tests-pixel-shuffle-gpu 4 40 -m gpu tests/test_pixel_shuffle.py
  bench bench-pixel-shuffle 40 bench/bench_pixel_shuffle.py --quick --no-compile --time-budget 30
  bench bench-model 110 bench/bench_model.py --quick --no-compile --dtypes bf16 --time-budget 95
else
  run tests-kernels-w4 4 150 tests/test_compress_skip.py tests/test_residual_distill.py
  bench bench-rdb 110 bench/bench_residual_distill.py --quick --time-budget 95
  bench bench-compress 40 bench/bench_compress_skip.py --quick --time-budget 30
  bench bench-model-compile 120 bench/bench_model.py --quick --dtypes bf16 --no-graphs --time-budget 105
fi
python3 bench/report.py $OUT/results-$stage.jsonl --md $OUT/results-$stage.md > /dev/null 2>&1 && tail -20 $OUT/results-$stage.md
