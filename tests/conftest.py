"""Test setup: without a GPU, every Triton kernel runs on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before Triton decorates the kernels, so it is set here, before any
test module imports fastdrn.kernels. On a CUDA machine the kernels run on the GPU instead.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _seed_and_backend(monkeypatch, request):
    # Fresh random inputs for every test, but reproducible from its name when it fails.
    torch.manual_seed(hash(request.node.nodeid) % (2**31))
    monkeypatch.delenv("FASTDRN_BACKEND", raising=False)
