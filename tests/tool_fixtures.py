"""What the command-line hardening tests share (tests/test_tools_hardening.py, tests/test_tools_images.py):
a tiny DRN x2, its weights file, and plain PyTorch math; a test module imports the fixtures by name."""
import pytest
import torch

import fastdrn

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
