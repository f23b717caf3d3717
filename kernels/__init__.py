"""fastdrn's Triton kernels, installed as the package `fastdrn.kernels`.

Each fused op has one file: its kernels, then the launcher (checks, allocation, grid), then the
registered torch.library op and its autograd, then the public function. `registry` lists every
kernel and the configurations it can launch with, for the ahead-of-time compile check.

set_launch_options(num_warps=..., autotune=..., weight_grad_blocks=..., fold_backward=...,
fuse_tail=...) sets at run time what FASTDRN_NUM_WARPS, FASTDRN_AUTOTUNE, FASTDRN_WEIGHT_GRAD_BLOCKS,
FASTDRN_FOLD_BACKWARD and FASTDRN_FUSE_TAIL set at the first launch (those it names; the others keep
their values), and set_launch_plans(enabled) what FASTDRN_LAUNCH_PLANS sets (docs/launch-path.md).
"""
from .settings import set_launch_options, set_launch_plans  # neither imports Triton nor the kernels

__all__ = ["set_launch_options", "set_launch_plans"]
