"""The FASTDRN_BACKEND switch: what each setting runs, and forced backends that cannot run raise."""
import sys

import pytest
import torch

import fastdrn
from fastdrn import backend, ops


def test_invalid_backend_is_named(monkeypatch):
    monkeypatch.setenv("FASTDRN_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="FASTDRN_BACKEND='cudnn'"):
        backend.requested()


def test_torch_backend_never_uses_triton(monkeypatch):
    monkeypatch.setenv("FASTDRN_BACKEND", "torch")
    assert not backend.use_triton("compress_skip", torch.device("cpu"))
    assert backend.describe("cpu").startswith("torch")


def test_forced_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("FASTDRN_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    z = torch.randn(1, 4, 2, 2)
    w = torch.randn(3, 4, 1, 1)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.compress_skip(z, w, torch.randn(3), torch.randn(1, 3, 2, 2))


def test_auto_on_cpu_without_interpreter_uses_torch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not backend.use_triton("compress_skip", torch.device("cpu"))
    assert "auto" in backend.describe("cpu")


def test_interpreter_runs_triton_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # As in a fresh process: kernels (and Triton's library) already decorated for the GPU compiler
    # cannot be interpreted.
    monkeypatch.delitem(sys.modules, "fastdrn.kernels._common", raising=False)
    monkeypatch.setattr(backend, "TRITON_IMPORTED_INTERPRETED", True)
    assert backend.use_triton("compress_skip", torch.device("cpu"))


def test_forced_triton_reports_missing_triton(monkeypatch):
    monkeypatch.setenv("FASTDRN_BACKEND", "triton")
    monkeypatch.setattr(backend, "TRITON_IMPORT_ERROR", "ModuleNotFoundError: No module named 'triton'")
    with pytest.raises(RuntimeError, match="could not be imported"):
        backend.use_triton("residual_distill", torch.device("cpu"))


def test_model_reports_its_backend(monkeypatch):
    monkeypatch.setenv("FASTDRN_BACKEND", "torch")
    model = fastdrn.DRN(scale=2, n_feats=4, n_groups=1, n_blocks=1, inner=4, distill=2)
    assert model.backend.startswith("torch")


INTERPRET_SPELLING = r"""
import torch
from fastdrn import backend, ops, reference
args = (torch.randn(1, 4, 2, 3), torch.randn(3, 4, 1, 1), torch.randn(3), torch.randn(1, 3, 2, 3))
out = ops.compress_skip(*args)  # the first op: the kernels are not imported yet
assert torch.allclose(out, reference.compress_skip(*args)), "auto must give the reference's result"
from fastdrn.kernels import _common
print("interpreting", backend.interpreting(), "kernels interpreted", _common.KERNELS_INTERPRETED)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors: the kernels run only if interpreted")
@pytest.mark.parametrize("value", [" 1", "y", "Y"])  # " 1": Triton compiles; "y": Triton interprets
def test_triton_interpret_is_read_as_triton_reads_it(value):
    """fastdrn decides interpreter or GPU as Triton does when it decorates the kernels. It stripped
    the value and took only 1/true/on/yes, Triton (3.9) neither: under " 1" the kernels were compiled
    for a GPU and launched on CPU tensors ("0 active drivers" from inside Triton); under "y" they
    were interpreted but auto ran PyTorch's math, and a forced backend raised, asking to set
    TRITON_INTERPRET=1."""
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "FASTDRN_BACKEND"}
    env.update(TRITON_INTERPRET=value, PYTHONPATH=root + os.pathsep + env.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", INTERPRET_SPELLING], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    interpreting, interpreted = run.stdout.split()[1], run.stdout.split()[4]
    assert interpreting == interpreted, run.stdout


@pytest.mark.parametrize("place,dtype", [
    ("interpreter", torch.bfloat16),  # the interpreter refuses bfloat16: auto runs PyTorch's math
    ("gpu", torch.float64),           # the GPU kernels have no float64: auto runs PyTorch's math
])
def test_model_backend_names_what_runs_for_its_dtype(place, dtype, device, monkeypatch):
    """model.backend (printed by the demo, `fastdrn eval` and `fastdrn train`) said "triton" for a
    model whose dtype auto runs through PyTorch's math, as it looked at the device alone."""
    from helpers import where

    if where(device) != place or backend.triton_unavailable_reason(device) is not None:
        pytest.skip(f"about {place} runs")
    assert not backend.use_triton("residual_distill", device, dtype), "the test's premise: auto runs PyTorch's math"
    model = fastdrn.DRN(scale=2, n_feats=4, n_groups=1, n_blocks=1, inner=4, distill=2).to(device, dtype)
    assert model.backend.startswith("torch (auto: "), model.backend
    assert backend.describe(device, dtype) == model.backend
    monkeypatch.setenv("FASTDRN_BACKEND", "triton")
    assert model.backend.startswith("triton (forced, but unavailable: "), model.backend


def test_model_backend_reads_autocast_dtype():
    """model.backend described the parameters' dtype under autocast too, where the forward runs in
    autocast's: a float32 model under CPU bfloat16 autocast in the interpreter said triton, and ran
    PyTorch's math (the interpreter refuses bfloat16)."""
    model = fastdrn.DRN(scale=2, n_feats=4, n_groups=1, n_blocks=1, inner=4, distill=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.backend == backend.describe("cpu", torch.bfloat16)
    assert model.backend == backend.describe("cpu", torch.float32)


@pytest.fixture
def gpu_branch(monkeypatch):
    """backend's GPU checks reached on this machine: no interpreter, kernels in the matching mode, and
    a stand-in device 0 whose capability and Triton driver each test sets; answers not cached between tests."""
    monkeypatch.setattr(backend, "interpreting", lambda: False)
    monkeypatch.setattr(backend, "_kernels_mode_mismatch", lambda interpret: None)
    monkeypatch.setattr(backend, "_gpu_reasons", {})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "Stand-in GPU")

    def gpu(capability, driver_error=None):
        from triton.runtime.driver import driver

        def active(config):
            if driver_error is not None:
                raise driver_error
            return type("Active", (), {"get_current_device": lambda self: 0})()

        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability)
        monkeypatch.setattr(type(driver), "active", property(active))

    return gpu


@pytest.mark.parametrize("capability,driver_error,reason", [
    ((7, 5), None, r"compute capability 8\.0 \(A100\) and newer; CUDA device 0 \(Stand-in GPU\) is 7\.5"),
    ((9, 0), RuntimeError("Failed to find C compiler. Please specify via CC environment variable."),
     r"Triton's CUDA driver does not start \(RuntimeError: Failed to find C compiler"),
    ((9, 0), None, None),
])
def test_a_gpu_the_kernels_cannot_run_on_is_named_before_a_launch(gpu_branch, monkeypatch, capability, driver_error,
                                                                  reason):
    """A GPU older than sm_80, or a Triton whose driver fails to start (it compiles a C helper on first
    use), failed inside the first launch, under auto too: now auto runs PyTorch's math, triton raises."""
    gpu_branch(capability, driver_error)
    cuda = torch.device("cuda", 0)
    if reason is None:
        assert backend.use_triton("residual_distill", cuda, torch.bfloat16)
        return
    assert not backend.use_triton("residual_distill", cuda, torch.bfloat16)
    assert backend.describe(cuda, torch.bfloat16).startswith("torch (auto: ")
    monkeypatch.setenv("FASTDRN_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="FASTDRN_BACKEND=triton but residual_distill cannot run its Triton "
                                           "kernels: .*" + reason):
        backend.use_triton("residual_distill", cuda, torch.bfloat16)


def test_gpu_is_asked_once(gpu_branch, monkeypatch):
    asked = []
    gpu_branch((8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: asked.append(index) or (8, 0))
    for _ in range(3):
        assert backend.gpu_reason(0) is None
    assert asked == [0]


WITHOUT_TRITON = r"""
import sys
sys.modules["triton"] = None  # as on a machine without Triton: every import of it fails
import torch
import fastdrn
from fastdrn.kernels import set_launch_options, set_launch_plans, settings
set_launch_options(fold_backward=False, num_warps=4)
set_launch_plans(False)
model = fastdrn.DRN(scale=2, n_feats=4, n_groups=1, n_blocks=1, inner=4, distill=2)
reference = fastdrn.reference.DRN(scale=2, n_feats=4, n_groups=1, n_blocks=1, inner=4, distill=2)
reference.load_state_dict(model.state_dict())
x = torch.rand(1, 3, 3, 5)
assert torch.allclose(model(x), reference(x), atol=1e-5), "not the reference's output"
assert not settings.launch_options().fold_backward and settings.launch_options().num_warps == 4
print("ran", model.backend)
"""


def test_launch_setters_work_without_triton():
    """fastdrn.kernels.set_launch_options and set_launch_plans (README: Settings) imported Triton and
    every kernel: on a machine without Triton a script that set them failed with ModuleNotFoundError,
    where its model runs in PyTorch's math."""
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("FASTDRN_BACKEND", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("ran torch (auto: Triton could not be imported"), run.stdout


def _no_triton(monkeypatch):
    monkeypatch.setattr(backend, "TRITON_IMPORT_ERROR", "ModuleNotFoundError: No module named 'triton'")
    return lambda: backend.use_triton("residual_distill", torch.device("cpu"))


def _no_extension(monkeypatch):
    from fastdrn import extension

    monkeypatch.setattr(extension, "unavailable_reason",
                        lambda device: "the C++/CUDA extension could not be loaded (RuntimeError: no compiler)")
    return lambda: ops.pixel_shuffle(torch.randn(1, 4, 2, 3), 2)


@pytest.mark.parametrize("degrade,fixes", [
    (_no_triton, ["pip install triton", "FASTDRN_BACKEND=auto"]),  # a machine without Triton
    (_no_extension, ["FASTDRN_BACKEND=auto"]),                      # an extension that does not build
])
def test_a_forced_backend_that_cannot_run_names_the_fix(degrade, fixes, monkeypatch):
    """The forced backend's error said why (the recorded reason) but not what to do about it."""
    call = degrade(monkeypatch)
    monkeypatch.setenv("FASTDRN_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="FASTDRN_BACKEND=triton but") as caught:
        call()
    for fix in fixes:
        assert fix in str(caught.value), str(caught.value)


def test_triton_s_own_import_mode_is_read_in_either_mode():
    """backend.TRITON_IMPORTED_INTERPRETED (whether Triton decorated its library for its interpreter)
    was None whenever Triton was imported interpreted (tl.cdiv is then an InterpretedFunction, which
    is no JITFunction), so a TRITON_INTERPRET unset later went unnoticed. Nothing here changed
    TRITON_INTERPRET since Triton was imported (conftest sets it before)."""
    assert backend.TRITON_IMPORTED_INTERPRETED is not None
    assert backend.TRITON_IMPORTED_INTERPRETED == backend.interpreting()
