"""Plain PyTorch DRN (Sun, Lu, Wang, Bai, ICME 2019): the oracle every test and benchmark uses.

Nothing clever lives here: nn.Conv2d, F.elu, F.pixel_shuffle, exactly as docs/architecture.md
describes. The fused ops in fastdrn.ops must agree with `residual_distill` and
`compress_skip` below; fastdrn.DRN must agree with `DRN`.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)


def residual_distill(z, w_squeeze, b_squeeze, w_conv, b_conv, w_expand, b_expand, alpha=0.2):
    """One residual distilling block: (N, D, H, W) -> (N, D + d, H, W)."""
    a = F.elu(F.conv2d(z, w_squeeze, b_squeeze), alpha)
    b = F.elu(F.conv2d(a, w_conv, b_conv, padding=1), alpha)
    c = F.conv2d(b, w_expand, b_expand)
    d_in = z.shape[1]
    return torch.cat([z + c[:, :d_in], c[:, d_in:]], dim=1)


def compress_skip(z, w, b, skip, alpha=0.2):
    """A group's compression and long skip: ELU(conv1x1(z, w, b)) + skip."""
    return F.elu(F.conv2d(z, w, b), alpha) + skip


def pixel_shuffle(x, upscale_factor):
    return F.pixel_shuffle(x, upscale_factor)


def pixel_shuffle_bias(x, bias, upscale_factor):
    """The conv's bias added to its (N, C*s*s, H, W) output, then the pixel shuffle."""
    return F.pixel_shuffle(x + bias.view(1, -1, 1, 1), upscale_factor)


def shuffle_tail(u, b_up, w_tail, b_tail, mean, upscale_factor):
    """DRN's output stage after the upsampler conv (u, without its bias b_up): the pixel shuffle,
    then the tail conv, plus the rgb mean."""
    return F.conv2d(pixel_shuffle_bias(u, b_up, upscale_factor), w_tail, b_tail, padding=1) + mean


class ResidualDistillBlock(nn.Module):
    def __init__(self, in_channels: int, inner: int, distill: int, alpha: float):
        super().__init__()
        self.alpha = alpha
        self.squeeze = nn.Conv2d(in_channels, inner, 1)
        self.conv = nn.Conv2d(inner, inner, 3, padding=1)
        self.expand = nn.Conv2d(inner, in_channels + distill, 1)

    def forward(self, z):
        return residual_distill(z, self.squeeze.weight, self.squeeze.bias, self.conv.weight,
                                self.conv.bias, self.expand.weight, self.expand.bias, self.alpha)


class ResidualDistillGroup(nn.Module):
    def __init__(self, n_feats: int, n_blocks: int, inner: int, distill: int, alpha: float):
        super().__init__()
        self.alpha = alpha
        self.blocks = nn.ModuleList(
            ResidualDistillBlock(n_feats + k * distill, inner, distill, alpha) for k in range(n_blocks)
        )
        self.compress = nn.Conv2d(n_feats + n_blocks * distill, n_feats, 1)

    def forward(self, y):
        z = y
        for block in self.blocks:
            z = block(z)
        return compress_skip(z, self.compress.weight, self.compress.bias, y, self.alpha)


def check_config(scale, n_colors, n_feats, n_groups, n_blocks, inner, distill, alpha, rgb_range):
    """Constructor arguments shared by the reference and the fused model, checked in one place."""
    ints = dict(scale=scale, n_colors=n_colors, n_feats=n_feats, n_groups=n_groups,
                n_blocks=n_blocks, inner=inner, distill=distill)
    for name, value in ints.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"DRN: {name} must be an int, got {value!r}")
    if scale < 2:
        raise ValueError(f"DRN: scale must be an integer >= 2, got {scale}")
    for name in ("n_colors", "n_feats", "n_groups", "inner", "distill"):
        if ints[name] < 1:
            raise ValueError(f"DRN: {name} must be >= 1, got {ints[name]}")
    if n_blocks < 0:
        raise ValueError(f"DRN: n_blocks must be >= 0, got {n_blocks}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"DRN: alpha must be a real number, got {type(alpha).__name__} {alpha!r}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"DRN: alpha must be finite and > 0, got {alpha}")
    if isinstance(rgb_range, bool) or not isinstance(rgb_range, numbers.Real):
        raise TypeError(f"DRN: rgb_range must be a real number, got {type(rgb_range).__name__} {rgb_range!r}")
    if not (math.isfinite(rgb_range) and rgb_range > 0):      # inf: every pixel NaN after the divide
        raise ValueError(f"DRN: rgb_range must be finite and > 0, got {rgb_range}")


def _rgb_mean(rgb_mean, n_colors) -> torch.Tensor:
    """rgb_mean as a float32 CPU tensor of n_colors finite values (a copy: never the caller's tensor;
    on the CPU, where its values can be checked, also under a `with torch.device("meta")`)."""
    mean = None
    if isinstance(rgb_mean, torch.Tensor):
        mean = rgb_mean.detach().to("cpu", torch.float32, copy=True)
    elif not isinstance(rgb_mean, (str, bytes)):
        try:
            mean = torch.tensor(rgb_mean, dtype=torch.float32, device="cpu")
        except (TypeError, ValueError, RuntimeError):    # strings, None, ragged lists
            pass
    if mean is None or mean.dim() != 1:
        raise TypeError(f"DRN: rgb_mean must be a sequence of n_colors numbers, got {rgb_mean!r}")
    if len(mean) != n_colors:
        raise ValueError(f"DRN: rgb_mean has {len(mean)} values for n_colors={n_colors}")
    if not bool(torch.isfinite(mean).all()):      # NaN or inf: every output pixel NaN
        raise ValueError(f"DRN: rgb_mean must be finite, got {tuple(rgb_mean)}")
    return mean


class DRN(nn.Module):
    """Distilling with Residual Network, as docs/architecture.md describes it, state_dict names included."""

    def __init__(self, scale: int = 4, n_colors: int = 3, n_feats: int = 64, n_groups: int = 6,
                 n_blocks: int = 9, inner: int = 64, distill: int = 8, alpha: float = 0.2,
                 rgb_mean=DIV2K_RGB_MEAN, rgb_range: float = 1.0):
        super().__init__()
        check_config(scale, n_colors, n_feats, n_groups, n_blocks, inner, distill, alpha, rgb_range)
        mean = _rgb_mean(rgb_mean, n_colors)
        self.scale = scale
        self.n_colors = n_colors
        self.alpha = alpha
        self.rgb_range = rgb_range
        self.register_buffer("rgb_mean", mean.view(1, n_colors, 1, 1).to(torch.get_default_device()))
        self.head = nn.Conv2d(n_colors, n_feats, 3, padding=1)
        self.groups = nn.ModuleList(
            ResidualDistillGroup(n_feats, n_blocks, inner, distill, alpha) for _ in range(n_groups)
        )
        self.upsample = nn.Conv2d(n_feats, n_feats * scale * scale, 3, padding=1)
        self.tail = nn.Conv2d(n_feats, n_colors, 3, padding=1)

    def forward(self, x):
        mean = self.rgb_mean.to(x.dtype) * self.rgb_range
        y0 = self.head(x - mean)
        y = y0
        for group in self.groups:
            y = group(y)
        y = pixel_shuffle(self.upsample(y + y0), self.scale)
        return self.tail(y) + mean


def drn(scale: int, **overrides) -> DRN:
    """The paper's DRN: C = 64, G = 6, K = 9, F = 64, d = 8."""
    return DRN(scale=scale, **overrides)


def drn_plus(scale: int, **overrides) -> DRN:
    """DRN+: 256 filters inside each RDB (decided: F = 256, docs/architecture.md)."""
    return DRN(scale=scale, **{"inner": 256, **overrides})
