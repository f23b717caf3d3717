"""The C++/CUDA extension (csrc/): torch.ops.fastdrn_ext.pixel_shuffle, .pixel_unshuffle and
.pixel_shuffle_bias (pixel_shuffle(x + bias.view(1, -1, 1, 1)) in one pass).

Importing this module builds nothing and queries no device. The first call that needs the ops
(`load_error`, `unavailable_reason`) imports the prebuilt `fastdrn._C` when setup.py built it, and
otherwise compiles csrc/ with torch.utils.cpp_extension.load (ninja), cached in torch's extensions
directory (TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions). The CUDA kernels are
compiled only when torch is a CUDA build and a CUDA toolkit is found (FASTDRN_CUDA_ARCH_LIST, else
TORCH_CUDA_ARCH_LIST, picks the GPU architectures: by default 8.0 and 9.0 with 9.0's PTX); otherwise
the build holds the CPU kernels alone. When the extension cannot be loaded, or holds no kernel a GPU
can run, the reason is kept and named by the error of whatever needs it, before any launch.

The ops themselves are defined in C++ (CPU and CUDA kernels); their autograd formulas and their
shape-only fake implementations, which let torch.compile trace them, are registered here.

setup.py loads this file by path, without importing the fastdrn package, to get `build_config`:
the module depends on nothing but the standard library and torch.
"""
from __future__ import annotations

import importlib
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import torch

LIBRARY = "fastdrn_ext"
ROOT = Path(__file__).resolve().parent.parent  # the source tree that holds csrc/
CPU_SOURCES = ("csrc/pixel_shuffle.cpp",)
CUDA_SOURCES = ("csrc/pixel_shuffle_cuda.cu",)
# A100 and H100/H200 as machine code, plus Hopper's PTX, which newer GPUs compile when they load it.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"
MIN_CUDA_ARCH = 80  # compute capability 8.0: the oldest GPUs fastdrn builds and checks its kernels for
DEFAULT_LOCK_TIMEOUT_S = 600.0  # longer than a full CUDA build of csrc/ takes

_log = logging.getLogger(__name__)


# ---- build configuration (shared with setup.py) -------------------------------------------------
def cuda_arch_list() -> tuple[str, str]:
    """(architecture list, the setting it came from): FASTDRN_CUDA_ARCH_LIST, else PyTorch's
    TORCH_CUDA_ARCH_LIST (which every other extension build honours), else the default."""
    for name in ("FASTDRN_CUDA_ARCH_LIST", "TORCH_CUDA_ARCH_LIST"):
        value = os.environ.get(name, "").strip()
        if value:
            return value, name
    return DEFAULT_CUDA_ARCH_LIST, "the default"


def _nvcc_archs() -> set[int] | None:
    """The virtual architectures the toolkit's nvcc compiles for (nvcc --list-gpu-arch), or None where
    no toolkit is found or it cannot say."""
    toolkit = find_cuda_toolkit()
    if toolkit is None:
        return None
    try:
        listed = subprocess.run([str(Path(toolkit) / "bin" / "nvcc"), "--list-gpu-arch"], capture_output=True,
                                text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {int(n) for n in re.findall(r"compute_(\d+)", listed)} or None


def nvcc_arch_flags(arch_list: str | None = None) -> list[str]:
    """-gencode flags for an architecture list such as "8.0;9.0+PTX" (the default), "80 90a" or
    "10.0+PTX" ("+PTX" also embeds PTX, which GPUs newer than the list compile as they load it);
    default: cuda_arch_list(). Each entry must be 8.0 or newer and, where a toolkit is found, one
    its nvcc knows, so that a typo is named here rather than deep in a failed build."""
    source = "the given list"
    if arch_list is None:
        arch_list, source = cuda_arch_list()
    known = None
    flags = []
    for entry in re.split(r"[;,\s]+", arch_list.strip()):
        if not entry:
            continue
        match = re.fullmatch(r"(?:sm_|compute_)?(\d+)(?:\.(\d))?([af]?)(\+PTX)?", entry, flags=re.IGNORECASE)
        if match is None or (match.group(2) is None and len(match.group(1)) < 2):
            raise ValueError(f"{source}={arch_list!r}: cannot read {entry!r}; use compute capabilities like 8.0, "
                             "9.0a, 90 or 9.0+PTX")
        major, minor, suffix, ptx = match.groups()
        number = int(f"{major}{minor or ''}")
        if number < MIN_CUDA_ARCH:
            raise ValueError(f"{source}={arch_list!r}: {entry!r} is compute capability {number // 10}.{number % 10}; "
                             "fastdrn's kernels are built for 8.0 (A100) and newer")
        if known is None:
            known = _nvcc_archs() or set()
        if known and number not in known:
            usable = ", ".join(f"{n // 10}.{n % 10}" for n in sorted(known) if n >= MIN_CUDA_ARCH)
            raise ValueError(f"{source}={arch_list!r}: the CUDA toolkit's nvcc does not know {entry!r}; it "
                             f"compiles for {usable}")
        arch = f"{number}{suffix.lower()}"
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    if not flags:
        raise ValueError(f"{source}={arch_list!r} names no architecture")
    return flags


def build_config(cuda: bool) -> tuple[list[str], list[str]]:
    """(sources relative to the source tree, nvcc flags) of the extension, with or without CUDA; the
    architecture list is read only for a CUDA build, so a bad one cannot fail a build without CUDA."""
    if not cuda:
        return list(CPU_SOURCES), ["-O3"]
    return list(CPU_SOURCES) + list(CUDA_SOURCES), ["-O3", *nvcc_arch_flags()]


def find_cuda_toolkit() -> str | None:
    """The CUDA toolkit directory: CUDA_HOME or CUDA_PATH as set, else the one around the nvcc on
    PATH, else /usr/local/cuda; candidates that are guessed must hold bin/nvcc and include/.

    torch.utils.cpp_extension.CUDA_HOME is None whenever torch is a CPU build, installed toolkit or
    not, so the reasons given for building without CUDA (and csrc/nvcc_check.sh) use this."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    guesses = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:  # nvcc on PATH may be a wrapper script outside the toolkit, hence the checks
        guesses.insert(0, str(Path(nvcc).resolve().parent.parent))
    for guess in guesses:
        if (Path(guess) / "bin" / "nvcc").is_file() and (Path(guess) / "include" / "cuda_runtime.h").is_file():
            return guess
    return None


def cuda_build_skip_reason() -> str | None:
    """Why a build now would leave out the CUDA kernels, or None when it includes them."""
    if torch.version.cuda is None:
        toolkit = find_cuda_toolkit()
        found = f"; the CUDA toolkit at {toolkit} cannot be used with it" if toolkit else ""
        return f"torch {torch.__version__} is not a CUDA build{found}"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "no CUDA toolkit found: set CUDA_HOME or put nvcc on PATH"
    return None


# ---- loading ------------------------------------------------------------------------------------
_lock = threading.Lock()
_loaded = False
_load_failure: str | None = None
_cuda_kernels = False
_no_cuda_reason = "the prebuilt fastdrn._C has no CUDA kernels"


def _ops_defined() -> bool:
    return hasattr(getattr(torch.ops, LIBRARY), "pixel_shuffle")


def lock_timeout() -> float:
    """Seconds to wait for another process's build of the extension: FASTDRN_BUILD_LOCK_TIMEOUT."""
    value = os.environ.get("FASTDRN_BUILD_LOCK_TIMEOUT", "").strip()
    if not value:
        return DEFAULT_LOCK_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds >= 0:  # NaN too: no wait would ever reach it
        raise ValueError(f"FASTDRN_BUILD_LOCK_TIMEOUT={value!r} is not a number of seconds, 0 or more")
    return seconds


def wait_for_build_lock(build_directory: str, timeout: float) -> None:
    """Wait while torch's build lock in `build_directory` exists (another process is compiling).

    torch waits on that file forever, and a build that was killed leaves it behind, so every later
    process would hang in silence: fastdrn waits at most `timeout` seconds, then raises an error that
    names the lock and how to clear it."""
    lock = os.path.join(build_directory, "lock")
    start = time.monotonic()
    told = False
    while os.path.exists(lock):
        waited = time.monotonic() - start
        if waited >= timeout:
            raise TimeoutError(
                f"waited {waited:.0f} s for the extension's build lock {lock}: another process is building it, or a "
                f"build that was killed left the lock behind. If no fastdrn build is running, delete {lock} and "
                "retry; FASTDRN_BUILD_LOCK_TIMEOUT sets how many seconds to wait")
        if not told and waited >= 5:
            _log.warning("fastdrn: waiting for the extension build lock %s (another process is building it; if "
                         "none is, delete the file)", lock)
            told = True
        time.sleep(min(0.2, max(timeout - waited, 0.01)))


def _build() -> None:
    """Compile csrc/ (CPU kernels, and CUDA ones when possible) and load it into torch.ops."""
    global _no_cuda_reason
    from torch.utils import cpp_extension

    missing = [p for p in CPU_SOURCES + CUDA_SOURCES if not (ROOT / p).is_file()]
    if missing:
        raise FileNotFoundError(f"the extension's sources are not installed (no {ROOT / missing[0]}); install fastdrn "
                                "from a source checkout, or build fastdrn._C with setup.py")
    skip = cuda_build_skip_reason()
    sources, nvcc_flags = build_config(cuda=skip is None)
    name = f"{LIBRARY}_{'cuda' if skip is None else 'cpu'}"
    # The directory torch.utils.cpp_extension.load would choose (TORCH_EXTENSIONS_DIR or its
    # default), named explicitly so that the lock waited on is the one the build takes.
    build_directory = cpp_extension._get_build_directory(name, verbose=False)
    wait_for_build_lock(build_directory, lock_timeout())
    cpp_extension.verify_ninja_availability()
    _log.info("fastdrn: loading the C++%s extension %r (compiled on first use, then cached in torch's "
              "extensions directory)", "/CUDA" if skip is None else "", name)
    cpp_extension.load(name=name, sources=[str(ROOT / p) for p in sources], extra_cflags=["-O3"],
                       extra_cuda_cflags=nvcc_flags, extra_include_paths=[str(ROOT / "csrc")],
                       build_directory=build_directory, with_cuda=skip is None, is_python_module=False)
    if skip is not None:
        _no_cuda_reason = f"it was compiled without them: {skip}"


def _import_or_build() -> None:
    try:
        importlib.import_module("fastdrn._C")  # built by setup.py; registers the ops as it loads
        return
    except ModuleNotFoundError as exc:
        if exc.name != "fastdrn._C":
            raise
        broken = None
    except ImportError as exc:  # e.g. built against another torch: a fresh build may still work
        broken = f"{type(exc).__name__}: {exc}"
    try:
        _build()
    except Exception as exc:
        if broken is not None:
            raise RuntimeError(f"the prebuilt fastdrn._C does not load ({broken}), and building the extension "
                               f"failed: {type(exc).__name__}: {exc}") from exc
        raise


def _finish_loading() -> None:
    global _loaded, _cuda_kernels
    _register_python_parts()
    _cuda_kernels = torch._C._dispatch_has_kernel_for_dispatch_key(f"{LIBRARY}::pixel_shuffle", "CUDA")
    _loaded = True


@torch.compiler.assume_constant_result  # torch.compile runs it eagerly and keeps the answer
def load_error() -> str | None:
    """Loads the extension on first call; None when its ops are ready, else why they cannot be."""
    global _load_failure
    if not _loaded and _load_failure is None:
        with _lock:
            if not _loaded and _load_failure is None:
                try:
                    _import_or_build()
                    _finish_loading()
                except Exception as exc:  # every failure is a reason to report where the ops are needed
                    _load_failure = f"{type(exc).__name__}: {exc}"
    return _load_failure


def unavailable_reason(device: torch.device) -> str | None:
    """Why the extension's kernels cannot run on tensors of `device`, or None when they can."""
    if device.type not in ("cpu", "cuda"):
        return f"the extension has CPU and CUDA kernels only (got a {device.type} tensor)"
    error = load_error()
    if error is not None:
        return f"the C++/CUDA extension could not be loaded ({error})"
    if device.type == "cuda":
        if not _cuda_kernels:
            return f"the extension has no CUDA kernels ({_no_cuda_reason})"
        return kernel_image_error(device.index)
    return None


_kernel_image_errors: dict[int, str | None] = {}


@torch.compiler.assume_constant_result
def kernel_image_error(index: int | None) -> str | None:
    """Why the extension's CUDA kernels cannot run on CUDA device `index` (None: the current one): it
    was compiled for other architectures, without PTX this GPU can compile. None when they can; asked
    once a device."""
    if index is None:
        try:
            index = torch.cuda.current_device()
        except Exception as exc:
            return f"no CUDA device can be used ({type(exc).__name__}: {exc})"
    if index not in _kernel_image_errors:
        try:
            error = torch.ops.fastdrn_ext.cuda_kernel_image_error(index)
        except Exception as exc:  # a build from before this check: rebuilt by reinstalling
            error = (f"the C++/CUDA extension cannot say whether it runs on this GPU ({type(exc).__name__}: {exc}); "
                     "reinstall fastdrn to rebuild it")
        else:
            if error:
                major, minor = torch.cuda.get_device_capability(index)
                error = (f"the C++/CUDA extension holds no kernel this GPU ({torch.cuda.get_device_name(index)}, "
                         f"compute capability {major}.{minor}) can run (CUDA: {error}); build it for this GPU with "
                         f"FASTDRN_CUDA_ARCH_LIST={major}.{minor} set: reinstall fastdrn, or, where it is built on "
                         "first use, just set it")
        _kernel_image_errors[index] = error or None
    return _kernel_image_errors[index]


# ---- autograd and fake implementations ----------------------------------------------------------
def _fake(x: torch.Tensor, factor: int, to_shuffled: bool, op: str | None = None) -> torch.Tensor:
    """The output's shape, dtype and strides, checked as the C++ op checks (same error types)."""
    default_op, factor_name = (("pixel_shuffle", "upscale_factor") if to_shuffled
                               else ("pixel_unshuffle", "downscale_factor"))
    op = op or default_op
    torch._check_value(x.dim() == 4, lambda: f"{op}: x must be a 4-D tensor (N, C, H, W), got shape {tuple(x.shape)}")
    torch._check_value(factor >= 1, lambda: f"{op}: {factor_name} must be >= 1, got {factor}")
    torch._check_type(x.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64),
                      lambda: f"{op}: x has dtype {x.dtype}; supported: float16, bfloat16, float32, float64")
    n, c, h, w = x.shape
    if to_shuffled:
        torch._check_value(c % (factor * factor) == 0, lambda: f"{op}: x has {c} channels, which is not divisible by "
                                                               f"{factor_name}**2 = {factor}**2")
        shape = (n, c // (factor * factor), h * factor, w * factor)
    else:
        torch._check_value(h % factor == 0 and w % factor == 0,
                           lambda: f"{op}: x has height {h} and width {w}, which must both be divisible by "
                                   f"{factor_name} = {factor}")
        shape = (n, c * factor * factor, h // factor, w // factor)
    # The C++ op allocates in x.suggest_memory_format(); this is its Python twin.
    memory_format = torch._prims_common.suggest_memory_format(x)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format)


def _check_shuffle_bias(x: torch.Tensor, bias: torch.Tensor) -> None:
    """pixel_shuffle_bias's checks of bias against x, as the C++ op makes them (same error types)."""
    op = "pixel_shuffle_bias"
    torch._check_value(bias.device == x.device, lambda: f"{op}: bias is on {bias.device} but x is on {x.device}")
    torch._check_type(bias.dtype == x.dtype, lambda: f"{op}: bias has dtype {bias.dtype} but x has {x.dtype}")
    torch._check_value(bias.dim() == 1, lambda: f"{op}: bias must be a 1-D tensor (C*s*s,), got shape "
                                                f"{tuple(bias.shape)}")
    if x.dim() == 4:  # _fake names an x that is not 4-D
        torch._check_value(bias.shape[0] == x.shape[1], lambda: f"{op}: bias has {bias.shape[0]} elements, expected "
                                                                f"one per channel of x (C*s*s = {x.shape[1]})")


def _pixel_shuffle_fake(x, upscale_factor):
    return _fake(x, upscale_factor, to_shuffled=True)


def _pixel_unshuffle_fake(x, downscale_factor):
    return _fake(x, downscale_factor, to_shuffled=False)


def _pixel_shuffle_bias_fake(x, bias, upscale_factor):
    _check_shuffle_bias(x, bias)
    return _fake(x, upscale_factor, to_shuffled=True, op="pixel_shuffle_bias")


def _save_factor(ctx, inputs, output):
    ctx.factor = inputs[1]


def _save_bias_factor(ctx, inputs, output):
    ctx.factor = inputs[2]


# Each op only moves elements, so its backward moves the gradient back with the other one.
def _pixel_shuffle_backward(ctx, grad):
    return torch.ops.fastdrn_ext.pixel_unshuffle(grad, ctx.factor), None


def _pixel_unshuffle_backward(ctx, grad):
    return torch.ops.fastdrn_ext.pixel_shuffle(grad, ctx.factor), None


def _pixel_shuffle_bias_backward(ctx, grad):
    """grad_x: the gradient moved back; grad_bias: that summed over (N, H, W), accumulated in float32
    (float64 for float64) and rounded once to bias's dtype, as torch's own bias gradients are."""
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        unshuffled = torch.ops.fastdrn_ext.pixel_unshuffle(grad, ctx.factor)
        if ctx.needs_input_grad[0]:
            grad_x = unshuffled
        if ctx.needs_input_grad[1]:
            accumulate = torch.float64 if grad.dtype == torch.float64 else torch.float32
            grad_bias = unshuffled.sum(dim=(0, 2, 3), dtype=accumulate).to(grad.dtype)
    return grad_x, grad_bias, None


def _register_python_parts() -> None:
    for op, fake, backward in (("pixel_shuffle", _pixel_shuffle_fake, _pixel_shuffle_backward),
                               ("pixel_unshuffle", _pixel_unshuffle_fake, _pixel_unshuffle_backward)):
        torch.library.register_fake(f"{LIBRARY}::{op}", fake)
        torch.library.register_autograd(f"{LIBRARY}::{op}", backward, setup_context=_save_factor)
    torch.library.register_fake(f"{LIBRARY}::pixel_shuffle_bias", _pixel_shuffle_bias_fake)
    torch.library.register_autograd(f"{LIBRARY}::pixel_shuffle_bias", _pixel_shuffle_bias_backward,
                                    setup_context=_save_bias_factor)


# The C++ library names this module (set_python_module) as the home of its fake implementations,
# and torch's error tells whoever loaded the library directly (`import fastdrn._C`) to import it:
# importing it then completes the ops.
if _ops_defined():
    _finish_loading()
