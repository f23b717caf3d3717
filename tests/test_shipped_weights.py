"""The weights fastdrn ships (drn-x2, drn-x3, drn-x4, docs/weights.md): each loads by its name from a
plain-tensor file and beats bicubic on a photograph none of them was trained on.

tests/data/heldout/astronaut_patch.png is a 96x96 crop of scikit-image's astronaut photograph (held
out from training; tests/data/README.md gives its source and licence). It is measured the field's
way (fastdrn eval: MATLAB-bicubic LR, Y channel, border = scale)."""
import os

import pytest
import torch

import fastdrn
import fastdrn.pretrained
from fastdrn.tools.evaluate import evaluate

HELD_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "heldout")
# The least gain over bicubic any shipped model must show (docs/weights.md: +0.3 dB is the bar).
MIN_GAIN_DB = 0.3


@pytest.fixture(autouse=True)
def _torch_backend(_seed_and_backend, monkeypatch):
    # The weights are under test, not the kernels (whose tests compare them with the reference):
    # PyTorch's math, not the Triton interpreter that conftest selects on a machine without a GPU.
    monkeypatch.setenv("FASTDRN_BACKEND", "torch")


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_shipped_weights_load_by_name_and_beat_bicubic_on_a_held_out_photograph(scale):
    name = f"drn-x{scale}"
    path = fastdrn.pretrained.resolve(name)
    assert os.path.dirname(path) == fastdrn.pretrained.WEIGHTS_DIR and os.path.isfile(path)
    stored = torch.load(path, weights_only=True)                 # tensors and numbers: nothing unpickled
    assert set(stored) == {"params", "config"}                   # one set of weights, with its config
    assert {v.dtype for k, v in stored["params"].items() if k != "rgb_mean"} == {torch.float16}
    assert os.path.getsize(path) < 2 << 20

    model = fastdrn.load(name)
    assert isinstance(model, fastdrn.DRN) and model.scale == scale and not model.training

    result = evaluate(name, HELD_OUT, device="cpu", log=lambda message: None)
    [row] = result["images"]
    assert row["name"] == "astronaut_patch" and result["crop_border"] == scale and result["y_channel"]
    assert row["psnr"] >= row["bicubic_psnr"] + MIN_GAIN_DB, row
    assert row["ssim"] > row["bicubic_ssim"], row
