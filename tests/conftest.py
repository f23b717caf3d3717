"""Test setup: without a GPU, every Triton kernel runs on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before Triton decorates the kernels, so it is set here, before any
test module imports fastdrn.kernels. On a CUDA machine the kernels run on the GPU instead.
"""
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def seed_of(nodeid: str) -> int:
    """The torch seed of the test named `nodeid`: the same in every process and on every run."""
    return zlib.crc32(nodeid.encode("utf-8"))


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _seed_and_backend(monkeypatch, request):
    # Fresh random inputs for every test, but reproducible from its name when it fails: crc32, not
    # hash(), which Python salts per process (PYTHONHASHSEED).
    torch.manual_seed(seed_of(request.node.nodeid))
    monkeypatch.delenv("FASTDRN_BACKEND", raising=False)
