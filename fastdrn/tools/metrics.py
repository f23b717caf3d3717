"""PSNR and SSIM as the super-resolution literature computes them.

The convention (EDSR, RCAN, DRN and BasicSR's ``test_y_channel``):

* the network output is clamped to [0, 1] and quantised to 8 bits (``round(x * 255)``), like a saved PNG;
* both images go to the Y channel of BT.601 YCbCr as MATLAB's ``rgb2ycbcr``:
  ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` with R, G, B in [0, 1] (Y in [16, 235]), kept in float
  (not rounded again);
* a border of ``scale`` pixels is cropped on every side;
* PSNR = 10 log10(255^2 / MSE);
* SSIM (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, L = 255, population
  (not sample) statistics, computed only where the window fits ("valid"), averaged over the map.
  (No factor-of-two downsampling as Wang's original MATLAB script does for large images: the SR
  field's scripts do not do it either.)

Inputs are torch tensors (..., C, H, W) or numpy arrays (H, W, C) or (H, W), as image libraries give
them; one holding NaN or infinity is refused. uint8 images are read as 0-255. Float images must lie
in [0, 1]: anything outside is refused (a 0-255 float image clamped to [0, 1] would give a silently
wrong number) unless ``data_range`` says what white is, and then values are clamped to
[0, data_range] as a saved image would be.
A model's raw output overshoots [0, 1] a little: pass ``data_range=1.0`` to clamp it.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["quantize", "to_255", "rgb_to_y", "psnr", "ssim", "psnr_ssim", "gaussian_window", "SSIM_WINDOW"]

SSIM_WINDOW = 11  # side of SSIM's Gaussian window: smaller images (after the border crop) have no SSIM


def quantize(x: torch.Tensor, levels: int = 255) -> torch.Tensor:
    """Clamp a [0, 1] image and round it to ``levels`` steps; returned as float64 in [0, levels]."""
    return torch.round(x.detach().double().clamp(0, 1) * levels)


def rgb_to_y(img255: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB in [0, 255] -> (..., H, W) BT.601 luma in [16, 235] (MATLAB rgb2ycbcr)."""
    img = img255.double()
    if img.shape[-3] == 1:
        img = img.expand(*img.shape[:-3], 3, *img.shape[-2:])
    r, g, b = img.unbind(-3)
    return 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0


def to_255(x, what: str = "image", data_range: float | None = None, quantized: bool = False) -> torch.Tensor:
    """An image as float64 8-bit levels in [0, 255], (..., C, H, W); see the module docstring for
    what is accepted. ``quantized=True``: ``x`` holds such levels already."""
    if isinstance(x, np.ndarray):
        if x.ndim not in (2, 3):
            raise ValueError(f"{what}: a numpy image must be (H, W, C) or (H, W), got shape {x.shape}")
        x = torch.from_numpy(np.array(x if x.ndim == 3 else x[..., None])).permute(2, 0, 1)  # a copy: x may be read-only
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: expected a torch tensor or numpy array, got {type(x).__name__}")
    x = x.detach()
    if x.is_floating_point():
        bad = int((~torch.isfinite(x)).sum())
        if bad:   # NaN passes the range check (it compares false) and clamping makes infinity white
            raise ValueError(f"{what} holds {bad} NaN or infinite value(s): it has no PSNR or SSIM")
    if quantized:
        return x.double()
    if x.dtype == torch.uint8:
        if data_range not in (None, 255):
            raise ValueError(f"{what}: a uint8 image is 0-255; data_range={data_range} contradicts it")
        return x.double()
    if not x.is_floating_point():
        if data_range is None:
            raise TypeError(f"{what}: {x.dtype} images need data_range (the value of white, e.g. 65535 "
                            "for 16-bit); uint8 is read as 0-255")
        x = x.double()
    if data_range is None:
        lo, hi = (x.min().item(), x.max().item()) if x.numel() else (0.0, 0.0)
        if lo < 0 or hi > 1:
            raise ValueError(
                f"{what} holds values in [{lo:.4g}, {hi:.4g}], outside [0, 1]: pass data_range=255 for a "
                "0-255 image, or data_range=1.0 to clamp a model's output to [0, 1] as a saved image is")
        data_range = 1.0
    if not data_range > 0:
        raise ValueError(f"{what}: data_range must be > 0, got {data_range}")
    return quantize(x.double() / data_range)


def _check_crop(img: torch.Tensor, crop: int) -> None:
    """Refuse a border crop that is negative or leaves no pixel (the mean of nothing is NaN)."""
    if crop < 0:
        raise ValueError(f"metrics: crop={crop}: a border cannot be negative")
    h, w = img.shape[-2:]
    if min(h, w) <= 2 * crop:
        raise ValueError(f"metrics: crop={crop} leaves nothing of the {w}x{h} image")


def _prepare(sr, hr, crop: int, y_channel: bool, quantized: bool, data_range: float | None):
    sr = to_255(sr, "sr", data_range, quantized)
    hr = to_255(hr, "hr", data_range, quantized)
    if sr.shape != hr.shape:
        raise ValueError(f"metrics: shapes differ: {tuple(sr.shape)} vs {tuple(hr.shape)}")
    _check_crop(sr, crop)
    if y_channel and sr.shape[-3] not in (1, 3):
        raise ValueError(f"metrics: the Y channel needs RGB (3 channels) or grey (1), got {sr.shape[-3]} "
                         "(drop an alpha channel first, or pass y_channel=False)")
    if y_channel:
        sr, hr = rgb_to_y(sr), rgb_to_y(hr)
    if crop > 0:
        sr = sr[..., crop:-crop, crop:-crop]
        hr = hr[..., crop:-crop, crop:-crop]
    return sr, hr


def psnr(sr, hr, crop: int = 0, y_channel: bool = True, quantized: bool = False,
         data_range: float | None = None) -> float:
    """PSNR in dB of two RGB images: floats in [0, 1] (or [0, data_range], clamped), uint8 as 0-255, or
    8-bit levels as floats with ``quantized=True``. ``crop``: border pixels left out on every side."""
    a, b = _prepare(sr, hr, crop, y_channel, quantized, data_range)
    mse = torch.mean((a - b) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(t * t) / (2 * sigma * sigma))
    g = g / g.sum()
    return torch.outer(g, g)


def _ssim_map(a: torch.Tensor, b: torch.Tensor, window: torch.Tensor, data_range: float) -> torch.Tensor:
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    a = a.reshape(-1, 1, *a.shape[-2:])
    b = b.reshape(-1, 1, *b.shape[-2:])
    w = window.to(a)[None, None]
    mu_a, mu_b = F.conv2d(a, w), F.conv2d(b, w)
    saa = F.conv2d(a * a, w) - mu_a * mu_a
    sbb = F.conv2d(b * b, w) - mu_b * mu_b
    sab = F.conv2d(a * b, w) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))


def ssim(sr, hr, crop: int = 0, y_channel: bool = True, quantized: bool = False,
         data_range: float | None = None) -> float:
    """SSIM of two RGB images, accepted as :func:`psnr` accepts them; on RGB (``y_channel=False``) the
    mean over the channels."""
    a, b = _prepare(sr, hr, crop, y_channel, quantized, data_range)
    if min(a.shape[-2:]) < 11:
        raise ValueError(f"ssim: image {tuple(a.shape[-2:])} is smaller than the 11x11 window")
    return _ssim_map(a, b, gaussian_window(), 255.0).mean().item()


def psnr_ssim(sr, hr, crop: int, data_range: float | None = None, y_channel: bool = True) -> tuple[float, float]:
    """(PSNR, SSIM) with the SR convention, inputs as :func:`psnr` takes them (SSIM is NaN for an
    image smaller than its 11x11 window after cropping)."""
    a, b = to_255(sr, "sr", data_range), to_255(hr, "hr", data_range)
    return (psnr(a, b, crop, y_channel, quantized=True),
            ssim(a, b, crop, y_channel, quantized=True) if min(a.shape[-2:]) - 2 * crop >= 11 else float("nan"))
