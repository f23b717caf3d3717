#!/usr/bin/env bash
# A lent-GPU session in two device calls of about 5 minutes each, everything written to $OUT:
#   bash bench/gpu_session.sh one   install; launch-plan tests (plans off for the rest if they fail);
#                                   kernel tests at 8 and 4 warps;
#                                   model, CUDA-graph and torch.compile tests; pixel-shuffle tests;
#                                   the model benchmark without torch.compile (eager, eager in one
#                                   CUDA graph, fastdrn, fastdrn in one CUDA graph); per-kernel profile
#   bash bench/gpu_session.sh two   install; the RDB benchmark, compress_skip; the autotune sweep
#                                   (which config each kernel's autotuner picks); the model
#                                   benchmark's torch.compile rows
#                                   (default and reduce-overhead); Nsight Compute on one block
#   bash bench/gpu_session.sh smoke the CPU rehearsal (CI runs it through tests/test_bench_smoke.py):
#                                   no install, one small test file, every benchmark and the profile
#                                   at --smoke sizes through Triton's interpreter; OUT defaults to a
#                                   temporary folder. Its numbers are not timings.
# The machine is bare each call and its copy of the tree has no .git: before the call, run
#   git rev-parse HEAD > bench/.commit
# here and name bench/.commit in the call's carry (it is git-ignored). pytest spreads the tests over
# the cores (pytest-xdist), so Triton's first-use compiles run in parallel.
set -u
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
stage=${1:-one}
[ "$stage" = smoke ] && : "${OUT:=$(mktemp -d)}" && export JOBS=0
mkdir -p "$OUT"
commit=${FASTDRN_COMMIT:-$(cat bench/.commit 2>/dev/null || git rev-parse HEAD 2>/dev/null || echo unknown)}
export BENCH_GIT_COMMIT=$commit
S=$OUT/setup-$stage.log
{ echo "commit: $commit"; date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } > $S 2>&1
if [ "$stage" != smoke ]; then
  t0=$(date +%s)
  FASTDRN_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout 100 python3 -m pip install --no-build-isolation --no-deps -e . >> $S 2>&1 || echo "INSTALL FAILED rc=$?" | tee -a $S
  echo "install: $(( $(date +%s) - t0 )) s" | tee -a $S
fi

run() { local name=$1 warps=$2 limit=$3; shift 3; local t0=$(date +%s)
  local jobs=${JOBS:-14}; [ "$jobs" = 0 ] && jobs="" || jobs="-n $jobs"  # JOBS=0: no pytest-xdist
  FASTDRN_NUM_WARPS=$warps timeout $limit python3 -m pytest -q -p no:cacheprovider -rf $jobs "$@" > $OUT/$name.log 2>&1
  echo "$name (FASTDRN_NUM_WARPS=$warps) rc=$? $(( $(date +%s) - t0 )) s"; grep -E "passed|failed|^FAILED|relative error|Error" $OUT/$name.log | head -12; }
bench() { local name=$1 limit=$2; shift 2; local t0=$(date +%s)
  FASTDRN_AUTOTUNE=0 timeout $limit python3 "$@" --out $OUT/results-$stage.jsonl > $OUT/$name.log 2>&1
  echo "$name rc=$? $(( $(date +%s) - t0 )) s"; tail -3 $OUT/$name.log; }

kernel_tests="tests/test_compress_skip.py tests/test_residual_distill.py tests/test_hardening.py"
if [ "$stage" = one ]; then
  # Launch plans (kernels/plans.py) first: if their replays differ from the launchers here, the rest of
  # the stage runs with them off, so the kernels are still tested and timed.
  run tests-plans 8 60 tests/test_plans.py
  if ! grep -qE "[0-9]+ passed" $OUT/tests-plans.log || grep -qE "[0-9]+ (failed|error)" $OUT/tests-plans.log; then
    export FASTDRN_LAUNCH_PLANS=0; echo "FASTDRN_LAUNCH_PLANS=0 for the rest of this stage: tests/test_plans.py did not pass"
  fi
  run tests-kernels-w8 8 110 $kernel_tests
  run tests-kernels-w4 4 90 $kernel_tests
  run tests-model 8 150 tests/test_model.py tests/test_graphs.py tests/test_compile.py
  run tests-pixel-shuffle-gpu 4 40 -m gpu tests/test_pixel_shuffle.py
  bench bench-model 90 bench/bench_model.py --quick --no-compile --dtypes bf16 --time-budget 80
  t0=$(date +%s); FASTDRN_AUTOTUNE=0 timeout 90 python3 bench/profile_kernels.py $OUT > $OUT/profile.log 2>&1
  echo "profile rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^== " $OUT/profile.log
elif [ "$stage" = two ]; then
  bench bench-rdb 110 bench/bench_residual_distill.py --quick --time-budget 100
  bench bench-compress 30 bench/bench_compress_skip.py --quick --time-budget 25
  t0=$(date +%s); timeout 100 python3 bench/autotune_sweep.py --out $OUT/autotune.jsonl --time-budget 80 > $OUT/autotune.log 2>&1
  echo "autotune sweep rc=$? $(( $(date +%s) - t0 )) s"; grep -c "not the default" $OUT/autotune.log
  bench bench-model-compile 150 bench/bench_model.py --quick --dtypes bf16 --no-graphs --time-budget 140
  t0=$(date +%s)
  FASTDRN_AUTOTUNE=0 timeout 50 ncu --kernel-name regex:'conv3x3|weight_grad|sum_partials' --launch-skip 10 --launch-count 5 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
    python3 bench/ncu_block.py > $OUT/ncu-16x48x48.txt 2>&1
  echo "ncu rc=$? $(( $(date +%s) - t0 )) s"
elif [ "$stage" = smoke ]; then
  run tests-backend 4 120 tests/test_backend.py
  bench bench-model 300 bench/bench_model.py --smoke
  bench bench-rdb 300 bench/bench_residual_distill.py --smoke
  t0=$(date +%s); timeout 120 python3 bench/autotune_sweep.py --smoke --out $OUT/autotune.jsonl > $OUT/autotune.log 2>&1
  echo "autotune sweep rc=$? $(( $(date +%s) - t0 )) s"
  t0=$(date +%s); timeout 300 python3 bench/profile_kernels.py $OUT --smoke > $OUT/profile.log 2>&1
  echo "profile rc=$? $(( $(date +%s) - t0 )) s"; grep -E "^== " $OUT/profile.log
else
  echo "unknown stage $stage (one, two or smoke)"; exit 2
fi
python3 bench/report.py $OUT/results-$stage.jsonl --md $OUT/results-$stage.md > /dev/null 2>&1 && tail -20 $OUT/results-$stage.md
# A device call returns at most 8 files: the logs travel as one archive.
[ "$stage" != smoke ] && (cd $OUT && tar czf logs-$stage.tar.gz *.log && rm -f *.log)
exit 0
