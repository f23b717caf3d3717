"""The backend switch (docs/numerics.md): FASTDRN_BACKEND = auto | triton | torch.

Read on every call, never at import, so a test or a script can change it at run time. Nothing
here queries a device at import; a missing Triton is recorded and named in the error that needs it.
"""
from __future__ import annotations

import functools
import os
import sys

import torch

BACKENDS = ("auto", "triton", "torch")

try:
    import triton  # noqa: F401
    from triton.runtime.interpreter import InterpretedFunction

    TRITON_IMPORT_ERROR: str | None = None
    # Whether Triton decorated its own library's @jit functions (tl.cdiv, which the kernels call) for
    # its interpreter: it reads TRITON_INTERPRET once, as it is imported, here at the latest. None
    # where this Triton's tl.cdiv is no such function.
    _cdiv = getattr(triton.language, "cdiv", None)
    TRITON_IMPORTED_INTERPRETED: bool | None = (
        isinstance(_cdiv, InterpretedFunction)
        if isinstance(_cdiv, (InterpretedFunction, triton.runtime.jit.JITFunction)) else None)
except Exception as exc:  # any failure to import is a reason to report, not to crash on
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
    InterpretedFunction = None
    TRITON_IMPORTED_INTERPRETED = None
try:  # Triton's own reading of TRITON_INTERPRET (3.4 and later), which decides how it decorates kernels
    from triton.knobs import runtime as _triton_runtime
except Exception:  # pragma: no cover - older Triton, or none
    _triton_runtime = None


def requested() -> str:
    value = os.environ.get("FASTDRN_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"FASTDRN_BACKEND={value!r} is not one of {', '.join(BACKENDS)}")
    return value


@torch.compiler.assume_constant_result  # Dynamo cannot trace Triton's C reader of the variable
def interpreting() -> bool:
    """True when Triton kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1), read as
    Triton reads it when it decorates them: fastdrn's own reading differed (" 1" and "y"), and kernels
    compiled for a GPU were launched on CPU tensors, or interpreted ones refused."""
    if _triton_runtime is not None:
        return bool(_triton_runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes", "y")


@torch.compiler.assume_constant_result
def _kernels_mode_mismatch(interpret: bool) -> str | None:
    """Triton reads TRITON_INTERPRET once, when it decorates a kernel: its own library, decorated as
    Triton was imported, and fastdrn's kernels, imported in one mode, cannot run in the other. None
    when both match the mode (or fastdrn's kernels are not imported yet).

    A constant to torch.compile: traced, it would guard on sys.modules, which the first fused call
    changes by importing the kernels, and Dynamo failed such a guard on the frame that made it
    (an H200 at 9e91a6a)."""
    if TRITON_IMPORTED_INTERPRETED is not None and TRITON_IMPORTED_INTERPRETED != interpret:
        imported, what = TRITON_IMPORTED_INTERPRETED, "Triton was imported (importing fastdrn imports it)"
    else:
        common = sys.modules.get("fastdrn.kernels._common")
        if common is None:
            return None
        imported, what = isinstance(common.elu, InterpretedFunction), "fastdrn's Triton kernels were imported"
        if imported == interpret:
            return None
    was, now = ("set", "unset") if imported else ("unset", "set")
    return (f"TRITON_INTERPRET was {was} when {what} and is {now} now; Triton reads it only then, so set or "
            "unset it before importing fastdrn (or restart the process)")


def triton_unavailable_reason(device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """Why the Triton kernels cannot run on tensors of this device and dtype, or None when they can."""
    if TRITON_IMPORT_ERROR is not None:
        return f"Triton could not be imported ({TRITON_IMPORT_ERROR}): install it (pip install triton)"
    if interpreting():
        # The interpreter runs CPU tensors (and copies CUDA ones through the host).
        if device.type not in ("cpu", "cuda"):
            return f"Triton's interpreter runs CPU and CUDA tensors only (got a {device.type} tensor)"
        if dtype == torch.bfloat16:
            return ("Triton's interpreter computes bfloat16 matrix products wrongly, so fastdrn refuses bfloat16 "
                    "there; use float32 (or float16) on the CPU, or FASTDRN_BACKEND=torch for PyTorch's math")
        if torch.compiler.is_compiling():
            return ("torch.compile traces with fake tensors, which Triton's interpreter cannot run (a GPU's compiled "
                    "kernels are traced); FASTDRN_BACKEND=auto traces PyTorch's math there")
        return _kernels_mode_mismatch(interpret=True)
    if device.type != "cuda":
        return (f"Triton kernels need CUDA tensors (got a {device.type} tensor); set TRITON_INTERPRET=1 "
                "before importing fastdrn to run them on the CPU through Triton's interpreter")
    if torch.version.hip is not None:
        return "fastdrn's Triton kernels are built and tested for NVIDIA GPUs only"
    if dtype == torch.float64:
        return "the GPU kernels are built for float32, bfloat16 and float16 (float64 runs in the interpreter)"
    return _kernels_mode_mismatch(interpret=False) or gpu_reason(device.index)


MIN_CAPABILITY = (8, 0)  # the oldest GPUs the kernels are compiled and checked for (A100: cp.async, bf16 dots)
_gpu_reasons: dict[int, str | None] = {}


@torch.compiler.assume_constant_result
def gpu_reason(index: int | None) -> str | None:
    """Why the Triton kernels cannot run on CUDA device `index` (None: the current one): a GPU older
    than compute capability 8.0, or a Triton whose CUDA driver does not start (it compiles a C helper
    on first use, so a machine without a C compiler fails there). Asked once a device, at its first
    fused call, so that the reason routes (auto runs PyTorch's math, triton raises) instead of a
    failure inside a launch."""
    if index is None:
        try:
            index = torch.cuda.current_device()
        except Exception as exc:
            return f"no CUDA device can be used ({type(exc).__name__}: {exc})"
    if index not in _gpu_reasons:
        _gpu_reasons[index] = _ask_gpu(index)
    return _gpu_reasons[index]


def _ask_gpu(index: int) -> str | None:
    try:
        capability = torch.cuda.get_device_capability(index)
    except Exception as exc:
        return f"CUDA device {index} cannot be queried ({type(exc).__name__}: {exc})"
    if tuple(capability) < MIN_CAPABILITY:
        return (f"fastdrn's Triton kernels are built for compute capability 8.0 (A100) and newer; CUDA device {index} "
                f"({torch.cuda.get_device_name(index)}) is {capability[0]}.{capability[1]}")
    try:
        from triton.runtime.driver import driver

        driver.active.get_current_device()
    except Exception as exc:
        return f"Triton's CUDA driver does not start ({type(exc).__name__}: {exc})"
    return None


def launch_device(device: torch.device):
    """A context that makes `device` the current CUDA device, or None where nothing needs switching.
    Triton launches on the current device whatever device its tensors are on, so a model on cuda:1
    ran its kernels on cuda:0 with pointers into cuda:1's memory (the extension and PyTorch's ops
    guard themselves). None for the current device, other devices' tensors, and under torch.compile,
    whose generated code sets the device itself."""
    if device.type != "cuda" or torch.compiler.is_compiling() or device.index == torch.cuda.current_device():
        return None
    return torch.cuda.device(device.index)


def on_first_tensors_device(op):
    """Runs op(x, ...) with x's CUDA device current (launch_device); x that is not a tensor goes
    through as it is, for op's checks to name. Backward needs no guard: autograd runs a CUDA
    backward on a thread of its own with that device current."""
    @functools.wraps(op)
    def on_device(x, *args, **kwargs):
        guard = launch_device(x.device) if isinstance(x, torch.Tensor) else None
        if guard is None:  # the common case, without a context manager's cost (about 0.3 us)
            return op(x, *args, **kwargs)
        with guard:
            return op(x, *args, **kwargs)

    return on_device


def transform_reason() -> str | None:
    """Why the fused ops cannot run here: inside a torch.func transform, whose wrapped tensors have no
    storage for the kernels and which cannot see through their autograd Functions, or inside a
    forward-mode AD dual level (torch.autograd.forward_ad), for which those Functions have no jvp.
    None otherwise (traced by torch.compile: its graph holds the registered ops, not those Functions)."""
    if torch.compiler.is_compiling():
        return None
    if torch._C._are_functorch_transforms_active():
        return ("a torch.func transform (grad, vmap, jvp, jacrev...) is active, and fastdrn's fused ops run their "
                "own autograd on real tensors; FASTDRN_BACKEND=auto runs PyTorch's math under transforms")
    if torch.autograd.forward_ad._current_level >= 0:
        return ("forward-mode AD (torch.autograd.forward_ad.dual_level) is active, and fastdrn's fused ops have no "
                "jvp; FASTDRN_BACKEND=auto runs PyTorch's math there")
    return None


def use_triton(op: str, device: torch.device, dtype: torch.dtype | None = None) -> bool:
    """Whether `op` runs its Triton kernels on `device`; a forced backend that cannot run raises."""
    choice = requested()
    if choice == "torch":
        return False
    reason = triton_unavailable_reason(device, dtype) or transform_reason()
    if choice == "triton" and reason is not None:
        fallback = "" if "FASTDRN_BACKEND=" in reason else "; FASTDRN_BACKEND=auto runs PyTorch's math where they cannot"
        raise RuntimeError(f"FASTDRN_BACKEND=triton but {op} cannot run its Triton kernels: {reason}{fallback}")
    return reason is None


def describe(device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> str:
    """The backend the fused ops would use for tensors on `device` of `dtype` (None: any dtype the
    kernels take there), in words."""
    device = torch.device(device)
    choice = requested()
    if choice == "torch":
        return "torch (forced by FASTDRN_BACKEND=torch)"
    reason = triton_unavailable_reason(device, dtype)
    if reason is None:
        where = "Triton interpreter" if interpreting() else "Triton on GPU"
        return f"triton ({where}{', forced' if choice == 'triton' else ''})"
    if choice == "triton":
        return f"triton (forced, but unavailable: {reason})"
    return f"torch (auto: {reason})"
