"""Fused DRN output stage, inference only: the pixel shuffle and the tail conv in one kernel.

    v   = pixel_shuffle(u + b_up, s)             u: the upsampler conv's output without its bias
    out = conv3x3(v, w_tail, b_tail) + mean      zero padding in the shuffled, high-resolution domain

`shuffle_tail_kernel` reads u through the shuffle's index map and never writes v (265 MB at x4 for
a 270x480 input). It is the tail conv as an implicit GEMM over high-resolution output pixels: a
program computes BLOCK_M of them, 9 taps x C channels in BLOCK_K chunks with tl.dot into an fp32
[BLOCK_M, NP] accumulator (NP: n_colors padded to 16, the weight tile masked past n_colors). Its
rows are whole s x s sub-blocks (SUB = s*s padded to a power of two rows each), each of a
low-resolution pixel, so the rows of one sub-block read adjacent channels of u (the tile is
loaded in the form the installed Triton compiles best: PIXELS_FASTEST). b_up is added to what was
read, only in bounds (the padding is zero, not the bias), in fp32 and rounded to u's dtype as the
conv's output would be; the weight is cast to u's dtype as autocast casts it. b_tail and mean are
added to the fp32 accumulator, and the result is written in the dtype and memory format asked for.

No backward: fastdrn.DRN runs it only where no gradient is needed (launch option fuse_tail).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ..ops import SHUFFLE_TAIL_MAX_COLORS
from ._common import (cdiv, check_int32, direct_launches, dot_precision, eager_fast_path, is_fp64, launch, next_pow2,
                      rows, track)

# Output channels computed: n_colors padded to the smallest tl.dot width (ops checks n_colors against it).
NP = SHUFFLE_TAIL_MAX_COLORS


@triton.jit
def shuffle_tail_kernel(
    u_ptr,       # [N, H, W, C*s*s] the upsampler conv's output without bias, channels_last (rows contiguous)
    bup_ptr,     # [C*s*s] the upsampler's bias, added to u where the tail reads it in bounds
    w_ptr,       # [NC, C, 3, 3] the tail's weight, contiguous; cast to u's dtype for the dot
    btail_ptr,   # [NC] the tail's bias
    mean_ptr,    # [NC] the rgb mean added to the output
    out_ptr,     # [N, NC, H*s, W*s] output: NCHW-contiguous, or channels_last when OUT_CL
    M,           # low-resolution pixels, N * H * W
    H,           # low-resolution height
    W,           # low-resolution width
    C,           # channels of the shuffled image (the tail's input channels)
    NC,          # output channels (n_colors), at most NP
    SCALE: tl.constexpr,     # s: compile-time, so sub-positions are divisions by a constant
    SUB: tl.constexpr,       # s*s rounded up to a power of two: rows per sub-block (the rest masked)
    OUT_CL: tl.constexpr,    # write the output channels_last
    IS_FP64: tl.constexpr,   # float64 storage: float64 accumulation (interpreter tests)
    PRECISION: tl.constexpr,  # tl.dot input_precision (dot_precision; "ieee" for float64)
    PIXELS_FASTEST: tl.constexpr,  # load u's tile with the pixels as its fast axis (PIXELS_FASTEST below)
    NP: tl.constexpr,        # output channels padded for the dot
    BLOCK_M: tl.constexpr,   # high-resolution pixels per program: BLOCK_M // SUB sub-blocks
    BLOCK_K: tl.constexpr,   # input channels per dot
):
    SS: tl.constexpr = SCALE * SCALE
    pid = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    sub_row = rm % SUB
    p = pid * (BLOCK_M // SUB) + rm // SUB      # the low-resolution pixel of each row
    i = sub_row // SCALE                        # the row's position in its s x s sub-block
    j = sub_row % SCALE
    row_ok = (p < M) & (sub_row < SS)
    sx = p % W
    sy = (p // W) % H
    n = p // (H * W)
    rk = tl.arange(0, BLOCK_K)
    rc = tl.arange(0, NP)
    c_ok = rc < NC
    acc_dtype = tl.float64 if IS_FP64 else tl.float32
    u_dtype = u_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, NP), dtype=acc_dtype)
    # Taps and channel chunks as two run-time loops, as conv3x3_fused_kernel's (residual_distill.py).
    for tap in range(9):
        # The high-resolution neighbour (Y + dy - 1, X + dx - 1), offset by s so that the divisions
        # are of non-negative numbers: its low-resolution pixel and sub-position in u.
        yy = i + tap // 3 - 1 + SCALE
        xx = j + tap % 3 - 1 + SCALE
        ly = sy + yy // SCALE - 1
        lx = sx + xx // SCALE - 1
        sub = (yy % SCALE) * SCALE + xx % SCALE
        src_ok = row_ok & (ly >= 0) & (ly < H) & (lx >= 0) & (lx < W)  # the high-resolution zero padding
        src = ((n * H + ly) * W + lx) * (C * SS) + sub
        for k0 in range(0, C, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < C
            # u's channel is k * s*s + sub-position: the rows of a sub-block read adjacent channels.
            if PIXELS_FASTEST:  # the tile as [BLOCK_K, BLOCK_M], transposed for the dot
                mask = k_ok[:, None] & src_ok[None, :]
                ch = kk[:, None] * SS + sub[None, :]
                x = tl.load(u_ptr + src[None, :] + kk[:, None] * SS, mask=mask, other=0.0)
                b = tl.load(bup_ptr + ch, mask=mask, other=0.0)
            else:               # the tile as [BLOCK_M, BLOCK_K], as the dot takes it
                mask = src_ok[:, None] & k_ok[None, :]
                ch = sub[:, None] + kk[None, :] * SS
                x = tl.load(u_ptr + src[:, None] + kk[None, :] * SS, mask=mask, other=0.0)
                b = tl.load(bup_ptr + ch, mask=mask, other=0.0)
            a = (x.to(acc_dtype) + b.to(acc_dtype)).to(u_dtype)
            wt = tl.load(w_ptr + rc[None, :] * (C * 9) + kk[:, None] * 9 + tap, mask=k_ok[:, None] & c_ok[None, :],
                         other=0.0).to(u_dtype)
            if PIXELS_FASTEST:
                acc = tl.dot(tl.trans(a), wt, acc, input_precision=PRECISION)
            else:
                acc = tl.dot(a, wt, acc, input_precision=PRECISION)
    acc += (tl.load(btail_ptr + rc, mask=c_ok, other=0.0).to(acc_dtype)
            + tl.load(mean_ptr + rc, mask=c_ok, other=0.0).to(acc_dtype))[None, :]
    hs = H * SCALE
    ws = W * SCALE
    out_y = (sy * SCALE + i)[:, None]
    out_x = (sx * SCALE + j)[:, None]
    if OUT_CL:
        offs = ((n[:, None] * hs + out_y) * ws + out_x) * NC + rc[None, :]
    else:
        offs = ((n[:, None] * NC + rc[None, :]) * hs + out_y) * ws + out_x
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & c_ok[None, :])


# ---- launcher ---------------------------------------------------------------------------------
# How the kernel loads u's tile, by the Triton that compiles it: the same values either way, but each
# form took 210-255 registers (with spills in some variants) under the compilers that do not favour
# it, against 88-123 under those that do (AOT check, sm_90, bf16: Triton 3.5 and 3.6 favour the
# [BLOCK_M, BLOCK_K] load, 3.7 to 3.9 the transposed one).
PIXELS_FASTEST = tuple(int(part) for part in triton.__version__.split(".")[:2]) >= (3, 7)

INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_K": 16}, num_warps=4, num_stages=1)
# Every config is in the AOT check (kernels/registry.py); the first is the default.
CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_K": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 256, "BLOCK_K": 32}, num_warps=8, num_stages=2),
]
# Float32 runs 3xTF32 dots (operands split in two): BLOCK_M 256 at 8 warps spilled 4-16 bytes on
# sm_80 (AOT check), so its 8-warp config has the 4-warp one's tiles.
FP32_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_K": 16}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_K": 16}, num_warps=8, num_stages=2),
]


def configs_for(dtype: torch.dtype) -> list:
    return FP32_CONFIGS if dtype == torch.float32 else CONFIGS


# Keyed by "float32 storage?", as gemm.conv1x1_tuned.
shuffle_tail_tuned = {fp32: triton.autotune(configs=configs_for(torch.float32 if fp32 else None),
                                            key=["C", "NC", "SCALE", "OUT_CL"])(shuffle_tail_kernel)
                      for fp32 in (False, True)}


def _shuffle_tail(u, b_up, w_tail, b_tail, mean, scale: int, out_dtype: torch.dtype, channels_last: bool):
    """Allocate the output and launch shuffle_tail_kernel (inputs checked by fastdrn.ops.check_shuffle_tail)."""
    u = rows(u)  # a copy only when u is not channels_last: the kernel reads rows of C*s*s channels
    n_img, css, height, width = u.shape
    colors = w_tail.shape[0]
    out = track(torch.empty((n_img, colors, height * scale, width * scale), device=u.device, dtype=out_dtype,
                            memory_format=torch.channels_last if channels_last else torch.contiguous_format))
    m = n_img * height * width
    check_int32("shuffle_tail", u.numel(), out.numel())
    sub = next_pow2(scale * scale, floor=1)
    launch(
        shuffle_tail_kernel, shuffle_tail_tuned[u.dtype == torch.float32],
        lambda meta: (cdiv(m, meta["BLOCK_M"] // sub),), INTERPRETER_CONFIG,
        u_ptr=u, bup_ptr=b_up.contiguous(), w_ptr=w_tail.contiguous(), btail_ptr=b_tail.contiguous(),
        mean_ptr=mean.reshape(-1).contiguous(), out_ptr=out, M=m, H=height, W=width, C=css // (scale * scale),
        NC=colors, SCALE=scale, SUB=sub, OUT_CL=channels_last, IS_FP64=is_fp64(u),
        PRECISION="ieee" if is_fp64(u) else dot_precision(u.dtype), NP=NP, PIXELS_FASTEST=PIXELS_FASTEST,
    )
    return out


# ---- registered op ------------------------------------------------------------------------------
@triton_op("fastdrn::shuffle_tail", mutates_args={})
def shuffle_tail_op(u: torch.Tensor, b_up: torch.Tensor, w_tail: torch.Tensor, b_tail: torch.Tensor,
                    mean: torch.Tensor, scale: int, out_dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    return _shuffle_tail(u, b_up, w_tail, b_tail, mean, scale, out_dtype, channels_last)


# ---- public function ----------------------------------------------------------------------------
def shuffle_tail(u, b_up, w_tail, b_tail, mean, scale, out_dtype, channels_last=False):
    """conv3x3(pixel_shuffle(u + b_up, scale), w_tail, b_tail, padding=1) + mean in one kernel, no
    autograd. Inputs as fastdrn.ops.check_shuffle_tail passes them (fastdrn.ops._shuffle_tail checks
    and calls this). u: (N, C*s*s, H, W), best channels_last (else copied to it); out_dtype: the
    output's dtype; channels_last: write the output channels_last instead of NCHW-contiguous."""
    if eager_fast_path():
        with direct_launches():
            return _shuffle_tail(u, b_up, w_tail, b_tail, mean, scale, out_dtype, bool(channels_last))
    return shuffle_tail_op(u, b_up, w_tail, b_tail, mean, scale, out_dtype, bool(channels_last))


# ---- ahead-of-time compile check ------------------------------------------------------------------
def aot_variants():
    """shuffle_tail_kernel at every config, for fp32, bf16 and fp16 u: at DRN's scales 2, 3 and 4,
    output NCHW and channels_last, with the parameters and output in u's dtype and (autocast in
    16 bits) in float32. Another scale compiles its own variant at launch, with the same tiles."""
    from .registry import AOT_DTYPES, expand, launch_configs

    kinds = {name: "ptr" for name in ("u_ptr", "bup_ptr", "w_ptr", "btail_ptr", "mean_ptr", "out_ptr")}
    kinds.update({name: "i32" for name in ("M", "H", "W", "C", "NC")})
    kinds.update({name: "constexpr" for name in ("SCALE", "SUB", "OUT_CL", "IS_FP64", "PRECISION", "PIXELS_FASTEST",
                                                  "NP", "BLOCK_M", "BLOCK_K")})
    autocast = dict(kinds, **{name: "*fp32" for name in ("bup_ptr", "w_ptr", "btail_ptr", "mean_ptr", "out_ptr")})
    cases = [(f"x{scale} {'cl' if cl else 'nchw'}", {"SCALE": scale, "SUB": next_pow2(scale * scale, floor=1),
                                                      "OUT_CL": cl, "IS_FP64": False, "NP": NP,
                                                      "PIXELS_FASTEST": PIXELS_FASTEST})
             for scale in (2, 3, 4) for cl in (False, True)]
    variants = []
    for dtype in AOT_DTYPES:
        configs = launch_configs(configs_for(torch.float32 if dtype == "fp32" else None))
        variants += expand(shuffle_tail_kernel, kinds, cases, configs, dtypes=(dtype,), div16=("M", "W", "C"),
                           aligned=("out_ptr",))
        if dtype != "fp32":
            variants += expand(shuffle_tail_kernel, autocast, [(f"{label} fp32 params", values)
                                                               for label, values in cases],
                               configs, dtypes=(dtype,), div16=("M", "W", "C"), aligned=("out_ptr",))
    return variants
