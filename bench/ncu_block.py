"""A residual distilling block's forward and backward, a few times, for Nsight Compute to read.

    ncu --kernel-name regex:'conv3x3|weight_grad|sum_partials|conv1x1' --launch-skip 8 --launch-count 8 \
        python bench/ncu_block.py [N H W D F]

bf16, channels_last, FASTDRN_AUTOTUNE as set by the caller. The first calls compile; ncu's
--launch-skip passes over them.
"""
import sys

import torch

from fastdrn import ops

n, h, w, d_in, inner = (int(v) for v in (sys.argv[1:6] if len(sys.argv) > 5 else (16, 48, 48, 64, 64)))
distill = 8
dev, dt = torch.device("cuda"), torch.bfloat16
torch.manual_seed(0)
z = torch.randn(n, d_in, h, w, device=dev, dtype=dt).contiguous(memory_format=torch.channels_last).requires_grad_()
weights = [(torch.randn(s, device=dev, dtype=dt) * 0.1).requires_grad_() for s in
           ((inner, d_in, 1, 1), (inner,), (inner, inner, 3, 3), (inner,), (d_in + distill, inner, 1, 1),
            (d_in + distill,))]
dy = torch.randn(n, d_in + distill, h, w, device=dev, dtype=dt).contiguous(memory_format=torch.channels_last)
for _ in range(4):
    out = ops.residual_distill(z, *weights, alpha=0.2)
    torch.autograd.backward(out, dy, inputs=[z, *weights])
torch.cuda.synchronize()
