"""MATLAB-compatible bicubic ``imresize`` in torch (the convention every published SR number uses).

The benchmark and DIV2K low-resolution images were made with MATLAB's ``imresize(I, 1/s, 'bicubic')``,
whose antialiasing makes it differ from PIL's or OpenCV's bicubic resize. This is a port of the
algorithm in MATLAB's ``imresize.m`` (``contributions``):

* cubic kernel with a = -0.5 (Keys):
  ``|x| <= 1: 1.5|x|^3 - 2.5|x|^2 + 1``;  ``1 < |x| <= 2: -0.5|x|^3 + 2.5|x|^2 - 4|x| + 2``; else 0.
* output pixel i (1-based) sits at input coordinate ``u = i / scale + 0.5 * (1 - 1 / scale)``.
* when shrinking (scale < 1) and antialiasing is on, the kernel is stretched:
  ``h(x) = scale * cubic(scale * x)`` with width ``4 / scale``; otherwise ``h = cubic``, width 4.
* the taps are ``floor(u - width / 2) + (0 .. ceil(width) + 1)``, the weights ``h(u - tap)`` are
  normalised to sum to one, and taps outside ``1..n`` are mirrored with MATLAB's
  ``aux = [1:n, n:-1:1]`` (half-sample symmetric padding: x(0) = x(1), x(-1) = x(2), ...).
* both dimensions are resized separately; MATLAB starts with the dimension of the smaller scale and
  takes rows first on a tie. In floating point without intermediate rounding the order changes only
  the last bits, so rows (H) always go first here.

Worked example (the one the tests check): ``imresize([1 2 3 4 5 6 7 8], 0.5)``. scale = 0.5, width 8,
``u = 2 i - 0.5`` = 1.5, 3.5, 5.5, 7.5. The eight taps around u sit at distances +-0.5, +-1.5, +-2.5,
+-3.5, where ``0.5 * cubic(0.5 * t)`` is 0.43359375, 0.11328125, -0.03515625, -0.01171875 (they sum to
1 already). In the interior (u = 3.5, taps 0..7) a linear ramp is reproduced except that tap 0 is
mirrored to x(1) = 1 instead of 0, so y2 = 3.5 + 1 * (-0.01171875) = 3.48828125; symmetrically
y3 = 5.51171875. At u = 1.5 the taps -2..5 read x(3), x(2), x(1), x(1), ..., x(5):
y1 = 1.5 - (0.11328125 - 0.10546875 - 0.05859375) = 1.44921875 and y4 = 7.55078125.
MATLAB prints 1.4492 3.4883 5.5117 7.5508.

A float image is resized without rounding (callers quantise). A uint8 image (a torch tensor or a
numpy array) comes back as uint8, computed in float64 and rounded once at the end, as BasicSR's
port and ``fastdrn train`` do; MATLAB itself rounds after each dimension, which can change rare
pixels by one grey level.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

__all__ = ["cubic", "resize_weights", "imresize", "downsample", "upsample"]


def cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = -0.5, as MATLAB's ``imresize``."""
    ax = x.abs()
    ax2, ax3 = ax * ax, ax * ax * ax
    inner = (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
    outer = (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2))
    return inner + outer


@lru_cache(maxsize=64)
def _weights_cached(in_len: int, out_len: int, scale: float, antialias: bool) -> torch.Tensor:
    x = torch.arange(1, out_len + 1, dtype=torch.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    if scale < 1 and antialias:
        width = 4.0 / scale
        kernel = lambda t: scale * cubic(scale * t)  # noqa: E731
    else:
        width = 4.0
        kernel = cubic
    left = torch.floor(u - width / 2)
    taps = math.ceil(width) + 2
    idx = left[:, None] + torch.arange(taps, dtype=torch.float64)[None, :]   # 1-based tap positions
    w = kernel(u[:, None] - idx)
    w = w / w.sum(dim=1, keepdim=True)
    # MATLAB: aux = [1:n, n:-1:1]; idx = aux(mod(idx - 1, 2n) + 1)
    m = (idx.long() - 1) % (2 * in_len)
    src = torch.where(m < in_len, m, 2 * in_len - 1 - m)                    # 0-based
    dense = torch.zeros(out_len, in_len, dtype=torch.float64)
    dense.scatter_add_(1, src, w)
    return dense


def resize_weights(in_len: int, out_len: int, scale: float | None = None, antialias: bool = True) -> torch.Tensor:
    """The (out_len, in_len) float64 matrix that resizes one dimension (rows sum to one)."""
    if scale is None:
        scale = out_len / in_len
    return _weights_cached(int(in_len), int(out_len), float(scale), bool(antialias)).clone()


def _resize_dim(x: torch.Tensor, dim: int, out_len: int, scale: float, antialias: bool) -> torch.Tensor:
    in_len = x.shape[dim]
    if in_len == out_len and scale == 1:
        return x
    w = _weights_cached(in_len, out_len, float(scale), bool(antialias)).to(device=x.device, dtype=x.dtype)
    # Sparse, banded matrix: each output pixel reads ceil(4 / scale) + 2 inputs at most.
    y = x.movedim(dim, -1)
    shape = y.shape
    y = y.reshape(-1, in_len)
    if out_len * in_len > 1 << 20 and x.device.type == "cpu":
        out = torch.sparse.mm(w.to_sparse_csr(), y.t()).t()
    else:
        out = y @ w.t()
    return out.reshape(*shape[:-1], out_len).movedim(-1, dim)


def imresize(x, scale: float | None = None, size: tuple[int, int] | None = None, antialias: bool = True):
    """Resize an image like MATLAB ``imresize(x, scale)``.

    ``x``: a torch tensor resized over its last two dimensions (..., H, W), or a numpy array laid out
    as images are, (H, W, C) or (H, W); the result has the same kind and layout. Floats are resized
    without clamping or rounding (quantise afterwards); uint8 comes back as uint8, rounded once.
    ``scale`` gives the output size ``ceil(scale * in)``; ``size`` = (height, width) gives it directly
    (then each dimension's scale is out / in, as MATLAB).
    """
    if isinstance(x, np.ndarray):
        if x.ndim not in (2, 3):
            raise ValueError(f"imresize: a numpy image must be (H, W, C) or (H, W), got shape {x.shape}")
        chw = torch.from_numpy(np.array(x if x.ndim == 3 else x[..., None])).permute(2, 0, 1)  # a copy: x may be read-only
        out = imresize(chw, scale, size, antialias).permute(1, 2, 0).numpy()
        return np.ascontiguousarray(out if x.ndim == 3 else out[..., 0])
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"imresize: expected a torch tensor or numpy array, got {type(x).__name__}")
    if x.dtype == torch.uint8:
        out = imresize(x.double(), scale, size, antialias)
        return torch.round(out.clamp(0, 255)).to(torch.uint8)
    if not x.is_floating_point():
        raise TypeError(f"imresize: expected a float or uint8 image, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"imresize: expected an image (..., H, W), got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if size is None:
        if scale is None:
            raise ValueError("imresize: give scale or size")
        size = (math.ceil(h * scale), math.ceil(w * scale))
        sh = sw = float(scale)
    else:
        sh, sw = size[0] / h, size[1] / w
    out = _resize_dim(x, x.dim() - 2, size[0], sh, antialias)
    return _resize_dim(out, x.dim() - 1, size[1], sw, antialias)


def downsample(hr: torch.Tensor, factor: int) -> torch.Tensor:
    """MATLAB ``imresize(hr, 1/factor, 'bicubic')`` (antialiased), in float, not quantised."""
    return imresize(hr, scale=1.0 / factor)


def upsample(lr: torch.Tensor, factor: int) -> torch.Tensor:
    """MATLAB ``imresize(lr, factor, 'bicubic')``: the bicubic baseline of the SR literature."""
    return imresize(lr, scale=float(factor))
