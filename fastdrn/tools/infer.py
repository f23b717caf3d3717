"""Inference helpers: seamless tiled forward, x8 self-ensemble, dtype handling.

Tiling is exact, not blended: each tile's core is run inside a window with at least ``overlap`` LR
pixels of real context on every side, or reaching the image border (where the model's own zero
padding applies as in the whole image), and only the core is kept. Every window of an image has the
same shape, ``min(side, tile + 2 * overlap)`` along each axis: windows at the border shift inwards
instead of shrinking, so one captured CUDA graph (:func:`fastdrn.make_upscaler`) serves every tile,
and every image at least that big. A DRN output pixel depends on LR pixels at most
``receptive_radius(cfg)`` away, so with ``overlap >= receptive_radius`` the tiled result equals the
untiled one up to floating-point summation order.
"""
from __future__ import annotations

import numbers
from typing import Callable, Mapping

import torch

from ..graphs import Upscaler
from .imresize import upsample

__all__ = ["receptive_radius", "forward_tiled", "self_ensemble", "super_resolve", "DTYPES", "resolve_device",
           "upscale_image", "NonFiniteOutputError"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteOutputError(ValueError):
    """The model's output holds NaN or infinity: cast to 8 bits it would be a black or white image."""


def receptive_radius(cfg: Mapping) -> int:
    """LR pixels of context an output pixel needs: head (1) + one 3x3 per RDB (G*K) + upsample (1)
    + tail (a 3x3 on the HR grid: 1 HR pixel = ceil(1 / scale) = 1 LR pixel)."""
    return int(cfg.get("n_groups", 6)) * int(cfg.get("n_blocks", 9)) + 3


def resolve_device(device: str | torch.device | None, arg: str = "--device") -> torch.device:
    """The device a ``--device`` value names (None or "auto": cuda when available, else cpu); one
    that is not a device, or cannot be used here (cuda without CUDA, cuda:7 on one GPU), raises
    ValueError naming it, before any model or image is moved. ``arg``: how the message names the
    argument (``--device 'x'``; a name without dashes as a keyword, ``device='x'``)."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    given = f"{arg} {device!r}" if arg.startswith("-") else f"{arg}={device!r}"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{given} is not a device (cpu, cuda, cuda:1, ...): "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if dev.type == "meta":
        raise ValueError(f"{given} cannot be used: meta tensors hold no data to compute with")
    if dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except Exception as e:  # AssertionError: Torch not compiled with CUDA enabled, invalid device ordinal, ...
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{given} cannot be used on this machine: {first}") from None
    return dev


def forward_tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, scale: int,
                  tile: int | None = None, overlap: int = 0, out_device: torch.device | None = None) -> torch.Tensor:
    """Apply ``fn`` (an x``scale`` model) to (N, C, H, W) ``x`` tile by tile (``tile`` LR pixels square;
    None or 0: the whole image at once). Each output must be ``x``'s (N, C) and ``scale`` times its
    input's size: tiles of another scale would be cut and placed wrongly."""
    if tile is not None and not _count(tile):
        raise ValueError(f"tile must be an int >= 0 or None, got {tile!r}")
    if not _count(overlap):
        raise ValueError(f"overlap must be an int >= 0, got {overlap!r}")
    n, _, h, w = x.shape
    if not tile or (h <= tile and w <= tile):
        out = _upscaled_by(fn, x, scale)
        return out if out_device is None else out.to(out_device)
    out = None
    for y0, y1, ya, yb in _windows(h, tile, overlap):
        for x0, x1, xa, xb in _windows(w, tile, overlap):
            o = _upscaled_by(fn, x[:, :, ya:yb, xa:xb], scale)
            if out is None:
                out = torch.empty(n, o.shape[1], h * scale, w * scale, dtype=o.dtype,
                                  device=out_device or o.device)
            out[:, :, y0 * scale:y1 * scale, x0 * scale:x1 * scale] = \
                o[:, :, (y0 - ya) * scale:(y1 - ya) * scale, (x0 - xa) * scale:(x1 - xa) * scale]
    return out


def _count(value) -> bool:
    """Whether value is an int >= 0 (a bool is not one: True would be a tile of one pixel)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def _upscaled_by(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, scale: int) -> torch.Tensor:
    """fn(x), refused unless it is x's (N, C) at ``scale`` times x's size."""
    o = fn(x)
    n, c, h, w = x.shape
    if tuple(o.shape) != (n, c, h * scale, w * scale):
        raise ValueError(f"scale={scale} and the model disagree: an input of {tuple(x.shape)} gave "
                         f"{tuple(o.shape)}, not {(n, c, h * scale, w * scale)} (the model's scale and "
                         "colour channels are those of its checkpoint)")
    return o


def _windows(size: int, tile: int, overlap: int):
    """(core start, core end, window start, window end) along one axis: cores of ``tile`` pixels,
    windows all ``min(size, tile + 2 * overlap)`` long, each reaching ``overlap`` pixels past its core
    or the border (a window that would cross the border is shifted back inside)."""
    span = min(size, tile + 2 * overlap)
    for c0 in range(0, size, tile):
        w0 = min(max(c0 - overlap, 0), size - span)
        yield c0, min(c0 + tile, size), w0, w0 + span


def _transform(x: torch.Tensor, t: int) -> torch.Tensor:
    if t & 1:
        x = x.flip(-1)
    if t & 2:
        x = x.flip(-2)
    if t & 4:
        x = x.transpose(-1, -2)
    return x


def _inverse(x: torch.Tensor, t: int) -> torch.Tensor:
    if t & 4:
        x = x.transpose(-1, -2)
    if t & 2:
        x = x.flip(-2)
    if t & 1:
        x = x.flip(-1)
    return x


def self_ensemble(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Mean of ``fn`` over the eight flips and 90-degree rotations of ``x``, each transformed back
    (the "x8" / "+" self-ensemble of EDSR and DRN)."""
    acc = None
    for t in range(8):
        y = _inverse(fn(_transform(x, t).contiguous()), t).float()
        acc = y if acc is None else acc + y
    return acc / 8


@torch.no_grad()
def super_resolve(model: torch.nn.Module, lr: torch.Tensor, scale: int, *, rgb_range: float = 1.0,
                  tile: int | None = None, overlap: int | None = None, ensemble: bool = False,
                  dtype: str | torch.dtype = "fp32", device: torch.device | str | None = None,
                  radius: int | None = None) -> torch.Tensor:
    """(3, H, W) or (N, 3, H, W) LR image in [0, 1] -> SR image in [0, 1] (float32 on the CPU, not clamped).
    An output holding NaN or infinity (fp16 overflowing, say) raises :class:`NonFiniteOutputError`.

    ``model``: a module, or an upscaler from :func:`fastdrn.make_upscaler` (on a GPU it replays one
    captured CUDA graph per input shape, and all the tiles of an image share one shape). It must
    already be on ``device`` and in ``dtype``. ``overlap`` defaults to ``radius`` (the
    receptive-field radius), which makes tiling seamless.
    """
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if lr.dim() not in (3, 4):
        raise ValueError(f"super_resolve takes an image (C, H, W) or batch (N, C, H, W), got shape {tuple(lr.shape)}")
    if not lr.is_floating_point():
        raise ValueError(f"super_resolve takes a floating-point image in [0, 1], got {lr.dtype} (divide a uint8 "
                         "image by 255)")
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if device is not None:
        dev = resolve_device(device)
    else:
        dev = model.device if isinstance(model, Upscaler) else next(model.parameters()).device
    single = lr.dim() == 3
    x = (lr[None] if single else lr).to(device=dev, dtype=dt) * rgb_range
    if overlap is None:
        overlap = radius if radius is not None else 0

    def fn(t):
        return forward_tiled(model, t, scale, tile, overlap,
                             out_device=torch.device("cpu") if tile else None)

    out = self_ensemble(fn, x) if ensemble else fn(x)
    out = out.float().cpu() / rgb_range
    bad = int((~torch.isfinite(out)).sum())
    if bad:
        # NaN cast to an integer image is 0 and infinity clamps to white: refused, not written or scored
        why = (" (fp16 overflowed: its largest value is 65504; run in bf16 or fp32)" if dt == torch.float16
               else "")
        raise NonFiniteOutputError(f"the model's output holds {bad:,} NaN or infinite value(s) of "
                                   f"{out.numel():,}{why}")
    return out[0] if single else out


def upscale_image(model, cfg, img, **kw):
    """An :class:`~fastdrn.tools.image_io.Image` -> the upscaled Image (alpha by bicubic)."""
    scale = cfg["scale"]
    sr = super_resolve(model, img.rgb, scale, rgb_range=cfg.get("rgb_range", 1.0),
                       radius=receptive_radius(cfg), **kw).clamp_(0, 1)
    alpha = None
    if img.alpha is not None:
        alpha = upsample(img.alpha.double(), scale).clamp_(0, 1).float()
    return img.with_(rgb=sr, alpha=alpha)


def prepare(model: torch.nn.Module, device, dtype: str) -> torch.nn.Module:
    """Move a model to the device and storage dtype used by :func:`super_resolve`."""
    dev = resolve_device(device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return model.to(device=dev, dtype=DTYPES[dtype]).eval()
