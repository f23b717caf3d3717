#!/usr/bin/env bash
# Reproduce the shipped weights fastdrn/weights/drn-x{2,3,4}.pt (docs/weights.md): photographs,
# x4 from scratch, then x2 and x3 from the x4 weights, fp16 export, evaluation on the held-out photographs.
#
#   bash training/train_shipped.sh WORKDIR      # from the repository root; needs scikit-image
#
# CPU settings: one thread (on the shared 2-core machine they were trained on, one thread ran the
# step faster than two), PyTorch's math (TRITON_INTERPRET must not be set: the interpreter is for
# testing kernels, far too slow to train). On a GPU, drop OMP_NUM_THREADS and --device cpu.
set -euo pipefail
work=${1:?usage: bash training/train_shipped.sh WORKDIR}
repo=$(cd "$(dirname "$0")/.." && pwd)
unset TRITON_INTERPRET
export OMP_NUM_THREADS=1 PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
fastdrn() { python3 -m fastdrn "$@"; }       # this checkout's fastdrn, installed or not
mkdir -p "$work"
cd "$work"

python3 "$repo/training/photos.py" photos        # photos/train (12), photos/heldout (3)

model=(--n-feats 32 --n-groups 2 --n-blocks 4 --inner 32 --distill 8)
recipe=(--patch-size 32 --batch-size 16 --lr 1e-3 --seed 0 --device cpu --log-interval 60)

# x4 from scratch, lr halved every 800 steps. Its EMA (decay 0.999) still holds 0.999^2400 = 9% of
# the random initialisation at the end, so the raw weights (--key model) are shipped.
fastdrn train --hr-dir photos/train --scale 4 --out runs/x4 --steps 2400 --iters-per-epoch 200 --lr-step 4 \
    --ema 0.999 "${model[@]}" "${recipe[@]}"
fastdrn export --weights runs/x4/last.pt --key model --dtype fp16 -o drn-x4.pt

# x2 and x3 from the x4 weights (all but the upsampling convolution), lr halved every 1000 steps;
# their EMA weights (decay 0.995) are shipped.
for s in 2 3; do
    fastdrn train --hr-dir photos/train --scale $s --out runs/x$s --steps 3000 --iters-per-epoch 250 --lr-step 4 \
        --ema 0.995 --init drn-x4.pt "${model[@]}" "${recipe[@]}"
    fastdrn export --weights runs/x$s/last.pt --key params_ema --dtype fp16 -o drn-x$s.pt
done

for s in 2 3 4; do
    fastdrn eval --weights drn-x$s.pt --hr-dir photos/heldout --device cpu --json eval-x$s.json
done
echo "to ship them: cp drn-x2.pt drn-x3.pt drn-x4.pt $repo/fastdrn/weights/"
