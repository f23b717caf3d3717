# One short device call after a fix: install, the kernel tests at 8 warps, the model benchmark
# without torch.compile, the RDB benchmark.
FASTDRN_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout 100 python3 -m pip install --no-build-isolation --no-deps -e . > $OUT/install.log 2>&1; echo install rc=$?
export BENCH_GIT_COMMIT=$(cat bench/.commit) FASTDRN_AUTOTUNE=0
FASTDRN_NUM_WARPS=8 timeout 75 python3 -m pytest -q -p no:cacheprovider -rf -n 14 tests/test_residual_distill.py tests/test_hardening.py > $OUT/tests-kernels-w8.log 2>&1
echo "tests rc=$?"; grep -E "passed|failed|^FAILED" $OUT/tests-kernels-w8.log | head
timeout 60 python3 bench/bench_model.py --quick --no-compile --dtypes bf16 --time-budget 50 --out $OUT/results.jsonl > $OUT/bench-model.log 2>&1; echo "model rc=$?"
timeout 80 python3 bench/bench_residual_distill.py --quick --time-budget 70 --out $OUT/results.jsonl > $OUT/bench-rdb.log 2>&1; echo "rdb rc=$?"
python3 bench/report.py $OUT/results.jsonl --md $OUT/results.md > /dev/null 2>&1; tail -25 $OUT/results.md
