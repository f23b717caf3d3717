"""fastdrn.DRN: the reference DRN's constructor and state_dict, run through the fused ops.

It subclasses fastdrn.reference.DRN, so the modules, parameter names and shapes are the
reference's own (checkpoints move both ways with strict=True); only forward differs: features stay
channels_last, every block and compression runs through fastdrn.ops (fused Triton kernels on a
GPU), pixel shuffle through the extension, and the head, upsample and tail 3x3 convolutions through
cuDNN.
"""
from __future__ import annotations

import torch

from . import backend, ops, reference


class DRN(reference.DRN):
    """Drop-in fast DRN. Keyword-only option: recompute=True saves less for backward (SPEC.md 3)."""

    def __init__(self, *args, recompute: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.recompute = recompute

    @property
    def backend(self) -> str:
        """The backend the fused ops use for this model's device, in words."""
        return backend.describe(self.head.weight.device)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        # Our ops are not autocast-aware: under autocast they run in its dtype (weights cast per
        # call, as autocast casts them for nn.Conv2d), with fp32 accumulation inside the kernels.
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    def forward(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.n_colors:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"DRN expects an (N, {self.n_colors}, H, W) image batch, got {shape}")
        channels_last_in = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        dtype = self._compute_dtype(x)
        mean = self.rgb_mean.to(x.dtype) * self.rgb_range
        x = x.contiguous(memory_format=torch.channels_last)
        y0 = self.head(x - mean).to(dtype).contiguous(memory_format=torch.channels_last)
        y = y0
        for group in self.groups:
            blocks = [tuple(None if t is None else t.to(dtype) for t in (
                blk.squeeze.weight, blk.squeeze.bias, blk.conv.weight, blk.conv.bias, blk.expand.weight,
                blk.expand.bias)) for blk in group.blocks]
            z = ops.distill_group(y, blocks, self.alpha, self.recompute)
            w_c = group.compress.weight.to(dtype)
            b_c = None if group.compress.bias is None else group.compress.bias.to(dtype)
            y = ops.compress_skip(z, w_c, b_c, y, self.alpha)
        y = self.upsample(y + y0)
        y = ops.pixel_shuffle(y, self.scale)
        out = self.tail(y) + mean
        return out if channels_last_in else out.contiguous()
