"""``fastdrn eval``: PSNR / SSIM of a DRN checkpoint against the bicubic baseline, the field's way.

For every HR image: LR is the given LR file (DIV2K / benchmark naming) or, without ``lr_dir``, MATLAB
bicubic downsampling of the HR image cropped to a multiple of the scale, rounded to 8 bits (how the
benchmark LR sets were made). SR and bicubic (MATLAB ``imresize(lr, scale)``) outputs are quantised to
8 bits and compared with HR on the Y channel with a ``scale``-pixel border cropped
(:mod:`fastdrn.tools.metrics`); ``crop_border`` and ``y_channel=False`` (RGB) change that.

An image too small for SSIM's 11x11 window once the border is cropped is skipped with a warning and
counted in the summary (``skipped``), not averaged in as NaN. An output of NaN or infinity (fp16
overflowing) fails its image, named, instead of giving a score. The JSON report is strict JSON:
non-finite numbers (an infinite PSNR of a perfect match, a mean over no image) are written as null.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Callable, Iterable

import torch

from ..graphs import Upscaler, make_upscaler
from .checkpoint import atomic_write_text, load_model
from .data import Pair, find_pairs, load_pair
from .image_io import DEFAULT_MAX_PIXELS, IMAGE_EXTS, Image, ImageReadError, write_image
from .imresize import upsample
from .infer import NonFiniteOutputError, prepare, receptive_radius, super_resolve
from .metrics import SSIM_WINDOW, psnr_ssim

__all__ = ["evaluate", "evaluate_pairs", "format_table", "convention"]

def convention(scale: int, crop_border: int | None = None, y_channel: bool = True) -> str:
    """The measuring convention in words, for the table and the JSON."""
    crop = scale if crop_border is None else crop_border
    return (("Y channel of BT.601 YCbCr (MATLAB rgb2ycbcr)" if y_channel else "RGB (all three channels)")
            + f", 8-bit quantised output, border of {crop} pixel(s) cropped; SSIM 11x11 Gaussian window "
              "sigma 1.5, K1 0.01, K2 0.03, L 255")


def _to_float(a) -> torch.Tensor:
    import numpy as np
    m = 65535.0 if a.dtype == np.uint16 else 255.0
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(2, 0, 1))).double() / m


def evaluate_pairs(model: torch.nn.Module | Upscaler, cfg: dict, pairs: Iterable[Pair], *, self_ensemble: bool = False,
                   tile: int | None = None, tile_overlap: int | None = None, dtype: str = "fp32",
                   device=None, bicubic: bool = True, fail_fast: bool = False,
                   loaded: dict | None = None, save_dir: str | None = None,
                   max_pixels: int | None = DEFAULT_MAX_PIXELS, crop_border: int | None = None,
                   y_channel: bool = True, bicubic_cache: dict | None = None,
                   log: Callable[[str], None] = print) -> dict:
    """Score ``model`` (a module or a :func:`fastdrn.make_upscaler` upscaler) on ``pairs``; returns
    {"images": [...], "mean": {...}, "failed": [...],
    "skipped": [...]} (skipped: images too small for SSIM once the border is cropped).

    ``loaded`` may map pair names to already decoded (lr, hr) arrays (training's validation set);
    ``bicubic_cache`` a dict in which the bicubic scores are kept across calls (they do not change).
    ``crop_border`` defaults to the scale; ``y_channel=False`` measures on RGB.
    """
    scale = cfg["scale"]
    crop = scale if crop_border is None else crop_border
    rows, failed, skipped = [], [], []
    for pair in pairs:
        try:
            if loaded and pair.name in loaded:
                lr, hr = loaded[pair.name]
            else:
                lr, hr = load_pair(pair, scale, max_pixels, on_warning=lambda msg: log(f"warning: {msg}"))
        except ImageReadError as e:
            log(f"error: {e}")
            failed.append({"name": pair.name, "error": str(e)})
            if fail_fast:
                break
            continue
        if min(hr.shape[:2]) - 2 * crop < SSIM_WINDOW:
            why = (f"{hr.shape[1]}x{hr.shape[0]} is too small: SSIM's {SSIM_WINDOW}x{SSIM_WINDOW} window needs "
                   f"{SSIM_WINDOW + 2 * crop} pixels a side with the {crop}-pixel border cropped")
            log(f"warning: {pair.name}: skipped: {why}")
            skipped.append({"name": pair.name, "reason": why})
            continue
        lr_t, hr_t = _to_float(lr), _to_float(hr)
        try:
            sr = super_resolve(model, lr_t.float(), scale, rgb_range=cfg.get("rgb_range", 1.0), tile=tile,
                               overlap=tile_overlap, ensemble=self_ensemble, dtype=dtype, device=device,
                               radius=receptive_radius(cfg))
        except NonFiniteOutputError as e:     # no score: a clamped infinity would give a number
            log(f"error: {pair.name}: {e}")
            failed.append({"name": pair.name, "error": str(e)})
            if fail_fast:
                break
            continue
        except RuntimeError as e:     # raised by the model or its kernels, which do not name the image
            raise RuntimeError(f"{pair.name}: {e}") from e
        row = {"name": pair.name, "size": [int(hr.shape[1]), int(hr.shape[0])]}
        # data_range=1: the model's output is clamped to [0, 1] and rounded, as a saved image would be
        row["psnr"], row["ssim"] = psnr_ssim(sr.double(), hr_t, crop, data_range=1.0, y_channel=y_channel)
        if bicubic:
            if bicubic_cache is not None and pair.name in bicubic_cache:
                bic = bicubic_cache[pair.name]
            else:
                bic = psnr_ssim(upsample(lr_t, scale), hr_t, crop, data_range=1.0, y_channel=y_channel)
                if bicubic_cache is not None:
                    bicubic_cache[pair.name] = bic
            row["bicubic_psnr"], row["bicubic_ssim"] = bic
        rows.append(row)
        if save_dir:
            write_image(os.path.join(save_dir, f"{pair.name}_x{scale}.png"), Image(rgb=sr.clamp(0, 1)))
    keys = ["psnr", "ssim"] + (["bicubic_psnr", "bicubic_ssim"] if bicubic else [])
    mean = {k: (sum(r[k] for r in rows) / len(rows) if rows else math.nan) for k in keys}
    return {"images": rows, "mean": mean, "failed": failed, "skipped": skipped}


def format_table(result: dict) -> str:
    rows = result["images"]
    bic = bool(rows) and "bicubic_psnr" in rows[0]
    name_w = max([len("image"), len("mean")] + [len(r["name"]) for r in rows])
    head = f"{'image':<{name_w}}  {'PSNR':>8}  {'SSIM':>7}" + (f"  {'bicubic PSNR':>12}  {'SSIM':>7}" if bic else "")
    lines = [head, "-" * len(head)]

    def fmt(name, r):
        s = f"{name:<{name_w}}  {r['psnr']:8.3f}  {r['ssim']:7.4f}"
        if bic:
            s += f"  {r['bicubic_psnr']:12.3f}  {r['bicubic_ssim']:7.4f}"
        return s

    lines += [fmt(r["name"], r) for r in rows]
    lines.append("-" * len(head))
    lines.append(fmt("mean", result["mean"]))
    if result.get("failed"):
        lines.append(f"{len(result['failed'])} image(s) failed: " + ", ".join(f["name"] for f in result["failed"]))
    if result.get("skipped"):
        lines.append(f"{len(result['skipped'])} image(s) skipped (smaller than the SSIM window): "
                     + ", ".join(f["name"] for f in result["skipped"]))
    return "\n".join(lines)


def _strict_json(value):
    """`value` with every non-finite float as None: JSON has no NaN or Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


def _same_folder(a: str, b: str) -> bool:
    """Whether two paths lead to the same folder (symbolic links and relative parts resolved), the
    folder existing or not."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    return os.path.isdir(a) and os.path.isdir(b) and os.path.samefile(a, b)


def _check_save_dir(save_dir: str, hr_dir: str, lr_dir: str | None, scale: int) -> None:
    """Refuse a --save-dir that is a folder eval reads images from: --hr-dir, --lr-dir, or the
    X<scale> / x<scale> subfolder of --lr-dir that it reads instead when one exists (or will read,
    once saving there has made it). The saved NAME_x<scale>.png images would join the images
    measured by the next run (an LR subfolder would even pair them with the HR images), and could
    replace one."""
    folders = [(hr_dir, f"the --hr-dir folder {hr_dir}")]
    if lr_dir:
        folders.append((lr_dir, f"the --lr-dir folder {lr_dir}"))
        for sub in (f"X{scale}", f"x{scale}"):
            folders.append((os.path.join(lr_dir, sub), f"{os.path.join(lr_dir, sub)}, the folder LR images are "
                            f"read from for --lr-dir {lr_dir} at scale {scale} when it exists"))
    for folder, what in folders:
        if _same_folder(save_dir, folder):
            raise ValueError(f"--save-dir {save_dir} is {what}: the upscaled images would join the images being "
                             "measured (and could replace one); give another folder")


def evaluate(weights: str, hr_dir: str, lr_dir: str | None = None, *, scale: int | None = None,
             self_ensemble: bool = False, json_path: str | None = None, tile: int | None = None,
             tile_overlap: int | None = None, dtype: str = "fp32", device=None, fail_fast: bool = False,
             save_dir: str | None = None, overrides: dict | None = None, key: str | None = None,
             crop_border: int | None = None, y_channel: bool = True,
             max_pixels: int | None = DEFAULT_MAX_PIXELS,
             cuda_graph: bool | None = None, log: Callable[[str], None] = print) -> dict:
    """Load ``weights``, score it on ``hr_dir`` (and ``lr_dir``), print a table, optionally write JSON.

    ``cuda_graph``: as in :func:`fastdrn.make_upscaler` (None: replay captured graphs on a GPU)."""
    if json_path and os.path.isdir(json_path):   # found before the images are measured, not after
        raise ValueError(f"--json {json_path}: a folder, where the report file is to be written")
    if save_dir and os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise ValueError(f"--save-dir {save_dir}: a file, where the upscaled images' folder is to be")
    t0 = time.perf_counter()
    # images are RGB here: a model of other colour channels is refused by name, not per image
    model, cfg = load_model(weights, overrides=overrides, expect={"scale": scale, "n_colors": 3}, key=key, log=log)
    if save_dir:
        _check_save_dir(save_dir, hr_dir, lr_dir, cfg["scale"])
    module = prepare(model, device, dtype)
    dev = next(module.parameters()).device
    log(f"device {dev}" + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "")
        + f", {dtype}; backend: {module.backend}")
    model = make_upscaler(module, cuda_graph=cuda_graph)
    pairs, missing = find_pairs(hr_dir, lr_dir, cfg["scale"], warn=lambda message: log(f"warning: {message}"))
    if not pairs and not missing:
        log(f"error: no images in {hr_dir} (files ending {', '.join(IMAGE_EXTS)})")
    failed = []
    for m in missing:
        log(f"error: {m}")
        failed.append({"name": os.path.basename(m.split(":")[0]), "error": m})
    if missing and fail_fast:
        pairs = []
    result = evaluate_pairs(model, cfg, pairs, self_ensemble=self_ensemble, tile=tile,
                            tile_overlap=tile_overlap, dtype=dtype, device=device, fail_fast=fail_fast,
                            save_dir=save_dir, max_pixels=max_pixels, crop_border=crop_border,
                            y_channel=y_channel, log=log)
    seconds = time.perf_counter() - t0
    result["failed"] = failed + result["failed"]
    result.update(weights=os.fspath(weights), hr_dir=os.fspath(hr_dir),
                  lr_dir=None if lr_dir is None else os.fspath(lr_dir),
                  lr_source="files" if lr_dir else "MATLAB bicubic downsampling of HR",
                  scale=cfg["scale"], self_ensemble=self_ensemble,
                  convention=convention(cfg["scale"], crop_border, y_channel),
                  crop_border=cfg["scale"] if crop_border is None else crop_border, y_channel=y_channel,
                  device=str(dev), seconds=seconds,
                  config={k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()})
    log(format_table(result))
    log(f"{len(result['images'])} image(s) in {seconds:.1f} s on {dev}; {result['convention']}")
    if json_path:
        text = json.dumps(_strict_json(result), indent=2, allow_nan=False)
        atomic_write_text(json_path, text + "\n")
    return result
