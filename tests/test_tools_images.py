"""``fastdrn upscale`` and ``fastdrn eval`` driven by a hostile practitioner: model outputs that are
not numbers, kinds of image files, and folders that give no work. All on the CPU, through plain
PyTorch math."""
import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

import fastdrn.reference
from fastdrn import cli
from fastdrn.tools import png16
from fastdrn.tools.image_io import read_image
from fastdrn.tools.imresize import upsample

from tool_fixtures import CFG, _env, weights  # noqa: F401 - fixtures, used by name


def _png(path, h=6, w=7, seed=0):
    rng = np.random.default_rng(seed)
    PILImage.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture
def overflowing(tmp_path):
    """Weights that are finite, and whose activations pass float16's largest value (65504): in
    fp16 the output is infinite or NaN, in fp32 it is a number."""
    sd = fastdrn.reference.DRN(**CFG).state_dict()
    for k, v in sd.items():
        if k.endswith("weight") and v.dim() == 4:
            sd[k] = v * 300
    path = tmp_path / "overflowing.pt"
    torch.save(sd, path)
    return str(path)


def test_a_model_output_of_nan_or_infinity_is_an_error_not_an_image(tmp_path, overflowing, capsys):
    """In fp16 the output overflowed to NaN and infinity: upscale wrote a black (NaN cast to 0) or
    white (infinity clamped to 1) image and exited 0, and eval printed a PSNR of nan, or one of the
    clamped image, and exited 0."""
    src = _png(tmp_path / "a.png", 9, 11)
    out = tmp_path / "out.png"
    assert cli.main(["upscale", src, "-o", str(out), "--weights", overflowing, "--device", "cpu",
                     "--dtype", "fp32"]) == 0                   # the same weights give numbers in fp32
    os.unlink(out)
    capsys.readouterr()
    assert cli.main(["upscale", src, "-o", str(out), "--weights", overflowing, "--device", "cpu",
                     "--dtype", "fp16"]) == 1
    err = capsys.readouterr().err
    assert f"error: {src}: the model's output holds" in err and "NaN or infinite" in err
    assert "fp16" in err and "bf16 or fp32" in err
    assert not out.exists()

    hr = tmp_path / "hr"
    hr.mkdir()
    _png(hr / "b.png", 24, 26)
    report = tmp_path / "r.json"
    capsys.readouterr()
    assert cli.main(["eval", "--hr-dir", str(hr), "--weights", overflowing, "--device", "cpu",
                     "--dtype", "fp16", "--json", str(report)]) == 1
    err = capsys.readouterr().err
    assert "error: b: the model's output holds" in err
    result = json.loads(report.read_text())
    assert result["images"] == [] and [f["name"] for f in result["failed"]] == ["b"]


def _with_trns(png: bytes, body: bytes) -> bytes:
    """``png`` with a tRNS chunk (``body``) after its IHDR chunk (signature 8 + IHDR 25 bytes)."""
    chunk = struct.pack(">I", len(body)) + b"tRNS" + body + struct.pack(">I", zlib.crc32(b"tRNS" + body))
    return png[:33] + chunk + png[33:]


def test_a_png_colour_key_transparency_is_kept(tmp_path, weights):
    """A PNG can make one colour transparent (a tRNS chunk on an RGB or greyscale image, 8 or 16 bits,
    as icons and old tools write it): the key was ignored, and the transparent background came out
    opaque in that colour. It is read as an alpha channel (0 where the pixel is the key), upscaled as
    every alpha is."""
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)      # odd sizes: rows and columns not mixed up
    rgb[:4] = (0, 255, 0)                                      # the key colour, over the top rows
    rgb[6, 2] = (0, 255, 1)                                    # one off: opaque
    src = tmp_path / "in"
    src.mkdir()
    PILImage.fromarray(rgb).save(src / "rgb.png", transparency=(0, 255, 0))
    grey = rgb[..., 1].copy()
    PILImage.fromarray(grey).save(src / "grey.png", transparency=255)
    grey16 = grey.astype(np.uint16) * 257
    grey16[6, 3] = 65534                                       # one off the 16-bit key: opaque
    PILImage.fromarray(grey16).save(src / "grey16.png", transparency=65535)
    rgb16 = rgb.astype(np.uint16) * 257
    (src / "rgb16.png").write_bytes(_with_trns(png16.encode(rgb16), struct.pack(">3H", 0, 65535, 0)))
    keyed = {"rgb.png": (rgb == (0, 255, 0)).all(-1), "grey.png": grey == 255,
             "grey16.png": grey16 == 65535, "rgb16.png": (rgb16 == (0, 65535, 0)).all(-1)}
    for name, transparent in keyed.items():
        img = read_image(src / name)
        assert img.alpha is not None, name
        assert (img.alpha[0].numpy() == np.where(transparent, 0.0, 1.0)).all(), name
        assert img.gray == name.startswith("grey") and img.bits == (16 if "16" in name else 8), name
    out = tmp_path / "out"
    assert cli.main(["upscale", str(src), "-o", str(out), "--weights", weights, "--device", "cpu"]) == 0
    for name, transparent in keyed.items():
        im = PILImage.open(out / name)
        assert im.size == (22, 18), name
        got = read_image(out / name)
        want = upsample(torch.from_numpy(np.where(transparent, 0.0, 1.0))[None], 2).clamp(0, 1)[0].numpy()
        assert got.alpha is not None and np.abs(got.alpha[0].numpy() - want).max() <= 1 / 255, name
        assert got.alpha[0, 0, 0] == 0 and got.alpha[0, -1, -1] == 1, name


def test_eval_of_a_folder_without_images_says_so(tmp_path, weights, capsys):
    """eval of an empty HR folder (or one of other files) printed an empty table with a mean of nan and
    exited 1, without a word of why."""
    hr = tmp_path / "hr"
    hr.mkdir()
    (hr / "notes.txt").write_text("not an image")
    assert cli.main(["eval", "--hr-dir", str(hr), "--weights", weights, "--device", "cpu"]) == 1
    assert f"error: no images in {hr} (" in capsys.readouterr().err


def test_an_input_named_twice_is_upscaled_once(tmp_path, weights, capsys):
    """A folder and a file in it (or a glob overlapping a folder) named the file twice: the second was
    refused as "already written from another input with the same name", an error for a file that
    had been upscaled, and the run exited 1."""
    src = tmp_path / "in"
    src.mkdir()
    a = _png(src / "a.png")
    _png(src / "b.png", seed=1)
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli.main(["upscale", str(src), a, str(tmp_path / "in" / ".." / "in" / "a.png"), "-o", str(out),
                     "--weights", weights, "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "error" not in captured.err and len(captured.out.splitlines()) == 2
    assert sorted(os.listdir(out)) == ["a.png", "b.png"]


def test_files_of_a_folder_that_are_not_read_are_named(tmp_path, weights, capsys):
    """Files of an input folder without one of the listed extensions were passed over without a word:
    a .jfif or .jpe (JPEG), .apng (PNG), .pnm or .pbm (the PPM family) photograph that Pillow reads,
    or a .heic that it does not, were simply missing from the output. The aliases are read; what is
    still left out (hidden files aside) is named in one warning."""
    src = tmp_path / "in"
    src.mkdir()
    rgb = np.random.default_rng(4).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    PILImage.fromarray(rgb).save(src / "a.jfif", format="JPEG")
    PILImage.fromarray(rgb).save(src / "b.JPE", format="JPEG")
    PILImage.fromarray(rgb).save(src / "c.apng", format="PNG")
    PILImage.fromarray(rgb).save(src / "d.pnm", format="PPM")
    PILImage.fromarray(rgb[..., 0] > 127).save(src / "e.pbm", format="PPM")
    (src / "f.heic").write_bytes(b"\0\0\0\x18ftypheic")
    (src / "notes.txt").write_text("shot on a phone")
    _png(src / ".hidden.png")
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli.main(["upscale", str(src), "-o", str(out), "--weights", weights, "--device", "cpu"]) == 0
    assert sorted(os.listdir(out)) == ["a.png", "b.png", "c.png", "d.png", "e.png"]
    err = capsys.readouterr().err
    assert "warning: 2 file(s) of the input folder(s) not read, not of an image extension" in err
    assert f"{src / 'f.heic'}, {src / 'notes.txt'}" in err and ".hidden" not in err

    hr = tmp_path / "hr"
    hr.mkdir()
    PILImage.fromarray(np.random.default_rng(5).integers(0, 256, (24, 26, 3), dtype=np.uint8)).save(
        hr / "g.jfif", format="JPEG")
    (hr / "h.heic").write_bytes(b"\0\0\0\x18ftypheic")
    assert cli.main(["eval", "--hr-dir", str(hr), "--weights", weights, "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "\ng " in captured.out
    assert f"not of an image extension" in captured.err and str(hr / "h.heic") in captured.err


@pytest.mark.parametrize("data_range", [None, 1.0])   # as given, and clamped as a saved image is
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_metrics_refuse_an_image_holding_nan_or_infinity(bad, data_range):
    """psnr / ssim of an image holding NaN returned nan (NaN passed the [0, 1] range check, which
    compares), and an infinity under data_range was clamped to white and scored as a number."""
    from fastdrn.tools.metrics import psnr, psnr_ssim, ssim
    hr = torch.rand(3, 13, 13, dtype=torch.float64)          # 13: the 11x11 SSIM window fits
    sr = hr.clone()
    sr[1, 5, 7] = bad
    for fn in (psnr, ssim, psnr_ssim):
        with pytest.raises(ValueError, match=r"sr holds 1 NaN or infinite value"):
            fn(sr, hr, 0, data_range=data_range)
        with pytest.raises(ValueError, match=r"hr holds 1 NaN or infinite value"):
            fn(hr, sr, 0, data_range=data_range)


def test_metrics_refuse_a_crop_that_leaves_nothing_and_channels_that_are_not_rgb():
    """psnr with a border crop as big as half the image returned nan (the mean of nothing), a negative
    crop was ignored, and the Y channel of a 4-channel (RGBA) image failed with "too many values to
    unpack (expected 3)"."""
    from fastdrn.tools.metrics import psnr, psnr_ssim
    a, b = torch.rand(3, 8, 13, dtype=torch.float64), torch.rand(3, 8, 13, dtype=torch.float64)  # crop 4: 0 rows left
    for fn in (psnr, psnr_ssim):
        with pytest.raises(ValueError, match=r"crop=4 leaves nothing of the 13x8 image"):
            fn(a, b, 4)
        with pytest.raises(ValueError, match=r"crop=-1: a border cannot be negative"):
            fn(a, b, -1)
    assert np.isfinite(psnr(a, b, 3))                       # 2 x 7 pixels left: a number
    rgba = torch.rand(4, 13, 13, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"the Y channel needs RGB \(3 channels\) or grey \(1\), got 4"):
        psnr(rgba, rgba.flip(-1), 0)
    assert np.isfinite(psnr(rgba, rgba.flip(-1), 0, y_channel=False))   # per channel: any count


def _with_chunk(png: bytes, kind: bytes, body: bytes) -> bytes:
    """``png`` with a chunk after its IHDR chunk (signature 8 + IHDR 25 bytes)."""
    chunk = struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return png[:33] + chunk + png[33:]


@pytest.mark.parametrize("orientation", [2, 3, 5, 6, 7, 8])   # every flip and rotation EXIF names
def test_a_16_bit_png_is_turned_as_its_exif_orientation_says(tmp_path, orientation):
    """An 8-bit PNG (or JPEG, or TIFF) is turned upright as its EXIF orientation says; a 16-bit RGB PNG,
    read by png16, was not, and came out on its side or mirrored."""
    from fastdrn.tools.image_io import read_image
    rgb16 = np.random.default_rng(orientation).integers(0, 65536, (5, 7, 3), dtype=np.uint16)  # not square
    exif = PILImage.Exif()
    exif[0x0112] = orientation
    (tmp_path / "deep.png").write_bytes(_with_chunk(png16.encode(rgb16), b"eXIf", exif.tobytes()))
    PILImage.fromarray((rgb16 >> 8).astype(np.uint8)).save(tmp_path / "flat.png", exif=exif)
    deep, flat = read_image(tmp_path / "deep.png"), read_image(tmp_path / "flat.png")
    assert deep.bits == 16 and deep.size == flat.size
    high = (torch.round(deep.rgb * 65535).to(torch.int64) >> 8).numpy()
    assert (high == torch.round(flat.rgb * 255).to(torch.int64).numpy()).all()


@pytest.mark.parametrize("top", [255, 2 ** 31 - 1])   # 8-bit values in 32 bits; the full range
def test_a_32_bit_integer_image_is_refused_not_clipped(tmp_path, weights, capsys, top):
    """A 32-bit integer TIFF was read as if its samples were 16-bit: values past 65535 were clipped to
    white (a full-range image came out all white) and 8-bit values in 32 bits came out black, with
    only a warning of lost precision; exit 0. It is refused, as floating-point images are."""
    from fastdrn.tools.image_io import ImageReadError, read_image
    arr = np.random.default_rng(6).integers(0, top, (5, 7), dtype=np.int64).astype(np.int32)
    path = tmp_path / "deep.tif"
    PILImage.fromarray(arr).save(path)
    with pytest.raises(ImageReadError, match=r"deep.tif: 32-bit integer samples are not supported"):
        read_image(path)
    capsys.readouterr()
    assert cli.main(["upscale", str(path), "-o", str(tmp_path / "out.png"), "--weights", weights,
                     "--device", "cpu"]) == 1
    assert "32-bit integer samples are not supported" in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()


def test_an_lr_image_is_the_partner_of_one_hr_image_only(tmp_path, weights, capsys):
    """HR a.png and a.bmp (two pictures) both found lr/a.png as their LR partner by name, and a.bmp was
    scored against a.png's LR without a word; an LR folder holding bx2.png and bx2.jpg gave one of
    them, by sort order. Both are errors naming the files; the unambiguous pair is still scored."""
    from fastdrn.tools.data import find_pairs
    rng = np.random.default_rng(7)
    hr, lr = tmp_path / "hr", tmp_path / "lr"
    hr.mkdir()
    lr.mkdir()
    pictures = {n: rng.integers(0, 256, (26, 30, 3), dtype=np.uint8) for n in "abc"}
    PILImage.fromarray(pictures["a"]).save(hr / "a.png")
    PILImage.fromarray(255 - pictures["a"]).save(hr / "a.bmp")
    PILImage.fromarray(pictures["a"][::2, ::2]).save(lr / "a.png")
    PILImage.fromarray(pictures["b"]).save(hr / "b.png")
    PILImage.fromarray(pictures["b"][::2, ::2]).save(lr / "bx2.png")
    PILImage.fromarray(255 - pictures["b"][::2, ::2]).save(lr / "bx2.jpg")
    PILImage.fromarray(pictures["c"]).save(hr / "c.png")
    PILImage.fromarray(pictures["c"][::2, ::2]).save(lr / "c.png")
    pairs, errors = find_pairs(str(hr), str(lr), 2)
    assert [(p.name, os.path.basename(p.lr)) for p in pairs] == [("c", "c.png")]
    assert sorted(errors) == sorted([
        f"{hr / 'a.bmp'}: its LR image {lr / 'a.png'} is also that of {hr / 'a.png'}: rename one of them",
        f"{hr / 'a.png'}: its LR image {lr / 'a.png'} is also that of {hr / 'a.bmp'}: rename one of them",
        f"{hr / 'b.png'}: several LR images could be its partner: {lr / 'bx2.jpg'}, {lr / 'bx2.png'}"])
    capsys.readouterr()
    assert cli.main(["eval", "--hr-dir", str(hr), "--lr-dir", str(lr), "--weights", weights, "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert "is also that of" in captured.err and "several LR images" in captured.err
    assert "\nc " in captured.out


def test_an_output_name_is_taken_only_once_written(tmp_path, weights, capsys):
    """a.jpg and a.png both map to out/a.png under --format png. When a.jpg could not be read, nothing
    was written, yet a.png was refused as "already written from another input with the same name":
    no output at all, and a message saying there was one."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jpg").write_bytes(b"not a JPEG")
    _png(src / "a.png")
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli.main(["upscale", str(src), "-o", str(out), "--format", "png", "--weights", weights,
                     "--device", "cpu"]) == 1                      # a.jpg failed
    err = capsys.readouterr().err
    assert f"{src / 'a.jpg'}: cannot decode image" in err and "already written" not in err
    assert os.listdir(out) == ["a.png"]
    assert read_image(out / "a.png").size == (12, 14)


def test_a_broken_link_is_named_as_one(tmp_path, weights, capsys):
    """A symbolic link whose target is gone was passed over without a word in a folder (a photograph
    missing from the output), and named as "No such file or directory" when given itself."""
    src = tmp_path / "in"
    src.mkdir()
    _png(src / "good.png")
    os.symlink(tmp_path / "moved" / "x.png", src / "dead.png")
    out = tmp_path / "out"
    for argv in ([str(src)], [str(src / "dead.png"), str(src / "good.png")]):
        capsys.readouterr()
        assert cli.main(["upscale", *argv, "-o", str(out), "--weights", weights, "--device", "cpu"]) == 1
        err = capsys.readouterr().err
        assert f"error: {src / 'dead.png'}: a symbolic link to {tmp_path / 'moved' / 'x.png'}, which does not exist" in err
        assert os.listdir(out) == ["good.png"]
    # training lists its folder the same way: with --cache disk the link stopped the run with
    # "[Errno 2] No such file or directory" instead of being named and skipped
    from fastdrn.tools.data import TrainPatches, find_pairs
    errors = []
    _png(src / "big.png", 20, 20)
    data = TrainPatches(find_pairs(str(src), None, 2)[0], 2, patch=2, cache="disk",
                        cache_dir=str(tmp_path / "cache"), on_error=errors.append)
    assert len(data) == 2 and len(errors) == 1 and "a symbolic link to" in errors[0]


def test_a_file_output_for_a_folder_input_says_the_input_is_a_folder(tmp_path, weights, capsys):
    """A folder of one image with -o x.png was refused as "there are 1 input images", which reads as a
    contradiction; the cause is that the input is a folder."""
    src = tmp_path / "in"
    src.mkdir()
    _png(src / "a.png")
    assert cli.main(["upscale", str(src), "-o", str(tmp_path / "x.png"), "--weights", weights]) == 2
    assert (f"{tmp_path / 'x.png'} names a file but the input {src} is a folder: give a folder as -o"
            in capsys.readouterr().err)


def test_a_save_dir_that_is_a_file_is_found_before_the_work(tmp_path, weights, capsys):
    """eval --save-dir naming a file scored the first image, then stopped at its write: no table, no
    JSON, every score measured so far lost. It is refused before any image is measured."""
    hr = tmp_path / "hr"
    hr.mkdir()
    _png(hr / "a.png", 24, 26)
    (tmp_path / "notes.txt").write_text("a file")
    capsys.readouterr()
    assert cli.main(["eval", "--hr-dir", str(hr), "--weights", weights, "--device", "cpu",
                     "--save-dir", str(tmp_path / "notes.txt")]) == 2
    captured = capsys.readouterr()
    assert f"--save-dir {tmp_path / 'notes.txt'}: a file, where the upscaled images' folder is to be" in captured.err
    assert "PSNR" not in captured.out


def test_output_options_that_do_nothing_here_are_said_to(tmp_path, weights, capsys):
    """--quality with PNG outputs only, and --suffix with -o naming the output file, were ignored
    without a word (the user asked for a_x2.png and got b.png, or for a smaller file and got the
    same PNG); as --tile-overlap without --tile is, they are said to have no effect."""
    src = _png(tmp_path / "a.png")
    out = tmp_path / "out"
    cases = [(["-o", str(out / "b.png"), "--suffix", "_x2"], "warning: --suffix has no effect when -o names the output file"),
             (["-o", str(out), "--quality", "50"], "warning: --quality has no effect: every output is a PNG"),
             (["-o", str(out / "c.png"), "--quality", "95"], "warning: --quality has no effect: every output is a PNG")]
    for args, message in cases:
        capsys.readouterr()
        assert cli.main(["upscale", src, *args, "--weights", weights, "--device", "cpu"]) == 0
        assert message in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["a.png", "b.png", "c.png"]
    for args in (["-o", str(out / "d.jpg"), "--quality", "50"], ["-o", str(out), "--format", "webp", "--quality", "50"],
                 ["-o", str(out), "--suffix", "_x2"], ["-o", str(out / "e.png")]):
        capsys.readouterr()
        assert cli.main(["upscale", src, *args, "--weights", weights, "--device", "cpu"]) == 0
        assert "no effect" not in capsys.readouterr().err, args


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is that of Triton's CPU interpreter")
def test_an_error_of_the_model_names_the_image(tmp_path, weights, capsys, monkeypatch):
    """An error raised while the model ran (here: a forced Triton backend refusing bfloat16 in its CPU
    interpreter) was printed as is, once per image, without saying which image it was."""
    monkeypatch.setenv("FASTDRN_BACKEND", "triton")
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.png", "b.png"):
        _png(src / name)
    capsys.readouterr()
    assert cli.main(["upscale", str(src), "-o", str(tmp_path / "out"), "--weights", weights, "--device", "cpu",
                     "--dtype", "bf16"]) == 1
    err = capsys.readouterr().err
    for name in ("a.png", "b.png"):
        assert f"error: {src / name}: FASTDRN_BACKEND=triton but" in err
    # eval stopped with a traceback
    hr = tmp_path / "hr"
    hr.mkdir()
    _png(hr / "c.png", 24, 26)
    capsys.readouterr()
    assert cli.main(["eval", "--hr-dir", str(hr), "--weights", weights, "--device", "cpu", "--dtype", "bf16"]) == 1
    assert "fastdrn: error: c: FASTDRN_BACKEND=triton but" in capsys.readouterr().err


def test_standard_output_as_output_is_refused(tmp_path, weights, capsys, monkeypatch):
    """-o - (standard output, to a Unix user) made a folder named "-" and wrote the image into it."""
    monkeypatch.chdir(tmp_path)
    src = _png(tmp_path / "a.png")
    assert cli.main(["upscale", src, "-o", "-", "--weights", weights]) == 2
    assert "-o -: writing to standard output is not supported: name a file or a folder" in capsys.readouterr().err
    assert not (tmp_path / "-").exists()
