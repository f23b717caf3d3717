"""Checkpoint loading, image I/O and ``fastdrn upscale`` (fastdrn.tools.checkpoint, image_io, infer, upscale)."""
import io
import os
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

import fastdrn
import fastdrn.reference
from fastdrn import cli
from fastdrn.tools import png16
from fastdrn.tools.checkpoint import (CheckpointError, atomic_write, build_model,
                                      infer_config, load_model)
from fastdrn.tools.image_io import ImageReadError, read_image
from fastdrn.tools.imresize import upsample
from fastdrn.tools.infer import forward_tiled, receptive_radius, self_ensemble, super_resolve

CFG = dict(scale=2, n_feats=8, n_groups=2, n_blocks=2, inner=8, distill=4)


@pytest.fixture(autouse=True)
def _env(_seed_and_backend, monkeypatch):
    monkeypatch.setenv("FASTDRN_BACKEND", "torch")   # plain math: never the Triton interpreter here
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(**over):
    return fastdrn.reference.DRN(**{**CFG, **over}).eval()


@pytest.fixture
def weights(tmp_path):
    """A plain state_dict saved with torch.save: must load with no flags."""
    m = _model()
    path = tmp_path / "drn_x2.pt"
    torch.save(m.state_dict(), path)
    return str(path), m


def _texture(h, w, c=3, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 0.5 + 0.25 * np.sin(xx / 3.0 + yy / 5.0)[..., None] + 0.2 * rng.random((h, w, c))
    return np.clip(base, 0, 1)


# ------------------------------------------------------------------------------------ checkpoints

@pytest.mark.parametrize("cfg", [CFG, dict(scale=3, n_feats=12, n_groups=1, n_blocks=3, inner=16, distill=2),
                                 dict(scale=4, n_feats=4, n_groups=3, n_blocks=0, inner=64, distill=8)])
def test_infer_config_from_shapes(cfg):
    sd = fastdrn.reference.DRN(**cfg).state_dict()
    got = infer_config(sd)
    for k, v in cfg.items():
        if cfg["n_blocks"] == 0 and k in ("inner", "distill"):
            continue
        assert got[k] == v, k
    model, loaded_cfg = load_model(sd)
    assert loaded_cfg["scale"] == cfg["scale"]


@pytest.mark.parametrize("wrap", ["plain", "params", "params_ema", "state_dict", "model", "module", "both"])
def test_common_wrappers(tmp_path, wrap):
    m = _model()
    sd = m.state_dict()
    obj = {
        "plain": sd,
        "params": {"params": sd},
        "params_ema": {"params": {k: torch.zeros_like(v) for k, v in sd.items()}, "params_ema": sd},
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model": {"model": sd, "optimizer": {"state": {}}},
        "module": {"module." + k: v for k, v in sd.items()},
        "both": {"state_dict": {"module._orig_mod." + k: v for k, v in sd.items()}},
    }[wrap]
    torch.save(obj, tmp_path / "w.pt")
    loaded, _ = load_model(tmp_path / "w.pt")
    x = torch.rand(1, 3, 9, 11)
    torch.testing.assert_close(loaded(x), m(x))     # loaded may be the fused fastdrn.DRN


def test_mismatch_errors_list_everything(tmp_path):
    sd = _model().state_dict()
    torch.save(sd, tmp_path / "x2.pt")
    with pytest.raises(CheckpointError, match=r"scale: checkpoint has 2, expected 4"):
        load_model(tmp_path / "x2.pt", expect={"scale": 4})
    bad = dict(sd)
    del bad["groups.1.compress.bias"]
    bad["extra.weight"] = torch.zeros(2)
    bad["tail.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointError) as e:
        load_model(bad)
    msg = str(e.value)
    assert "missing keys (1)" in msg and "groups.1.compress.bias" in msg
    assert "unexpected keys (1)" in msg and "extra.weight" in msg
    assert "mis-shaped keys (1)" in msg and "tail.bias: checkpoint (5,) vs model (3,)" in msg
    # not a DRN at all
    with pytest.raises(CheckpointError, match="not a DRN state_dict: missing head.weight"):
        load_model({"fc.weight": torch.zeros(3, 3)})
    # CLI: exit code 2 and the message
    img = tmp_path / "a.png"
    PILImage.fromarray((_texture(8, 8) * 255).astype(np.uint8)).save(img)
    assert cli.main(["upscale", str(img), "-o", str(tmp_path / "o"), "--weights", str(tmp_path / "x2.pt"), "--device", "cpu",
                     "--scale", "3"]) == 2


def test_unsafe_or_corrupt_checkpoints_are_refused(tmp_path):
    torch.save({"model": _model().state_dict(), "obj": np.arange(3)}, tmp_path / "unsafe.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_model(tmp_path / "unsafe.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_model(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(tmp_path / "missing.pt")


def test_build_model_switches_to_fastdrn_DRN(monkeypatch):
    class Fake(fastdrn.reference.DRN):
        pass
    assert type(build_model(**CFG)) is (fastdrn.DRN if hasattr(fastdrn, "DRN") else fastdrn.reference.DRN)
    monkeypatch.setattr(fastdrn, "DRN", Fake, raising=False)
    assert type(build_model(**CFG)) is Fake


def test_atomic_write_never_leaves_half_files(tmp_path):
    dst = tmp_path / "out.bin"
    dst.write_bytes(b"old")

    def failing(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(dst, failing)
    assert dst.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]
    atomic_write(dst, lambda tmp: open(tmp, "wb").close() or None)
    assert dst.read_bytes() == b"" and os.listdir(tmp_path) == ["out.bin"]



def test_atomic_write_errors_name_the_destination_not_the_temporary_file(tmp_path, weights, capsys):
    (tmp_path / "a_file").write_bytes(b"x")
    (tmp_path / "a_folder.png").mkdir()
    writes = []

    def write(tmp):
        writes.append(tmp)
        open(tmp, "wb").close()

    blocked = tmp_path / "a_file" / "sub" / "out.png"
    with pytest.raises(OSError, match="^" + re.escape(f"{blocked}: cannot write: {tmp_path / 'a_file'} is a file, not a folder")
                       + "$"):
        atomic_write(blocked, write)
    with pytest.raises(IsADirectoryError, match="a_folder.png: cannot write: it is a folder$"):
        atomic_write(tmp_path / "a_folder.png", write)
    assert not writes                                   # refused before anything was written

    def failing(tmp):
        raise PermissionError(13, "Permission denied", tmp)

    with pytest.raises(PermissionError, match="^" + re.escape(f"{tmp_path / 'out.png'}: cannot write: Permission denied")
                       + "$") as e:
        atomic_write(tmp_path / "out.png", failing)
    assert e.value.errno == 13
    assert sorted(os.listdir(tmp_path)) == ["a_file", "a_folder.png", "drn_x2.pt"]   # no temporary file left
    # the command line reports it by the output's name, for each input
    PILImage.new("RGB", (5, 4)).save(tmp_path / "in.png")
    PILImage.new("L", (5, 4)).save(tmp_path / "in2.png")
    capsys.readouterr()
    assert cli.main(["upscale", str(tmp_path / "in.png"), str(tmp_path / "in2.png"), "-o", str(tmp_path / "a_file"),
                     "--weights", weights[0]]) == 1
    err = capsys.readouterr().err
    for name in ("in.png", "in2.png"):
        assert f"{tmp_path / 'a_file' / name}: cannot write: {tmp_path / 'a_file'} is a file, not a folder" in err
    assert "Errno" not in err and ".tmp" not in err



def test_atomic_write_takes_any_name_the_file_system_takes(tmp_path):
    """The temporary name held the whole stem plus 15 characters: a legal 249-character name failed
    with 'File name too long'. Stale temporary files of such a name are still recognised."""
    from fastdrn.tools.checkpoint import temp_name_pattern
    for stem in ("a" * 245, "é" * 120):                       # 249 characters; 244 bytes in UTF-8
        dst = tmp_path / (stem + ".png")
        seen = []
        atomic_write(dst, lambda tmp: seen.append(os.path.basename(tmp)) or open(tmp, "wb").close())
        assert dst.exists() and temp_name_pattern(dst).fullmatch(seen[0])
    assert sorted(os.listdir(tmp_path)) == sorted(["a" * 245 + ".png", "é" * 120 + ".png"])


# --------------------------------------------------------------------------------- tiling, ensemble

def test_receptive_radius_is_tight():
    m = _model()
    r = receptive_radius(CFG)
    x = torch.zeros(1, 3, 2 * r + 5, 2 * r + 5)
    x2 = x.clone()
    c = r + 2
    x2[..., c, c] = 1.0
    with torch.no_grad():
        d = (m(x2) - m(x)).abs().sum(1)[0]
    ys, xs = d.nonzero(as_tuple=True)
    s = CFG["scale"]
    reach = max((ys // s - c).abs().max().item(), (xs // s - c).abs().max().item())
    assert reach == r


@pytest.mark.parametrize("scale,tile", [(2, 16), (3, 11)])
def test_tiled_equals_untiled(scale, tile):
    cfg = {**CFG, "scale": scale}
    m = _model(scale=scale)
    x = torch.rand(3, 45, 38)
    r = receptive_radius(cfg)
    full = super_resolve(m, x, scale)
    tiled = super_resolve(m, x, scale, tile=tile, overlap=r)
    assert tiled.shape == full.shape == (3, 45 * scale, 38 * scale)
    assert (tiled - full).abs().max().item() < 1e-5
    # too little overlap shows seams: the check above is sensitive
    seamy = super_resolve(m, x, scale, tile=tile, overlap=r // 2)
    assert (seamy - full).abs().max().item() > 1e-3
    # ensemble + tiles
    e_full = super_resolve(m, x, scale, ensemble=True)
    e_tiled = super_resolve(m, x, scale, ensemble=True, tile=tile, overlap=r)
    assert (e_full - e_tiled).abs().max().item() < 1e-5


@pytest.mark.parametrize("tile", [None, 4])     # whole image, and tiles (where a wrong scale mis-cut the output)
def test_super_resolve_refuses_a_scale_or_channels_the_model_does_not_have(tile):
    """With tiles, scale=2 for an x3 model wrote each tile's x3 output into an x2 canvas: a wrong
    image, no error; a 1-channel input to a 3-colour reference model came out as 3 channels."""
    m = _model(scale=3)
    with pytest.raises(ValueError, match=r"scale=2 .*\(1, 3, \d+, \d+\) gave \(1, 3, \d+, \d+\)"):
        super_resolve(m, torch.rand(3, 9, 11), 2, tile=tile, radius=receptive_radius(CFG))
    with pytest.raises(ValueError, match=r"\(1, 1, 5, 5\) gave \(1, 3, 15, 15\)"):
        super_resolve(m, torch.rand(1, 5, 5), 3, tile=tile, radius=receptive_radius(CFG))


@pytest.mark.parametrize("kw,message", [
    (dict(tile=-4), "tile must be an int >= 0 or None, got -4"),      # ran untiled, silently
    (dict(tile=2.5), "tile must be an int >= 0 or None, got 2.5"),    # range(): TypeError naming no argument
    (dict(tile=True), "tile must be an int >= 0 or None, got True"),  # ran as tiles of 1 pixel
    (dict(tile=0, overlap=-1), "overlap must be an int >= 0, got -1"),  # ignored without tiles
    (dict(tile=4, overlap=1.5), "overlap must be an int >= 0, got 1.5"),
])
def test_forward_tiled_refuses_a_bad_tile_or_overlap(kw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        forward_tiled(_model(), torch.rand(1, 3, 9, 11), CFG["scale"], **kw)


@pytest.mark.parametrize("lr,dtype,message", [
    (torch.rand(5, 5), "fp32", r"an image \(C, H, W\) or batch \(N, C, H, W\), got shape \(5, 5\)"),  # unpack error
    (torch.rand(3, 5, 5), "fp8", "dtype must be one of fp32, bf16, fp16, got 'fp8'"),               # KeyError 'fp8'
    # a uint8 image (torchvision.io.read_image's) was taken as [0, 1] values: an output 255 times too bright
    ((torch.rand(3, 5, 5) * 255).to(torch.uint8), "fp32", r"floating-point image in \[0, 1\], got torch.uint8"),
])
def test_super_resolve_names_a_bad_image_shape_or_dtype(lr, dtype, message):
    with pytest.raises(ValueError, match=message):
        super_resolve(_model(), lr, CFG["scale"], dtype=dtype)


def test_self_ensemble_is_mean_of_eight_transforms():
    x = torch.rand(1, 3, 5, 7)
    calls = []

    def fn(t):
        calls.append(tuple(t.shape))
        return t * 2 + t[..., :1, :1]            # not equivariant: the corner pixel differs per transform
    out = self_ensemble(fn, x)
    assert len(calls) == 8 and calls.count((1, 3, 7, 5)) == 4
    corners = [x[..., 0, 0], x[..., 0, -1], x[..., -1, 0], x[..., -1, -1]]
    expected = x * 2 + sum(c[..., None, None] for c in corners) * 2 / 8
    torch.testing.assert_close(out, expected)


def test_forward_tiled_without_tiles_is_plain():
    m = _model()
    x = torch.rand(1, 3, 10, 12)
    with torch.no_grad():
        torch.testing.assert_close(forward_tiled(m, x, 2, None), m(x))


# ------------------------------------------------------------------------------------------ files

def _encode_with_filters(arr, ftypes):
    """A 16-bit PNG whose rows use the given PNG filter types (an independent, row-by-row encoder)."""
    h, w, ch = arr.shape
    bpp = 2 * ch
    be = arr.astype(">u2").reshape(h, w * ch).view(np.uint8).astype(np.int64)
    rows = []
    for r in range(h):
        row, prev = be[r], (be[r - 1] if r else np.zeros_like(be[r]))
        left = np.concatenate([np.zeros(bpp, np.int64), row[:-bpp]])
        ul = np.concatenate([np.zeros(bpp, np.int64), prev[:-bpp]])
        f = ftypes[r % len(ftypes)]
        if f == 0:
            pred = 0
        elif f == 1:
            pred = left
        elif f == 2:
            pred = prev
        elif f == 3:
            pred = (left + prev) >> 1
        else:
            p = left + prev - ul
            pa, pb, pc = abs(p - left), abs(p - prev), abs(p - ul)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, ul))
        rows.append(bytes([f]) + ((row - pred) & 255).astype(np.uint8).tobytes())
    ctype = {1: 0, 2: 4, 3: 2, 4: 6}[ch]

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, ctype, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


@pytest.mark.parametrize("ch", [1, 2, 3, 4])
def test_png16_decoder_all_filters(ch):
    a = np.random.default_rng(ch).integers(0, 65536, (23, 31, ch)).astype(np.uint16)
    assert (png16.decode(_encode_with_filters(a, [0, 1, 2, 3, 4, 4, 1, 3])) == a).all()
    assert (png16.decode(png16.encode(a)) == a).all()


def _save(path, arr, **kw):
    if arr.dtype == np.uint16 and arr.ndim == 3:
        path.write_bytes(png16.encode(arr))
    else:
        PILImage.fromarray(arr).save(path, **kw)
    return str(path)


def _expected_rgb(model, rgb01):
    return super_resolve(model, torch.from_numpy(rgb01.transpose(2, 0, 1)).float(), CFG["scale"]).clamp(0, 1)


def test_upscale_kinds_of_images(tmp_path, weights):
    wpath, m = weights
    src = tmp_path / "in"
    src.mkdir()
    tex = _texture(12, 10)
    rgb8 = (tex * 255).round().astype(np.uint8)
    _save(src / "rgb.png", rgb8)
    _save(src / "gray.png", rgb8[..., 0])
    alpha = (np.linspace(0, 255, 120).reshape(12, 10)).round().astype(np.uint8)
    _save(src / "rgba.png", np.dstack([rgb8, alpha]))
    _save(src / "gray16.png", (tex[..., 1] * 65535).round().astype(np.uint16))
    rgb16 = (tex * 65535).round().astype(np.uint16)
    _save(src / "rgb16.png", rgb16)
    _save(src / "photo.jpg", rgb8, quality=95)
    _save(src / "photo.webp", rgb8, quality=95)
    out = tmp_path / "out"
    assert cli.main(["upscale", str(src), "-o", str(out), "--weights", wpath, "--device", "cpu"]) == 0
    assert sorted(os.listdir(out)) == sorted(os.listdir(src))

    im = PILImage.open(out / "rgb.png")
    assert im.mode == "RGB" and im.size == (20, 24)
    want = np.round(_expected_rgb(m, rgb8 / 255.0).permute(1, 2, 0).numpy() * 255)
    assert np.abs(np.asarray(im).astype(float) - want).max() <= 1
    assert PILImage.open(out / "gray.png").mode == "L"
    im = PILImage.open(out / "rgba.png")
    assert im.mode == "RGBA" and im.size == (20, 24)
    a_want = np.round(upsample(torch.from_numpy(alpha / 255.0)[None], 2).clamp(0, 1)[0].numpy() * 255)
    assert np.abs(np.asarray(im)[..., 3].astype(float) - a_want).max() <= 1
    im = PILImage.open(out / "gray16.png")
    assert im.mode.startswith("I") and im.size == (20, 24)
    assert np.asarray(im).max() > 255                       # still 16-bit values
    got16 = png16.decode((out / "rgb16.png").read_bytes())
    assert got16.dtype == np.uint16 and got16.shape == (24, 20, 3)
    want16 = _expected_rgb(m, rgb16 / 65535.0).permute(1, 2, 0).numpy() * 65535
    assert np.abs(got16 - want16).max() <= 1.0               # not reduced to 8 bits
    assert PILImage.open(out / "photo.jpg").format == "JPEG"
    assert PILImage.open(out / "photo.webp").format == "WEBP"


def _tiff16(arr: np.ndarray, order: str = "<", deflate: bool = False) -> bytes:
    """A one-strip TIFF of 16-bit RGB or RGBA samples (Pillow cannot write one); ``deflate`` makes
    Pillow decode it through libtiff instead of its own raw decoder."""
    h, w, ch = arr.shape
    data = arr.astype(order + "u2").tobytes()
    data = zlib.compress(data) if deflate else data
    bits_at = 8 + len(data)
    tags = [(256, 3, 1, w), (257, 3, 1, h), (258, 3, ch, bits_at), (259, 3, 1, 8 if deflate else 1),
            (262, 3, 1, 2), (273, 4, 1, 8), (277, 3, 1, ch), (278, 3, 1, h), (279, 4, 1, len(data)),
            (284, 3, 1, 1)] + ([(338, 3, 1, 2)] if ch == 4 else [])       # 338: alpha, not premultiplied
    ifd_at = bits_at + 2 * ch
    head = (b"II*\0" if order == "<" else b"MM\0*") + struct.pack(order + "I", ifd_at)
    ifd = struct.pack(order + "H", len(tags)) + b"".join(
        struct.pack(order + "HHI", tag, kind, n) + (struct.pack(order + "HH", v, 0) if kind == 3 and n == 1
                                                    else struct.pack(order + "I", v)) for tag, kind, n, v in tags)
    return head + data + struct.pack(order + f"{ch}H", *[16] * ch) + ifd + struct.pack(order + "I", 0)


def test_16_bit_ppm_and_tiff_come_out_16_bit(tmp_path, weights, capsys):
    """Pillow reads 16-bit RGB PPM and TIFF files as 8-bit: the upscaled PNG was 8-bit without a word.
    They are read at full precision and written as 16-bit PNGs; a 16-bit file still read at 8 bits
    (an interlaced PNG, which png16 does not read) says so."""
    wpath, m = weights
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    tex = _texture(9, 11)                             # odd sizes: rows and columns are not mixed up
    rgb16 = (tex * 65535).round().astype(np.uint16)
    rgba16 = np.dstack([rgb16, rgb16[..., :1] // 3 + 1000])
    (src / "p6.ppm").write_bytes(b"P6\n11 9\n65535\n" + rgb16.astype(">u2").tobytes())
    # P3 (decimal) with a comment and maxval 4095 (12-bit): scaled by the maxval, not by 65535
    rgb12 = (tex * 4095).round().astype(np.uint16)
    (src / "p3.ppm").write_bytes(b"P3\n# 12-bit\n11 9\n4095\n" + " ".join(map(str, rgb12.ravel())).encode())
    (src / "le.tif").write_bytes(_tiff16(rgb16, "<"))
    (src / "be.tif").write_bytes(_tiff16(rgb16, ">"))
    (src / "deflate.tif").write_bytes(_tiff16(rgb16, "<", deflate=True))
    (src / "rgba.tif").write_bytes(_tiff16(rgba16, "<"))
    (src / "grey.pgm").write_bytes(b"P5\n11 9\n65535\n" + rgb16[..., 1].astype(">u2").tobytes())
    for name in ("p6.ppm", "le.tif", "be.tif", "deflate.tif", "rgba.tif", "grey.pgm"):
        img = read_image(src / name)
        assert img.bits == img.file_bits == 16, name
        assert (torch.round(img.rgb * 65535).numpy().transpose(1, 2, 0)
                == (rgb16[..., 1:2] if name == "grey.pgm" else rgb16)).all(), name
    assert (torch.round(read_image(src / "rgba.tif").alpha[0] * 65535).numpy() == rgba16[..., 3]).all()
    assert (torch.round(read_image(src / "p3.ppm").rgb * 4095).numpy().transpose(1, 2, 0) == rgb12).all()
    capsys.readouterr()
    assert cli.main(["upscale", str(src), "-o", str(out), "--weights", wpath, "--device", "cpu"]) == 0
    assert "warning" not in capsys.readouterr().err
    want16 = _expected_rgb(m, rgb16 / 65535.0).permute(1, 2, 0).numpy() * 65535
    for name in ("p6.png", "le.png", "be.png", "deflate.png", "rgba.png"):
        got = png16.decode((out / name).read_bytes())
        assert got.shape == (18, 22, 4 if name == "rgba.png" else 3), name
        assert np.abs(got[..., :3] - want16).max() <= 1.0, name
    got = png16.decode((out / "p3.png").read_bytes())
    assert np.abs(got - _expected_rgb(m, rgb12 / 4095.0).permute(1, 2, 0).numpy() * 65535).max() <= 1.0
    grey = PILImage.open(out / "grey.png")
    assert grey.mode.startswith("I") and np.asarray(grey).max() > 255

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    # 1 x 1: Adam7's first pass holds the only pixel, so the data is that of a plain PNG
    (tmp_path / "interlaced.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 16, 2, 0, 0, 1))
        + chunk(b"IDAT", zlib.compress(b"\0" + rgb16[0, :1].astype(">u2").tobytes())) + chunk(b"IEND", b""))
    assert cli.main(["upscale", str(tmp_path / "interlaced.png"), "-o", str(tmp_path / "il.png"),
                     "--weights", wpath, "--device", "cpu"]) == 0
    assert (f"warning: {tmp_path / 'interlaced.png'}: has 16-bit samples, read at 8 bits (this layout is not read "
            "at full precision): the output is 8-bit") in capsys.readouterr().err


def _profile(space: bytes) -> bytes:
    """Bytes that stand for an ICC profile of a colour space (the header's bytes 16-20)."""
    return bytes(16) + space + bytes(range(60))


def test_colour_profiles_are_kept(tmp_path, weights):
    """The ICC profile was dropped, which shifts the colours of a wide-gamut (Display P3, Adobe RGB)
    photograph. It is written back when it describes the pixels as written (RGB, or GRAY for a
    greyscale image), in every format, 16-bit PNGs included; a CMYK profile on a JPEG that was
    converted to RGB is not."""
    from fastdrn.tools.image_io import write_image
    from fastdrn.tools.png16 import read_icc
    wpath, _ = weights
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    rgb8 = (_texture(6, 7) * 255).astype(np.uint8)
    rgb_icc, gray_icc = _profile(b"RGB "), _profile(b"GRAY")
    _save(src / "a.png", rgb8, icc_profile=rgb_icc)
    _save(src / "b.jpg", rgb8, icc_profile=rgb_icc)
    _save(src / "c.webp", rgb8, icc_profile=rgb_icc)
    _save(src / "d.png", rgb8[:, :, 0], icc_profile=gray_icc)
    (src / "e.png").write_bytes(png16.encode((_texture(6, 7) * 65535).astype(np.uint16), rgb_icc))
    PILImage.fromarray(rgb8).convert("CMYK").save(src / "f.jpg", icc_profile=_profile(b"CMYK"))
    _save(src / "g.png", rgb8[:, :, 0], icc_profile=rgb_icc)     # a profile of another space: dropped
    assert PILImage.open(src / "e.png").info["icc_profile"] == rgb_icc     # png16 writes a valid iCCP
    assert cli.main(["upscale", str(src), "-o", str(out), "--weights", wpath]) == 0
    kept = {name: PILImage.open(out / name).info.get("icc_profile") for name in sorted(os.listdir(out))}
    assert kept == {"a.png": rgb_icc, "b.jpg": rgb_icc, "c.webp": rgb_icc, "d.png": gray_icc, "e.png": rgb_icc,
                    "f.jpg": None, "g.png": None}
    assert read_icc((out / "e.png").read_bytes()) == rgb_icc and read_image(out / "e.png").bits == 16


def test_an_animation_is_said_to_be_upscaled_by_its_first_frame(tmp_path, weights, capsys):
    """An animated GIF or PNG, or a multi-page TIFF, became a still of its first frame without a word."""
    rgb8 = (_texture(6, 7) * 255).astype(np.uint8)
    frames = [PILImage.fromarray(rgb8), PILImage.fromarray(255 - rgb8), PILImage.fromarray(rgb8[::-1])]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "b.png", save_all=True, append_images=frames[1:2])
    frames[0].save(tmp_path / "c.tif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "d.gif")
    capsys.readouterr()
    assert cli.main(["upscale", *(str(tmp_path / n) for n in ("a.gif", "b.png", "c.tif", "d.gif")),
                     "-o", str(tmp_path / "out"), "--weights", weights[0]]) == 0
    err = capsys.readouterr().err
    for name, n in (("a.gif", 3), ("b.png", 2), ("c.tif", 3)):
        assert f"warning: {tmp_path / name}: has {n} frames (an animation or pages): only the first is upscaled" in err
    assert "d.gif" not in err
    assert sorted(os.listdir(tmp_path / "out")) == ["a.png", "b.png", "c.png", "d.png"]


def test_upscale_single_file_formats_and_tiles(tmp_path, weights):
    wpath, m = weights
    rgb8 = (_texture(30, 26) * 255).round().astype(np.uint8)
    src = _save(tmp_path / "a.png", rgb8)
    assert cli.main(["upscale", src, "-o", str(tmp_path / "b.png"), "--weights", wpath, "--device", "cpu"]) == 0
    assert cli.main(["upscale", src, "-o", str(tmp_path / "c.png"), "--weights", wpath, "--device", "cpu", "--tile", "8"]) == 0
    b = np.asarray(PILImage.open(tmp_path / "b.png")).astype(int)
    c = np.asarray(PILImage.open(tmp_path / "c.png")).astype(int)
    assert np.abs(b - c).max() <= 1 and (b == c).mean() > 0.999
    assert cli.main(["upscale", src, "-o", str(tmp_path / "d"), "--weights", wpath, "--device", "cpu", "--format", "webp",
                     "--self-ensemble", "--dtype", "bf16"]) == 0
    assert PILImage.open(tmp_path / "d" / "a.webp").size == (52, 60)
    # a file name as OUTPUT with several inputs is a usage error; an output never overwrites its input
    assert cli.main(["upscale", src, src, "-o", str(tmp_path / "e.png"), "--weights", wpath, "--device", "cpu"]) == 2
    assert cli.main(["upscale", src, "-o", str(tmp_path), "--weights", wpath, "--device", "cpu"]) == 1


def test_output_options_that_cannot_be_honoured_are_refused(tmp_path, weights, capsys):
    """An output that would not be what was asked for is a usage error naming the option, and
    nothing is written: a file extension fastdrn cannot write (not a folder of that name), a
    --format that contradicts the output file's extension, a --suffix that leaves the output
    folder, a --quality out of range."""
    wpath, _ = weights
    src = _save(tmp_path / "a.png", (_texture(6, 7) * 255).astype(np.uint8))
    out = tmp_path / "out"
    out.mkdir()
    cases = [(["-o", str(out / "b.bmp")], "b.bmp: cannot write .bmp images"),
             (["-o", str(out / "b.TIF")], "b.TIF: cannot write .tif images"),
             (["-o", str(out / "b.png"), "--format", "jpeg"], "--format jpeg does not match the output file"),
             (["-o", str(out / "c"), "--suffix", "/../x"], "--suffix '/../x': a suffix of file names cannot hold"),
             ]
    for args, message in cases:
        capsys.readouterr()
        assert cli.main(["upscale", src, *args, "--weights", wpath]) == 2, args
        assert message in capsys.readouterr().err
        assert os.listdir(out) == [] and sorted(os.listdir(tmp_path)) == ["a.png", "drn_x2.pt", "out"]
    with pytest.raises(SystemExit):
        cli.main(["upscale", src, "-o", str(out / "b.jpg"), "--quality", "500", "--weights", wpath])
    assert "--quality: expected a quality from 0 to 100" in capsys.readouterr().err
    # --rgb-range inf wrote an image of NaN cast to bytes; nan and 0 blamed the checkpoint
    for option, value in (("--rgb-range", "inf"), ("--rgb-range", "0"), ("--alpha", "nan")):
        with pytest.raises(SystemExit):
            cli.main(["upscale", src, "-o", str(out / "b.png"), option, value, "--weights", wpath])
        assert f"{option}: expected a finite number > 0, got {value}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--hr-dir", str(tmp_path), "--out", str(out), "--scale", "2", "--rgb-range", "inf"])
    assert "--rgb-range: expected a finite number > 0, got inf" in capsys.readouterr().err
    assert os.listdir(out) == []
    # an option that does nothing here is said to
    assert cli.main(["upscale", src, "-o", str(out / "t.png"), "--tile-overlap", "3", "--weights", wpath]) == 0
    assert "warning: --tile-overlap has no effect without --tile" in capsys.readouterr().err
    os.unlink(out / "t.png")
    # what matches is written: a .jpeg file with --format jpeg, and a folder named like an image
    assert cli.main(["upscale", src, "-o", str(out / "b.jpeg"), "--format", "jpeg", "--weights", wpath]) == 0
    (out / "d.bmp").mkdir()
    assert cli.main(["upscale", src, "-o", str(out / "d.bmp"), "--weights", wpath]) == 0
    assert PILImage.open(out / "b.jpeg").format == "JPEG" and os.listdir(out / "d.bmp") == ["a.png"]
    # a trailing separator names a folder to make, even with an image extension
    for name in ("e.png", "f.bmp"):
        capsys.readouterr()
        assert cli.main(["upscale", src, "-o", str(out / name) + os.sep, "--weights", wpath]) == 0, capsys.readouterr()
        assert os.listdir(out / name) == ["a.png"]


@pytest.mark.parametrize("device, message", [("foo", "is not a device (cpu, cuda, cuda:1, ...)"),
                                             ("cuda:x", "is not a device"),
                                             ("cuda:999", "cannot be used on this machine"),
                                             ("meta", "cannot be used: meta tensors hold no data")])
def test_a_device_that_cannot_be_used_is_a_usage_error(tmp_path, weights, capsys, device, message):
    """These ended in tracebacks from torch.device or Module.to (an AssertionError without CUDA)."""
    src = _save(tmp_path / "a.png", (_texture(6, 7) * 255).astype(np.uint8))
    hr = tmp_path / "hr"
    hr.mkdir()
    _save(hr / "b.png", (_texture(20, 20) * 255).astype(np.uint8))
    for argv in (["upscale", src, "-o", str(tmp_path / "b.png")], ["eval", "--hr-dir", str(hr)]):
        capsys.readouterr()
        assert cli.main([*argv, "--weights", weights[0], "--device", device]) == 2
        assert f"fastdrn: error: --device {device!r} {message}" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists()


def test_a_model_of_other_colour_channels_is_refused_before_any_image(tmp_path, capsys):
    """A 1-channel DRN loaded, then failed on every image with "DRN expects an (N, 1, H, W) image
    batch, got (1, 3, 9, 11)", naming neither the file nor the cause."""
    torch.save(_model(n_colors=1, rgb_mean=(0.5,)).state_dict(), tmp_path / "gray.pt")
    src = _save(tmp_path / "a.png", (_texture(6, 7)[:, :, 0] * 255).astype(np.uint8))
    hr = tmp_path / "hr"
    hr.mkdir()
    _save(hr / "b.png", (_texture(20, 20) * 255).astype(np.uint8))
    for argv in (["upscale", src, "-o", str(tmp_path / "out.png")], ["eval", "--hr-dir", str(hr)]):
        capsys.readouterr()
        assert cli.main([*argv, "--weights", str(tmp_path / "gray.pt")]) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / 'gray.pt'} does not fit" in err and "n_colors: checkpoint has 1, expected 3" in err
        assert "image batch" not in err
    assert not (tmp_path / "out.png").exists()


def test_bad_inputs_are_named_and_skipped(tmp_path, weights, capsys):
    wpath, _ = weights
    src = tmp_path / "in"
    src.mkdir()
    rgb8 = (_texture(10, 10) * 255).astype(np.uint8)
    _save(src / "a_good.png", rgb8)
    full = (src / "a_good.png").read_bytes()
    (src / "b_truncated.png").write_bytes(full[: len(full) // 2])
    (src / "c_garbage.png").write_bytes(b"this is not an image")
    (src / "d_empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    PILImage.fromarray(rgb8).save(buf, format="JPEG")
    (src / "e_truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    bad16 = png16.encode(np.zeros((8, 8, 3), np.uint16))
    (src / "f_truncated16.png").write_bytes(bad16[:-30])
    _save(src / "z_good.png", rgb8)
    out = tmp_path / "out"
    code = cli.main(["upscale", str(src), str(tmp_path / "missing.png"), "-o", str(out), "--weights", wpath, "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1
    for name in ("b_truncated.png", "c_garbage.png", "d_empty.jpg", "e_truncated.jpg", "f_truncated16.png",
                 "missing.png"):
        assert name in err, name
    assert sorted(os.listdir(out)) == ["a_good.png", "z_good.png"]        # nothing half-written
    # --fail-fast: stops at the first bad file
    out2 = tmp_path / "out2"
    assert cli.main(["upscale", str(src), "-o", str(out2), "--weights", wpath, "--device", "cpu", "--fail-fast"]) == 1
    assert sorted(os.listdir(out2)) == ["a_good.png"]
    assert "stopping" in capsys.readouterr().err
    # reading directly raises with the file name
    with pytest.raises(ImageReadError, match="b_truncated.png"):
        read_image(src / "b_truncated.png")


def test_skip_existing_leaves_finished_outputs_and_does_the_rest(tmp_path, weights, capsys):
    """--skip-existing resumes a stopped run: an output that exists is left byte for byte as it is
    and its input not read (a corrupt input there is no failure), the others are written; without
    the option an existing output is replaced."""
    wpath, _ = weights
    src = tmp_path / "in"
    src.mkdir()
    for name, seed in (("a.png", 1), ("b.png", 2)):
        _save(src / name, (_texture(9, 7, seed=seed) * 255).astype(np.uint8))
    (src / "c.png").write_bytes(b"not an image: read only if its output is missing")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"a finished output")
    (out / "c.png").write_bytes(b"another finished output")
    argv = ["upscale", str(src), "-o", str(out), "--weights", wpath, "--device", "cpu"]
    assert cli.main([*argv, "--skip-existing"]) == 0
    log = "".join(capsys.readouterr())
    assert (out / "a.png").read_bytes() == b"a finished output"
    assert (out / "c.png").read_bytes() == b"another finished output"
    assert "a.png: skipped" in log and "c.png: skipped" in log and "b.png: skipped" not in log
    assert read_image(out / "b.png").size == (18, 14)
    assert cli.main(argv) == 1  # c.png is read now, and named as the failure
    assert "c.png" in capsys.readouterr().err
    assert read_image(out / "a.png").size == (18, 14)  # replaced
