"""Pieces every fused op shares: ELU in Triton, launch-config choice, layout and index checks."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fastdrn.backend import interpreting

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
def elu_grad_from_output(y, alpha):
    # y = ELU(x): dy/dx is 1 where y > 0 and alpha * exp(x) = y + alpha elsewhere; NaN where y is
    # NaN (it takes the else branch), so a NaN pre-activation makes its gradient NaN.
    return tl.where(y > 0, 1.0, y + alpha)


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
    from torch._library.triton import set_wrap_triton_enabled as _set_wrap_triton_enabled
except ImportError:  # pragma: no cover - older or newer torch
    _set_wrap_triton_enabled = None


def eager_fast_path() -> bool:
    """Whether a call may skip the registered op and run its launchers under a torch.autograd.Function.

    The custom-op dispatch costs about 150 us a block forward+backward on the host (measured with
    the launches stubbed, 2-core CPU: 483 us through the ops, 307 us through a Function), and a
    training step launches 54 blocks. Only in eager mode: torch.compile and export trace the ops.
    """
    return _set_wrap_triton_enabled is not None and not torch.compiler.is_compiling()


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


def fixed_config(interpreter: triton.Config, configs: list) -> triton.Config | None:
    """The one config to launch with, or None to let the autotuner choose among `configs`.

    The interpreter always runs `interpreter`. On a GPU, FASTDRN_NUM_WARPS=n pins
    pinned_config(configs, n) (the test suite runs 4 and 8) and FASTDRN_AUTOTUNE=0 the default,
    configs[0].
    """
    if interpreting():
        return interpreter
    warps = os.environ.get("FASTDRN_NUM_WARPS", "").strip()
    if warps:
        return pinned_config(configs, int(warps))
    if os.environ.get("FASTDRN_AUTOTUNE", "1").strip() == "0":
        return configs[0]
    return None


def launch(kernel, tuned, grid, interpreter: triton.Config, **args) -> None:
    """Launch `kernel` at a fixed config, or through its autotuner `tuned`, via wrap_triton."""
    config = fixed_config(interpreter, tuned.configs)
    if config is None:
        wrap_triton(tuned)[grid](**args)
    else:
        wrap_triton(kernel)[grid](**args, **config.kwargs, num_warps=config.num_warps,
                                  num_stages=config.num_stages)


def rows(t: torch.Tensor) -> torch.Tensor:
    """A 4-D activation as channels_last (a no-op when it already is): pixels are rows."""
    return t.contiguous(memory_format=torch.channels_last)


def row_stride(t: torch.Tensor) -> int:
    """Distance between consecutive pixels of a channels_last tensor (or of a channel slice of one)."""
    return t.stride(3)


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


def grad_split(m: int, block_m: int, tiles: int) -> int:
    """Rows per split-M partial of a weight gradient: enough programs to fill a GPU, in whole blocks.

    Depends on shapes only (never on the device), so the partials - and so the sums - are the same
    run to run. About 512 programs over tiles x splits suits a 132-SM H100 (2 to 4 waves).
    """
    blocks = cdiv(m, block_m)
    splits = max(1, min(blocks, cdiv(512, max(tiles, 1))))
    return cdiv(blocks, splits) * block_m
