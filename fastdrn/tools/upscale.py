"""``fastdrn upscale``: image files or folders in, upscaled image files out.

Greyscale images are replicated to RGB for the model and converted back; an alpha channel is upscaled
separately with MATLAB bicubic; 16-bit PNGs stay 16-bit. Big images can be processed in tiles with
overlap (seamless when the overlap is at least the receptive-field radius, the default). A file that
cannot be read is reported by name and skipped (or stops everything with ``fail_fast``).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import torch

from ..graphs import make_upscaler
from .checkpoint import load_model
from .image_io import WRITE_FORMATS, ImageReadError, list_images, read_image, write_image
from .infer import prepare, receptive_radius, upscale_image

__all__ = ["upscale", "output_paths"]

FORMAT_EXT = {"png": ".png", "jpeg": ".jpg", "jpg": ".jpg", "webp": ".webp"}


def output_paths(inputs: list[str], output: str, fmt: str | None = None, suffix: str = "") -> list[tuple[str, str]]:
    """(input file, output file) for every image. ``output`` is a file when there is one input file
    and it has an image extension, else a folder. Folders are expanded (not recursively)."""
    files = list_images(inputs)
    single = len(inputs) == 1 and not Path(inputs[0]).is_dir() and len(files) == 1
    if Path(output).suffix.lower() in WRITE_FORMATS and not Path(output).is_dir():
        if single:
            return [(files[0], output)]
        raise ValueError(f"{output} names a file but there are {len(files)} input images: give a folder")
    out = []
    for f in files:
        ext = FORMAT_EXT[fmt] if fmt else Path(f).suffix.lower()
        if ext not in WRITE_FORMATS:
            ext = ".png"
        out.append((f, os.path.join(output, Path(f).stem + suffix + ext)))
    return out


def _upscale_fitting(model, cfg, img, tile, overlap, ensemble, dtype, log):
    """Upscale; on a GPU out-of-memory error without --tile, retry with smaller and smaller tiles."""
    try:
        return upscale_image(model, cfg, img, tile=tile, overlap=overlap, ensemble=ensemble, dtype=dtype)
    except torch.cuda.OutOfMemoryError:
        if tile:
            raise
    torch.cuda.empty_cache()
    t = 512
    while True:
        log(f"warning: {img.path}: out of GPU memory, retrying with --tile {t}")
        try:
            return upscale_image(model, cfg, img, tile=t, overlap=overlap, ensemble=ensemble, dtype=dtype)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if t <= 32:
                raise
            t //= 2


def upscale(inputs: list[str], output: str, weights: str, *, tile: int | None = None,
            tile_overlap: int | None = None, dtype: str = "fp32", self_ensemble: bool = False,
            device=None, fail_fast: bool = False, fmt: str | None = None, quality: int = 95,
            suffix: str = "", scale: int | None = None, overrides: dict | None = None,
            cuda_graph: bool | None = None, log: Callable[[str], None] = print) -> int:
    """Upscale ``inputs`` (files and/or folders) into ``output``; returns the number of failures.

    ``cuda_graph``: as in :func:`fastdrn.make_upscaler` (None: replay captured graphs on a GPU)."""
    model, cfg = load_model(weights, overrides=overrides, expect={"scale": scale})
    model = make_upscaler(prepare(model, device, dtype), cuda_graph=cuda_graph)
    radius = receptive_radius(cfg)
    if tile and tile_overlap is not None and tile_overlap < radius:
        log(f"warning: tile overlap {tile_overlap} < receptive-field radius {radius}: seams are possible")
    failures = 0
    jobs = output_paths(inputs, output, fmt, suffix)
    taken: set[str] = set()
    for n, (src, dst) in enumerate(jobs):
        t0 = time.perf_counter()
        try:
            if os.path.abspath(src) == os.path.abspath(dst):
                raise ValueError(f"{src}: output would overwrite the input (use another folder or --suffix)")
            if os.path.abspath(dst) in taken:
                raise ValueError(f"{src}: output {dst} was already written from another input with the same name")
            taken.add(os.path.abspath(dst))
            img = read_image(src)
            out = _upscale_fitting(model, cfg, img, tile, tile_overlap, self_ensemble, dtype, log)
            for w in write_image(dst, out, quality=quality):
                log(f"warning: {w}")
        except (ImageReadError, ValueError, OSError, RuntimeError) as e:
            failures += 1
            log(f"error: {e}")
            if fail_fast:
                log(f"error: stopping (--fail-fast): {len(jobs) - n - 1} file(s) not processed")
                return failures
            continue
        h, w = img.size
        log(f"{src} -> {dst} ({w}x{h} -> {w * cfg['scale']}x{h * cfg['scale']}, "
            f"{time.perf_counter() - t0:.2f} s)")
    if not jobs:
        log("error: no input images")
        return 1
    return failures
