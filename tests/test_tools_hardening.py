"""The ``fastdrn`` tools as a hostile user would drive them (issue 14): outputs aimed at inputs,
decompression bombs, damaged and malformed checkpoints, a stale build lock, images too small for
SSIM, file modes, and signals during training. All on the CPU, through plain PyTorch math."""
import fcntl
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

import fastdrn.reference
from fastdrn import cli, extension
from fastdrn.tools import png16
from fastdrn.tools.checkpoint import CheckpointError, atomic_save, atomic_write, atomic_write_text, load_model
from fastdrn.tools.image_io import Image, ImageReadError, read_image, write_image
from fastdrn.tools.train import remove_stale_temp_files
from tool_fixtures import CFG, _env, weights  # noqa: F401 - fixtures, used by name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TRAIN = ["--n-feats", "4", "--n-groups", "1", "--n-blocks", "1", "--inner", "4", "--distill", "2"]


def _png(path, h=6, w=7, seed=0):
    rng = np.random.default_rng(seed)
    PILImage.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _snapshot(*paths):
    return {str(p): open(p, "rb").read() for p in paths}


def _upscale(*args):
    return cli.main(["upscale", *map(str, args), "--device", "cpu"])


# ---- item 1: no output replaces an input ---------------------------------------------------------

def test_output_folder_that_is_a_symlink_to_the_input_folder(tmp_path, weights):
    inputs = tmp_path / "in"
    inputs.mkdir()
    files = [_png(inputs / "a.png"), _png(inputs / "b.png", seed=1)]
    link = tmp_path / "out"
    link.symlink_to(inputs, target_is_directory=True)
    before = _snapshot(*files)
    assert _upscale(inputs, "-o", link, "--weights", weights) == 1
    assert _snapshot(*files) == before
    assert sorted(os.listdir(inputs)) == ["a.png", "b.png"]


def test_an_output_that_is_another_input_of_the_run(tmp_path, weights):
    """upscale A/x.png B/x.png -o B: A's output is B/x.png, which must not be replaced before (or
    after) B/x.png is read; nor may B/x.png's output replace itself."""
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    a, b = _png(tmp_path / "A" / "x.png"), _png(tmp_path / "B" / "x.png", seed=1)
    before = _snapshot(a, b)
    assert _upscale(a, b, "-o", tmp_path / "B", "--weights", weights) == 1
    assert _snapshot(a, b) == before


def test_an_output_file_hard_linked_or_symlinked_to_the_input(tmp_path, weights):
    src = _png(tmp_path / "x.png")
    before = _snapshot(src)
    os.link(src, tmp_path / "hard.png")
    os.symlink(src, tmp_path / "soft.png")
    for out in ("hard.png", "soft.png"):
        assert _upscale(src, "-o", tmp_path / out, "--weights", weights) == 1
        assert _snapshot(src) == before


def test_outputs_beside_the_inputs_with_a_suffix_still_work(tmp_path, weights):
    src = _png(tmp_path / "x.png")
    assert _upscale(src, "-o", tmp_path, "--suffix", "_x2", "--weights", weights) == 0
    assert PILImage.open(tmp_path / "x_x2.png").size == (14, 12)


# ---- item 4: decompression bombs -------------------------------------------------------------------

def _png16_bomb(path, width, height):
    """A 16-bit RGB PNG of width x height black pixels: a few hundred KB of zlib for every few
    hundred MB of pixels. Written in streamed pieces, never held whole."""
    row = b"\x00" * (width * 6 + 1)
    deflate = zlib.compressobj(9)
    rows_per_piece = max(1, (8 << 20) // len(row))
    with open(path, "wb") as f:
        f.write(png16.SIGNATURE + png16._chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)))
        body = []
        for start in range(0, height, rows_per_piece):
            body.append(deflate.compress(row * min(rows_per_piece, height - start)))
        body.append(deflate.flush())
        f.write(png16._chunk(b"IDAT", b"".join(body)))
        f.write(png16._chunk(b"IEND", b""))
    return path


def test_a_16_bit_png_bomb_is_refused_before_decoding(tmp_path):
    """9500 x 9500 pixels (just past Pillow's limit of 89,478,485) in well under 1 MB: refused from
    its header; decoding it would take ~5 GB."""
    bomb = _png16_bomb(tmp_path / "bomb.png", 9500, 9500)
    assert os.path.getsize(bomb) < 1 << 20
    t0 = time.perf_counter()
    with pytest.raises(ImageReadError, match=r"bomb\.png: the image is 9500 x 9500 = 90,250,000 pixels.*--max-pixels"):
        read_image(bomb)
    assert time.perf_counter() - t0 < 5


def test_the_pixel_limit_applies_to_every_format_and_can_be_raised(tmp_path, weights):
    small16 = tmp_path / "rgb16.png"
    small16.write_bytes(png16.encode(np.full((20, 30, 3), 4000, np.uint16)))
    small8 = _png(tmp_path / "rgb8.png", 20, 30)
    for path in (small16, small8):
        with pytest.raises(ImageReadError, match="600 pixels, more than the limit of 599"):
            read_image(path, max_pixels=599)
        assert read_image(path, max_pixels=600).size == (20, 30)
    out = tmp_path / "out"
    assert _upscale(small8, "-o", out, "--weights", weights, "--max-pixels", "599") == 1
    assert _upscale(small8, "-o", out, "--weights", weights, "--max-pixels", "600") == 0
    assert _upscale(small8, "-o", out, "--weights", weights, "--max-pixels", "0") == 0


def test_zlib_data_longer_than_the_header_says_is_refused():
    rows = b"\x00" + b"\x00" * 12       # one row of a 2-pixel 16-bit RGB image ...
    ihdr = struct.pack(">IIBBBBB", 2, 1, 16, 2, 0, 0, 0)
    data = (png16.SIGNATURE + png16._chunk(b"IHDR", ihdr) + png16._chunk(b"IDAT", zlib.compress(rows * 1000))
            + png16._chunk(b"IEND", b""))  # ... and 999 more that the header does not declare
    with pytest.raises(png16.PNGError, match="longer than its header"):
        png16.decode(data)


def test_image_errors_name_the_file_not_a_buffer(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all" * 10)
    with pytest.raises(ImageReadError) as info:
        read_image(junk)
    assert str(junk) in str(info.value) and "BytesIO" not in str(info.value)


def test_a_fifo_or_a_device_is_refused_not_read_without_end(tmp_path, weights, capsys):
    """A FIFO given as the image waited forever for a writer (and /dev/zero would be read until the
    memory ran out); a FIFO as --weights was 'no such checkpoint file'. A path that is not a regular
    file is refused by name, for images and checkpoints alike; /dev/null stands for the devices."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    done = {}
    run = threading.Thread(target=lambda: done.update(rc=_upscale(fifo, "-o", tmp_path / "out.png",
                                                                   "--weights", weights)), daemon=True)
    run.start()
    run.join(60)
    blocked = run.is_alive()
    if blocked:                      # release the reader that waits for a writer, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        run.join()
    err = capsys.readouterr().err
    assert not blocked, "reading the FIFO blocked"
    assert done["rc"] == 1
    assert f"error: {fifo}: a FIFO (named pipe), not a regular file: refused" in err
    assert _upscale("/dev/null", "-o", tmp_path / "out.png", "--weights", weights) == 1
    assert "error: /dev/null: a character device, not a regular file: refused" in capsys.readouterr().err
    for source in (fifo, "/dev/null"):
        assert _upscale(_png(tmp_path / "a.png"), "-o", tmp_path / "out.png", "--weights", source) == 2
        assert "not a regular file: refused" in capsys.readouterr().err
        with pytest.raises(CheckpointError, match="not a regular file: refused"):
            load_model(str(source))
    assert not (tmp_path / "out.png").exists()


# ---- item 5: a stale extension build lock --------------------------------------------------------

def test_a_stale_build_lock_times_out_with_its_name(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("FASTDRN_BUILD_LOCK_TIMEOUT", "0.5")
    name = f"{extension.LIBRARY}_{'cuda' if extension.cuda_build_skip_reason() is None else 'cpu'}"
    (tmp_path / name).mkdir()
    lock = tmp_path / name / "lock"
    lock.write_text("")               # what a build killed mid-way leaves behind
    outcome = []

    def build():
        try:
            extension._build()
        except BaseException as e:  # noqa: BLE001 - any outcome is recorded for the assertions
            outcome.append(e)

    thread = threading.Thread(target=build, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the build waited on the stale lock for a minute"
    assert outcome and isinstance(outcome[0], TimeoutError), outcome
    assert str(lock) in str(outcome[0]) and "delete" in str(outcome[0])


# "nan": every comparison with the time waited is false, so a stale lock was waited on for ever,
# in silence (what the timeout is there to prevent); "-1": a negative number of seconds.
@pytest.mark.parametrize("value", ["soon", "nan", "-1"])
def test_the_lock_timeout_must_be_a_number(value, monkeypatch):
    monkeypatch.setenv("FASTDRN_BUILD_LOCK_TIMEOUT", value)
    with pytest.raises(ValueError, match="FASTDRN_BUILD_LOCK_TIMEOUT"):
        extension.lock_timeout()


# FASTDRN_BUILD_EXT read anything but "0" as "build": "no", "false" or " 0" spent minutes compiling
# the CUDA extension at install time, which the variable is there to skip; now refused, as the other
# on/off settings are. " 0 ": the surrounding spaces are taken off, as theirs are.
@pytest.mark.parametrize("value,refused", [("no", True), ("false", True), ("", True), (" 0 ", False), ("1", False)])
def test_build_ext_takes_0_or_1(value, refused):
    env = dict(os.environ, FASTDRN_BUILD_EXT=value)
    run = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    if refused:
        assert run.returncode != 0 and f"FASTDRN_BUILD_EXT={value!r}" in run.stderr, run.stderr[-2000:]
    else:
        assert run.returncode == 0 and run.stdout.strip() == "fastdrn", run.stderr[-2000:]


# ---- item 6: checkpoints with flipped bytes ------------------------------------------------------

def test_a_checkpoint_with_flipped_bytes_is_refused(tmp_path, weights, capsys):
    data = bytearray(open(weights, "rb").read())
    raw = torch.load(weights, weights_only=True)["head.weight"].numpy().tobytes()
    at = bytes(data).find(raw)       # the weight's bytes inside the zip: flip one bit of one of them
    assert at > 0
    data[at + len(raw) // 2] ^= 0x40
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt.*CRC-32"):
        load_model(str(damaged))
    assert _upscale(_png(tmp_path / "x.png"), "-o", tmp_path / "out", "--weights", damaged) == 2
    assert "CRC-32" in capsys.readouterr().err


# ---- item 9: images too small for SSIM, strict JSON ------------------------------------------------

def _strict_load(path):
    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(open(path).read(), parse_constant=refuse)


def test_eval_skips_images_too_small_for_ssim_and_writes_strict_json(tmp_path, weights):
    hr = tmp_path / "hr"
    hr.mkdir()
    _png(hr / "big.png", 24, 26)
    _png(hr / "tiny.png", 4, 4, seed=1)
    report = tmp_path / "r.json"
    code = cli.main(["eval", "--weights", weights, "--hr-dir", str(hr), "--json", str(report), "--device", "cpu"])
    assert code == 0
    result = _strict_load(report)
    assert [r["name"] for r in result["images"]] == ["big"]
    assert [s["name"] for s in result["skipped"]] == ["tiny"]
    assert all(isinstance(v, float) for v in result["mean"].values())


def test_eval_with_only_tiny_images_fails_with_valid_json(tmp_path, weights):
    hr = tmp_path / "hr"
    hr.mkdir()
    _png(hr / "tiny.png", 4, 4)
    report = tmp_path / "r.json"
    code = cli.main(["eval", "--weights", weights, "--hr-dir", str(hr), "--json", str(report), "--device", "cpu"])
    assert code == 1
    result = _strict_load(report)
    assert result["images"] == [] and result["mean"]["psnr"] is None


def test_an_infinite_psnr_is_null_in_json(tmp_path):
    from fastdrn.tools.evaluate import _strict_json

    text = json.dumps(_strict_json({"psnr": float("inf"), "rows": [{"ssim": float("nan")}, 1.5]}), allow_nan=False)
    assert json.loads(text) == {"psnr": None, "rows": [{"ssim": None}, 1.5]}


# ---- item 10: outputs get the umask's mode -------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_outputs_get_the_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_image(tmp_path / "img.png", Image(rgb=torch.rand(3, 5, 4)))
        write_image(tmp_path / "img16.png", Image(rgb=torch.rand(3, 5, 4), bits=16))
        atomic_write_text(tmp_path / "r.json", "{}\n")
        atomic_save({"w": torch.zeros(2)}, tmp_path / "c.pt")
    finally:
        os.umask(old)
    for name in ("img.png", "img16.png", "r.json", "c.pt"):
        mode = os.stat(tmp_path / name).st_mode & 0o777
        assert mode == 0o666 & ~umask, f"{name}: mode {oct(mode)} under umask {oct(umask)}"


# ---- item 11: malformed training checkpoints ---------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A DIV2K-like folder and the checkpoint of one training step on it."""
    root = tmp_path_factory.mktemp("train")
    hr = root / "hr"
    hr.mkdir()
    for i in range(2):
        _png(hr / f"{i:04d}.png", 24, 24, seed=i)
    out = root / "run"
    args = ["train", "--hr-dir", str(hr), "--scale", "2", "--out", str(out), "--steps", "1", "--patch-size", "8",
            "--batch-size", "2", "--workers", "0", "--no-progress", "--device", "cpu", *TINY_TRAIN]
    old = os.environ.get("FASTDRN_BACKEND")
    os.environ["FASTDRN_BACKEND"] = "torch"
    try:
        assert cli.main(args) == 0
    finally:
        os.environ.pop("FASTDRN_BACKEND") if old is None else os.environ.__setitem__("FASTDRN_BACKEND", old)
    return hr, out / "last.pt", args


def _bad_rng(ckpt):
    ckpt["rng"]["torch"] = torch.zeros(3, dtype=torch.uint8)


def _mis_shaped(ckpt):
    ckpt["model"]["head.weight"] = torch.zeros(5, 3, 3, 3)


def _sparse(ckpt):
    ckpt["model"]["head.bias"] = ckpt["model"]["head.bias"].to_sparse()


def _bad_optimizer_state(ckpt):
    state = ckpt["optimizer"]["state"]
    first = next(iter(state))
    state[first]["exp_avg"] = torch.zeros(7)


MALFORMED = {
    "no step": lambda c: c.pop("step"),
    "no optimizer": lambda c: c.pop("optimizer"),
    "no model": lambda c: c.pop("model"),
    "step a string": lambda c: c.__setitem__("step", "ten"),
    "config without alpha": lambda c: c["config"].pop("alpha"),
    "bad rng state": _bad_rng,
    "no numpy rng": lambda c: c["rng"].pop("numpy"),
    "mis-shaped weight": _mis_shaped,
    "sparse weight": _sparse,
    "optimizer state of the wrong shape": _bad_optimizer_state,
    "scheduler a list": lambda c: c.__setitem__("scheduler", [1, 2]),
}


@pytest.mark.parametrize("damage", sorted(MALFORMED))
def test_malformed_training_checkpoints_get_a_clear_error(damage, trained, tmp_path, capsys):
    hr, last, args = trained
    ckpt = torch.load(last, weights_only=True)
    MALFORMED[damage](ckpt)
    bad = tmp_path / "bad.pt"
    torch.save(ckpt, bad)
    out = tmp_path / "resumed"
    resume = [a if a != str(last.parent) else str(out) for a in args] + ["--resume", str(bad)]
    code = cli.main(resume)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("fastdrn: error:") and str(bad) in err and "Traceback" not in err, err


def test_a_sparse_tensor_in_a_weights_file_is_refused(tmp_path, capsys):
    state = fastdrn.reference.DRN(**CFG).state_dict()
    state["tail.weight"] = state["tail.weight"].to_sparse()
    path = tmp_path / "sparse.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="tail.weight: torch.sparse_coo"):
        load_model(str(path))
    assert _upscale(_png(tmp_path / "x.png"), "-o", tmp_path / "out", "--weights", path) == 2


# ---- item 12: signals during training, stale temporary files -------------------------------------

def test_sigterm_during_training_saves_and_exits_143(trained, tmp_path):
    hr, _last, _args = trained
    out = tmp_path / "run"
    env = {**os.environ, "FASTDRN_BACKEND": "torch", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "fastdrn.cli", "train", "--hr-dir", str(hr), "--scale", "2", "--out", str(out),
           "--steps", "100000", "--save-every", "100000", "--patch-size", "8", "--batch-size", "2",
           "--workers", "0", "--log-every", "1", "--device", "cpu", *TINY_TRAIN]
    # stdout to a file and stderr read by a thread: no pipe fills, and no read blocks past the
    # deadline if the trainer goes quiet.
    with open(tmp_path / "stdout.txt", "w") as stdout_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=stdout_file, stderr=subprocess.PIPE, text=True)
        stderr, third_step = [], threading.Event()

        def read_stderr():
            for line in proc.stderr:           # progress lines: "[---...] 3/100000 loss ..."
                stderr.append(line)
                if " 3/100000 " in line:
                    third_step.set()

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        try:
            third_step.wait(timeout=240)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        reader.join(timeout=10)
    stdout, stderr = (tmp_path / "stdout.txt").read_text(), "".join(stderr)
    assert third_step.is_set(), "no third training step within 240 s: " + stderr[-2000:]
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "stopped by SIGTERM" in stdout
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] >= 3


# Above Linux's largest pid_max (2**22): the process id of no process, as that of a killed run.
DEAD_PID = 2 ** 22 + 1


def test_stale_temporary_checkpoints_are_removed_on_start(trained, tmp_path):
    hr, _last, args = trained
    out = tmp_path / "run"
    out.mkdir()
    stale = [out / f".last.{DEAD_PID}.k3j_9x2a.tmp.pt", out / f".best.{DEAD_PID}.AbCd1234.tmp.pt"]
    # other names, and one without a process id (made before temporary names held one)
    kept = [out / f".other.{DEAD_PID}.k3j_9x2a.tmp.pt", out / "notes.tmp.pt", out / ".last.short.tmp.pt",
            out / ".last.k3j_9x2a.tmp.pt"]
    for p in stale + kept:
        p.write_bytes(b"partial")
    run = [a if a != str(_last.parent) else str(out) for a in args]
    assert cli.main(run) == 0
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)
    assert not [n for n in os.listdir(out) if n.startswith((".last.", ".best.")) and n not in
                {p.name for p in kept}]


def test_a_temporary_checkpoint_of_a_run_still_writing_is_left_alone(trained, tmp_path):
    """A run starting in the --out folder of another run deleted every temporary last.pt/best.pt file
    there, the other run's file in the middle of its save included: that save then failed. Only the
    files of writers that are gone are deleted: a writer's process id is in the name, and it holds a
    lock on the file (which tells across machines sharing the folder, where process ids do not)."""
    hr, _last, args = trained
    out = tmp_path / "run"
    out.mkdir()
    removed = []

    def save_while_another_run_starts(tmp):
        torch.save({"step": 1}, tmp)
        removed.extend(remove_stale_temp_files(str(out), print))

    atomic_write(out / "last.pt", save_while_another_run_starts)       # a run of this process
    assert removed == [] and torch.load(out / "last.pt", weights_only=True) == {"step": 1}
    (out / "last.pt").unlink()   # a new run is refused a folder holding another run's last.pt
    # a run on another machine: a process id that is no process here, and the lock it holds
    elsewhere = out / f".best.{DEAD_PID}.Qx7_mm2Z.tmp.pt"
    elsewhere.write_bytes(b"half written")
    # a run of another process on this machine (the one that started pytest), without the lock
    here = out / f".last.{os.getppid()}.Pp3_kk9a.tmp.pt"
    here.write_bytes(b"half written")
    with open(elsewhere, "rb+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        assert cli.main([a if a != str(_last.parent) else str(out) for a in args]) == 0
        assert elsewhere.read_bytes() == b"half written" and here.exists()
    assert remove_stale_temp_files(str(out), print) == [str(elsewhere)]   # lock released: abandoned
    assert here.exists()
