# One device call: install, then bench/gpu_debug.py's matrix, and compute-sanitizer on one case.
FASTDRN_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout 100 python3 -m pip install --no-build-isolation --no-deps -e . > $OUT/install.log 2>&1; echo install rc=$?
CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer); echo "sanitizer: $CS"
if [ -x "$CS" ]; then CUDA_LAUNCH_BLOCKING=1 FASTDRN_AUTOTUNE=0 timeout 150 $CS --print-limit 5 python3 bench/gpu_debug.py --child splits0 float32 1 > $OUT/sanitizer.log 2>&1 & fi
for warps in 4 8; do FASTDRN_NUM_WARPS=$warps timeout 120 python3 bench/gpu_debug.py $OUT --jobs 13; done
wait; tail -c 3000 $OUT/sanitizer.log 2>/dev/null
