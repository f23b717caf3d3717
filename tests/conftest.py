"""Test setup: without a GPU, every Triton kernel runs on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before Triton decorates the kernels, so it is set here, before any
test module imports fastdrn.kernels. On a CUDA machine the kernels run on the GPU instead.
"""
import os
import sys
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
    # Launch plans live for the process: one recorded while an earlier test patched a launcher would
    # replay the patched launches here. Every test records its own (if the kernels are loaded at all:
    # some tests check what importing fastdrn loads).
    plans = sys.modules.get("fastdrn.kernels.plans")
    if plans is not None:
        plans.reset()


# A CUDA fault (an illegal address, a kernel trap) is sticky: every later CUDA call of the process
# fails, so one faulting kernel would turn the rest of a pytest-xdist worker's tests into errors
# that hide what else passes or fails. After the faulting test's report has gone out, the worker
# exits and xdist starts a fresh one for the remaining tests (it reports the exited worker's next
# test, which did not run, as crashed).
_STICKY_CUDA_ERRORS = ("illegal memory access", "misaligned address", "unspecified launch failure",
                       "device-side assert", "illegal instruction")
_cuda_context_lost = False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    global _cuda_context_lost
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None and any(text in str(call.excinfo.value)
                                                          for text in _STICKY_CUDA_ERRORS):
        _cuda_context_lost = True


def pytest_runtest_logfinish(nodeid, location):
    if _cuda_context_lost and os.environ.get("PYTEST_XDIST_WORKER"):
        os._exit(3)
