"""fastdrn's Triton kernels, installed as the package `fastdrn.kernels`.

Each fused op has one file: its kernels, then the launcher (checks, allocation, grid), then the
registered torch.library op and its autograd, then the public function. `registry` lists every
kernel and the configurations it can launch with, for the ahead-of-time compile check.
"""
