"""A small PNG reader and writer for 16-bit-per-channel images, which Pillow reduces to 8 bits.

Pillow keeps 16-bit greyscale ("I;16") but decodes 16-bit RGB, RGBA and grey+alpha PNGs to 8 bits
and cannot write them. This module handles exactly those: non-interlaced, bit depth 16, colour types
0 (grey), 2 (RGB), 4 (grey + alpha), 6 (RGBA). Unfiltering runs along anti-diagonals (a wavefront),
so every PNG filter, Paeth included, is vectorised with numpy: pixel (r, j) depends only on (r, j-1),
(r-1, j) and (r-1, j-1), all on earlier diagonals.
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}


class PNGError(ValueError):
    pass


def read_header(data: bytes) -> dict | None:
    """IHDR fields of a PNG, or None if ``data`` is not a PNG."""
    if len(data) < 33 or not data.startswith(SIGNATURE) or data[12:16] != b"IHDR":
        return None
    w, h, depth, ctype, _comp, _filt, interlace = struct.unpack(">IIBBBBB", data[16:29])
    return dict(width=w, height=h, bit_depth=depth, color_type=ctype, interlace=interlace)


def needs_png16(data: bytes) -> bool:
    hdr = read_header(data)
    return bool(hdr and hdr["bit_depth"] == 16 and hdr["color_type"] in (2, 4, 6) and hdr["interlace"] == 0)


def _unfilter(raw: np.ndarray, h: int, w: int, bpp: int) -> np.ndarray:
    stride = w * bpp
    rows = raw.reshape(h, stride + 1)
    ftype = rows[:, 0].astype(np.int64)
    if ftype.max(initial=0) > 4:
        raise PNGError("invalid PNG filter type")
    filt = rows[:, 1:].reshape(h, w, bpp).astype(np.int64)
    if not ftype.any():
        return filt.astype(np.uint8)
    out = np.zeros((h + 1, w + 1, bpp), dtype=np.int64)     # one zero row above, one zero column left
    for d in range(h + w - 1):
        r = np.arange(max(0, d - w + 1), min(h - 1, d) + 1)
        j = d - r
        a = out[r + 1, j]          # left
        b = out[r, j + 1]          # up
        c = out[r, j]              # up-left
        f = ftype[r][:, None]
        p = a + b - c
        pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        pred = np.select([f == 1, f == 2, f == 3, f == 4], [a, b, (a + b) >> 1, paeth], 0)
        out[r + 1, j + 1] = (filt[r, j] + pred) & 255
    return out[1:, 1:].astype(np.uint8)


def decode(data: bytes) -> np.ndarray:
    """A 16-bit PNG -> uint16 array (H, W, C)."""
    hdr = read_header(data)
    if hdr is None:
        raise PNGError("not a PNG file")
    if hdr["bit_depth"] != 16 or hdr["color_type"] not in CHANNELS or hdr["interlace"] != 0:
        raise PNGError("png16 reads non-interlaced 16-bit PNGs only")
    pos, idat = 8, []
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if len(body) != length:
            raise PNGError("PNG file is truncated")
        if ctype == b"IDAT":
            idat.append(body)
        elif ctype == b"IEND":
            break
        pos += 12 + length
    else:
        raise PNGError("PNG file is truncated (no IEND chunk)")
    h, w, ch = hdr["height"], hdr["width"], CHANNELS[hdr["color_type"]]
    bpp = 2 * ch
    expected = h * (w * bpp + 1)
    try:
        # At most what the header promises (plus one byte to notice more): a small file cannot
        # inflate into gigabytes that its header does not declare.
        inflater = zlib.decompressobj()
        raw = inflater.decompress(b"".join(idat), expected + 1)
    except zlib.error as e:
        raise PNGError(f"PNG data is corrupt: {e}") from None
    if len(raw) > expected:
        raise PNGError("PNG image data is longer than its header's size")
    if len(raw) != expected:
        raise PNGError("PNG image data is truncated")
    px = _unfilter(np.frombuffer(raw, dtype=np.uint8), h, w, bpp)
    return px.reshape(h, w * bpp).view(">u2").reshape(h, w, ch).astype(np.uint16)


MAX_ICC_BYTES = 16 << 20     # colour profiles are kilobytes; a bigger one is not inflated


def _find_chunk(data: bytes, kind: bytes, stop: tuple[bytes, ...]) -> bytes | None:
    """The body of a PNG's first ``kind`` chunk, or None where a chunk of ``stop`` (or the file's
    end) comes first."""
    pos = 8
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        if ctype == kind:
            return data[pos + 8:pos + 8 + length]
        if ctype in stop:
            return None
        pos += 12 + length
    return None


def read_icc(data: bytes) -> bytes | None:
    """The ICC colour profile of a PNG's iCCP chunk (name, 0, method 0, zlib data), or None."""
    body = _find_chunk(data, b"iCCP", (b"IDAT", b"IEND"))   # iCCP comes before the image data
    if body is None:
        return None
    name_end = body.find(b"\0")
    if name_end < 0 or body[name_end + 1:name_end + 2] != b"\0":
        raise PNGError("PNG iCCP chunk is malformed")
    try:
        icc = zlib.decompressobj().decompress(body[name_end + 2:], MAX_ICC_BYTES + 1)
    except zlib.error as e:
        raise PNGError(f"PNG colour profile is corrupt: {e}") from None
    if len(icc) > MAX_ICC_BYTES:
        raise PNGError("PNG colour profile is larger than 16 MiB")
    return icc


def read_exif(data: bytes) -> bytes | None:
    """The body of a PNG's eXIf chunk (EXIF data, which says how to turn the image upright), or None."""
    return _find_chunk(data, b"eXIf", (b"IEND",))


def read_trns(data: bytes) -> tuple[int, ...] | None:
    """The colour key of a grey or RGB PNG's tRNS chunk (one or three 16-bit samples: pixels of that
    value are transparent), or None."""
    hdr = read_header(data)
    n = {0: 1, 2: 3}.get(hdr["color_type"]) if hdr else None
    body = _find_chunk(data, b"tRNS", (b"IDAT", b"IEND")) if n else None   # tRNS comes before the image data
    if body is None:
        return None
    if len(body) != 2 * n:
        raise PNGError("PNG tRNS chunk is malformed")
    return struct.unpack(f">{n}H", body)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def encode(arr: np.ndarray, icc: bytes | None = None) -> bytes:
    """uint16 array (H, W) or (H, W, C) with C in 1..4 -> PNG bytes (filter 'Up' on every row),
    with ``icc`` as its colour profile (an iCCP chunk) when given."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    h, w, ch = arr.shape
    ctype = {1: 0, 2: 4, 3: 2, 4: 6}[ch]
    be = arr.astype(">u2").reshape(h, w * ch).view(np.uint8)
    up = be.copy()
    up[1:] = be[1:] - be[:-1]                         # filter type 2 (Up), modulo 256
    rows = np.concatenate([np.full((h, 1), 2 if h > 1 else 0, np.uint8), up], axis=1)
    rows[0, 0] = 0                                     # first row: no row above, filter None
    rows[0, 1:] = be[0]
    ihdr = struct.pack(">IIBBBBB", w, h, 16, ctype, 0, 0, 0)
    profile = _chunk(b"iCCP", b"ICC profile\0\0" + zlib.compress(icc)) if icc else b""
    return (SIGNATURE + _chunk(b"IHDR", ihdr) + profile + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + _chunk(b"IEND", b""))
