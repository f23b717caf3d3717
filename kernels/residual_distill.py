"""Fused residual distilling block (RDB), forward and backward.

    a   = ELU(conv1x1(z, W_sq) + b_sq)          D -> F
    b   = ELU(conv3x3(a, W_c) + b_c)            F -> F
    c   = conv1x1(b, W_e) + b_e                 F -> D + d
    out = cat([z + c[:, :D], c[:, D:]])

Forward (docs/kernels.md): the squeeze GEMM with its ELU (kernels/gemm.py), then
`conv3x3_fused_kernel`: the 3x3 as an implicit GEMM over a, bias and ELU in registers, then the
expand GEMM on that register tile in column chunks, with the residual add on the first D columns
and the concat both done by where the store lands. `b` never leaves the chip unless the backward
will need it. In a chain of blocks of one width (16-bit on a GPU, every dtype under the
interpreter: folds_next_squeeze) the 3x3 kernel also computes the next block's squeeze from the
output chunks it stores, so a block after the first is one launch.

Float32 at F = 256 runs the 1x1 after the 3x3 as its own launch, forward and backward
(fuses_second_gemm): the fused form spilled registers at every config.

Eager calls run these launchers under a torch.autograd.Function (no custom-op dispatch), one for
a whole group's chain of blocks when training; the registered ops below are what torch.compile
traces, one a block. Both share every launcher.

Backward (dy has D + d channels), deterministic, no atomics:
    a    = recomputed by the squeeze 1x1 (cheap; saving it would cost F values a pixel)
    b    = saved by the forward (default), or recomputed by conv3x3_fused_kernel (recompute=True)
    g_b  = (dy W_e) * ELU'(b)                   a 1x1, ELU' read off the saved output b; with b saved,
                                                one conv1x1_pair launch computes a and g_b
    g_a  = convT3x3(g_b) * ELU'(a)              conv3x3_fused_kernel with flipped, transposed W_c,
    dz   = g_a W_sq + dy[:, :D]                   and the squeeze transpose in its second GEMM
    dW_e, dW_c, dW_sq and the biases            split-M partials of all three in one launch
                                                (kernels/gemm.py weight_grads), then one fixed-order sum;
                                                in a group, up to three blocks' in those two launches
                                                (FASTDRN_WEIGHT_GRAD_BLOCKS)

Saved for backward: z and b by default (D + F values a pixel, against the reference's D + 4F);
z alone with recompute=True.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from ._common import (KERNELS_INTERPRETED, cdiv, check_int32, check_saved, check_unbatched, direct_launches,
                      dot_precision, eager_fast_path, elu, elu_grad_from_output, extent, function_apply, is_fp64,
                      join_alpha, launch, launch_options, next_pow2, rows, split_alpha, track)
from .compress_skip import _backward as _compress_backward
from .compress_skip import _forward as _compress_forward
from .compress_skip import compress_skip
from .gemm import (EPILOGUE_ELU, EPILOGUE_LINEAR, EPILOGUE_TIMES_ELU_GRAD_OF_RES, conv1x1, conv1x1_pair, row_align,
                   weight_grads)
from .plans import checked_signature, planned, pointers, tensor_signature  # noqa: F401 - checked_signature: for ops

EPI_ELU = 0                  # mid = ELU(conv3x3(x) + bias)
EPI_TIMES_ELU_GRAD_OF_AUX = 1  # mid = conv3x3(x) * ELU'(.) where aux = ELU(.) was saved


@triton.jit
def conv3x3_fused_kernel(
    x_ptr,       # [M, F] input rows of the 3x3 (a forward, g_b backward), F contiguous channels per pixel
    wc_ptr,      # [9, F, F] 3x3 weight packed tap-major as (tap, c_in, c_out) of this pass's product
    bc_ptr,      # [F] 3x3 bias, read when HAS_BIAS1
    aux_ptr,     # [M, F] saved ELU output whose derivative gates the result, read when EPI1 == 1
    mid_ptr,     # [M, F] the 3x3 stage's result (b forward, g_a backward), written when SAVE_MID
    w2_ptr,      # second (1x1) weight: element (n, f) at n * F + f, or f * N2 + n when W2_TRANSPOSED
    b2_ptr,      # [N2] second bias, read when HAS_BIAS2
    res_ptr,     # residual rows added to output columns < NRES, row stride stride_rm
    out_ptr,     # [M, N2] output rows, row stride stride_om; may alias res_ptr (in-place group path)
    w3_ptr,      # HAS_NEXT: the next block's squeeze weight (F, N2), element (f, n) at f * N2 + n; with
                 # NEXT_GRAD, the previous block's expand weight (N2, F), element (n, f) at n * F + f
    b3_ptr,      # [F] the next block's squeeze bias, read when HAS_NEXT and HAS_BIAS3
    aux3_ptr,    # [M, F] the previous block's saved b, read when NEXT_GRAD
    next_ptr,    # [M, F] written when HAS_NEXT: the next block's a = ELU(out W3^T + b3), or with
                 # NEXT_GRAD the previous block's g_b = (dz W3) * ELU'(its b)
    M,           # pixel rows, N * H * W
    H,           # image height
    W,           # image width
    N2,          # output channels of the second GEMM       } these four in units of ROW_ALIGN
    NRES,        # output columns that get the residual (D)  } elements: N2 = 72 is passed as 9
    stride_rm,   # elements between pixel rows of res        } with ROW_ALIGN = 8, and the kernel
    stride_om,   # elements between pixel rows of out        } knows every row is 16-byte aligned
    alpha_hi,    # ELU alpha, fp32 high half
    alpha_lo,    # ELU alpha, fp32 low half (float64 runs only)
    F: tl.constexpr,          # channels of the 3x3 (the block's inner width): compile-time, so row
                              # addresses are known multiples and loads vectorize at any N2, H, W
    FLIP_TAPS: tl.constexpr,  # read tap 8 - t for tap t: the transposed 3x3 of the input gradient
    EPI1: tl.constexpr,       # EPI_ELU or EPI_TIMES_ELU_GRAD_OF_AUX
    HAS_BIAS1: tl.constexpr,
    SAVE_MID: tl.constexpr,
    HAS_SECOND: tl.constexpr,  # run the second GEMM and store out (False: only mid is wanted)
    HAS_BIAS2: tl.constexpr,
    W2_TRANSPOSED: tl.constexpr,  # the second weight is (F, N2) (the squeeze, in the input gradient)
    HAS_NEXT: tl.constexpr,   # also compute the next block's squeeze from the output rows in registers
    HAS_BIAS3: tl.constexpr,
    NEXT_GRAD: tl.constexpr,  # backward: the third GEMM is the previous block's g_b from this block's dz
    IS_FP64: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input_precision (see dot_precision)
    ROW_ALIGN: tl.constexpr,  # N2, NRES and the row strides are multiples of this (gemm.row_align)
    BLOCK_M: tl.constexpr,    # pixel rows per program
    BLOCK_F: tl.constexpr,    # F padded to a power of two: the whole 3x3 output row stays in registers
    BLOCK_K: tl.constexpr,    # input channels per 3x3 step
    BLOCK_N: tl.constexpr,    # output columns per step of the second GEMM
    TILE_W: tl.constexpr,     # 0: BLOCK_M consecutive pixels of the raster order; else a 2-D tile of
                              # BLOCK_M // TILE_W image rows by TILE_W columns (the taps share more of it)
    X_IN_L1: tl.constexpr,    # load x through L1 (cp.async.ca), so that taps re-reading it may hit there
):
    pid = tl.program_id(0)
    if TILE_W == 0:
        rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = rm < M
        h = (rm // W) % H
        w = rm % W
    else:
        tiles_w = tl.cdiv(W, TILE_W)
        tiles = tl.cdiv(H, BLOCK_M // TILE_W) * tiles_w  # an image's tiles
        image = pid // tiles
        tile_h = (pid % tiles) // tiles_w
        h = tile_h * (BLOCK_M // TILE_W) + tl.arange(0, BLOCK_M) // TILE_W
        w = (pid % tiles_w) * TILE_W + tl.arange(0, BLOCK_M) % TILE_W
        m_ok = (h < H) & (w < W)  # the grid holds whole images only
        rm = (image * H + h) * W + w
    rf = tl.arange(0, BLOCK_F)
    f_ok = rf < F
    rk = tl.arange(0, BLOCK_K)
    acc_dtype = tl.float64 if IS_FP64 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_F), dtype=acc_dtype)
    # Taps at run time, not unrolled: the unrolled form spilled and lost pipelining (docs/kernels.md).
    # Taps and channel chunks are two nested loops, not one flattened loop, which Triton
    # miscompiled at 8 warps (pytorch/pytorch issue 173068).
    for tap in range(9):
        dy = tap // 3 - 1
        dx = tap % 3 - 1
        hh = h + dy
        ww = w + dx
        src_ok = m_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)  # the zero padding
        src = rm + dy * W + dx
        if FLIP_TAPS:
            w_tap = 8 - tap
        else:
            w_tap = tap
        for k0 in range(0, F, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < F
            if X_IN_L1:
                x = tl.load(x_ptr + src[:, None] * F + kk[None, :], mask=src_ok[:, None] & k_ok[None, :], other=0.0,
                            cache_modifier=".ca")
            else:
                x = tl.load(x_ptr + src[:, None] * F + kk[None, :], mask=src_ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(wc_ptr + w_tap * F * F + kk[:, None] * F + rf[None, :],
                         mask=k_ok[:, None] & f_ok[None, :], other=0.0)
            acc = tl.dot(x, wt, acc, input_precision=PRECISION)
    _conv3x3_epilogue(acc, rm, m_ok, rf, f_ok, bc_ptr, aux_ptr, mid_ptr, w2_ptr, b2_ptr, res_ptr, out_ptr, w3_ptr,
                      b3_ptr, aux3_ptr, next_ptr, N2 * ROW_ALIGN, NRES * ROW_ALIGN, stride_rm * ROW_ALIGN,
                      stride_om * ROW_ALIGN, join_alpha(alpha_hi, alpha_lo, IS_FP64), F, EPI1, HAS_BIAS1, SAVE_MID,
                      HAS_SECOND, HAS_BIAS2, W2_TRANSPOSED, HAS_NEXT, HAS_BIAS3, NEXT_GRAD, PRECISION, BLOCK_M,
                      BLOCK_N)


@triton.jit
def _conv3x3_epilogue(acc, rm, m_ok, rf, f_ok, bc_ptr, aux_ptr, mid_ptr, w2_ptr, b2_ptr, res_ptr, out_ptr, w3_ptr,
                      b3_ptr, aux3_ptr, next_ptr, N2, NRES, stride_rm, stride_om, alpha,
                      F: tl.constexpr, EPI1: tl.constexpr, HAS_BIAS1: tl.constexpr, SAVE_MID: tl.constexpr,
                      HAS_SECOND: tl.constexpr, HAS_BIAS2: tl.constexpr, W2_TRANSPOSED: tl.constexpr,
                      HAS_NEXT: tl.constexpr, HAS_BIAS3: tl.constexpr, NEXT_GRAD: tl.constexpr,
                      PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Both 3x3 kernels' epilogue on one [BLOCK_M, BLOCK_F] tile of 3x3 products: bias, ELU or the
    # gradient through it, the optional stored copy, the second (1x1) GEMM with the residual add,
    # and (HAS_NEXT) a third GEMM over the output chunks as they are stored, so the output is never
    # read back for it: forward, the next block's squeeze; backward (NEXT_GRAD), the previous
    # block's g_b from this block's dz, which is that block's output gradient.
    acc_dtype = acc.dtype
    if HAS_BIAS1:
        acc += tl.load(bc_ptr + rf, mask=f_ok, other=0.0).to(acc_dtype)[None, :]
    mf_ok = m_ok[:, None] & f_ok[None, :]
    if EPI1 == 0:
        mid = elu(acc, alpha)
    else:
        aux = tl.load(aux_ptr + rm[:, None] * F + rf[None, :], mask=mf_ok, other=0.0)
        mid = acc * elu_grad_from_output(aux, alpha, acc_dtype)
    mid_store = mid.to(mid_ptr.dtype.element_ty)
    if SAVE_MID:
        tl.store(mid_ptr + rm[:, None] * F + rf[None, :], mid_store, mask=mf_ok)
    if HAS_SECOND:
        next_acc = tl.zeros_like(acc)
        # The second GEMM's operand is the stored-precision tile, as if it had gone through memory;
        # so is the third's (the output exactly as stored).
        for n0 in range(0, N2, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            n_ok = rn < N2
            if W2_TRANSPOSED:
                w2 = tl.load(w2_ptr + rf[:, None] * N2 + rn[None, :], mask=f_ok[:, None] & n_ok[None, :], other=0.0)
            else:
                w2 = tl.load(w2_ptr + rn[None, :] * F + rf[:, None], mask=f_ok[:, None] & n_ok[None, :], other=0.0)
            c = tl.dot(mid_store, w2, tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype), input_precision=PRECISION)
            if HAS_BIAS2:
                c += tl.load(b2_ptr + rn, mask=n_ok, other=0.0).to(acc_dtype)[None, :]
            res_ok = m_ok[:, None] & (rn[None, :] < NRES)
            c += tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :], mask=res_ok, other=0.0).to(acc_dtype)
            c_store = c.to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], c_store, mask=m_ok[:, None] & n_ok[None, :])
            if HAS_NEXT:
                if NEXT_GRAD:
                    w3 = tl.load(w3_ptr + rn[:, None] * F + rf[None, :], mask=n_ok[:, None] & f_ok[None, :],
                                 other=0.0)
                else:
                    w3 = tl.load(w3_ptr + rf[None, :] * N2 + rn[:, None], mask=n_ok[:, None] & f_ok[None, :],
                                 other=0.0)
                next_acc = tl.dot(c_store, w3, next_acc, input_precision=PRECISION)
        if HAS_NEXT:
            if NEXT_GRAD:
                aux3 = tl.load(aux3_ptr + rm[:, None] * F + rf[None, :], mask=mf_ok, other=0.0)
                next_val = next_acc * elu_grad_from_output(aux3, alpha, acc_dtype)
            else:
                if HAS_BIAS3:
                    next_acc += tl.load(b3_ptr + rf, mask=f_ok, other=0.0).to(acc_dtype)[None, :]
                next_val = elu(next_acc, alpha)
            tl.store(next_ptr + rm[:, None] * F + rf[None, :], next_val.to(next_ptr.dtype.element_ty), mask=mf_ok)


@triton.jit
def pack3x3_kernel(
    w_ptr,         # n 3x3 weights: element (k, o, i, kh, kw) at k * s_n + o * s_o + i * s_i + kh * s_kh + kw * s_kw
    packed_ptr,    # [n, 9, F_IN, F_OUT] (k, tap, i, o), tap = 3 kh + kw: the forward's operand, written when FORWARD
    packed_t_ptr,  # [n, 9, F_OUT, F_IN] (k, tap, o, i): the transposed convolution's, written when TRANSPOSED
    F_OUT,         # the convolutions' output channels
    F_IN,          # their input channels
    s_n,           # w's strides, in elements: weight k,
    s_o,           #   output channel,
    s_i,           #   input channel,
    s_kh,          #   kernel row,
    s_kw,          #   kernel column
    FORWARD: tl.constexpr,
    TRANSPOSED: tl.constexpr,
    BLOCK_O: tl.constexpr,  # output channels a program
    BLOCK_I: tl.constexpr,  # input channels a program
):
    # One program per weight and [BLOCK_O, BLOCK_I] tile of it, its 9 taps (padded to 16) at once, so
    # both packed forms come from one read of the weights: a copy, bit for bit, in any dtype.
    k = tl.program_id(0)
    tiles_i = tl.cdiv(F_IN, BLOCK_I)
    o = (tl.program_id(1) // tiles_i) * BLOCK_O + tl.arange(0, BLOCK_O)[:, None, None]
    i = (tl.program_id(1) % tiles_i) * BLOCK_I + tl.arange(0, BLOCK_I)[None, :, None]
    tap = tl.arange(0, 16)[None, None, :]
    ok = (o < F_OUT) & (i < F_IN) & (tap < 9)
    values = tl.load(w_ptr + k * s_n + o * s_o + i * s_i + (tap // 3) * s_kh + (tap % 3) * s_kw, mask=ok)
    plane = F_IN * F_OUT
    start = (k * 9 + tap) * plane
    if FORWARD:
        tl.store(packed_ptr + start + i * F_OUT + o, values, mask=ok)
    if TRANSPOSED:
        tl.store(packed_t_ptr + start + o * F_IN + i, values, mask=ok)


# ---- launch configurations (keyed by BLOCK_F; every entry is in the AOT check) --------------------
def _config(block_m, block_n, block_k, warps, stages, tile_w=0, x_in_l1=False):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "TILE_W": tile_w,
                          "X_IN_L1": x_in_l1}, num_warps=warps, num_stages=stages)


# Chosen by compiling every launch shape for sm_90 and sm_80 (kernels/aot_check.py) and keeping
# the configs without register spills. The [BLOCK_M, BLOCK_F] accumulator, the stored tile that
# feeds the second GEMM and that GEMM's own tile share the registers: wide blocks need 8 warps, and
# float32's 3xTF32 dots (operands split in two) need 8 warps and BLOCK_K 16 from F = 16 up. Float32
# at F = 256 does not fuse the second GEMM at all (see fuses_second_gemm).
CONV3X3_CONFIGS = {
    16: [_config(64, 64, 16, 4, 3), _config(128, 64, 16, 8, 3)],
    32: [_config(64, 32, 32, 4, 3), _config(128, 64, 32, 8, 3)],
    # H200, 0211768 (bench/results/2026-11-28c-h200): 128 x 32 x 64 at 8 warps was fastest forward,
    # 64 x 64 x 32 on the input gradient, 64 x 32 x 64 at 4 warps in place at inference.
    64: [_config(128, 32, 64, 8, 3), _config(64, 64, 32, 8, 3), _config(64, 32, 64, 4, 4)],
    128: [_config(64, 64, 32, 8, 3), _config(64, 32, 32, 8, 3)],
    256: [_config(64, 16, 32, 8, 2)],  # BLOCK_N 32 spilled 8-16 bytes on sm_80 in the input-gradient pass
}
CONV3X3_FP32_CONFIGS = {
    16: [_config(64, 64, 16, 8, 3)],
    32: [_config(64, 32, 16, 8, 3)],
    64: [_config(64, 16, 16, 8, 3)],
    128: [_config(64, 16, 16, 8, 3)],
    256: [_config(64, 16, 16, 8, 2)],
}
# 16-bit candidates at DRN's width, neither launched nor autotuned. bench/profile_kernels.py times
# them beside the configs above and a GPU test checks each against float64; one joins
# CONV3X3_CONFIGS when a GPU run shows it wins. In the AOT check like the others. Whole-F steps
# (BLOCK_K 64) won at 0211768; the first tries a fourth stage. 256 x 32 x 64 at 8 warps and
# 128 x 32 x 64 at 4 spilled 4 to 240 bytes in the unaligned input-gradient pass (sm_90, sm_80).
# The others ask whether the taps' re-reads of x can come from L1 instead of L2 (docs/kernels.md):
# the default and the inference winner with x loaded through L1; the default's 128 pixels as an
# 8 x 16 tile, whose nine taps read 180 distinct pixels instead of up to 390, with and without L1;
# the inference winner's 64 as an 8 x 8 tile with L1 (100 distinct pixels instead of up to 198).
CONV3X3_CANDIDATES = {
    64: [_config(128, 32, 64, 8, 4), _config(128, 32, 64, 8, 3, x_in_l1=True), _config(64, 32, 64, 4, 4, x_in_l1=True),
         _config(128, 32, 64, 8, 3, tile_w=16), _config(128, 32, 64, 8, 3, tile_w=16, x_in_l1=True),
         _config(64, 32, 64, 4, 4, tile_w=8, x_in_l1=True)],
}
# Per BLOCK_F, with BLOCK_K no wider than BLOCK_F (built once: a Config per launch costs host time).
CONV3X3_INTERPRETER_BY_F = {block_f: _config(32, 32, min(block_f, 32), 4, 1) for block_f in CONV3X3_CONFIGS}

# pack3x3_kernel's one config, on a GPU and in the interpreter: 8 x 16 channels x 16 taps, 16 values a
# thread. 16 x 32 and 16 x 16 spilled 4 to 20 bytes (at 80 registers) on sm_90 and sm_80 (AOT check).
PACK3X3_CONFIG = triton.Config({"BLOCK_O": 8, "BLOCK_I": 16}, num_warps=4, num_stages=1)


def conv3x3_configs(block_f: int, dtype: torch.dtype) -> list:
    """The configs launched at this width: the first is the default, the rest are autotuned."""
    return (CONV3X3_FP32_CONFIGS if dtype == torch.float32 else CONV3X3_CONFIGS)[block_f]


_TUNE_KEY = ["F", "N2", "NRES", "EPI1", "HAS_SECOND", "ROW_ALIGN"]


def conv3x3_autotuner(configs: list, inplace: bool):
    """The 3x3 kernel autotuned over `configs`. The in-place group path writes over its own
    residual, so there every autotuning trial must start from it (restore_value)."""
    return triton.autotune(configs=configs, key=_TUNE_KEY, restore_value=["out_ptr"] if inplace else None)(
        conv3x3_fused_kernel)


# Keyed by (BLOCK_F, float32?, in place?).
conv3x3_tuned = {
    (block_f, fp32, inplace): conv3x3_autotuner(conv3x3_configs(block_f, torch.float32 if fp32 else None), inplace)
    for block_f in CONV3X3_CONFIGS for fp32 in (False, True) for inplace in (False, True)
}
MAX_INNER = max(CONV3X3_CONFIGS)

def fuses_second_gemm(block_f: int, dtype: torch.dtype) -> bool:
    """Whether the 1x1 after the 3x3 (expand forward, squeeze transpose backward) runs in the 3x3
    kernel's epilogue. Not for float32 at F = 256: the 3xTF32 dot splits the [BLOCK_M, 256] fp32
    operand in two and every config spilled 110 to 600 bytes (AOT check), so there the 3x3 writes
    its result and conv1x1_kernel runs the 1x1: one launch and 2F values a pixel more."""
    return not (dtype == torch.float32 and block_f > 128)


# ---- launchers ---------------------------------------------------------------------------------
def _conv3x3(x, wc_packed, bc, alpha, *, epi1, flip_taps=False, aux=None, save_mid=False, mid=None, w2=None,
             w2_transposed=False, b2=None, n2=0, res=None, res_stride=0, nres=0, out=None, out_stride=0, inplace=False,
             w3=None, b3=None, aux3=None, next_out=None):
    """Launch a 3x3 kernel over the rows of x (a channels_last (N, F, H, W) tensor); returns (mid,
    a_next): the 3x3 stage's result when saved (into `mid` when given, a tensor like x), and the next
    block's squeeze when w3 (its weight, (F, n2, 1, 1)) is given and the rows are aligned (else None:
    the next block squeezes itself). With aux3 (the previous block's saved b), w3 is that block's
    expand weight (n2, F, 1, 1) and a_next its g_b = (out W3) * ELU'(aux3) (the backward's fold).
    next_out: where to write a_next (a tensor like x), if the caller has a place. w2: the second
    GEMM's weight, (n2, F), or (F, n2) when w2_transposed."""
    n_img, inner, height, width = x.shape
    m = n_img * height * width
    block_f = next_pow2(inner)
    if save_mid and mid is None:
        mid = track(torch.empty_like(x))
    elif not save_mid:
        mid = None
    # Channel counts, strides and the offsets of the tensors read or written by rows: all multiples
    # of 16 bytes is the common case (DRN's widths are multiples of 8).
    extents = [n2, nres, res_stride, out_stride]
    extents += [t.storage_offset() for t in (res, out, w2, w3) if t is not None]
    align = row_align(x.dtype, *extents) if w2 is not None else 1
    if align == 1:  # the folded GEMM's extra accumulator only fits with aligned rows (AOT)
        w3 = b3 = aux3 = None
    a_next = None if w3 is None else next_out if next_out is not None else track(torch.empty_like(x))
    check_int32("residual_distill", m * max(inner, out_stride, res_stride), wc_packed.numel())
    alpha_hi, alpha_lo = split_alpha(alpha)
    kernel, tuned = conv3x3_fused_kernel, conv3x3_tuned[(block_f, x.dtype == torch.float32, inplace)]
    grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) if not meta["TILE_W"] else  # noqa: E731
                         n_img * cdiv(height, meta["BLOCK_M"] // meta["TILE_W"]) * cdiv(width, meta["TILE_W"]),)
    interp = CONV3X3_INTERPRETER_BY_F[block_f]
    launch(
        kernel, tuned, grid, interp,
        x_ptr=x, wc_ptr=wc_packed, bc_ptr=bc if bc is not None else wc_packed,
        aux_ptr=aux if aux is not None else x, mid_ptr=mid if mid is not None else x,
        w2_ptr=w2 if w2 is not None else wc_packed, b2_ptr=b2 if b2 is not None else wc_packed,
        res_ptr=res if res is not None else x, out_ptr=out if out is not None else x,
        w3_ptr=w3 if w3 is not None else wc_packed, b3_ptr=b3 if b3 is not None else wc_packed,
        aux3_ptr=aux3 if aux3 is not None else x, next_ptr=a_next if a_next is not None else x,
        M=m, H=height, W=width, F=inner, N2=n2 // align, NRES=nres // align, stride_rm=res_stride // align,
        stride_om=out_stride // align,
        alpha_hi=alpha_hi, alpha_lo=alpha_lo,
        FLIP_TAPS=flip_taps, EPI1=epi1, HAS_BIAS1=bc is not None, SAVE_MID=save_mid, HAS_SECOND=w2 is not None,
        HAS_BIAS2=b2 is not None, W2_TRANSPOSED=w2_transposed, HAS_NEXT=w3 is not None, HAS_BIAS3=b3 is not None,
        NEXT_GRAD=aux3 is not None,
        IS_FP64=is_fp64(x), PRECISION=dot_precision(x.dtype), ROW_ALIGN=align, BLOCK_F=block_f,
    )
    return mid, a_next


# The widths at which a block's 3x3 kernel also computes the next block's squeeze (its [BLOCK_M, F]
# fp32 accumulator beside the others): compiled without spills there (AOT); wider blocks launch
# the squeeze on its own. Every dtype fuses the second GEMM, which the fold extends, at these widths.
FOLD_MAX_F = 64


def folds_on_gpu(block_f: int, dtype: torch.dtype) -> bool:
    """Whether a GPU folds the next squeeze at this width: 16-bit storage only. On an H100 (7be7242)
    the float32 in-place group path with the fold faulted (illegal address) where every 16-bit
    group checked matched; float32 is the precision path, not the fast one, so it keeps the
    separate squeeze launch that earlier GPU runs verified."""
    return block_f <= FOLD_MAX_F and dtype in (torch.bfloat16, torch.float16)


def folds_next_squeeze(inner: int, dtype: torch.dtype, next_inner: int | None) -> bool:
    """Whether a block of inner width `inner` computes the next block's squeeze in its epilogue:
    folds_on_gpu, or any dtype under the interpreter (so that the tests run the fold in float64)."""
    block_f = next_pow2(inner)
    return next_inner == inner and (folds_on_gpu(block_f, dtype) or (KERNELS_INTERPRETED and block_f <= FOLD_MAX_F))


def _pack3x3(w, forward=True, transposed=False) -> tuple:
    """(packed, packed_t) of n 3x3 convolution weights, w an (n, F_out, F_in, 3, 3) tensor of any
    strides (a stack of weights, or a view of packed ones): packed (n, 9, F_in, F_out) tap-major, the
    forward's operand, where `forward`, and packed_t (n, 9, F_out, F_in), whose taps the kernel reads
    flipped (FLIP_TAPS) for the transposed convolution, where `transposed`; None otherwise. One
    launch for both, reading w once."""
    n, f_out, f_in = w.shape[:3]
    packed = track(torch.empty((n, 9, f_in, f_out), device=w.device, dtype=w.dtype)) if forward else None
    packed_t = track(torch.empty((n, 9, f_out, f_in), device=w.device, dtype=w.dtype)) if transposed else None
    strides = w.stride()
    check_int32("residual_distill", n * 9 * f_in * f_out, extent(w))
    tiles = cdiv(f_out, PACK3X3_CONFIG.kwargs["BLOCK_O"]) * cdiv(f_in, PACK3X3_CONFIG.kwargs["BLOCK_I"])
    launch(pack3x3_kernel, None, lambda meta: (n, tiles), PACK3X3_CONFIG, w_ptr=w,
           packed_ptr=packed if forward else packed_t, packed_t_ptr=packed_t if transposed else packed,
           F_OUT=f_out, F_IN=f_in, s_n=strides[0], s_o=strides[1], s_i=strides[2], s_kh=strides[3],
           s_kw=strides[4], FORWARD=forward, TRANSPOSED=transposed)
    return packed, packed_t


def _pack_conv(w_conv, transpose=False):
    """(F_out, F_in, 3, 3) -> [9, F_in, F_out] tap-major; transposed [9, F_out, F_in] (_pack3x3)."""
    packed, packed_t = _pack3x3(w_conv[None], not transpose, transpose)
    return (packed_t if transpose else packed)[0]


def _pack_convs(w_convs, transpose=False) -> list:
    """_pack_conv of each weight: for weights of one shape and dtype, all in one launch (_pack_stack),
    returned as [that (n, 9, ., .) stack] (its per-block slices keep the 16-byte alignment of a fresh
    tensor); otherwise one packed tensor a weight. _packed_blocks gives the per-block tensors of either."""
    if _stackable(w_convs):
        return [_pack_stack(_stacked(w_convs), not transpose, transpose)[transpose]]
    return [_pack_stack(w[None], not transpose, transpose)[transpose][0] for w in w_convs]


def _stacked(w_convs):
    """The weights as one (n, F_out, F_in, 3, 3) tensor, not differentiated: the Functions compute
    the weights' gradients themselves."""
    with torch.no_grad():
        return torch.stack(w_convs)


def _stackable(w_convs) -> bool:
    first = w_convs[0]
    shape, dtype = first.shape, first.dtype  # devices: torch.stack refuses a mix with its own error
    return len(w_convs) > 1 and first.numel() * first.element_size() % 16 == 0 and all(
        w.shape == shape and w.dtype == dtype for w in w_convs)


def _pack_stack(stack, forward=True, transposed=False) -> tuple:
    """_pack3x3(stack, forward, transposed) through a launch plan (called outside the regions of the
    Functions, whose plans take the packed weights as inputs)."""
    return planned(_pack_region, (forward, transposed), [stack])


def _pack_region(static, inputs):
    return _pack3x3(inputs[0], *static)


def pack_groups(w_convs, lengths, transposed=False) -> tuple:
    """_pack_convs of several groups' 3x3 weights in one launch (fastdrn.DRN packs a whole model's
    once a step): w_convs, every group's in order; lengths, how many each group has. Returns (packs,
    packs_t): per group [its (n, 9, F_in, F_out) slice of the stack] (a block's slice keeps the
    16-byte alignment of a fresh tensor), and with `transposed` (training) the same of the transposed
    packs its backward reads, written by the same launch (else each group's backward transposes its
    own); (None, None) where the weights are not all of one shape and dtype (then each group packs
    its own). Not differentiated: the Functions compute the weights' gradients themselves."""
    if not _stackable(w_convs):
        return None, None
    starts = [sum(lengths[:k]) for k in range(len(lengths))]

    def per_group(packed):
        return [[packed[start:start + length]] for start, length in zip(starts, lengths)]

    with direct_launches():  # eager, as the Functions launch (its callers run on the eager fast path)
        packed, packed_t = _pack_stack(_stacked(w_convs), True, transposed)
    return per_group(packed), per_group(packed_t) if transposed else None


def _as_weights(packed):
    """The (n, F_out, F_in, 3, 3) weights of packed (n, 9, F_in, F_out) ones, as a view."""
    return packed.unflatten(1, (3, 3)).permute(0, 4, 3, 1, 2)


def _transposed_packs(packs, first=0) -> list:
    """_pack_convs(w_convs[first:], transpose=True) from packs = _pack_convs(w_convs), in the same
    stacked or per-block form, read from the packs themselves (no stack of the weights again)."""
    if len(packs) == 1 and packs[0].dim() == 4:
        return [_pack_stack(_as_weights(packs[0][first:]), False, True)[1]]
    return [_pack_stack(_as_weights(p[None]), False, True)[1][0] for p in packs[first:]]


def _packed_blocks(packs) -> list:
    """Each block's packed 3x3 weight from what _pack_convs returned. Inside a planned region the
    slices of a stack are views of its input: a replay adds their offsets to its address instead of
    making them (10 us a group)."""
    return list(packs[0].unbind()) if len(packs) == 1 and packs[0].dim() == 4 else list(packs)


def _squeeze(z, z_stride, w_squeeze, b_squeeze, alpha, out=None):
    return conv1x1(z, z_stride, w_squeeze, False, b_squeeze, EPILOGUE_ELU, alpha, out=out,
                   out_stride=None if out is None else out.shape[1])


def _forward_into(z, z_stride, out, out_stride, w_squeeze, b_squeeze, w_conv, b_conv, w_expand, b_expand, alpha,
                  save_b, inplace, a=None, next_squeeze=(None, None), wc_packed=None, b=None, a_out=None,
                  next_out=None):
    """One block from rows of z (D channels) into rows of out (D + d channels). a: this block's
    squeeze when the previous block computed it (else it is computed here, into a_out if given);
    next_squeeze: the next block's (w_squeeze, b_squeeze), folded into this block's 3x3 epilogue
    where folds_next_squeeze allows (into next_out if given); wc_packed: _pack_conv(w_conv) when the
    caller has it; b: where to save b, if the caller has a place (channels_last (N, F, H, W)).
    Returns (b when saved, the next block's a when folded)."""
    d_in, inner = w_squeeze.shape[1], w_squeeze.shape[0]
    if wc_packed is None:
        wc_packed = _pack_conv(w_conv)
    if a is None:
        a = _squeeze(z, z_stride, w_squeeze, b_squeeze, alpha, out=a_out)
    if not fuses_second_gemm(next_pow2(inner), z.dtype):
        b, _ = _conv3x3(a, wc_packed, b_conv, alpha, epi1=EPI_ELU, save_mid=True, mid=b)
        conv1x1(b, inner, w_expand, False, b_expand, EPILOGUE_LINEAR, alpha, res=z, res_stride=z_stride,
                out=out, out_stride=out_stride, n_res=d_in)
        return (b if save_b else None), None
    w3, b3 = next_squeeze
    if w3 is not None and not folds_next_squeeze(inner, z.dtype, w3.shape[0]):
        w3 = b3 = None
    return _conv3x3(a, wc_packed, b_conv, alpha, epi1=EPI_ELU, save_mid=save_b, mid=b,
                    w2=w_expand, b2=b_expand, n2=w_expand.shape[0],
                    res=z, res_stride=z_stride, nres=d_in, out=out, out_stride=out_stride, inplace=inplace,
                    w3=w3, b3=b3, next_out=next_out)


def _forward(z, w_squeeze, b_squeeze, w_conv, b_conv, w_expand, b_expand, alpha, save_b, a=None,
             w_squeeze_next=None, b_squeeze_next=None, wc_packed=None, out=None, b=None, a_out=None,
             next_out=None):
    """Returns (out, b or empty, the next block's a or empty). wc_packed: _pack_conv(w_conv), if the
    caller has it; out and b: where to write them (channels_last), if the caller has a place; a_out
    and next_out: where this block's squeeze and the next block's go (_forward_into)."""
    z = rows(z)
    n_img, d_in, height, width = z.shape
    n_out = w_expand.shape[0]
    if out is None:
        out = track(torch.empty((n_img, n_out, height, width), device=z.device, dtype=z.dtype,
                                memory_format=torch.channels_last))
    b, a_next = _forward_into(z, d_in, out, n_out, w_squeeze, b_squeeze, w_conv, b_conv, w_expand, b_expand, alpha,
                              save_b, inplace=False, a=a if a is not None and a.numel() else None,
                              next_squeeze=(w_squeeze_next, b_squeeze_next), wc_packed=wc_packed, b=b, a_out=a_out,
                              next_out=next_out)
    # Two separate empties: a custom op's outputs must not alias one another.
    return out, (b if b is not None else track(z.new_empty(0))), (a_next if a_next is not None else track(z.new_empty(0)))


def _backward(grad, z, b, w_squeeze, b_squeeze, w_conv, b_conv, w_expand, b_expand, alpha, wc_packed=None,
              wc_packed_t=None):
    """dz and the six weight and bias gradients (dz, dW_sq, db_sq, dW_c, db_c, dW_e, db_e).
    wc_packed, wc_packed_t: _pack_conv(w_conv) (read only to rebuild b) and _pack_conv(w_conv,
    transpose=True), if the caller has them."""
    dz, problems, _ = _backward_input(grad, z, b, w_squeeze, b_squeeze, w_conv, b_conv, w_expand, alpha, wc_packed,
                                      wc_packed_t)
    return (dz, *_block_weight_grads(weight_grads(*problems)))


def _block_weight_grads(grads) -> tuple:
    """(dW_sq, db_sq, dW_c, db_c, dW_e, db_e) from weight_grads' results for a block's problems."""
    (dw_e, db_e), (dw_c, db_c), (dw_sq, db_sq) = grads
    return dw_sq, db_sq, dw_c, db_c, dw_e, db_e


def _backward_input(grad, z, b, w_squeeze, b_squeeze, w_conv, b_conv, w_expand, alpha, wc_packed=None,
                    wc_packed_t=None, a=None, g_b=None, previous=None):
    """A block's backward up to its weight gradients: (dz, the block's three weight_grads problems:
    expand, 3x3, squeeze, the previous block's g_b or None). Two launches (pair, 3x3); the caller
    launches the weight gradients, of this block alone or together with its neighbours'
    (weight_grad_blocks). With fold_backward: a, this block's squeeze as the forward saved it; g_b,
    this block's as the next block's kernel computed it (else one 1x1 launch here); previous, the
    previous block's (w_expand, saved b), whose g_b this block's 3x3 kernel then computes from dz
    where the rows allow (_conv3x3), so a block is one launch."""
    grad, z = rows(grad), rows(z)
    if wc_packed_t is None:
        wc_packed_t = _pack_conv(w_conv, transpose=True)
    d_in, n_out = z.shape[1], w_expand.shape[0]
    if a is not None:  # saved by the forward (fold_backward), and so is b
        if g_b is None:
            g_b = conv1x1(grad, n_out, w_expand, True, None, EPILOGUE_TIMES_ELU_GRAD_OF_RES, alpha,
                          res=b, res_stride=b.shape[1])
    elif b is None or b.numel() == 0:  # recompute=True: b was not saved; rebuild it from a first
        a = _squeeze(z, d_in, w_squeeze, b_squeeze, alpha)
        b, _ = _conv3x3(a, _pack_conv(w_conv) if wc_packed is None else wc_packed, b_conv, alpha, epi1=EPI_ELU,
                        save_mid=True)
        g_b = conv1x1(grad, n_out, w_expand, True, None, EPILOGUE_TIMES_ELU_GRAD_OF_RES, alpha,
                      res=b, res_stride=b.shape[1])
    else:  # a and g_b, two 1x1 products, in one launch
        a, g_b = conv1x1_pair(
            dict(x=z, x_stride=d_in, w=w_squeeze, transpose_w=False, bias=b_squeeze, epilogue=EPILOGUE_ELU),
            dict(x=grad, x_stride=n_out, w=w_expand, transpose_w=True, bias=None,
                 epilogue=EPILOGUE_TIMES_ELU_GRAD_OF_RES, res=b, res_stride=b.shape[1]),
            alpha)
    inner = a.shape[1]
    g_b_previous = None
    if fuses_second_gemm(next_pow2(inner), z.dtype):
        dz = track(torch.empty_like(z))
        w3, aux3 = previous if previous is not None else (None, None)
        g_a, g_b_previous = _conv3x3(g_b, wc_packed_t, None, alpha, epi1=EPI_TIMES_ELU_GRAD_OF_AUX,
                                     flip_taps=True, aux=a, save_mid=True, w2=w_squeeze, w2_transposed=True, n2=d_in,
                                     res=grad, res_stride=n_out, nres=d_in, out=dz, out_stride=d_in, w3=w3, aux3=aux3)
    else:
        g_a, _ = _conv3x3(g_b, wc_packed_t, None, alpha, epi1=EPI_TIMES_ELU_GRAD_OF_AUX,
                          flip_taps=True, aux=a, save_mid=True)
        dz = conv1x1(g_a, inner, w_squeeze, True, None, EPILOGUE_LINEAR, alpha, res=grad, res_stride=n_out)
    return dz, ((grad, n_out, b, inner, n_out, inner, 1, w_expand),
                (g_b, inner, a, inner, inner, inner, 9, w_conv),
                (g_a, inner, z, d_in, inner, d_in, 1, w_squeeze)), g_b_previous


def _group_forward(buffer, weights, alpha, compress=None, packs=None, signature=None):
    """Blocks in place over one channels_last buffer of width C + K*d; weights holds 6 tensors per
    block (w_squeeze, b_squeeze, w_conv, b_conv, w_expand, b_expand). Block k reads channels
    [0, D_k) and writes [0, D_k + d_k) of the same pixel rows: the residual add is read and written
    by one program, so no concat copy and no second buffer exist. Each block's 3x3 kernel also
    computes the next block's squeeze from the output rows it stores (folds_next_squeeze). Eager
    calls replay a launch plan (kernels/plans.py). compress: (w, b, skip) of the group's compression,
    run in the same plan on the buffer: then its output is returned. packs: _pack_convs(the blocks'
    3x3 weights), if the caller has them (pack_groups). signature: plans.checked_signature of
    [the group's input, *weights, *compress[:2]] (fastdrn.ops), if the caller has it; the input is
    compress's skip where there is one."""
    if packs is None:
        packs = _pack_convs(weights[2::6])  # derived from the weights: not in the plan's signature
    compress = tuple(compress or ())
    if signature is not None:
        # The plan keys [buffer, *weights, *compress]: the buffer's layout, then the caller's key
        # (which reads the input once, as the skip, and the weights); the same tensors' pointers in
        # the plan's order, the input last where it is the skip.
        (key, addresses), (buffer_key, buffer_pointer) = signature, tensor_signature([buffer])
        signature = (buffer_key, key), buffer_pointer + addresses[1:] + (addresses[:1] if compress else ())
    return planned(_group_forward_region, (alpha, len(weights) // 6, len(compress)),
                   [buffer, *weights, *compress, *packs], keyed=1 + len(weights) + len(compress),
                   signature=signature)


def _group_forward_region(static, inputs):
    (alpha, n_blocks, n_compress), buffer = static, inputs[0]
    weights = inputs[1:1 + 6 * n_blocks]
    compress = inputs[1 + 6 * n_blocks:1 + 6 * n_blocks + n_compress]
    packed = _packed_blocks(inputs[1 + 6 * n_blocks + n_compress:])
    stride = buffer.shape[1]
    a = None
    for k, i in enumerate(range(0, len(weights), 6)):
        w_squeeze, b_squeeze, w_conv, b_conv, w_expand, b_expand = weights[i:i + 6]
        next_squeeze = tuple(weights[i + 6:i + 8]) if i + 6 < len(weights) else (None, None)
        _, a = _forward_into(buffer, stride, buffer, stride, w_squeeze, b_squeeze, w_conv, b_conv, w_expand, b_expand,
                             alpha, save_b=False, inplace=True, a=a, next_squeeze=next_squeeze, wc_packed=packed[k])
    return _compress_forward(buffer, *compress, alpha) if compress else None


def _saved_views(arena, like, w_squeezes, w_expands, compression, z_in_arena, save_b, save_a=False):
    """The activations a group's backward reads, as channels_last views of one allocation (`arena`;
    None: allocated here): one tensor to allocate, save and check instead of two a block.
    The pieces, in order: the first block's input when an earlier block made it (z_in_arena), then
    per block its b (save_b), its a (save_a: fold_backward) and its output, but the last block's
    only when the compression reads it (else it is the group's result). like: a tensor of the group's N, H, W and dtype; w_squeezes,
    w_expands: those weights of each block from the first that needs a gradient; compression: its
    (w, b), or nothing. Each piece starts at a multiple of 256 bytes, so it has the alignment of a
    fresh tensor (the launchers read storage offsets). Returns (arena, the views)."""
    n_img, _, height, width = like.shape
    pixels, unit = n_img * height * width, max(1, 256 // like.element_size())
    n_blocks = len(w_squeezes)
    channels = [w_squeezes[0].shape[1] if w_squeezes else compression[0].shape[1]] if z_in_arena else []
    for k in range(n_blocks):
        channels += [w_squeezes[k].shape[0]] * (save_b + save_a)
        if k < n_blocks - 1 or compression:
            channels.append(w_expands[k].shape[0])
    offsets, length = [], 0
    for c in channels:
        offsets.append(length)
        length += -(-pixels * c // unit) * unit
    if arena is None:
        arena = track(torch.empty(length, device=like.device, dtype=like.dtype))
    # From the arena's own start: a saved_tensors_hooks unpack may hand it back at a storage offset.
    start = arena.storage_offset()
    return arena, [arena.as_strided((n_img, c, height, width), (height * width * c, 1, width * c, c), start + offset)
                   for c, offset in zip(channels, offsets)]


def dense_as_read(tensors: list, per_block: int = 6) -> list:
    """Blocks' tensors, per_block a block with the 3x3 weight third (the 6 given, or the 4 or 5 of
    _read_by_backward), as the kernels read them: the 1x1 weights and the biases dense (t itself
    where it is: no copy, no autograd node; else a copy autograd differentiates back to t); the 3x3
    weights as given, since they are packed tap-major from any layout (and a channels_last one gets
    its gradient in that layout). None, an absent bias, stays None."""
    return [t if t is None or i % per_block == 2 else t.contiguous() for i, t in enumerate(tensors)]


def _read_by_backward(weights, save_b) -> list:
    """Of the 6 tensors of each block, those its backward reads: w_squeeze, b_squeeze (a is
    recomputed), w_conv, b_conv only to rebuild b (not save_b), and w_expand; b_expand never (as
    PyTorch's convolution saves no bias). Saving fewer tensors is less host work each way."""
    if save_b:
        return [t for i in range(0, len(weights), 6) for t in (*weights[i:i + 3], weights[i + 4])]
    return [t for i in range(0, len(weights), 6) for t in weights[i:i + 5]]


def _chain_forward_region(static, inputs):
    """A group's blocks forward for training (_EagerDistillGroup): inputs are z, the 6 tensors of each
    block, the compression's (w, b) when n_compress = 2, and each block's packed 3x3 weight. Returns
    (the last output, or the compression's of it with z as the skip; what the backward reads: z when
    `first` is 0, then the activations of _saved_views in one tensor). save_a (fold_backward): each
    block's a is saved too, written where the backward reads it by its own squeeze or, folded, by
    the previous block's kernel."""
    alpha, first, save_b, save_a, n_blocks, n_compress = static
    z = inputs[0]
    weights = inputs[1:1 + 6 * n_blocks]
    compression = inputs[1 + 6 * n_blocks:1 + 6 * n_blocks + n_compress]
    packed = _packed_blocks(inputs[1 + 6 * n_blocks + n_compress:])
    # Block `first`'s input is an earlier block's output, saved with the rest, unless it is the result.
    z_in_arena = 0 < first and (first < n_blocks or n_compress > 0)
    arena, views = _saved_views(None, z, weights[6 * first::6], weights[6 * first + 4::6], compression, z_in_arena,
                                save_b, save_a)
    views = iter(views)
    bs, a_saved, outs = [None] * n_blocks, [None] * (n_blocks + 1), [None] * n_blocks
    for k in range(n_blocks):  # in _saved_views' order
        if k == first - 1 and (k < n_blocks - 1 or compression):  # z_in_arena
            outs[k] = next(views)
        if k >= first:
            bs[k] = next(views) if save_b else None
            a_saved[k] = next(views) if save_a else None
            outs[k] = next(views) if k < n_blocks - 1 or compression else None
    a = None
    for k, i in enumerate(range(0, len(weights), 6)):
        w_squeeze_next, b_squeeze_next = weights[i + 6:i + 8] if i + 6 < len(weights) else (None, None)
        z, _b, a = _forward(z, *weights[i:i + 6], alpha, save_b and k >= first, a, w_squeeze_next, b_squeeze_next,
                            wc_packed=packed[k], out=outs[k], b=bs[k], a_out=a_saved[k], next_out=a_saved[k + 1])
    if compression:
        z = _compress_forward(z, *compression, inputs[0], alpha)
    return z, ([inputs[0]] if first == 0 else []) + [arena]


def _chain_backward_region(static, inputs):
    """The backward of _chain_forward_region's blocks from `first`, and of its compression (if any)
    before them: inputs are the output gradient, the group's input z (None when `first` > 0: then the
    first block's input is saved with the rest), each block's tensors its backward reads
    (_read_by_backward), the compression's (w, b), the forward's saved activations (_saved_views),
    the transposed packed 3x3 weights (n_packs_t tensors, _pack_convs) and, where b was not saved,
    each block's forward packed weight. Returns (the gradient at the first block's input, without the
    long skip's; the 6 weight and bias gradients of each block, then the compression's 2). save_a
    (fold_backward): each block's a was saved, and each block's input-gradient kernel computes the
    previous block's g_b where folds_next_squeeze allows."""
    alpha, n_blocks, n_packs_t, save_b, save_a, n_compress = static
    per_block = 4 if save_b else 5
    grad, z, weights = inputs[0], inputs[1], inputs[2:2 + per_block * n_blocks]
    compression = inputs[2 + per_block * n_blocks:2 + per_block * n_blocks + n_compress]
    arena = inputs[2 + per_block * n_blocks + n_compress]
    packs = inputs[3 + per_block * n_blocks + n_compress:]
    packed_t = _packed_blocks(packs[:n_packs_t]) if n_packs_t else []
    packed = packs[n_packs_t:] or [None] * n_blocks
    views = iter(_saved_views(arena, grad, weights[::per_block], weights[per_block - 1::per_block], compression,
                              z is None, save_b, save_a)[1])
    inputs_k, bs, a_saved = [z if z is not None else next(views)], [], []
    for k in range(n_blocks):
        bs.append(next(views) if save_b else None)
        a_saved.append(next(views) if save_a else None)
        if k < n_blocks - 1 or compression:
            inputs_k.append(next(views))
    grads = [None] * (6 * n_blocks)
    if compression:
        grad, dw, db = _compress_backward(grad, inputs_k[-1], *compression, alpha)
        grads += (dw, db)
    # The weight gradients of up to weight_grad_blocks consecutive blocks (from the last) share one
    # launch and one sum: their problems wait in `pending` until then.
    window, pending, g_b = launch_options().weight_grad_blocks, [], None
    for k in reversed(range(n_blocks)):
        w_squeeze, b_squeeze, w_conv, *b_conv, w_expand = weights[per_block * k:per_block * (k + 1)]
        previous = None
        if save_a and k > 0 and folds_next_squeeze(weights[per_block * (k - 1)].shape[0], grad.dtype,
                                                   w_squeeze.shape[0]):
            previous = (weights[per_block * k - 1], bs[k - 1])  # block k-1's w_expand and saved b
        grad, problems, g_b = _backward_input(grad, inputs_k[k], bs[k], w_squeeze, b_squeeze, w_conv,
                                              b_conv[0] if b_conv else None, w_expand, alpha, packed[k], packed_t[k],
                                              a=a_saved[k], g_b=g_b, previous=previous)
        pending.append((k, problems))
        if len(pending) == window or k == 0:
            results = weight_grads(*(problem for _k, problems in pending for problem in problems))
            for j, (block, _problems) in enumerate(pending):
                grads[6 * block:6 * block + 6] = _block_weight_grads(results[3 * j:3 * j + 3])
            pending = []
    return grad, grads


# ---- registered ops and autograd -----------------------------------------------------------------
@triton_op("fastdrn::residual_distill", mutates_args={})
def residual_distill_op(z: torch.Tensor, w_squeeze: torch.Tensor, b_squeeze: torch.Tensor | None,
                        w_conv: torch.Tensor, b_conv: torch.Tensor | None, w_expand: torch.Tensor,
                        b_expand: torch.Tensor | None, alpha: float, save_b: bool, a: torch.Tensor | None,
                        w_squeeze_next: torch.Tensor | None,
                        b_squeeze_next: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, b, a_next): b = ELU(conv3x3(a)) when save_b (kept for backward), else empty; a:
    this block's squeeze when the previous block folded it (None or empty: computed here); a_next:
    the next block's squeeze when w_squeeze_next is given and folds_next_squeeze holds, else empty.
    a and a_next are forward-time values only: the backward recomputes a from z."""
    return _forward(z, w_squeeze, b_squeeze, w_conv, b_conv, w_expand, b_expand, alpha, save_b, a, w_squeeze_next,
                    b_squeeze_next)


@triton_op("fastdrn::residual_distill_backward", mutates_args={})
def residual_distill_backward_op(
    grad: torch.Tensor, z: torch.Tensor, b: torch.Tensor, w_squeeze: torch.Tensor, b_squeeze: torch.Tensor | None,
    w_conv: torch.Tensor, b_conv: torch.Tensor | None, w_expand: torch.Tensor, b_expand: torch.Tensor | None,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of z, w_squeeze, b_squeeze, w_conv, b_conv, w_expand, b_expand (b empty: recompute it)."""
    return _backward(grad, z, b, w_squeeze, b_squeeze, w_conv, b_conv, w_expand, b_expand, alpha)


@triton_op("fastdrn::residual_distill_group_", mutates_args={"buffer"})
def residual_distill_group_op(buffer: torch.Tensor, weights: list[torch.Tensor | None], alpha: float) -> None:
    """Inference: run blocks in place over one channels_last buffer of width C + K*d (_group_forward).
    weights: 6 a block, biases None where a block has none."""
    _group_forward(buffer, weights, alpha)


def _setup_context(ctx, inputs, output):
    z, w_squeeze, b_squeeze, w_conv, b_conv, w_expand, b_expand, alpha, _save_b, *_folded = inputs
    _out, b, a_next = output
    ctx.mark_non_differentiable(b, a_next)
    ctx.save_for_backward(z, b, w_squeeze, b_squeeze, w_conv, b_conv, w_expand, b_expand)
    ctx.alpha = alpha
    ctx.has_bias = (b_squeeze is not None, b_conv is not None, b_expand is not None)


def _input_grads(ctx, grad, backward):
    """Gradients for the op's inputs from backward(grad, z, b, *weights, alpha) (the registered
    backward op, or _backward itself on the eager path); None for absent biases and the scalars."""
    if torch.is_grad_enabled():
        raise RuntimeError("fastdrn residual_distill: double backward (create_graph=True) is not supported")
    z, b, *weights = ctx.saved_tensors
    check_saved("residual_distill", (z, b, *weights), grad)
    # A saved_tensors_hooks unpack may hand them back in another layout (save_on_cpu: NCHW): the
    # kernels read b as pixel rows.
    if b.dim() == 4:
        b = rows(b)
    weights = dense_as_read(weights)
    dz, dw_sq, db_sq, dw_c, db_c, dw_e, db_e = backward(grad, z, b, *weights, ctx.alpha)
    has_sq, has_c, has_e = ctx.has_bias
    # None for alpha, save_b and the folded squeeze's inputs (a, w_squeeze_next, b_squeeze_next):
    # the next block's own backward gives its squeeze weights their gradients.
    return (dz, dw_sq, db_sq if has_sq else None, dw_c, db_c if has_c else None, dw_e, db_e if has_e else None,
            None, None, None, None, None)


def _autograd_backward(ctx, grad, _grad_b, _grad_a_next):
    return _input_grads(ctx, grad, residual_distill_backward_op)


residual_distill_op.register_autograd(_autograd_backward, setup_context=_setup_context)


class _EagerResidualDistill(torch.autograd.Function):
    """The registered op's forward and backward without the custom-op dispatch (eager_fast_path):
    the same launchers, the same saved tensors, the same gradients."""

    @staticmethod
    def forward(ctx, z, w_squeeze, b_squeeze, w_conv, b_conv, w_expand, b_expand, alpha, save_b, a, w_squeeze_next,
                b_squeeze_next):
        inputs = (z, w_squeeze, b_squeeze, w_conv, b_conv, w_expand, b_expand, alpha, save_b, a, w_squeeze_next,
                  b_squeeze_next)
        with direct_launches():
            out, b, a_next = planned(_block_forward_region, (alpha, save_b),
                                     [z, w_squeeze, b_squeeze, w_conv, b_conv, w_expand, b_expand, a, w_squeeze_next,
                                      b_squeeze_next])
        _setup_context(ctx, inputs, (out, b, a_next))
        return out, a_next

    @staticmethod
    def backward(ctx, grad, _grad_a_next):
        check_unbatched("residual_distill", grad)
        with direct_launches():
            return _input_grads(ctx, grad, _planned_backward)


# The 3x3 weight is packed inside these regions (_pack3x3 is a launch like the others).
def _block_forward_region(static, inputs):
    alpha, save_b = static
    return _forward(*inputs[:7], alpha, save_b, *inputs[7:])


def _block_backward_region(static, inputs):
    return _backward(*inputs, static[0])


def _planned_backward(grad, z, b, *weights_and_alpha):
    """_backward through a launch plan."""
    *weights, alpha = weights_and_alpha
    return planned(_block_backward_region, (alpha,), [rows(grad), z, b, *weights])


def _chain_forward_saving(z, weights, compression, packs, alpha, first, save_b, save_a, signature, z_key):
    """A group's planned forward as its autograd node runs it: (out, the tensors to save, where they
    are). Saved: z (where block 0 needs a gradient) and the activations (one tensor), then the
    weights the backward reads (_read_by_backward), then the compression's (w, b); where they are:
    the addresses of all but the activations, and z's layout (z_key, its tensor_signature key), which
    _chain_backward_planned compares with the saved z's."""
    out, activations = planned(_chain_forward_region, (alpha, first, save_b, save_a, len(weights) // 6,
                                                       len(compression)),
                               [z, *weights, *compression, *packs],
                               keyed=1 + len(weights) + len(compression), signature=signature)  # packs follow
    read = _read_by_backward(weights[6 * first:], save_b)
    return (out, [*activations, *read, *compression],
            (pointers([None if first else z, *read, *compression]), None if first else z_key))


def _chain_backward_planned(grad, saved, n_blocks, first, n_compress, alpha, save_b, save_a, packs, packs_t,
                            forward_key, saved_where):
    """A group's planned backward from what _chain_forward_saving saved (of `n_blocks` blocks, from
    block `first`): (the input's gradient, without the long skip's share, or None where z needs none;
    the gradients of the weights from block `first` on and of the compression). packs, packs_t: the
    forward's packed 3x3 weights and the transposed ones (None: transposed here). The plan is keyed
    by the forward's key where the saved tensors are still the forward's (saved_where, from
    _chain_forward_saving): the backward then reads their addresses, not their whole layout again
    (58 tensors a group, ~35 us)."""
    z, arena = (None, saved[0]) if first else saved[:2]
    check_saved("residual_distill", (arena,), grad)
    arena = arena.contiguous()  # as _saved_views carves it, whatever layout a saved_tensors_hooks unpack gave it
    weights = saved[2 - bool(first):len(saved) - n_compress]
    compression = saved[len(saved) - n_compress:]
    addresses = pointers([z, *weights, *compression])
    saved_pointers, z_key = saved_where
    if addresses != saved_pointers:
        # Not the forward's tensors (a saved_tensors_hooks unpack made them), maybe in another layout.
        check_saved("residual_distill", saved, grad)
        weights = dense_as_read(weights, 4 if save_b else 5)
        compression = [t if t is None else t.contiguous() for t in compression]
    n_blocks -= first
    if not n_blocks:
        packs_t = []
    elif packs_t is not None:
        packs_t = [packs_t[0][first:]]
    else:
        packs_t = _transposed_packs(packs, first)
    # Keyed: the gradient, z and the weights; the saved activations and the packed weights are what
    # the planned forward and _pack_convs made of those. save_b is static: whether b was saved is
    # also in the activations' layout. The forward's packed weights go in block by block (from
    # `first`): how the forward packed them also depends on blocks before `first`, which the key
    # does not read.
    packed = [] if save_b else _packed_blocks(packs)[first:]
    signature = None
    # The forward's tensors, whose layouts its key holds: each at its address, and z in its layout too (an
    # activation: a saved_tensors_hooks pair may free it and hand back a copy where the allocator put it).
    if forward_key is not None and addresses == saved_pointers and (z is None or tensor_signature([z])[0] == z_key):
        grad_key, grad_pointer = tensor_signature([grad])
        signature = (forward_key, first, grad_key), grad_pointer + addresses
    grad_in, grads = planned(
        _chain_backward_region, (alpha, n_blocks, len(packs_t), save_b, save_a, n_compress),
        [grad, z, *weights, *compression, arena, *packs_t, *packed],
        keyed=2 + len(weights) + n_compress, signature=signature)
    return (None if first else grad_in), grads


def _checked_grad_rows(grad):
    """A group node's output gradient as pixel rows, refused where the backward cannot take it."""
    if torch.is_grad_enabled():
        raise RuntimeError("fastdrn residual_distill: double backward (create_graph=True) is not supported")
    check_unbatched("residual_distill", grad)
    return rows(grad)


class _EagerDistillGroup(torch.autograd.Function):
    """A group's chain of blocks, and its compression, as one autograd node (eager_fast_path): per
    block the same _forward and _backward as _EagerResidualDistill, with the same folded squeeze,
    saved tensors and gradients, and compress_skip's, but one Function's host cost a group instead
    of one a block and one more for the compression.

    apply(alpha, first, save_b, n_compress, signature, packs, packs_t, z, *weights, *compression): weights
    holds 6 tensors a block (biases may be None); compression is the group's (w, b), with z as its
    skip, when n_compress is 2 (then the node returns the compression's output), or nothing;
    signature, packs and packs_t: residual_distill_chain's. Blocks before `first` need no gradient (nothing
    they read requires one), so they save nothing and their backward is not run, as their
    per-block Functions would not be recorded."""

    @staticmethod
    def forward(ctx, alpha, first, save_b, n_compress, signature, packs, packs_t, z, *tensors):
        weights, compression = tensors[:len(tensors) - n_compress], tensors[len(tensors) - n_compress:]
        with direct_launches():
            if packs is None:
                packs = _pack_convs(weights[2::6])
            # fold_backward: a saved too (F values a pixel a block), so the backward has no pair kernel.
            save_a = save_b and launch_options().fold_backward
            z_key = None if first else tensor_signature([z])[0]
            out, saved, where = _chain_forward_saving(z, weights, compression, packs, alpha, first, save_b, save_a,
                                                      signature, z_key)
        ctx.save_for_backward(*saved)
        ctx.alpha, ctx.first, ctx.save_b, ctx.save_a, ctx.n_compress = alpha, first, save_b, save_a, n_compress
        ctx.n_blocks = len(weights) // 6
        ctx.forward_key = None if signature is None else signature[0]
        ctx.saved_where = where
        # Kept for the backward (9 F^2 values a block): without packs_t its transposed packs are one
        # launch on these (no stack of the weights again), and rebuilding b (recompute) reads them.
        # w_conv itself is saved, so changing it in place before backward still raises.
        ctx.packs, ctx.packs_t = packs, packs_t
        # Which weights are present (None: all, as the signature's pointers show where there is one).
        all_present = signature is not None and len(signature[1]) == 1 + len(tensors)
        ctx.present = None if all_present else [t is not None for t in tensors]
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = _checked_grad_rows(grad)
        with direct_launches():
            grad_in, grads = _chain_backward_planned(
                grad, ctx.saved_tensors, ctx.n_blocks, ctx.first, ctx.n_compress, ctx.alpha, ctx.save_b, ctx.save_a,
                ctx.packs, ctx.packs_t, ctx.forward_key, ctx.saved_where)
        grads = [None] * (6 * ctx.first) + grads
        if grad_in is not None and ctx.n_compress:  # the long skip's share: the node's own output gradient
            grad_in = grad_in.add_(grad)
        # None for the scalars and absent biases.
        if ctx.present is None:
            return (None, None, None, None, None, None, None, grad_in, *grads)
        return (None, None, None, None, None, None, None, grad_in,
                *(g if has else None for g, has in zip(grads, ctx.present)))


class _EagerDistillGroups(torch.autograd.Function):
    """Every group of a model's body, each with its compression and long skip, as one autograd node:
    per group what _EagerDistillGroup does with `first` 0, all biases present and the compression
    (the same planned regions, saved tensors and gradients), but one Function's apply, context and
    backward call for the body instead of one a group.

    apply(alpha, save_b, sizes, whole, check, packs, packs_t, z, *tensors): tensors holds each
    group's 6 tensors a block then its compression's (w, b); sizes, each group's block count; whole,
    plans.checked_signature(tensors), all present; check(k, y, y_key), the op layer's input checks of
    group k for its input y; packs and packs_t, pack_groups' for every group. z requires a gradient,
    so every block needs one."""

    @staticmethod
    def forward(ctx, alpha, save_b, sizes, whole, check, packs, packs_t, z, *tensors):
        number, addresses = whole
        save_a = save_b and launch_options().fold_backward
        saved, keys, saved_where, start = [], [], [], 0
        with direct_launches():
            for k, n_blocks in enumerate(sizes):
                end = start + 6 * n_blocks + 2
                y_key, y_pointer = tensor_signature([z])
                check(k, z, y_key)
                for w_squeeze in tensors[start:end - 2:6]:
                    _check_inner(w_squeeze.shape[0])
                # Keyed by the whole body's signature, the group's place in it and its input's layout.
                key = (number, k, y_key)
                z, group_saved, group_where = _chain_forward_saving(
                    z, tensors[start:end - 2], tensors[end - 2:end], packs[k], alpha, 0, save_b, save_a,
                    (key, y_pointer + addresses[start:end]), y_key)
                saved += group_saved
                keys.append(key)
                saved_where.append(group_where)
                start = end
        ctx.save_for_backward(*saved)
        ctx.alpha, ctx.save_b, ctx.save_a, ctx.sizes = alpha, save_b, save_a, sizes
        ctx.keys, ctx.saved_where, ctx.packs, ctx.packs_t = keys, saved_where, packs, packs_t
        return z

    @staticmethod
    def backward(ctx, grad):
        grad = _checked_grad_rows(grad)
        saved, sizes = ctx.saved_tensors, ctx.sizes
        per_block = 4 if ctx.save_b else 5  # the weights _read_by_backward keeps a block
        ends, end = [], 0  # each group's saved tensors: z, the activations, the weights read, (w, b)
        for n_blocks in sizes:
            end += 2 + per_block * n_blocks + 2
            ends.append(end)
        grads = [None] * len(sizes)
        with direct_launches():
            for k in reversed(range(len(sizes))):
                grad_in, grads[k] = _chain_backward_planned(
                    grad, saved[ends[k - 1] if k else 0:ends[k]], sizes[k], 0, 2, ctx.alpha, ctx.save_b, ctx.save_a,
                    ctx.packs[k], ctx.packs_t[k], ctx.keys[k], ctx.saved_where[k])
                grad = grad_in.add_(grad)  # the long skip's share
        return (None, None, None, None, None, None, None, grad, *(g for group in grads for g in group))


# The Functions' apply without its Python layer (kernels/_common.py function_apply).
_apply_block, _apply_group = function_apply(_EagerResidualDistill), function_apply(_EagerDistillGroup)
_apply_groups = function_apply(_EagerDistillGroups)


# ---- public functions ----------------------------------------------------------------------------
def _check_inner(inner: int) -> None:
    if inner > MAX_INNER:
        raise ValueError(f"residual_distill: the fused kernels keep a row of F channels in registers and support "
                         f"F <= {MAX_INNER}; got F = {inner} (use FASTDRN_BACKEND=torch for wider blocks)")


def _block(z, block, alpha, recompute, a=None, next_squeeze=(None, None)):
    """One block through the eager Function or the registered op; returns (out, the next block's a)."""
    _check_inner(block[0].shape[0])
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (z, *block))
    args = (z, *block, float(alpha), needs_grad and not recompute, a, *next_squeeze)
    if eager_fast_path():
        return _apply_block(*args)
    out, _b, a_next = residual_distill_op(*args)
    return out, a_next


def residual_distill(z, w_squeeze, b_squeeze, w_conv, b_conv, w_expand, b_expand, alpha=0.2, recompute=False):
    """The fused block (inputs checked by fastdrn.ops). recompute=True saves z alone for backward."""
    return _block(z, (w_squeeze, b_squeeze, w_conv, b_conv, w_expand, b_expand), alpha, recompute)[0]


def residual_distill_chain(z, weights, alpha=0.2, recompute=False, compress=(), signature=None, packs=None,
                           packs_t=None):
    """A group's blocks one after another (inputs checked by fastdrn.ops; weights: the 6 tensors of
    each block, (w_squeeze, b_squeeze, w_conv, b_conv, w_expand, b_expand), in one flat list), each
    block's 3x3 kernel also computing the next block's squeeze (folds_next_squeeze): one launch a
    block forward after the first. Gradients as for the blocks called one by one. compress: the
    group's compression (w, b), run on the last output with z as the skip; its output is returned.
    Eager: one autograd Function for the group and its compression (_EagerDistillGroup); traced:
    the registered ops block by block, then compress_skip. signature: plans.checked_signature of
    [z, *weights, *compress], if the caller has it (the forward's launch plan is keyed by it);
    packs: _pack_convs(the blocks' 3x3 weights), if the caller has them (pack_groups), and packs_t
    the same transposed (pack_groups(..., transposed=True)), for the backward."""
    compress = tuple(compress)
    if eager_fast_path():
        for w_squeeze in weights[::6]:
            _check_inner(w_squeeze.shape[0])
        first = len(weights) // 6  # the first block that needs a gradient (reads a tensor that requires one)
        if torch.is_grad_enabled():
            first = next((k for k in range(first) if (k == 0 and z.requires_grad)
                          or any(t is not None and t.requires_grad for t in weights[6 * k:6 * k + 6])), first)
        return _apply_group(float(alpha), first, not recompute, len(compress), signature, packs, packs_t, z,
                            *weights, *compress)
    skip, a = z, None
    blocks = [tuple(weights[i:i + 6]) for i in range(0, len(weights), 6)]
    for k, block in enumerate(blocks):
        next_squeeze = tuple(blocks[k + 1][:2]) if k + 1 < len(blocks) else (None, None)
        z, a = _block(z, block, alpha, recompute, a, next_squeeze)
    return compress_skip(z, *compress, skip, float(alpha)) if compress else z


def residual_distill_groups(z, tensors, sizes, alpha, recompute, whole, check, packs, packs_t):
    """A model body's groups, each with its compression and long skip, one after another, for training
    in eager mode (_EagerDistillGroups; inputs as its apply's, checked by `check` group by group).
    Gradients as for the groups called one by one."""
    return _apply_groups(float(alpha), not recompute, tuple(sizes), whole, check, packs, packs_t, z, *tensors)


def residual_distill_group_(buffer, weights, alpha=0.2, compress=None, packs=None, signature=None):
    """Run a group's blocks in place over `buffer`, inference only; weights: the blocks' tensors in
    one flat list, (w_squeeze, b_squeeze, w_conv, b_conv, w_expand, b_expand) a block.

    buffer: channels_last (N, C + K*d, H, W) whose first C channels hold the group's input;
    afterwards it holds the last block's output. Built and checked by fastdrn.ops.distill_group.
    compress: (w, b, skip), checked by fastdrn.ops.distill_and_compress: the group's compression then
    runs on the buffer in the same launch plan, and its output is returned instead of the buffer.
    packs: _pack_convs(the blocks' 3x3 weights), if the caller has them (pack_groups). signature:
    plans.checked_signature of [the group's input (compress's skip), *weights, *compress[:2]], if the
    caller has it (fastdrn.ops): it keys the launch plan.
    """
    for w_squeeze in weights[::6]:
        _check_inner(w_squeeze.shape[0])
    if eager_fast_path():
        with direct_launches():
            out = _group_forward(buffer, weights, float(alpha), compress, packs, signature)
        return buffer if compress is None else out
    residual_distill_group_op(buffer, weights, float(alpha))
    return buffer if compress is None else compress_skip(buffer, *compress, float(alpha))


# ---- ahead-of-time compile check ------------------------------------------------------------------
def aot_variants():
    """The 3x3 kernels as their launchers run them, at every BLOCK_F and config, for fp32, bf16 and
    fp16: forward (b saved or not, with or without the next block's squeeze folded in) and the
    input-gradient pass with the 1x1 fused where fuses_second_gemm says so, else the 3x3 alone; and
    the 3x3 alone rebuilding b (recompute=True). Each with its rows aligned (ROW_ALIGN 8 in 16 bits,
    4 in float32: the launcher checks every width, stride and offset) and, unfolded, unaligned
    (ROW_ALIGN 1, integers not divisible by 16). F is a compile-time constant, compiled here at F =
    BLOCK_F (DRN's widths, 16 to 256); another F compiles its own variant at launch, with the same
    tiles and masks. And pack3x3_kernel, which packs the 3x3 weights for them."""
    from .registry import AOT_DTYPES, config_label, expand, launch_configs

    kinds = {name: "ptr" for name in ("x_ptr", "wc_ptr", "bc_ptr", "aux_ptr", "mid_ptr", "w2_ptr", "b2_ptr",
                                       "res_ptr", "out_ptr", "w3_ptr", "b3_ptr", "aux3_ptr", "next_ptr")}
    kinds.update({name: "i32" for name in ("M", "H", "W", "N2", "NRES", "stride_rm", "stride_om")})
    kinds.update(alpha_hi="fp32", alpha_lo="fp32")
    kinds.update({name: "constexpr" for name in ("F", "FLIP_TAPS", "EPI1", "HAS_BIAS1", "SAVE_MID", "HAS_SECOND", "HAS_BIAS2",
                                                  "W2_TRANSPOSED", "HAS_NEXT", "HAS_BIAS3", "NEXT_GRAD", "IS_FP64",
                                                  "PRECISION", "ROW_ALIGN", "BLOCK_M", "BLOCK_F", "BLOCK_K", "BLOCK_N",
                                                  "TILE_W", "X_IN_L1")})
    no_next = dict(HAS_NEXT=False, HAS_BIAS3=False, NEXT_GRAD=False)
    forward = dict(FLIP_TAPS=False, EPI1=EPI_ELU, HAS_BIAS1=True, HAS_SECOND=True, HAS_BIAS2=True, W2_TRANSPOSED=False)
    fused_passes = [
        ("forward", dict(forward, SAVE_MID=False, **no_next)),
        ("forward save b", dict(forward, SAVE_MID=True, **no_next)),
        ("input grad", dict(FLIP_TAPS=True, EPI1=EPI_TIMES_ELU_GRAD_OF_AUX, HAS_BIAS1=False, SAVE_MID=True, HAS_SECOND=True,
                            HAS_BIAS2=False, W2_TRANSPOSED=True, **no_next)),
    ]
    # With the next block's squeeze folded in (folds_next_squeeze, aligned rows only).
    folded_passes = [
        ("forward + next squeeze", dict(forward, SAVE_MID=False, HAS_NEXT=True, HAS_BIAS3=True, NEXT_GRAD=False)),
        ("forward save b + next squeeze", dict(forward, SAVE_MID=True, HAS_NEXT=True, HAS_BIAS3=True,
                                               NEXT_GRAD=False)),
        # The backward's fold (fold_backward): the previous block's g_b from this block's dz.
        ("input grad + previous g_b", dict(FLIP_TAPS=True, EPI1=EPI_TIMES_ELU_GRAD_OF_AUX, HAS_BIAS1=False,
                                           SAVE_MID=True, HAS_SECOND=True, HAS_BIAS2=False, W2_TRANSPOSED=True,
                                           HAS_NEXT=True, HAS_BIAS3=False, NEXT_GRAD=True)),
    ]
    # The 3x3 alone: rebuilding b (recompute=True), and both passes where the 1x1 is not fused.
    alone = dict(HAS_SECOND=False, HAS_BIAS2=False, W2_TRANSPOSED=False, ROW_ALIGN=1, **no_next)
    alone_passes = [
        ("b alone", dict(alone, FLIP_TAPS=False, EPI1=EPI_ELU, HAS_BIAS1=True, SAVE_MID=True)),
        ("input grad alone", dict(alone, FLIP_TAPS=True, EPI1=EPI_TIMES_ELU_GRAD_OF_AUX, HAS_BIAS1=False, SAVE_MID=True)),
    ]
    ints = ("M", "H", "W", "N2", "NRES", "stride_rm", "stride_om")
    # Allocated by the launchers (a, g_b, packed weights, mid, out or the group buffer, the next a),
    # so 16-byte aligned; with ROW_ALIGN > 1 the launcher has also checked res, out and the weights.
    own = ("x_ptr", "wc_ptr", "aux_ptr", "aux3_ptr", "mid_ptr", "out_ptr", "next_ptr")
    checked = own + ("res_ptr", "w2_ptr", "w3_ptr")

    def compile_cases(block_f, dtype, fused, folded, listed, candidates):
        configs = launch_configs(listed) + [(f"{config_label(c)} [candidate]", c) for c in candidates]
        unit = 4 if dtype == "fp32" else 8
        label = lambda text, align: f"F{block_f} {text} align {align}"  # noqa: E731
        common = {"F": block_f, "BLOCK_F": block_f, "IS_FP64": False}
        aligned = [(label(text, unit), {**values, **common, "ROW_ALIGN": unit}) for text, values in fused + folded]
        unaligned = [(label(text, 1), {**values, **common, "ROW_ALIGN": 1}) for text, values in fused]
        alone_cases = [(f"F{block_f} {text}", {**values, **common}) for text, values in
                       (alone_passes[:1] if fused else alone_passes)]
        kernel, dtypes = conv3x3_fused_kernel, (dtype,)
        return (expand(kernel, kinds, aligned, configs, dtypes=dtypes, div16=ints, aligned=checked)
                + expand(kernel, kinds, unaligned + alone_cases, configs, dtypes=dtypes,
                         div16=ints, aligned=own, specializations=("plain",))
                + expand(kernel, kinds, alone_cases, configs, dtypes=dtypes, div16=ints,
                         aligned=own, specializations=("div16",)))

    variants = []
    for block_f in CONV3X3_CONFIGS:
        for dtype in AOT_DTYPES:
            torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
            fused = fused_passes if fuses_second_gemm(block_f, torch_dtype) else []
            folded = folded_passes if folds_on_gpu(block_f, torch_dtype) else []
            candidates = CONV3X3_CANDIDATES.get(block_f, []) if torch_dtype != torch.float32 else []
            variants += compile_cases(block_f, dtype, fused, folded, conv3x3_configs(block_f, torch_dtype), candidates)

    # pack3x3_kernel at its one config: each packed form alone and both, from contiguous weights (a
    # unit kernel-column stride, which Triton specializes) and from others (channels_last weights,
    # or packed ones read back for the transposed form).
    pack_kinds = {"w_ptr": "ptr", "packed_ptr": "ptr", "packed_t_ptr": "ptr"}
    pack_kinds.update({name: "i32" for name in ("F_OUT", "F_IN", "s_n", "s_o", "s_i", "s_kh", "s_kw")})
    pack_kinds.update({name: "constexpr" for name in ("FORWARD", "TRANSPOSED", "BLOCK_O", "BLOCK_I")})
    pack_cases = [(f"{label}{' unit s_kw' if unit else ''}", {"FORWARD": forward, "TRANSPOSED": transposed,
                                                              **({"s_kw": 1} if unit else {})})
                  for label, forward, transposed in (("forward", True, False), ("transposed", False, True),
                                                     ("both", True, True))
                  for unit in (True, False)]
    variants += expand(pack3x3_kernel, pack_kinds, pack_cases,
                       [(config_label(PACK3X3_CONFIG) + " [fixed]", PACK3X3_CONFIG)], dtypes=AOT_DTYPES,
                       div16=("F_OUT", "F_IN", "s_n", "s_o", "s_i", "s_kh", "s_kw"), needs_mma=False,
                       aligned=("packed_ptr", "packed_t_ptr"))
    return variants
