"""``fastdrn train`` and ``fastdrn eval``: the recipe beats bicubic on real photos, exact resume,
DDP equivalence (two gloo processes on the CPU), checkpoint format, data layouts, bad inputs."""
import io
import json
import os
import re
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

import fastdrn
from fastdrn import cli
from fastdrn.tools import progress
from fastdrn.tools.checkpoint import load_model
from fastdrn.tools.data import StreamBatchSampler, TrainPatches, find_pairs, make_lr
from fastdrn.tools.metrics import psnr, ssim
from fastdrn.tools.train import TrainConfig, Trainer, default_workers, train
from helpers import run_bounded

TINY = dict(n_feats=8, n_groups=1, n_blocks=2, inner=8, distill=4)


@pytest.fixture(autouse=True)
def _env(_seed_and_backend, monkeypatch):
    monkeypatch.setenv("FASTDRN_BACKEND", "torch")   # plain math, never the Triton interpreter
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _texture(h, w, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    f = rng.uniform(2, 6, 3)
    base = 0.5 + 0.3 * np.sin(xx[..., None] / f + yy[..., None] / f[::-1]) + 0.15 * rng.random((h, w, 3))
    return (np.clip(base, 0, 1) * 255).round().astype(np.uint8)


@pytest.fixture
def synth(tmp_path):
    """A DIV2K-style layout: HR/0001.png ... and LR_bicubic/X2/0001x2.png ..."""
    hr, lr = tmp_path / "DIV2K_train_HR", tmp_path / "DIV2K_train_LR_bicubic" / "X2"
    hr.mkdir()
    lr.mkdir(parents=True)
    for i in range(1, 5):
        img = _texture(40 + 4 * i, 44, i)
        PILImage.fromarray(img).save(hr / f"{i:04d}.png")
        PILImage.fromarray(make_lr(img, 2)).save(lr / f"{i:04d}x2.png")
    return tmp_path


def _cfg(synth, out, **kw):
    base = dict(hr_dir=str(synth / "DIV2K_train_HR"), out=str(out), scale=2, patch_size=12, batch_size=4,
                lr=1e-3, workers=0, progress=False, iters_per_epoch=2, device="cpu", **TINY)
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------------------ data

def test_pairs_and_generated_lr_match_files(synth):
    pairs, missing = find_pairs(str(synth / "DIV2K_train_HR"), str(synth / "DIV2K_train_LR_bicubic"), 2)
    assert not missing and [p.lr.endswith(f"{i:04d}x2.png") for i, p in enumerate(pairs, 1)] == [True] * 4
    from_files = TrainPatches(pairs, 2, 12, cache="memory")
    generated = TrainPatches(find_pairs(str(synth / "DIV2K_train_HR"), None, 2)[0], 2, 12, cache="none")
    for key in [(0, [1, 2]), (3, [7, 8])]:
        for a, b in zip(from_files[key], generated[key]):
            assert torch.equal(a, b)
        lr, hr = from_files[key]
        assert lr.shape == (3, 12, 12) and hr.shape == (3, 24, 24)



def test_images_that_share_a_name_are_kept_apart(tmp_path, capsys):
    """a.png and a.bmp were both named "a": validation scored the second one twice (its decoded data
    and bicubic score were keyed by the name), and eval --save-dir wrote one over the other."""
    hr = tmp_path / "hr"
    hr.mkdir()
    img = _texture(36, 40, 7)
    PILImage.fromarray(img).save(hr / "a.png")
    PILImage.fromarray(255 - img).save(hr / "a.bmp")
    PILImage.fromarray(img[::-1]).save(hr / "b.png")
    pairs, _ = find_pairs(str(hr), None, 2)
    assert [p.name for p in pairs] == ["a.bmp", "a.png", "b"]
    trainer = Trainer(_cfg(tmp_path, tmp_path / "run", hr_dir=str(hr), val_hr_dir=str(hr), steps=1,
                           patch_size=8), log=lambda m: None)
    from fastdrn.tools.evaluate import evaluate_pairs
    model = trainer.model.eval()
    kept = evaluate_pairs(model, trainer.model_cfg, trainer.val_pairs, loaded=trainer.val_data,
                          bicubic_cache=trainer.val_bicubic, log=lambda m: None)["images"]
    fresh = evaluate_pairs(model, trainer.model_cfg, find_pairs(str(hr), None, 2)[0], log=lambda m: None)["images"]
    assert [(r["name"], r["psnr"]) for r in kept] == [(r["name"], r["psnr"]) for r in fresh]
    assert kept[0]["psnr"] != kept[1]["psnr"]
    torch.save(model.state_dict(), tmp_path / "w.pt")
    assert cli.main(["eval", "--weights", str(tmp_path / "w.pt"), "--hr-dir", str(hr),
                     "--save-dir", str(tmp_path / "saved")]) == 0
    assert sorted(os.listdir(tmp_path / "saved")) == ["a.bmp_x2.png", "a.png_x2.png", "b_x2.png"]



@pytest.mark.parametrize("damage", ["truncated", "garbage", "another_array"])
def test_a_damaged_disk_cache_file_is_decoded_again(tmp_path, damage):
    """A cache file cut short (a copy, a full disk, an old version) or holding another array stopped
    training with numpy's 'EOF: reading array header, expected 118 bytes got 90', naming no file, or
    would have trained on the wrong pixels; a cache is rebuilt from the image instead, with a warning."""
    hr = tmp_path / "hr"
    hr.mkdir()
    PILImage.fromarray(_texture(20, 24, 5)).save(hr / "a.png")
    pairs, _ = find_pairs(str(hr), None, 2)
    cache = tmp_path / "cache"
    first = TrainPatches(pairs, 2, patch=8, cache="disk", cache_dir=str(cache))
    expected = first[(0, [0, 0])]
    hr_file = next(cache.glob("*_hr.npy"))
    if damage == "truncated":
        hr_file.write_bytes(hr_file.read_bytes()[:100])
    elif damage == "garbage":
        hr_file.write_bytes(b"not an array")
    else:
        np.save(hr_file, np.zeros((3, 5, 3), np.uint8))
    errors, warnings = [], []
    data = TrainPatches(pairs, 2, patch=8, cache="disk", cache_dir=str(cache), on_error=errors.append,
                        on_warning=warnings.append)
    assert errors == [] and len(data) == 1
    assert len(warnings) == 1 and str(hr_file) in warnings[0] and "decoded again" in warnings[0]
    got = data[(0, [0, 0])]
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_the_disk_cache_takes_images_with_long_names(tmp_path):
    """A legal 240-character image name made a cache file name past 255 bytes: training with
    --cache disk stopped with 'File name too long'."""
    hr = tmp_path / "hr"
    hr.mkdir()
    long_name = "p" * 236 + ".png"
    PILImage.fromarray(_texture(20, 24, 5)).save(hr / long_name)
    PILImage.fromarray(_texture(20, 24, 6)).save(hr / ("p" * 236 + ".bmp"))   # same first 64 characters
    pairs, _ = find_pairs(str(hr), None, 2)
    errors = []
    data = TrainPatches(pairs, 2, patch=8, cache="disk", cache_dir=str(tmp_path / "cache"), on_error=errors.append)
    assert errors == [] and len(data) == 2
    assert len(os.listdir(tmp_path / "cache")) == 4
    lr0, _ = data[(0, [0, 0])]
    lr1, _ = data[(1, [0, 0])]
    assert not torch.equal(lr0, lr1)


def test_sampler_shards_the_global_batch():
    one = list(StreamBatchSampler(5, 4, 6, seed=3))
    r0 = list(StreamBatchSampler(5, 4, 6, seed=3, rank=0, world_size=2))
    r1 = list(StreamBatchSampler(5, 4, 6, seed=3, rank=1, world_size=2))
    assert [a + b for a, b in zip(r0, r1)] == one
    assert list(StreamBatchSampler(5, 4, 6, seed=3, start_step=4)) == one[4:]
    idx = [i for b in one[:5] for i, _ in b]                 # 20 draws = 4 permutations of 5 images
    assert all(sorted(idx[k:k + 5]) == list(range(5)) for k in range(0, 20, 5))


# --------------------------------------------------------------------------- resume, checkpoints

def test_resume_is_exact_and_checkpoint_is_safe(synth, tmp_path):
    full = tmp_path / "full"
    assert train(_cfg(synth, full, steps=6, lr_step=1, workers=1)) == 0  # lr halves every 2 steps
    part = tmp_path / "part"
    assert train(_cfg(synth, part, steps=3, lr_step=1)) == 0
    ck = torch.load(part / "last.pt", weights_only=True)                     # safe loading works
    assert ck["step"] == 3 and set(ck["rng"]) == {"torch", "cuda", "numpy", "python"}
    assert train(_cfg(synth, part, steps=6, lr_step=1, resume="auto")) == 0
    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(part / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, st in a["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[name], b["optimizer"]["state"][k][name])
    assert a["scheduler"] == b["scheduler"] and a["scheduler"]["_last_lr"][0] == pytest.approx(1e-3 / 8)
    for k in ("torch", "python"):
        assert torch.equal(a["rng"][k] if k == "torch" else a["rng"][k]["state"],
                           b["rng"][k] if k == "torch" else b["rng"][k]["state"])
    # the training checkpoint is also a --weights file for eval / upscale
    model, cfg = load_model(full / "last.pt")
    assert cfg["scale"] == 2 and cfg["n_feats"] == 8



def test_files_of_the_image_folders_that_are_not_read_are_named(synth, tmp_path, capsys):
    """A photograph of an extension not read (.heic) in --hr-dir or --val-hr-dir was left out of
    training and validation without a word; upscale and eval name such files, and so does train."""
    hr = synth / "DIV2K_train_HR"
    (hr / "0005.heic").write_bytes(b"\0\0\0\x18ftypheic")
    val = tmp_path / "val"
    val.mkdir()
    PILImage.fromarray(_texture(40, 44, 9)).save(val / "v.png")
    (val / "w.heic").write_bytes(b"\0\0\0\x18ftypheic")
    assert train(_cfg(synth, tmp_path / "run", steps=1, val_hr_dir=str(val))) == 0
    out = capsys.readouterr().out
    for name in (hr / "0005.heic", val / "w.heic"):
        assert f"warning: 1 file(s) of the input folder(s) not read, not of an image extension" in out
        assert str(name) in out, name


@pytest.mark.parametrize("length", [dict(steps=2), dict(epochs=1)])   # a run measured in steps, one in epochs
def test_a_resumed_run_keeps_its_own_length(synth, tmp_path, length, capsys):
    """Resuming without --steps or --epochs continues to the length the run was started with. It used
    to take the default of 800 epochs: a finished --steps 2 run resumed with --resume auto trained on
    for 1598 more steps."""
    out = tmp_path / "run"
    assert train(_cfg(synth, out, **length)) == 0                        # 2 steps: 2 iterations an epoch
    assert train(_cfg(synth, out, resume="auto")) == 0
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2
    assert "nothing to train: the run is at step 2, and it has 2 steps" in capsys.readouterr().out
    longer = {k: 2 * v for k, v in length.items()}                        # an explicit length still extends it
    assert train(_cfg(synth, out, resume="auto", **longer)) == 0
    assert train(_cfg(synth, out, resume="auto")) == 0                    # ... and is the run's length after
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 4


@pytest.mark.parametrize("option, value", [("steps", 0), ("steps", -3), ("epochs", 0), ("batch_size", 0),
                                           ("patch_size", -4), ("lr_step", 0), ("save_every", 0),
                                           ("val_every", 0), ("val_max", 0), ("log_every", 0)])
def test_counts_below_one_are_refused_by_name(synth, tmp_path, option, value, capsys):
    """--batch-size 0, --patch-size -4 and --lr-step 0 ended in tracebacks from the DataLoader, the
    model and StepLR; --steps 0 claimed a last.pt it never wrote; --save-every 0, --val-every 0 and
    --val-max 0 were silently read as their defaults."""
    out = tmp_path / "run"
    flag = "--" + option.replace("_", "-")
    argv = ["train", "--hr-dir", str(synth / "DIV2K_train_HR"), "--scale", "2", "--out", str(out), "--no-progress",
            "--patch-size", "8", "--device", "cpu", *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()],
            *([] if option in ("steps", "epochs") else ["--steps", "1"]), f"{flag}={value}"]
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{flag} {value}: must be a whole number of at least 1" in err and "Traceback" not in err
    assert not out.exists() or os.listdir(out) == []


@pytest.mark.parametrize("option, value, expected", [
    ("lr-gamma", "-1", "--lr-gamma -1.0: must be a finite number above 0"),   # the lr went negative at the first decay
    ("lr-gamma", "0", "--lr-gamma 0.0: must be a finite number above 0"),     # training stopped at the first decay
    ("lr-gamma", "nan", "--lr-gamma nan: must be a finite number above 0"),   # weights went NaN at the first decay
    ("lr", "0", "--lr 0.0: must be a finite number above 0"),                 # trained nothing, exit 0
    ("lr", "inf", "--lr inf: must be a finite number above 0"),               # diverged at the first step
    ("seed", "-1", "--seed -1: must be a whole number of at least 0"),        # numpy's 'expected non-negative integer'
    ("log-interval", "nan", "--log-interval nan: must be a finite number of seconds, 0 or more"),  # never a line
    ("log-interval", "-5", "--log-interval -5.0: must be a finite number of seconds, 0 or more"),
])
def test_rates_and_seed_out_of_range_are_refused_by_name(synth, tmp_path, option, value, expected, capsys):
    """--lr-gamma -1 trained on at a negative learning rate (gradient ascent) and exited 0; --seed -1
    failed in numpy with a message that named no option."""
    argv = ["train", "--hr-dir", str(synth / "DIV2K_train_HR"), "--scale", "2", "--out", str(tmp_path / "run"),
            "--no-progress", "--patch-size", "8", "--device", "cpu", "--steps", "3", "--lr-step", "1",
            "--iters-per-epoch", "1", *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()], f"--{option}={value}"]
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_batch_larger_than_the_memory_is_refused_before_the_work(synth, tmp_path, capsys):
    """--batch-size 100000000000 (a slip of the keys) grew past 8 GB of memory in the sampler for
    minutes, deaf to SIGTERM (its handler waits for a step to end), instead of saying it cannot fit."""
    argv = ["train", "--hr-dir", str(synth / "DIV2K_train_HR"), "--scale", "2", "--out", str(tmp_path / "run"),
            "--no-progress", "--patch-size", "8", "--device", "cpu", "--steps", "1", "--workers", "0",
            *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()], "--batch-size", str(10 ** 11)]
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(r"one batch of \d+ patches of \d+x\d+ \(LR\) and \d+x\d+ \(HR\) takes [\d.]+ GiB as float32, "
                     r"more than this machine's [\d.]+ GiB of memory", err), err
    assert "Traceback" not in err


def test_resuming_on_another_set_of_training_images_says_it_will_not_repeat_the_run(synth, tmp_path, capsys):
    """The data order is a permutation of the images: resumed after an image was added (or removed),
    the run went on with another order and said nothing, while another seed, batch or patch size was
    warned about."""
    out = tmp_path / "run"
    assert train(_cfg(synth, out, steps=1)) == 0
    PILImage.fromarray(_texture(48, 44, 9)).save(synth / "DIV2K_train_HR" / "0009.png")
    capsys.readouterr()
    assert train(_cfg(synth, out, steps=2, resume="auto")) == 0
    assert ("warning: resuming with n_images 5, the checkpoint used 4: the run will not repeat the "
            "uninterrupted one") in capsys.readouterr().out


def test_a_second_ctrl_c_in_the_middle_of_a_step_saves_no_torn_checkpoint(synth, tmp_path, monkeypatch, capsys):
    """A second Ctrl-C raises KeyboardInterrupt wherever the loop is; landing after Adam had updated
    the weights but before the step was counted, it saved last.pt as step 2 holding step 3's weights
    and moments: resumed, step 3 was applied twice and the run no longer repeated the uninterrupted one."""
    full = tmp_path / "full"
    assert train(_cfg(synth, full, steps=3)) == 0
    train_module = sys.modules["fastdrn.tools.train"]     # fastdrn.tools.train is the function
    real = train_module.make_train_step

    def interrupted_at_the_third(*args, **kwargs):
        step, calls = real(*args, **kwargs), []

        def run(lr, hr):
            loss = step(lr, hr)
            calls.append(1)
            if len(calls) == 3:           # the weights and moments are step 3's; the count is still 2
                raise KeyboardInterrupt
            return loss
        return run

    part = tmp_path / "part"
    monkeypatch.setattr(train_module, "make_train_step", interrupted_at_the_third)
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(synth, part, steps=3))
    assert "interrupted in step 3: last.pt not written (it holds step 2)" in capsys.readouterr().out
    monkeypatch.setattr(train_module, "make_train_step", real)
    assert train(_cfg(synth, part, steps=3, resume="auto")) == 0
    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(part / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_a_new_run_into_the_folder_of_another_keeps_its_checkpoints(synth, tmp_path, capsys):
    """A second run with the same --out and no --resume started afresh and wrote its step-1 last.pt
    over the first run's step-3 one, and its first validation replaced the first run's best.pt
    (its best PSNR began at -inf), without a word."""
    out = tmp_path / "run"
    assert train(_cfg(synth, out, steps=3, val_every=1, val_hr_dir=str(synth / "DIV2K_train_HR"))) == 0
    before = {n: (out / n).read_bytes() for n in ("last.pt", "best.pt")}
    argv = ["train", "--hr-dir", str(synth / "DIV2K_train_HR"), "--scale", "2", "--out", str(out), "--no-progress",
            "--patch-size", "8", "--device", "cpu", "--workers", "0",
            *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]]
    capsys.readouterr()
    assert cli.main([*argv, "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: holds last.pt, best.pt of an earlier run" in err and "--resume auto" in err
    assert {n: (out / n).read_bytes() for n in before} == before
    # resuming it is what such a folder is for
    assert cli.main([*argv, "--steps", "4", "--lr", "1e-3", "--iters-per-epoch", "2", "--resume", "auto"]) == 0
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 4
    # nor a run whose best.pt outlived its last.pt (validated more often than saved, then killed): --resume
    # auto found no last.pt, started afresh and replaced that best.pt at its first validation
    (out / "last.pt").unlink()
    capsys.readouterr()
    assert cli.main([*argv, "--steps", "1", "--resume", "auto"]) == 2
    assert f"--out {out}: holds best.pt of an earlier run, which a new run would overwrite: there is no last.pt" \
        in capsys.readouterr().err
    assert (out / "best.pt").read_bytes() == before["best.pt"]


def test_out_that_is_a_file_and_resuming_at_another_scale_or_past_the_end(synth, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="--out .*a_file: exists and is not a folder"):
        train(_cfg(synth, tmp_path / "a_file", steps=1))
    with pytest.raises(OSError, match=r"^--out .*a_file/run: cannot create the folder: Not a directory$"):
        train(_cfg(synth, tmp_path / "a_file" / "run", steps=1))
    out = tmp_path / "run"
    assert train(_cfg(synth, out, steps=1)) == 0
    with pytest.raises(fastdrn.tools.CheckpointError,
                       match=re.escape(f"{out / 'last.pt'}: the checkpoint is of scale 2, --scale is 3")):
        train(_cfg(synth, out, steps=2, scale=3, resume="auto"))
    # validation LR images without their HR images were ignored without a word
    with pytest.raises(ValueError, match="--val-lr-dir .* needs --val-hr-dir"):
        train(_cfg(synth, out, steps=1, val_lr_dir=str(synth / "DIV2K_train_LR_bicubic")))
    # resumed at its last step, a run trains nothing and says so, not that it wrote a checkpoint
    other = tmp_path / "other"
    capsys.readouterr()
    assert train(_cfg(synth, other, steps=1, resume=str(out / "last.pt"))) == 0
    printed = capsys.readouterr().out
    assert "nothing to train: the run is at step 1, and it has 1 steps" in printed and "checkpoint" not in printed
    assert os.listdir(other) == []



def test_resuming_with_other_model_options_or_an_empty_validation_folder_says_so(synth, tmp_path, capsys):
    """--n-feats 16, --alpha 0.3 or --lr 0.5 on resume were silently ignored (the checkpoint's model
    and optimizer went on);
    a --val-hr-dir without images silently meant no validation and no best.pt."""
    out = tmp_path / "run"
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert train(_cfg(synth, out, steps=1, val_hr_dir=str(empty))) == 0
    assert f"warning: --val-hr-dir {empty} holds no images: no validation, no best.pt" in capsys.readouterr().out
    with pytest.raises(fastdrn.tools.CheckpointError,
                       match=re.escape("resuming continues the checkpoint's model, optimizer and schedule, not the "
                                       "ones asked for: --n-feats 16 (it has 8), --alpha 0.3 (it has 0.2)")):
        train(_cfg(synth, out, steps=2, resume="auto", n_feats=16, alpha=0.3))
    # a new learning rate was not used either, while the checkpoint's record of the options said it was
    with pytest.raises(fastdrn.tools.CheckpointError, match=re.escape("--lr 0.5 (it has 0.001), --lr-gamma 0.1 (it has 0.5)")):
        train(_cfg(synth, out, steps=2, resume="auto", lr=0.5, lr_gamma=0.1))
    # the options it was trained with, or the defaults, resume
    assert train(_cfg(synth, out, steps=2, resume="auto")) == 0
    assert train(TrainConfig(hr_dir=str(synth / "DIV2K_train_HR"), out=str(out), scale=2, steps=3, resume="auto",
                             patch_size=12, batch_size=4, workers=0, progress=False, iters_per_epoch=2,
                             device="cpu")) == 0
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 3



def test_validation_images_too_small_for_ssim_are_left_out_once(synth, tmp_path, capsys):
    """They were scored every validation as "PSNR nan dB (Y, 2 images)", and best.pt never came."""
    val = tmp_path / "val"
    val.mkdir()
    PILImage.fromarray(_texture(10, 12, 3)).save(val / "tiny.png")
    capsys.readouterr()
    assert train(_cfg(synth, tmp_path / "tiny_only", steps=2, val_every=1, val_hr_dir=str(val))) == 0
    printed = capsys.readouterr().out
    assert (f"warning: {val / 'tiny.png'}: 12x10 is too small to validate on (SSIM's 11x11 window needs "
            "15 pixels a side with the 2-pixel border cropped): not used") in printed
    assert f"warning: --val-hr-dir {val}: no usable images: no validation, no best.pt" in printed
    assert "nan" not in printed and printed.count("too small") == 1
    PILImage.fromarray(_texture(24, 26, 4)).save(val / "big.png")
    assert train(_cfg(synth, tmp_path / "mixed", steps=1, val_every=1, val_hr_dir=str(val))) == 0
    printed = capsys.readouterr().out
    assert re.search(r"step 1: validation PSNR \d+\.\d+ dB, bicubic \d+\.\d+ dB \(Y, 1 images\) \(best\)", printed)
    assert (tmp_path / "mixed" / "best.pt").exists()



def test_a_diverged_run_stops_and_keeps_its_last_good_checkpoint(synth, tmp_path, capsys):
    """At --lr 1e30 the weights went NaN by step 2; the run went on, overwrote last.pt with them and
    said "done" with exit code 0."""
    out = tmp_path / "run"
    argv = ["train", "--hr-dir", str(synth / "DIV2K_train_HR"), "--scale", "2", "--out", str(out), "--no-progress",
            "--patch-size", "8", "--batch-size", "4", "--device", "cpu", "--steps", "4", "--save-every", "1",
            "--lr", "1e30", *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]]
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(r"step (\d+): the weights became NaN or infinite \(.+\): the training diverged; "
                     + re.escape(str(out / "last.pt")) + r" was not overwritten \(it holds step (\d+)\)", err), err
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert f"it holds step {ckpt['step']})" in err and os.listdir(out) == ["last.pt"]


def test_init_takes_another_scales_body_and_refuses_another_architecture(synth, tmp_path, capsys):
    from fastdrn.reference import DRN
    from fastdrn.tools.checkpoint import CheckpointError
    x3 = DRN(scale=3, **TINY)
    with torch.no_grad():
        for p in x3.parameters():
            p.add_(torch.randn_like(p))                    # nothing a fresh model could start from
    torch.save({"params": x3.state_dict(), "config": {"alpha": 0.2}}, tmp_path / "x3.pth")
    trainer = Trainer(_cfg(synth, tmp_path / "x2", init=str(tmp_path / "x3.pth"), ema=0.9, steps=1))
    assert "initialised from" in capsys.readouterr().out
    for model in (trainer.model, trainer.ema_model):       # the EMA starts from the same weights
        mine = model.state_dict()
        for k, v in x3.state_dict().items():
            if k.startswith("upsample."):
                assert mine[k].shape[0] == 8 * 4 and not torch.equal(mine[k][:v.shape[0]], v[:mine[k].shape[0]])
            else:
                assert torch.equal(mine[k], v), k
    # the same from the command line, then resumed: --init is not applied over the checkpoint
    args = ["train", "--hr-dir", str(synth / "DIV2K_train_HR"), "--scale", "2", "--out", str(tmp_path / "c"),
            "--patch-size", "12", "--batch-size", "2", "--no-progress", "--device", "cpu",
            "--n-feats", "8", "--n-groups", "1", "--n-blocks", "2", "--inner", "8", "--distill", "4",
            "--init", str(tmp_path / "x3.pth")]
    assert cli.main([*args, "--steps", "1"]) == 0
    assert "initialised from" in capsys.readouterr().out
    assert cli.main([*args, "--steps", "2", "--resume", "auto"]) == 0
    assert "not used: resuming" in capsys.readouterr().out
    # another architecture is named, not half-loaded
    with pytest.raises(CheckpointError, match="n_feats: 8 there, 12 here"):
        Trainer(_cfg(synth, tmp_path / "y", init=str(tmp_path / "x3.pth"), n_feats=12))
    fresh = [a if a != str(tmp_path / "c") else str(tmp_path / "d") for a in args[:-1]]   # c holds a run
    assert cli.main([*fresh, str(tmp_path / "absent.pt"), "--steps", "1"]) == 2
    assert "absent.pt" in capsys.readouterr().err


def test_amp_bf16_lr_files_and_progress(synth, tmp_path, capsys):
    assert train(_cfg(synth, tmp_path / "amp", steps=2, amp="bf16", progress=True, log_every=1,
                      lr_dir=str(synth / "DIV2K_train_LR_bicubic"), cache="disk")) == 0
    err = capsys.readouterr().err
    assert "2/2" in err and "loss" in err and "patch/s" in err
    assert any(f.endswith("_hr.npy") for f in os.listdir(tmp_path / "amp" / "cache"))


def test_bad_training_images_are_named_and_skipped(synth, tmp_path, capsys):
    hr = synth / "DIV2K_train_HR"
    (hr / "0009.png").write_bytes((hr / "0001.png").read_bytes()[:200])
    (hr / "0010.png").write_bytes(b"garbage")
    code = cli.main(["train", "--hr-dir", str(hr), "--scale", "2", "--out", str(tmp_path / "o"), "--steps", "2",
                     "--patch-size", "12", "--batch-size", "2", "--workers", "0", "--no-progress", "--device", "cpu",
                     "--n-feats", "8", "--n-groups", "1", "--n-blocks", "1", "--inner", "8"])
    err = capsys.readouterr().err
    assert code == 1 and "0009.png" in err and "0010.png" in err
    assert (tmp_path / "o" / "last.pt").exists()                        # trained on the good ones
    code = cli.main(["train", "--hr-dir", str(hr), "--scale", "2", "--out", str(tmp_path / "o2"), "--steps", "2",
                     "--patch-size", "12", "--batch-size", "2", "--workers", "0", "--no-progress", "--device", "cpu",
                     "--n-feats", "8", "--n-groups", "1", "--n-blocks", "1", "--inner", "8", "--fail-fast"])
    assert code == 1 and not (tmp_path / "o2" / "last.pt").exists()


def test_ema_follows_the_weights_is_validated_saved_resumed_and_loaded(synth, tmp_path, capsys):
    decay = 0.6
    t = Trainer(_cfg(synth, tmp_path / "manual", steps=3, ema=decay))
    expected = [p.detach().double().clone() for p in t.model.parameters()]     # the EMA starts at the weights
    for lr, hr in t.loader:
        t.advance(lr, hr)
        expected = [decay * e + (1 - decay) * p.detach().double() for e, p in zip(expected, t.model.parameters())]
    assert t.step == 3
    for e, p, raw in zip(expected, t.ema_model.parameters(), t.model.parameters()):
        torch.testing.assert_close(p.double(), e, rtol=1e-6, atol=1e-7)
        assert not torch.equal(p, raw)
    t.close()
    # saved as params_ema, validated (with the bicubic PSNR beside), resumed exactly
    val = str(synth / "DIV2K_train_HR")
    full, part = tmp_path / "full", tmp_path / "part"
    assert train(_cfg(synth, full, steps=4, ema=decay, val_hr_dir=val, val_every=2)) == 0
    out = capsys.readouterr().out
    assert re.search(r"step 2: validation PSNR [0-9.]+ dB \(EMA\), bicubic [0-9.]+ dB", out), out
    assert train(_cfg(synth, part, steps=2, ema=decay)) == 0
    assert train(_cfg(synth, part, steps=4, ema=decay, resume="auto")) == 0
    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(part / "last.pt", weights_only=True)
    for k in a["params_ema"]:
        assert torch.equal(a["params_ema"][k], b["params_ema"][k]), k
    assert any(not torch.equal(a["params_ema"][k], a["model"][k]) for k in a["model"])
    # what inference loads by default is the EMA
    model = fastdrn.load(full / "last.pt")
    ema = fastdrn.reference.DRN(scale=2, **TINY).eval()
    ema.load_state_dict(a["params_ema"])
    x = torch.rand(1, 3, 6, 7)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ema(x))
    with pytest.raises(ValueError, match="--ema must be a decay"):
        Trainer(_cfg(synth, tmp_path / "bad", steps=1, ema=1.0))


def test_training_says_where_it_runs_and_fits_the_machine(synth, tmp_path, capsys, monkeypatch):
    assert train(_cfg(synth, tmp_path / "r", steps=1, workers=None)) == 0
    out = capsys.readouterr().out
    n = sum(p.numel() for p in fastdrn.reference.DRN(scale=2, **TINY).parameters())
    assert re.search(rf"device cpu; backend: torch.*DRN x2 .*: {n:,} parameters", out), out
    assert "0 data worker(s)" in out                                        # the CPU trains: no workers
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert default_workers(cuda) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert default_workers(cuda) == 4 and default_workers(torch.device("cpu")) == 0


def test_progress_off_a_terminal_is_by_time_unless_steps_are_given(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])

    def lines(**kw):
        stream = io.StringIO()
        p = progress.Progress(10, stream=stream, **kw)
        for step in range(1, 11):
            clock[0] += 7.0                                       # 7 s per step
            p.update(step, 1, loss=0.5)
        return [int(re.search(r"\] (\d+)/10", line).group(1)) for line in stream.getvalue().splitlines()]

    assert lines(interval=30.0) == [5, 10]                        # every 30 s, and the last step
    assert lines(every=4) == [4, 8, 10]


# -------------------------------------------------------------------------------------------- DDP

def _ddp_worker(argv):
    """Run under torchrun (or directly for one process): gradients of the first global batch, then
    3 training steps. Writes grads_w{world}.pt and OUT/last.pt."""
    data, out = argv
    torch.set_num_threads(1)
    cfg = TrainConfig(hr_dir=os.path.join(data, "DIV2K_train_HR"), out=out, scale=2, patch_size=12,
                      batch_size=4, lr=1e-3, workers=0, progress=False, steps=3, iters_per_epoch=2,
                      device="cpu", **TINY)
    os.makedirs(out, exist_ok=True)
    t = Trainer(cfg)
    lr, hr = next(iter(t.loader))
    t.forward_backward(lr, hr)
    if t.rank == 0:
        torch.save({n: p.grad.clone() for n, p in t.model.named_parameters()},
                   os.path.join(out, f"grads_w{t.world}.pt"))
    t.optimizer.zero_grad(set_to_none=True)
    t.fit()
    t.close()


def test_ddp_two_gloo_processes_match_one(synth, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _ddp_worker([str(synth), str(one)])
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    # The workers run this file as a script: this checkout's fastdrn first, not another installed one.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo on loopback, whatever the host name resolves to
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           __file__, str(synth), str(two)]
    r = run_bounded(cmd, 240, env=env)  # torchrun's workers are stopped with it at the limit
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    g1 = torch.load(one / "grads_w1.pt", weights_only=True)
    g2 = torch.load(two / "grads_w2.pt", weights_only=True)
    assert g1.keys() == g2.keys()
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-7, msg=k)
    w1 = torch.load(one / "last.pt", weights_only=True)
    w2 = torch.load(two / "last.pt", weights_only=True)
    for k in w1["model"]:
        torch.testing.assert_close(w2["model"][k], w1["model"][k], rtol=1e-4, atol=1e-6, msg=k)
    assert w1["step"] == w2["step"] == 3


# ------------------------------------------------------------------------------------------ eval

def test_eval_table_json_layouts_and_bad_images(synth, tmp_path, capsys):
    train(_cfg(synth, tmp_path / "run", steps=1))
    weights = str(tmp_path / "run" / "last.pt")
    js = tmp_path / "res.json"
    assert cli.main(["eval", "--weights", weights, "--device", "cpu", "--hr-dir", str(synth / "DIV2K_train_HR"),
                     "--lr-dir", str(synth / "DIV2K_train_LR_bicubic"), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "bicubic PSNR" in out and "mean" in out and "0004" in out
    res = json.loads(js.read_text())
    assert len(res["images"]) == 4 and res["scale"] == 2 and not res["failed"]
    # without LR files the LR images are made by MATLAB bicubic: same LR, same numbers
    assert cli.main(["eval", "--weights", weights, "--device", "cpu", "--hr-dir", str(synth / "DIV2K_train_HR"),
                     "--json", str(tmp_path / "gen.json"), "--self-ensemble"]) == 0
    gen = json.loads((tmp_path / "gen.json").read_text())
    for a, b in zip(res["images"], gen["images"]):
        assert a["bicubic_psnr"] == pytest.approx(b["bicubic_psnr"], abs=1e-9)
    # a truncated HR image and a missing LR partner are named; the rest is scored; exit code 1
    hr = synth / "DIV2K_train_HR"
    (hr / "0005.png").write_bytes((hr / "0001.png").read_bytes()[:100])
    PILImage.fromarray(_texture(40, 40, 9)).save(hr / "0006.png")      # no LR partner
    assert cli.main(["eval", "--weights", weights, "--device", "cpu", "--hr-dir", str(hr),
                     "--lr-dir", str(synth / "DIV2K_train_LR_bicubic"), "--json", str(js)]) == 1
    err = capsys.readouterr().err
    assert "0005.png" in err and "0006" in err
    res = json.loads(js.read_text())
    assert len(res["images"]) == 4 and len(res["failed"]) == 2
    # wrong scale: an error that says so
    assert cli.main(["eval", "--weights", weights, "--device", "cpu", "--hr-dir", str(hr), "--scale", "4"]) == 2
    assert "scale: checkpoint has 2, expected 4" in capsys.readouterr().err



def test_eval_refuses_to_save_into_the_folder_it_measures(synth, tmp_path, capsys):
    """--save-dir equal to --hr-dir put NAME_x2.png beside the HR images: the next eval measured them
    as HR images too (and an HR image of that name was replaced)."""
    torch.save(fastdrn.reference.DRN(scale=2, **TINY).state_dict(), tmp_path / "w.pt")
    hr = synth / "DIV2K_train_HR"
    before = sorted(os.listdir(hr))
    for save in (hr, str(hr) + "/", synth / "DIV2K_train_HR" / ".." / "DIV2K_train_HR"):
        capsys.readouterr()
        assert cli.main(["eval", "--weights", str(tmp_path / "w.pt"), "--hr-dir", str(hr), "--save-dir", str(save)]) == 2
        assert (f"is the --hr-dir folder {hr}: the upscaled images would join the images being measured"
                in capsys.readouterr().err)
    assert sorted(os.listdir(hr)) == before
    assert cli.main(["eval", "--weights", str(tmp_path / "w.pt"), "--hr-dir", str(hr),
                     "--save-dir", str(tmp_path / "sr")]) == 0
    assert sorted(os.listdir(tmp_path / "sr")) == [f"{n[:-4]}_x2.png" for n in before]



def test_eval_refuses_to_save_into_the_lr_folder_it_reads(synth, tmp_path, capsys, monkeypatch):
    """--lr-dir D is read from D/X2 (BasicSR's layout) at scale 2; --save-dir D/X2 was not caught, and
    NAME_x2.png, a name the LR lookup takes, joined the LR images. Refused however it is spelled (a
    symbolic link, a relative path with '..'), and for a flat D too, where saving would create the
    D/X2 that the next run reads instead of D."""
    torch.save(fastdrn.reference.DRN(scale=2, **TINY).state_dict(), tmp_path / "w.pt")
    hr, lr = synth / "DIV2K_train_HR", synth / "DIV2K_train_LR_bicubic"
    before = sorted(os.listdir(lr / "X2"))
    (tmp_path / "link").symlink_to(lr / "X2")
    monkeypatch.chdir(synth)
    for save in (lr / "X2", tmp_path / "link", "DIV2K_train_LR_bicubic/X2/../X2"):
        capsys.readouterr()
        assert cli.main(["eval", "--weights", str(tmp_path / "w.pt"), "--hr-dir", str(hr), "--lr-dir", str(lr),
                         "--save-dir", str(save)]) == 2
        err = capsys.readouterr().err
        assert (f"--save-dir {save} is {lr / 'X2'}, the folder LR images are read from for --lr-dir {lr} at "
                "scale 2 when it exists: the upscaled images would join the images being measured") in err
    assert sorted(os.listdir(lr / "X2")) == before
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in before:
        (flat / name).write_bytes((lr / "X2" / name).read_bytes())
    assert cli.main(["eval", "--weights", str(tmp_path / "w.pt"), "--hr-dir", str(hr), "--lr-dir", str(flat),
                     "--save-dir", str(flat / "X2")]) == 2
    assert f"--save-dir {flat / 'X2'} is {flat / 'X2'}, the folder LR images are read from" in capsys.readouterr().err
    assert not (flat / "X2").exists()
    assert cli.main(["eval", "--weights", str(tmp_path / "w.pt"), "--hr-dir", str(hr), "--lr-dir", str(lr),
                     "--save-dir", str(lr / "sr")]) == 0                  # a folder eval does not read


def test_a_folder_where_a_result_file_goes_is_found_before_the_work(synth, tmp_path, capsys):
    """A folder named last.pt in --out failed the first save, after an epoch of training; a folder
    named like --json failed after every image was measured."""
    out = tmp_path / "run"
    (out / "last.pt").mkdir(parents=True)
    log = []
    with pytest.raises(ValueError, match="last.pt there is a folder, where the checkpoint is to be written"):
        train(_cfg(synth, out, steps=1), log=log.append)
    assert log == []                                               # before any image was read
    torch.save(fastdrn.reference.DRN(scale=2, **TINY).state_dict(), tmp_path / "w.pt")
    (tmp_path / "report.json").mkdir()
    capsys.readouterr()
    assert cli.main(["eval", "--weights", str(tmp_path / "w.pt"), "--hr-dir", str(synth / "DIV2K_train_HR"),
                     "--json", str(tmp_path / "report.json")]) == 2
    captured = capsys.readouterr()
    assert "--json " + str(tmp_path / "report.json") + ": a folder, where the report file is to be written" in captured.err
    assert "PSNR" not in captured.out


def test_eval_crop_border_and_rgb_switches_and_what_it_prints(synth, tmp_path, capsys):
    train(_cfg(synth, tmp_path / "run", steps=1))
    weights = str(tmp_path / "run" / "last.pt")
    hr_dir, lr_dir = synth / "DIV2K_train_HR", synth / "DIV2K_train_LR_bicubic"
    capsys.readouterr()
    assert cli.main(["eval", "--weights", weights, "--device", "cpu", "--hr-dir", str(hr_dir), "--lr-dir", str(lr_dir),
                     "--no-y", "--crop-border", "0", "--json", str(tmp_path / "rgb.json"),
                     "--save-dir", str(tmp_path / "sr")]) == 0
    out = capsys.readouterr().out
    assert "device cpu" in out and re.search(r"4 image\(s\) in [0-9.]+ s on cpu", out)
    res = json.loads((tmp_path / "rgb.json").read_text())
    assert res["y_channel"] is False and res["crop_border"] == 0 and res["convention"].startswith("RGB")
    assert res["device"] == "cpu" and res["seconds"] > 0
    # the numbers are the metrics' own on the saved 8-bit SR image, on RGB with nothing cropped
    row = res["images"][0]
    sr = np.asarray(PILImage.open(tmp_path / "sr" / f"{row['name']}_x2.png"))
    hr = np.asarray(PILImage.open(hr_dir / f"{row['name']}.png"))
    assert row["psnr"] == pytest.approx(psnr(sr, hr, 0, y_channel=False), abs=1e-9)
    assert row["ssim"] == pytest.approx(ssim(sr, hr, 0, y_channel=False), abs=1e-9)
    assert cli.main(["eval", "--weights", weights, "--device", "cpu", "--hr-dir", str(hr_dir), "--lr-dir", str(lr_dir),
                     "--crop-border", "5", "--json", str(tmp_path / "y.json")]) == 0
    y = json.loads((tmp_path / "y.json").read_text())["images"][0]
    assert y["psnr"] == pytest.approx(psnr(sr, hr, 5), abs=1e-9) and y["psnr"] != row["psnr"]


# --------------------------------------------------------------------------- the recipe, on photos

def test_training_on_photos_beats_bicubic(tmp_path, capsys):
    data = pytest.importorskip("skimage.data")
    train_dir, val_dir = tmp_path / "train", tmp_path / "val"
    train_dir.mkdir()
    val_dir.mkdir()
    for name in ("astronaut", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field"):
        PILImage.fromarray(getattr(data, name)()).save(train_dir / f"{name}.png")
    PILImage.fromarray(data.chelsea()).save(val_dir / "chelsea.png")       # held out
    t0 = time.perf_counter()
    # The paper's recipe (L1, Adam, random 8-fold augmented crops, LR by MATLAB bicubic) shortened for a
    # CPU test: a small DRN, 600 steps of batch 16 with 32x32 LR patches, learning rate 2e-3.
    code = cli.main(["train", "--hr-dir", str(train_dir), "--scale", "2", "--out", str(tmp_path / "run"),
                     "--steps", "600", "--patch-size", "32", "--batch-size", "16", "--lr", "2e-3",
                     "--iters-per-epoch", "300", "--n-feats", "16", "--n-groups", "1", "--n-blocks", "3",
                     "--inner", "16", "--distill", "4", "--workers", "0", "--no-progress", "--device", "cpu", "--device", "cpu",
                     "--val-hr-dir", str(val_dir), "--val-every", "300"])
    elapsed = time.perf_counter() - t0
    assert code == 0
    js = tmp_path / "eval.json"
    assert cli.main(["eval", "--weights", str(tmp_path / "run" / "last.pt"), "--device", "cpu", "--hr-dir", str(val_dir),
                     "--json", str(js)]) == 0
    res = json.loads(js.read_text())["images"][0]
    with capsys.disabled():
        print(f"\n[held-out chelsea x2] DRN {res['psnr']:.3f} dB / SSIM {res['ssim']:.4f}   "
              f"bicubic {res['bicubic_psnr']:.3f} dB / SSIM {res['bicubic_ssim']:.4f}   "
              f"(training {elapsed:.0f} s)")
    assert res["psnr"] > res["bicubic_psnr"] + 0.1
    assert res["ssim"] > res["bicubic_ssim"]


if __name__ == "__main__":
    _ddp_worker(sys.argv[1:])


def _interlaced_png16(rgb16: np.ndarray) -> bytes:
    """A 16-bit RGB PNG with Adam7 interlacing: a layout read through Pillow's 8-bit decoder."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    h, w, _ = rgb16.shape
    raw = b""
    for y0, x0, dy, dx in ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2),
                           (1, 0, 2, 1)):
        sub = rgb16[y0::dy, x0::dx]
        if sub.size:  # an empty pass has no scanlines at all
            raw += b"".join(b"\0" + row.astype(">u2").tobytes() for row in sub)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 1))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_train_and_eval_warn_of_images_read_at_fewer_bits(synth, tmp_path, capsys):
    """An image whose file holds 16-bit samples in a layout read at 8 bits (interlaced PNG): train,
    its validation and eval each say so, naming the file, as upscale does; the run goes on."""
    hr = synth / "DIV2K_train_HR"
    rgb8 = _texture(44, 48, 7)
    deep = hr / "0005.png"
    deep.write_bytes(_interlaced_png16(rgb8.astype(np.uint16) * 257))
    assert np.array_equal(np.asarray(PILImage.open(deep).convert("RGB")), rgb8)  # Pillow reads it, at 8 bits
    warning = f"warning: {deep}: has 16-bit samples, read at 8 bits (this layout is not read at full precision)"
    assert cli.main(["train", "--hr-dir", str(hr), "--scale", "2", "--out", str(tmp_path / "run"), "--steps", "1",
                     "--patch-size", "12", "--batch-size", "2", "--workers", "0", "--no-progress", "--device", "cpu",
                     "--n-feats", "8", "--n-groups", "1", "--n-blocks", "1", "--inner", "8",
                     "--val-hr-dir", str(hr), "--val-every", "1"]) == 0
    assert capsys.readouterr().err.count(warning) == 2  # the training set, then the validation set
    assert cli.main(["eval", "--weights", str(tmp_path / "run" / "last.pt"), "--device", "cpu",
                     "--hr-dir", str(hr)]) == 0
    assert warning in capsys.readouterr().err

