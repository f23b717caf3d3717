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
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["quantize", "rgb_to_y", "psnr", "ssim", "psnr_ssim", "gaussian_window", "SSIM_WINDOW"]

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


def _prepare(sr: torch.Tensor, hr: torch.Tensor, crop: int, y_channel: bool, quantized: bool):
    if sr.shape != hr.shape:
        raise ValueError(f"metrics: shapes differ: {tuple(sr.shape)} vs {tuple(hr.shape)}")
    if not quantized:
        sr, hr = quantize(sr), quantize(hr)
    sr, hr = sr.double(), hr.double()
    if y_channel:
        sr, hr = rgb_to_y(sr), rgb_to_y(hr)
    if crop > 0:
        sr = sr[..., crop:-crop, crop:-crop]
        hr = hr[..., crop:-crop, crop:-crop]
    return sr, hr


def psnr(sr: torch.Tensor, hr: torch.Tensor, crop: int = 0, y_channel: bool = True,
         quantized: bool = False) -> float:
    """PSNR in dB of (3, H, W) images in [0, 1] (or in [0, 255] with ``quantized=True``)."""
    a, b = _prepare(sr, hr, crop, y_channel, quantized)
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


def ssim(sr: torch.Tensor, hr: torch.Tensor, crop: int = 0, y_channel: bool = True,
         quantized: bool = False) -> float:
    """SSIM of (3, H, W) images in [0, 1] (or [0, 255] with ``quantized=True``); RGB: mean over channels."""
    a, b = _prepare(sr, hr, crop, y_channel, quantized)
    if min(a.shape[-2:]) < 11:
        raise ValueError(f"ssim: image {tuple(a.shape[-2:])} is smaller than the 11x11 window")
    return _ssim_map(a, b, gaussian_window(), 255.0).mean().item()


def psnr_ssim(sr: torch.Tensor, hr: torch.Tensor, crop: int) -> tuple[float, float]:
    """Both metrics on the Y channel with the SR convention (inputs in [0, 1], quantised here)."""
    a, b = quantize(sr), quantize(hr)
    return (psnr(a, b, crop, quantized=True),
            ssim(a, b, crop, quantized=True) if min(a.shape[-2:]) - 2 * crop >= 11 else float("nan"))
