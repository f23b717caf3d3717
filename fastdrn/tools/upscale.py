"""``fastdrn upscale``: image files or folders in, upscaled image files out.

Greyscale images are replicated to RGB for the model and converted back; an alpha channel is upscaled
separately with MATLAB bicubic; 16-bit PNG, TIFF and PPM images come out as 16-bit PNGs (JPEG and
WebP outputs are 8-bit, with a warning). Big images can be processed in tiles with
overlap (seamless when the overlap is at least the receptive-field radius, the default). A file that
cannot be read is reported by name and skipped (or stops everything with ``fail_fast``).

No output ever replaces an input of the run: every output path is compared, after resolving
symbolic links (and by device and inode, which catches hard links too), with every input before
anything is written; an output that would land on an input is refused and counted as a failure.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import torch

from ..graphs import make_upscaler
from .checkpoint import load_model
from .image_io import (DEFAULT_MAX_PIXELS, IMAGE_EXTS, WRITE_FORMATS, ImageReadError, list_images, precision_lost,
                       read_image, write_image)
from .infer import NonFiniteOutputError, prepare, receptive_radius, upscale_image

__all__ = ["upscale", "output_paths"]

FORMAT_EXT = {"png": ".png", "jpeg": ".jpg", "jpg": ".jpg", "webp": ".webp"}


def output_paths(inputs: list[str], output: str, fmt: str | None = None, suffix: str = "",
                 warn=None) -> list[tuple[str, str]]:
    """(input file, output file) for every image. ``output`` is a file when there is one input file
    and it has an image extension, else a folder. Folders are expanded (not recursively; their other
    files are named in one message to ``warn`` when given); a file named more than once is listed once."""
    if output == "-":      # a folder named "-" would be made
        raise ValueError("-o -: writing to standard output is not supported: name a file or a folder")
    files = list_images(inputs, warn=warn)
    single = len(inputs) == 1 and not Path(inputs[0]).is_dir() and len(files) == 1
    if os.sep in suffix or (os.altsep and os.altsep in suffix):
        raise ValueError(f"--suffix {suffix!r}: a suffix of file names cannot hold a path separator")
    ext = Path(output).suffix.lower()
    # a trailing separator says folder, whatever the name looks like
    folder = Path(output).is_dir() or output.endswith(os.sep) or bool(os.altsep and output.endswith(os.altsep))
    if ext in IMAGE_EXTS and ext not in WRITE_FORMATS and not folder:
        raise ValueError(f"{output}: cannot write {ext} images: name a .png, .jpg, .jpeg or .webp file, or a folder")
    if ext in WRITE_FORMATS and not folder:
        if fmt and WRITE_FORMATS[FORMAT_EXT[fmt]] != WRITE_FORMATS[ext]:
            raise ValueError(f"--format {fmt} does not match the output file {output}: change one of them")
        if single:
            return [(files[0], output)]
        if len(inputs) == 1 and Path(inputs[0]).is_dir():
            raise ValueError(f"{output} names a file but the input {inputs[0]} is a folder: give a folder as -o")
        raise ValueError(f"{output} names a file but there are {len(files)} input images: give a folder")
    out, seen = [], set()
    for f in files:
        # a file named twice (a folder and a file in it, overlapping globs) is upscaled once
        where = os.path.join(os.path.realpath(os.path.dirname(f) or "."), os.path.basename(f))
        if where in seen:
            continue
        seen.add(where)
        ext = FORMAT_EXT[fmt] if fmt else Path(f).suffix.lower()
        if ext not in WRITE_FORMATS:
            ext = ".png"
        out.append((f, os.path.join(output, Path(f).stem + suffix + ext)))
    return out


def _identity(path: str) -> tuple[str, tuple[int, int] | None]:
    """Where a path really leads: its resolved path, and (device, inode) when it exists."""
    try:
        st = os.stat(path)
        inode = (st.st_dev, st.st_ino)
    except OSError:
        inode = None
    return os.path.realpath(path), inode


def _clobbered_input(dst: str, inputs: dict) -> str | None:
    """The input that writing `dst` would replace, if any. inputs: resolved path -> (path, inode)."""
    real, inode = _identity(dst)
    if real in inputs:
        return inputs[real][0]
    if inode is not None:
        for src, src_inode in inputs.values():
            if src_inode == inode:
                return src
    return None


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


def upscale(inputs: list[str], output: str, weights: str, *, key: str | None = None, tile: int | None = None,
            tile_overlap: int | None = None, dtype: str = "fp32", self_ensemble: bool = False,
            device=None, fail_fast: bool = False, fmt: str | None = None, quality: int | None = None,
            suffix: str = "", scale: int | None = None, overrides: dict | None = None,
            max_pixels: int | None = DEFAULT_MAX_PIXELS, cuda_graph: bool | None = None,
            skip_existing: bool = False, log: Callable[[str], None] = print) -> int:
    """Upscale ``inputs`` (files and/or folders) into ``output``; returns the number of failures.

    An existing output file is replaced, or with ``skip_existing`` left as it is and its image not
    read: images are written to a temporary name and renamed, so an existing output is a whole file
    (a run stopped part way resumes where it stopped).

    ``quality``: of JPEG and WebP outputs (None: 95). ``key``: the checkpoint entry to read (see :func:`fastdrn.tools.checkpoint.select_weights`);
    ``max_pixels``: larger input images are refused before they are decoded (None: no limit);
    ``cuda_graph``: as in :func:`fastdrn.make_upscaler` (None: replay captured graphs on a GPU)."""
    # images are RGB here: a model of other colour channels is refused by name, not per image
    model, cfg = load_model(weights, overrides=overrides, expect={"scale": scale, "n_colors": 3}, key=key, log=log)
    model = make_upscaler(prepare(model, device, dtype), cuda_graph=cuda_graph)
    radius = receptive_radius(cfg)
    if tile and tile_overlap is not None and tile_overlap < radius:
        log(f"warning: tile overlap {tile_overlap} < receptive-field radius {radius}: seams are possible")
    failures = 0
    jobs = output_paths(inputs, output, fmt, suffix, warn=lambda message: log(f"warning: {message}"))
    # options that cannot change this run's outputs are said to, not ignored
    if suffix and len(jobs) == 1 and jobs[0][1] == output:
        log("warning: --suffix has no effect when -o names the output file")
    if quality is not None and jobs and all(WRITE_FORMATS[Path(d).suffix.lower()] == "PNG" for _, d in jobs):
        log("warning: --quality has no effect: every output is a PNG")
    quality = 95 if quality is None else quality
    # Every input of the run, identified before anything is written.
    sources = {}
    for src, _dst in jobs:
        real, inode = _identity(src)
        sources[real] = (src, inode)
    taken: set[str] = set()
    for n, (src, dst) in enumerate(jobs):
        t0 = time.perf_counter()
        try:
            clobbered = _clobbered_input(dst, sources)
            if clobbered is not None:
                what = "the input itself" if clobbered == src else f"the input {clobbered}"
                raise ValueError(f"{src}: output {dst} would overwrite {what}: refused (use another folder or "
                                 "--suffix)")
            if os.path.realpath(dst) in taken:
                raise ValueError(f"{src}: output {dst} was already written from another input with the same name")
            if skip_existing and os.path.isfile(dst):
                log(f"{src}: skipped, {dst} exists (--skip-existing)")
                continue
            img = read_image(src, max_pixels=max_pixels)
            if img.frames > 1:
                log(f"warning: {src}: has {img.frames} frames (an animation or pages): only the first is upscaled")
            lost = precision_lost(img, src)
            if lost:
                log(f"warning: {lost}: the output is {img.bits}-bit")
            try:
                out = _upscale_fitting(model, cfg, img, tile, tile_overlap, self_ensemble, dtype, log)
            except NonFiniteOutputError as e:
                raise ValueError(f"{src}: {e}") from None
            except RuntimeError as e:      # raised by the model or its kernels, which do not name the image
                raise RuntimeError(f"{src}: {e}") from None
            warnings = write_image(dst, out, quality=quality)
            taken.add(os.path.realpath(dst))       # once written: an input that failed takes no name
            for w in warnings:
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
