"""``fastdrn upscale`` and ``fastdrn eval`` driven by a hostile practitioner: model outputs that are
not numbers, kinds of image files, and folders that give no work. All on the CPU, through plain
PyTorch math."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

import fastdrn.reference
from fastdrn import cli

CFG = dict(scale=2, n_feats=4, n_groups=1, n_blocks=1, inner=4, distill=2)


@pytest.fixture(autouse=True)
def _env(_seed_and_backend, monkeypatch):
    monkeypatch.setenv("FASTDRN_BACKEND", "torch")   # plain math: never the Triton interpreter here
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(fastdrn.reference.DRN(**CFG).state_dict(), path)
    return str(path)


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
