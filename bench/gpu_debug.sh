# One device call: install, then bench/gpu_debug.py's matrix, and compute-sanitizer on one case.
FASTDRN_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout 100 python3 -m pip install --no-build-isolation --no-deps -e . > $OUT/install.log 2>&1; echo install rc=$?
CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer); echo "sanitizer: $CS"
if [ -x "$CS" ]; then CUDA_LAUNCH_BLOCKING=1 FASTDRN_AUTOTUNE=0 timeout 150 $CS --print-limit 5 python3 bench/gpu_debug.py --child case1 bfloat16 0 > $OUT/sanitizer.log 2>&1 & fi
FASTDRN_NUM_WARPS=4 timeout 200 python3 bench/gpu_debug.py $OUT --jobs 13
wait; tail -c 3000 $OUT/sanitizer.log 2>/dev/null
