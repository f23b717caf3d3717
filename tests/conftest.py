"""Test setup: without a GPU, every Triton kernel runs on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before Triton is imported (it decorates its own library then) and
decorates the kernels, so it is set here, before any test module imports fastdrn. On a CUDA machine the kernels run on the GPU instead.
"""
import dataclasses
import os
import sys
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _lighten_the_interpreter() -> None:
    """Two of the Triton interpreter's costs that a GPU build never pays, taken off (measured on this
    2-core CPU: test_group_and_compression_in_one_node[False-nothing] 32.0 s -> 9.7 s):

    - it re-patches triton.language (inspect.getmembers over the whole module) on every call of a
      @triton.jit helper, tl.cdiv and tl.zeros included, though the running kernel's patch already
      covers it: here a helper patches only the language modules the running kernel has not;
    - it wraps every integer add, sub and mul in an int32-overflow assertion, which a GPU build
      compiles without: 60% of what remained. Sizes that could overflow int32 are far past what the
      interpreter can run, and the launchers refuse them on the host (check_int32) before any launch.
      FASTDRN_TEST_SANITIZE_OVERFLOW=1 keeps the assertions.

    Only Triton's private interpreter internals allow this; where they differ (another Triton), the
    interpreter is left as it is: slower, the same results.
    """
    try:
        import triton.language as tl
        import triton.runtime.interpreter as interp
    except ImportError:
        return
    if not all(hasattr(interp, name) for name in ("_patch_lang", "_LangPatchScope", "GridExecutor",
                                                   "interpreter_builder")):
        return
    if os.environ.get("FASTDRN_TEST_SANITIZE_OVERFLOW") != "1":
        options = interp.interpreter_builder.options
        if dataclasses.is_dataclass(options) and hasattr(options, "sanitize_overflow"):
            interp.interpreter_builder.options = dataclasses.replace(options, sanitize_overflow=False)
    patch_lang, run_grid = interp._patch_lang, interp.GridExecutor.__call__
    patched = []  # per running kernel (a stack): the language modules patched so far

    def languages(fn):
        return {id(value) for value in fn.__globals__.values() if value is tl or value is tl.core}

    def patch_once(fn):
        wanted = languages(fn)
        if patched and wanted <= patched[-1]:
            return interp._LangPatchScope()
        scope = patch_lang(fn)
        if patched:
            patched[-1].update(wanted)
        return scope

    def run_grid_tracked(self, *args, **kwargs):
        patched.append(set())
        try:
            return run_grid(self, *args, **kwargs)
        finally:
            patched.pop()

    interp._patch_lang = patch_once
    interp.GridExecutor.__call__ = run_grid_tracked


if os.environ.get("TRITON_INTERPRET") == "1":
    _lighten_the_interpreter()


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
