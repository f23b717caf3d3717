"""Image files <-> float tensors for the tools.

Reading gives an :class:`Image`: RGB as a (3, H, W) float32 tensor in [0, 1] (greyscale replicated to
three channels, remembered in ``gray``), the alpha channel separately (a PNG's tRNS colour key becomes
one), and the bit depth (8 or 16) so that writing can give back the same kind of file. Pillow reads
16-bit greyscale at full precision but reduces 16-bit RGB(A) to 8 bits; those are read here instead:
PNGs through :mod:`fastdrn.tools.png16`, PPMs (any maxval above 255) with numpy, TIFFs by decoding
twice through Pillow, once for the high byte of every sample and once for the low one. A file of more
than 8 bits per sample that is still read at 8 (an interlaced PNG) says so in ``Image.file_bits``;
32-bit integer and floating-point samples are refused. An EXIF orientation is applied, 16-bit PNGs
included. Every failure (missing, unreadable, truncated, not a regular file: a FIFO or a device would
be read without end) raises :class:`ImageReadError` naming the file. Files are written atomically
(temporary name + os.replace).

An image of more than ``max_pixels`` pixels (default :data:`DEFAULT_MAX_PIXELS`, Pillow's own
decompression-bomb limit) is refused from its header, before any pixel is decoded, whatever reads
it: a few megabytes of compressed PNG can claim gigabytes of pixels.
"""
from __future__ import annotations

import io
import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage, ImageOps

from . import png16
from .checkpoint import NotRegularFileError, atomic_write, open_regular

__all__ = ["Image", "ImageReadError", "read_image", "write_image", "to_uint8", "list_images", "skipped_files",
           "IMAGE_EXTS", "WRITE_FORMATS", "DEFAULT_MAX_PIXELS"]

IMAGE_EXTS = (".png", ".apng", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pgm",
              ".pbm", ".pnm", ".gif")
WRITE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
# Pillow's default (Image.MAX_IMAGE_PIXELS, ~89.5 million pixels, a 9459 x 9459 image), fixed here
# so that a change to Pillow's global does not move it.
DEFAULT_MAX_PIXELS = 89_478_485


class ImageReadError(OSError):
    pass


@dataclass
class Image:
    rgb: torch.Tensor                 # (3, H, W) float32 in [0, 1]
    alpha: torch.Tensor | None = None  # (1, H, W) float32 in [0, 1]
    gray: bool = False                # the file was greyscale: convert back when writing
    bits: int = 8                     # 8 or 16 bits per channel
    path: str = ""
    icc: bytes | None = None          # the file's ICC colour profile: written back, or colours shift
    frames: int = 1                   # frames in the file (animated GIF/PNG/WebP, multi-page TIFF); the first is read
    file_bits: int = 8                # bits per sample in the file: above ``bits`` when precision was lost reading it

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.rgb.shape[-2:])

    def with_(self, **kw) -> "Image":
        return replace(self, **kw)


def list_images(paths, recursive: bool = False, warn=None) -> list[str]:
    """Expand files and folders into a sorted list of image files (folders: by extension). The other
    files of the folders (hidden ones aside) are named in one message to ``warn`` when it is given."""
    out, skipped = [], []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            it = p.rglob("*") if recursive else p.iterdir()
            # a broken link is listed, to be named as one: passed over, its photograph would be missing
            files = sorted(str(q) for q in it if (q.is_file() or (q.is_symlink() and not q.exists()))
                           and not q.name.startswith("."))
            out += [f for f in files if Path(f).suffix.lower() in IMAGE_EXTS]
            skipped += [f for f in files if Path(f).suffix.lower() not in IMAGE_EXTS]
        else:
            out.append(str(p))
    if skipped and warn is not None:
        warn(skipped_files(skipped))
    return out


def skipped_files(skipped: list[str], shown: int = 5) -> str:
    """The warning for files of input folders that :func:`list_images` passed over."""
    names = ", ".join(skipped[:shown]) + (f" and {len(skipped) - shown} more" if len(skipped) > shown else "")
    return (f"{len(skipped)} file(s) of the input folder(s) not read, not of an image extension "
            f"({' '.join(IMAGE_EXTS)}): {names}")


def _from_array(arr: np.ndarray, maxval: float, gray: bool, path: str, bits: int) -> Image:
    arr = arr.astype(np.float32) / maxval
    if arr.ndim == 2:
        arr = arr[:, :, None]
    t = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    ch = t.shape[0]
    alpha = None
    if ch in (2, 4):
        alpha, t = t[-1:].contiguous(), t[:-1]
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1).contiguous()
    return Image(rgb=t, alpha=alpha, gray=gray, bits=bits, path=path)


def _check_size(path: str, width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ImageReadError(f"{path}: the image is {width} x {height} = {width * height:,} pixels, more than the "
                             f"limit of {max_pixels:,} (a guard against decompression bombs); raise it with "
                             "--max-pixels if the file is trusted")


def _allow_in_pillow(max_pixels: int | None) -> None:
    """Raise Pillow's own decompression-bomb limit (a global, only ever raised here) to ours, so that
    an image our limit allows is not refused by Pillow's."""
    if PILImage.MAX_IMAGE_PIXELS is not None and (max_pixels is None or max_pixels > PILImage.MAX_IMAGE_PIXELS):
        PILImage.MAX_IMAGE_PIXELS = max_pixels


def read_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image:
    """Read an image file (PNG 8/16-bit, JPEG, WebP, BMP, TIFF, ...) into an :class:`Image`.

    Images of more than ``max_pixels`` pixels are refused before decoding (None: no limit)."""
    path = os.fspath(path)
    try:
        with open_regular(path) as f:
            data = f.read()
    except NotRegularFileError as e:
        raise ImageReadError(str(e)) from None
    except OSError as e:
        if os.path.islink(path) and not os.path.exists(path):
            raise ImageReadError(f"{path}: a symbolic link to {os.readlink(path)}, which does not exist") from None
        raise ImageReadError(f"{path}: cannot read: {e.strerror or e}") from None
    buffer = io.BytesIO(data)
    try:
        if png16.needs_png16(data):
            header = png16.read_header(data)
            _check_size(path, header["width"], header["height"], max_pixels)
            arr = _upright(png16.decode(data), png16.read_exif(data))
            key = png16.read_trns(data)
            if key is not None:
                arr = _key_alpha(arr, key, 65535)
            img = _from_array(arr, 65535.0, arr.shape[2] in (1, 2), path, 16)
            return img.with_(icc=_matching_icc(png16.read_icc(data), img))
        _allow_in_pillow(max_pixels)
        im = PILImage.open(buffer)                 # reads the header only
        _check_size(path, im.size[0], im.size[1], max_pixels)
        tile = list(im.tile)                       # how the pixels are stored; load() clears it
        im.load()                                  # decode now: truncated files fail here
        icc = im.info.get("icc_profile")
        file_bits = _file_bits(im, tile, data)
        if im.mode == "I" and file_bits > 16:     # read as 16-bit, every value past 65535 would be white
            raise ImageReadError(f"{path}: {file_bits}-bit integer samples are not supported (at most 16 bits): "
                                 "convert the image to 16 bits")
        img = _deep(im, tile, data, path) or _decoded(ImageOps.exif_transpose(im), path)
        return img.with_(icc=_matching_icc(icc, img), frames=int(getattr(im, "n_frames", 1)),
                         file_bits=max(img.bits, file_bits))
    except ImageReadError:
        raise
    except PILImage.DecompressionBombError:      # past twice Pillow's own limit
        raise ImageReadError(f"{path}: the image has more pixels than the limit of {max_pixels:,} (a guard against "
                             "decompression bombs); raise it with --max-pixels if the file is trusted") from None
    except PILImage.UnidentifiedImageError:
        raise ImageReadError(f"{path}: cannot decode image: not a format Pillow can identify") from None
    except Exception as e:  # OSError('image file is truncated'), png16.PNGError, ...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        msg = msg.replace(repr(buffer), "the file").replace(str(buffer), "the file")
        raise ImageReadError(f"{path}: cannot decode image: {msg}") from None


# EXIF orientation -> the turn that makes the image upright, as ImageOps.exif_transpose does it
_UPRIGHT = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
            5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
            7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1], 8: lambda a: np.rot90(a, 1)}


def _upright(arr: np.ndarray, exif: bytes | None) -> np.ndarray:
    """(H, W, C) ``arr`` turned as the orientation of ``exif`` (a PNG's eXIf chunk) says."""
    if not exif:
        return arr
    tags = PILImage.Exif()
    tags.load(exif)
    turn = _UPRIGHT.get(tags.get(0x0112))
    return arr if turn is None else np.ascontiguousarray(turn(arr))


def precision_lost(img: Image, path: str) -> str | None:
    """What reading lost, in words, when the file holds more bits per sample than were read (a layout
    read through Pillow's 8-bit decoders, such as an interlaced 16-bit PNG); None when nothing was."""
    if img.file_bits <= img.bits:
        return None
    return (f"{path}: has {img.file_bits}-bit samples, read at {img.bits} bits (this layout is not read at full "
            "precision)")


def _file_bits(im: PILImage.Image, tile: list, data: bytes) -> int:
    """Bits per sample the file holds (a PNG's bit depth, a TIFF's BitsPerSample, 16 for a PPM whose
    maxval passes 255), whatever Pillow decoded it to."""
    if im.format == "PNG":
        return png16.read_header(data)["bit_depth"]
    if im.format == "TIFF":
        bits = im.tag_v2.get(258, 8)
        return max(bits) if isinstance(bits, tuple) else int(bits)
    if im.format == "PPM" and _ppm_maxval(tile) > 255:
        return 16
    return 8


def _ppm_maxval(tile: list) -> int:
    """A PPM's maxval where Pillow's PPM decoders scale its samples to 8 bits (0 otherwise: a
    16-bit PGM that Pillow reads as 16-bit samples)."""
    return tile[0].args[1] if tile and tile[0].codec_name in ("ppm", "ppm_plain") else 0


# Pillow decodes a TIFF's 16-bit samples to their high byte; read as the other byte order, the same
# data gives the low byte. "N" is the machine's own order.
_OTHER_ORDER = {"L": "B", "B": "L", "N": "B" if sys.byteorder == "little" else "L"}
_LOW_BYTE = {f"{m};16{o}": f"{m};16{_OTHER_ORDER[o]}" for m in ("RGB", "RGBA") for o in "LBN"}


def _deep(im: PILImage.Image, tile: list, data: bytes, path: str) -> Image | None:
    """A PPM or TIFF of 16-bit (or PPM maxval > 255) RGB(A) samples at full precision, which Pillow
    (``im``, decoded from ``tile``) reduces to 8 bits; None for any other image."""
    if im.format == "PPM" and im.mode == "RGB" and _ppm_maxval(tile) > 255:
        maxval, offset, (w, h) = _ppm_maxval(tile), tile[0].offset, im.size
        if tile[0].codec_name == "ppm":               # P6: big-endian 16-bit samples
            raw = data[offset:offset + 6 * w * h]
            if len(raw) < 6 * w * h:
                raise ImageReadError(f"{path}: cannot decode image: PPM file is truncated")
            arr = np.frombuffer(raw, ">u2")
        else:                                         # P3: decimal numbers, comments allowed
            text = re.sub(rb"#[^\n]*", b" ", data[offset:])
            arr = np.array(text.split()[:3 * w * h], dtype=np.int64)
            if arr.size < 3 * w * h:
                raise ImageReadError(f"{path}: cannot decode image: PPM file is truncated")
        arr = np.minimum(arr.reshape(h, w, 3), maxval)      # a sample above maxval (malformed) is clipped
        return _from_array(arr, float(maxval), False, path, 16)
    if im.format == "TIFF" and tile and all(t.args and t.args[0] in _LOW_BYTE for t in tile):
        low = PILImage.open(io.BytesIO(data))
        low.tile = [t._replace(args=(_LOW_BYTE[t.args[0]], *t.args[1:])) for t in low.tile]
        low.load()
        high = np.asarray(ImageOps.exif_transpose(im)).astype(np.uint16)
        arr = (high << 8) | np.asarray(ImageOps.exif_transpose(low)).astype(np.uint16)
        return _from_array(arr, 65535.0, False, path, 16)
    return None


def _key_alpha(arr: np.ndarray, key, white: int) -> np.ndarray:
    """``arr`` (H, W) or (H, W, C) with an alpha channel added: 0 where a pixel is ``key`` (the colour a
    PNG's tRNS chunk makes transparent), ``white`` elsewhere."""
    arr = arr if arr.ndim == 3 else arr[:, :, None]
    opaque = (arr.astype(np.int64) != np.asarray(key, dtype=np.int64).reshape(-1)).any(-1)
    return np.dstack([arr, np.where(opaque, white, 0).astype(arr.dtype)])


def _decoded(im: PILImage.Image, path: str) -> Image:
    """A decoded Pillow image -> :class:`Image` (greyscale, alpha and 16 bits kept)."""
    mode = im.mode
    # a grey or RGB PNG's tRNS colour key: pixels of that value are transparent (an int, or an RGB tuple)
    key = im.info.get("transparency")
    if mode.startswith("I;16") or mode == "I":
        arr = np.clip(np.asarray(im, dtype=np.int64), 0, 65535).astype(np.uint16)
        return _from_array(_key_alpha(arr, key, 65535) if isinstance(key, int) else arr, 65535.0, True, path, 16)
    if mode in ("1", "L"):
        arr = np.asarray(im.convert("L"))
        return _from_array(_key_alpha(arr, key, 255) if isinstance(key, int) else arr, 255.0, True, path, 8)
    if mode in ("LA", "La"):
        return _from_array(np.asarray(im.convert("LA")), 255.0, True, path, 8)
    if mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in im.info):
        return _from_array(np.asarray(im.convert("RGBA")), 255.0, False, path, 8)
    if mode == "F":
        raise ImageReadError(f"{path}: floating-point images are not supported")
    arr = np.asarray(im.convert("RGB"))
    if mode == "RGB" and isinstance(key, tuple) and len(key) == 3:
        arr = _key_alpha(arr, key, 255)
    return _from_array(arr, 255.0, False, path, 8)


def _matching_icc(icc: bytes | None, img: Image) -> bytes | None:
    """``icc`` when its colour space (header bytes 16-20) is that of the pixels as written: RGB, or
    GRAY for greyscale; a CMYK profile no longer describes pixels converted to RGB."""
    if not icc or len(icc) < 20:
        return None
    return icc if icc[16:20] == (b"GRAY" if img.gray else b"RGB ") else None


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) float in [0, 1] -> (H, W, C) uint8, rounded (the 8-bit quantisation of the metrics)."""
    return torch.round(x.detach().float().clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def _quant(x: torch.Tensor, bits: int) -> np.ndarray:
    m = 65535.0 if bits == 16 else 255.0
    q = torch.round(x.detach().double().clamp(0, 1) * m).permute(1, 2, 0).cpu().numpy()
    return q.astype(np.uint16 if bits == 16 else np.uint8)


def _to_gray(rgb: torch.Tensor) -> torch.Tensor:
    # ITU-R 601-2 luma, the weights PIL uses for convert("L")
    w = torch.tensor([0.299, 0.587, 0.114], dtype=rgb.dtype, device=rgb.device).view(3, 1, 1)
    return (rgb * w).sum(0, keepdim=True)


def write_image(path: str | os.PathLike, img: Image, quality: int = 95) -> list[str]:
    """Write ``img`` to ``path``; the format comes from the extension (.png, .jpg/.jpeg, .webp).

    PNG keeps 16 bits where the image has them; JPEG and WebP are 8-bit, and JPEG drops the alpha.
    Greyscale images are written greyscale. Returns warnings (lossy conversions) as strings.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in WRITE_FORMATS:
        raise ValueError(f"{path}: cannot write {ext or 'files without an extension'}: use "
                         + ", ".join(sorted(WRITE_FORMATS)))
    fmt = WRITE_FORMATS[ext]
    warnings = []
    color = _to_gray(img.rgb) if img.gray else img.rgb
    alpha = img.alpha
    if alpha is not None and fmt == "JPEG":
        warnings.append(f"{path}: JPEG has no alpha channel: alpha dropped")
        alpha = None
    planes = color if alpha is None else torch.cat([color, alpha.to(color)], 0)
    bits = img.bits if fmt == "PNG" else 8
    if img.bits == 16 and bits == 8:
        warnings.append(f"{path}: {fmt} is 8-bit: 16-bit image reduced to 8 bits")
    arr = _quant(planes, bits)
    icc = {"icc_profile": img.icc} if img.icc else {}
    if bits == 16:
        if arr.shape[2] == 1:
            writer = lambda tmp: PILImage.fromarray(arr[:, :, 0]).save(tmp, format="PNG", **icc)  # noqa: E731
        else:
            data = png16.encode(arr, img.icc)
            writer = lambda tmp: Path(tmp).write_bytes(data)  # noqa: E731
    else:
        pil = PILImage.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        kw = {"quality": quality, **icc} if fmt in ("JPEG", "WEBP") else icc
        writer = lambda tmp: pil.save(tmp, format=fmt, **kw)  # noqa: E731
    atomic_write(path, writer)
    return warnings
