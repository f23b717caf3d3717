"""Pieces every fused op shares: ELU in Triton, launch settings and config choice, the launch path
(`launch`, lean once warm: docs/launch-path.md), layout and index checks."""
from __future__ import annotations

import functools
import os
from threading import get_ident

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.runtime.driver import driver as triton_driver
from triton.runtime.jit import JITFunction

try:  # what the lean launch path reads of Triton (knobs from 3.4, native_specialize_impl from 3.6: Triton
    # 3.5 has no native_specialize_impl); without it every launch is Triton's, and no plan is recorded
    from triton import knobs
    from triton._C.libtriton import native_specialize_impl
except ImportError:  # pragma: no cover - older Triton
    knobs = native_specialize_impl = None

INT32_LIMIT = 2**31 - 1

# Triton's FP fusion default changes in 3.10 (docs/kernels.md); fix it here so results do
# not move with the Triton version. Fused multiply-add is what the GPU tolerances were set with.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


@triton.jit
def elu(x, alpha):
    # Non-finite values pass as in F.elu: NaN stays NaN (it takes the else branch, whose exp is of
    # NaN itself: tl.minimum(x, 0.0) would turn NaN into 0), +inf stays +inf, -inf gives -alpha.
    # The exp is of min(x, 0) written with where, so the positive branch never overflows into an
    # unused inf.
    return tl.where(x > 0, x, alpha * (tl.exp(tl.where(x > 0, 0.0, x)) - 1.0))


@triton.jit
def elu_grad_from_output(y_stored, alpha, acc_dtype: tl.constexpr):
    # y = ELU(x) as stored: dy/dx is 1 where y > 0 and alpha * exp(x) = y + alpha elsewhere; NaN
    # where y is NaN (it takes the else branch), so a NaN pre-activation makes its gradient NaN.
    # Where y is -alpha as the storage dtype rounds it (x below about -6 in bf16, -inf too), the
    # derivative is exactly 0, as the reference's alpha * exp(x) underflows there: y + alpha would
    # be the rounding error of -alpha (-2e-4 in bf16, negative), and 0 * inf must stay NaN.
    y = y_stored.to(acc_dtype)
    saturated = (tl.full([], 0.0, acc_dtype) - alpha).to(y_stored.dtype).to(acc_dtype)  # a scalar
    return tl.where(y > 0, 1.0, tl.where(y <= saturated, 0.0, y + alpha))


@triton.jit
def elu_grad_from_input(x, alpha):
    # NaN where x is NaN, as above: the exp is of x itself there (tl.minimum(x, 0.0) gave 0).
    return tl.where(x > 0, 1.0, alpha * tl.exp(tl.where(x > 0, 0.0, x)))


@triton.jit
def join_alpha(alpha_hi, alpha_lo, IS_FP64: tl.constexpr):
    # Triton passes Python floats as fp32; float64 runs rebuild alpha from two fp32 halves.
    if IS_FP64:
        return tl.cast(alpha_hi, tl.float64) + tl.cast(alpha_lo, tl.float64)
    else:
        return alpha_hi


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision. Float32 storage runs 3xTF32 (near-fp32 products on the tensor cores):
    plain TF32 moved pre-activations by ~1e-3, enough to flip ELU's derivative (1 against alpha)
    for values near 0, which put float32 gradients 2e-2 off the float64 reference on an H100.
    16-bit inputs ignore it (their products are exact in fp32 accumulators)."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=64)
def split_alpha(alpha: float) -> tuple[float, float]:
    """alpha as fp32 hi + lo halves: exact to about 1e-14, enough for the float64 contract. Cached:
    every launch asks, and a model has one alpha."""
    hi = float(torch.tensor(alpha, dtype=torch.float32))
    return hi, float(torch.tensor(alpha - hi, dtype=torch.float32))


try:  # private to torch, so optional: without it every call goes through the registered op
    from torch._library.triton import is_wrap_triton_enabled as _wrap_triton_enabled
    from torch._library.triton import set_wrap_triton_enabled as _set_wrap_triton_enabled
except ImportError:  # pragma: no cover - older or newer torch
    _set_wrap_triton_enabled = _wrap_triton_enabled = None

# Whether Triton decorated fastdrn's kernels for its CPU interpreter (TRITON_INTERPRET=1 when they
# were imported): fixed for the life of the process, whatever the environment says later.
KERNELS_INTERPRETED = not isinstance(elu, JITFunction)


def eager_fast_path() -> bool:
    """Whether a call may skip the registered op and run its launchers under a torch.autograd.Function.

    The custom-op dispatch costs about 150 us a block forward+backward on the host (measured with
    the launches stubbed, 2-core CPU: 483 us through the ops, 307 us through a Function), and a
    training step launches 54 blocks. Only in eager mode: torch.compile and export trace the ops.
    """
    return _set_wrap_triton_enabled is not None and not torch.compiler.is_compiling()


def function_apply(function: type):
    """function.apply for a torch.autograd.Function without setup_context, less the Python layer of
    torch.autograd.Function.apply: binding defaults, and a generator over every argument that
    unwraps dead functorch wrappers, 12 us for a group's 61 arguments on the host. That layer
    matters only under functorch transforms, which these Functions do not support (they define no
    setup_context): with a transform active, the public apply runs and raises its own error."""
    base = getattr(torch._C, "_FunctionBase", None)
    direct = None if base is None or "apply" not in vars(base) else vars(base)["apply"].__get__(None, function)
    if direct is None:
        return function.apply
    transforms_active = torch._C._are_functorch_transforms_active

    def apply(*args):
        return function.apply(*args) if transforms_active() else direct(*args)
    return apply


def direct_launches():
    """Launch Triton kernels straight from eager code, not through the higher-order op that
    wrap_triton builds for tracing (torch notes ~1 ms per eager HOP dispatch). The registered ops
    do the same inside their own bodies."""
    return _set_wrap_triton_enabled(False)


def pinned_config(configs: list, warps: int) -> triton.Config:
    """What FASTDRN_NUM_WARPS=warps runs: the first listed config with that many warps, or the
    default (the first) where the list has none. A config is only ever run as listed, so the AOT
    check of the lists covers every pinned launch too; a kernel too wide for 4 warps stays at 8."""
    return next((config for config in configs if config.num_warps == warps), configs[0])


# Launch settings live in settings.py (importable without Triton); named here for the launchers.
from .settings import (UNCHANGED, WEIGHT_GRAD_BLOCKS, LaunchOptions, launch_options,  # noqa: E402,F401
                       launch_settings, set_launch_options)


def forget_launches() -> None:
    """Forget every kept kernel and launch plan (set_launch_options: they ran under the old settings)."""
    global generation
    generation += 1  # what a launch or recording in flight in another thread found stays unkept
    for lean in _lean_launchers.values():
        lean.forget()
    launch_plans.clear()  # they hold the forgotten kernels


def fixed_config(interpreter: triton.Config, configs: list) -> triton.Config | None:
    """The one config to launch with, or None to let the autotuner choose among `configs`.

    The interpreter always runs `interpreter`. On a GPU, FASTDRN_NUM_WARPS=n pins
    pinned_config(configs, n) (the test suite runs 4 and 8) and FASTDRN_AUTOTUNE=0 the default,
    configs[0] (both read once: launch_options).
    """
    if KERNELS_INTERPRETED:
        return interpreter
    options = launch_options()
    if options.num_warps is not None:
        return pinned_config(configs, options.num_warps)
    if not options.autotune or len(configs) == 1:
        return configs[0]
    return None


# ---- the lean launch path -------------------------------------------------------------------
def wrap_triton_enabled() -> bool:
    """Whether launches go through wrap_triton's traceable wrapper (tracing), not straight to Triton."""
    return _wrap_triton_enabled is None or _wrap_triton_enabled()


def lean_launches_possible() -> bool:
    """Whether this Triton has what the lean path reads (3.6 and later; checked against 3.5, 3.6 and 3.9)."""
    return native_specialize_impl is not None


def hooks_idle() -> bool:
    """Whether no Triton launch hook is installed (see _hooks_idle)."""
    return _hooks_idle(knobs.runtime)


def _hooks_idle(runtime) -> bool:
    """Whether no Triton launch hook would run (a profiler such as Proton installs them): Triton 3.9
    keeps them in HookChain objects, which are idle when empty; older Triton keeps None or a hook."""
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    return (enter is None or not getattr(enter, "calls", True)) and (leave is None or not getattr(leave, "calls", True))


class LeanLauncher:
    """A kernel's launches after the first, without Triton's per-call work.

    Triton's JITFunction.run binds the arguments, specializes them, builds a cache key (with the
    options as a string), reads its knobs and the driver, checks globals, evaluates the grid and
    builds launch metadata before it calls the compiled kernel's launcher; the autotuner first
    builds a dict of every argument. On the host that is 20-40 us a launch. Here, as Inductor does
    with its compiled kernels, the first launch of each specialization goes through Triton as usual
    and its compiled kernel and config are kept; later launches with the same key call that
    kernel's launcher directly, from a function generated for the kernel's signature.

    The key holds everything Triton specializes on, as JITFunction.run does: each pointer's dtype
    and 16-byte alignment (what Triton's native specialization reads for a tensor), every other
    runtime argument through Triton's own native_specialize_impl (integers equal to 1, divisible by
    16, 32 or 64 bits; floats), the value of every constexpr argument, and the autotuner's key
    arguments where it tunes; entries are per device. A key not seen yet goes through Triton.
    """

    def __init__(self, kernel, tuned, configs: list):
        self.kernel = kernel
        self.tuned = tuned
        self.params = kernel.params
        self.config_names = set(configs[0].kwargs)
        self.tune_keys = [] if tuned is None else list(tuned.keys)
        constexpr = {p.name for p in self.params if p.is_constexpr}
        # Only plain signatures: keyword-bound arguments without defaults or type annotations, and
        # configs whose meta-parameters are all constexpr and without hooks. Otherwise Triton runs.
        self.supported = (
            all(set(config.kwargs) == self.config_names and config.pre_hook is None for config in configs)
            and self.config_names <= constexpr
            and all(not p.has_default and (p.is_constexpr or not p.annotation) for p in self.params)
            and (tuned is None or (not tuned.user_defined_pre_hook and not tuned.user_defined_post_hook
                                   and tuned.early_config_prune is None and tuned.perf_model is None))
        )
        self.devices: dict = {}  # device -> (key function, launch function, entries)

    def forget(self) -> None:
        for _key, _launch, entries in self.devices.values():
            entries.clear()

    def _generate(self, device, args: dict):
        """key(args) and launch(grid, driver, device, args) for this kernel on `device`, args being the
        launch's keyword dict; pointer arguments are those the first call passed tensors to."""
        names = [p.name for p in self.params if p.name not in self.config_names]
        key_parts, values = [], []
        for p in self.params:
            name = p.name
            if name in self.config_names:
                values.append("None")  # a constexpr, which the launcher skips; the key holds the config
                continue
            values.append(name)
            if p.is_constexpr:
                key_parts.append(name)
            elif isinstance(args[name], torch.Tensor):
                key_parts.append(f"{name}.dtype")
                if not p.do_not_specialize and not p.do_not_specialize_on_alignment:
                    key_parts.append(f"{name}.data_ptr() & 15 == 0")
            else:
                key_parts.append(f"specialize(backend, {name}, {p.is_const}, {not p.do_not_specialize}, "
                                 f"{not p.do_not_specialize_on_alignment})")
        key_parts += [name for name in self.tune_keys if name not in self.config_names]
        key = f"({', '.join(key_parts)},)"
        # Arguments come as the launchers' keyword dict: looking 35 names up in it costs about half
        # of binding them as keyword arguments.
        unpack = "".join(f"        {name} = args[{name!r}]\n" for name in names)
        source = (
            f"def key(args):\n"
            f"    try:\n{unpack}"
            f"        return {key}\n"
            f"    except (AttributeError, KeyError):  # a pointer that is not a tensor, or a missing argument\n"
            f"        return None\n"
            f"def launch(grid, driver, device, args):\n"
            f"    try:\n{unpack}"
            f"        entry = entries.get({key})\n"
            f"    except (AttributeError, KeyError):  # a pointer that is not a tensor, or a missing argument\n"
            f"        return False\n"
            f"    if entry is None:\n"
            f"        return False\n"
            f"    run, function, metadata, meta = entry\n"
            f"    grid = grid(meta)\n"
            f"    run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,\n"
            f"        driver.get_current_stream(device), function, metadata, None, None, None, {', '.join(values)})\n"
            f"    return True\n")
        namespace = {"specialize": native_specialize_impl, "backend": self.kernel.device_caches[device][3],
                     "entries": {}}
        exec(source, namespace)  # noqa: S102 - generated from the kernel's own signature
        return namespace["key"], namespace["launch"], namespace["entries"]

    def keep(self, compiled, config: triton.Config, args: dict) -> None:
        """Remember what Triton's path just launched for these arguments."""
        if not self.supported or not hasattr(compiled, "packed_metadata"):
            return  # nothing compiled (a cache hook declined) or an asynchronous compile
        device = triton_driver.active.get_current_device()
        generated = self.devices.get(device)
        if generated is None:
            generated = self.devices[device] = self._generate(device, args)
        key = generated[0](args)
        if key is None:
            return
        run = compiled.run  # loads the module on the device (CompiledKernel._init_handles)
        generated[2][key] = (run, compiled.function, compiled.packed_metadata, config.kwargs)


_lean_launchers: dict[int, LeanLauncher] = {}

# Launch plans (kernels/plans.py): regions of launcher code recorded once per signature, keyed by
# it (None: that signature could not be planned). Cleared with everything that changes a launch.
launch_plans: dict = {}
# Counts the forgetting of kept kernels and plans: a launch or a recording that began before one
# (in another thread) does not keep what it found under the old settings.
generation = 0
# The plans.Recorder of the region being recorded, or None: launch() and track() report to it what
# its own thread launches and allocates (recorder.thread); other threads' launches are theirs.
recorder = None


def check_unbatched(op: str, grad: torch.Tensor) -> None:
    """Refuse, by name, a backward under vmap (autograd.grad's is_grads_batched=True and
    jacobian(vectorize=True) use the older vmap, torch.func its own): its batched tensors have no
    storage for a kernel to read."""
    functorch = torch._C._functorch
    if functorch.is_legacy_batchedtensor(grad) or functorch.is_functorch_wrapped_tensor(grad):
        raise RuntimeError(f"fastdrn {op}: batched gradients (autograd.grad's is_grads_batched=True, "
                           "jacobian(vectorize=True), torch.func transforms) are not supported by the fused "
                           "backward; compute them one at a time, or run with FASTDRN_BACKEND=torch")


def check_saved(op: str, saved, like: torch.Tensor) -> None:
    """Refuse, by name, saved tensors that a saved_tensors_hooks unpack handed back in another dtype
    or on another device than `like` (the op's gradient): the kernels would fail inside, or round the
    gradients to the other dtype, where PyTorch's own ops refuse them."""
    for t in saved:
        if t is not None and (t.dtype != like.dtype or t.device != like.device):
            raise RuntimeError(f"fastdrn {op}: a saved tensor came back from a saved_tensors_hooks unpack as {t.dtype} "
                               f"on {t.device}, but the op ran in {like.dtype} on {like.device}; the unpack must "
                               "return each tensor in its dtype and on its device")


def track(t: torch.Tensor) -> torch.Tensor:
    """t, a tensor a launcher just allocated; a region being recorded notes the allocation."""
    if recorder is not None and recorder.thread == get_ident():
        recorder.allocated(t)
    return t


def lean_entry(kernel, tuned, args: dict):
    """(run, function, packed metadata, config meta-parameters) of what the lean path launches for
    these arguments on the current device, or None where it would go through Triton."""
    lean = _lean_launchers.get(id(kernel if tuned is None else tuned))
    if lean is None:
        return None
    generated = lean.devices.get(triton_driver.active.get_current_device())
    if generated is None:
        return None
    key = generated[0](args)
    return None if key is None else generated[2].get(key)


def launch(kernel, tuned, grid, interpreter: triton.Config, **args) -> None:
    """Launch `kernel` with keyword arguments `args`: at a fixed config, or through its autotuner
    `tuned` (None: `interpreter` is the only config, on a GPU too).

    grid(meta) gives the launch grid from the config's meta-parameters (meta["BLOCK_M"]...). In eager
    code (wrap_triton disabled, real tensors) a kernel's launches after the first go through its
    LeanLauncher; under tracing (torch.compile, export) through wrap_triton, as Triton's own calls.
    """
    lean = _lean_launchers.get(id(kernel if tuned is None else tuned))
    if (lean is not None and not _wrap_triton_enabled() and not kernel.pre_run_hooks
            and _hooks_idle(knobs.runtime)):
        driver = triton_driver.active
        device = driver.get_current_device()
        generated = lean.devices.get(device)
        if generated is not None and generated[1](grid, driver, device, args):
            if recorder is not None and recorder.thread == get_ident():
                recorder.launched(kernel, tuned, grid, interpreter, args)
            return
    configs = [interpreter] if tuned is None else tuned.configs
    began = generation
    config = fixed_config(interpreter, configs)
    if config is None:
        compiled = wrap_triton(tuned)[grid](**args)
        config = tuned.best_config
    else:
        compiled = wrap_triton(kernel)[grid](**args, **config.kwargs, num_warps=config.num_warps,
                                             num_stages=config.num_stages)
    # Keep what ran for the lean path; nothing to keep when interpreted, traced, or on a Triton too old.
    if not (KERNELS_INTERPRETED or wrap_triton_enabled() or not lean_launches_possible() or generation != began):
        if lean is None:
            lean = _lean_launchers[id(kernel if tuned is None else tuned)] = LeanLauncher(kernel, tuned, configs)
        lean.keep(compiled, config, args)
    if recorder is not None and recorder.thread == get_ident():
        recorder.launched(kernel, tuned, grid, config, args)


def rows(t: torch.Tensor) -> torch.Tensor:
    """A 4-D activation as channels_last (a no-op when it already is): pixels are rows."""
    return t.contiguous(memory_format=torch.channels_last)


def row_stride(t: torch.Tensor) -> int:
    """Distance between consecutive pixels of a channels_last tensor (or of a channel slice of one):
    the stride of the innermost spatial dim longer than 1. Not stride(3) alone: torch skips size-1
    dims when it calls a tensor channels_last contiguous, so at width 1 stride(3) can be anything
    (a 1-row channels_last image transposed to a column has h*c there)."""
    for dim in (3, 2, 0):
        if t.shape[dim] > 1:
            return t.stride(dim)
    return t.shape[1]  # one pixel: no stride is read


def extent(t) -> int:
    """The elements from t's first element to its last, inclusive, through its strides (0 when empty)."""
    return 0 if t.numel() == 0 else 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))


def check_int32(op: str, *extents: int) -> None:
    """Kernels index with int32: refuse sizes whose largest offset would not fit."""
    for extent in extents:
        if extent > INT32_LIMIT:
            raise ValueError(f"{op}: a tensor spans {extent} elements, more than the int32 offsets of "
                             f"the kernels allow ({INT32_LIMIT}); split the batch or the image")


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host. triton.cdiv also runs on the host, but as a constexpr
    function that costs ~5 us a call (measured: 25 calls a block's forward+backward)."""
    return -(-a // b)


def next_pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << max(n - 1, 0).bit_length())


def is_fp64(t: torch.Tensor) -> bool:
    return t.dtype == torch.float64
