"""Pixel-row GEMM kernels that several fused ops share.

A 1x1 convolution over channels_last activations is a GEMM over M = N*H*W pixel rows. These
kernels carry every 1x1 product of the forward and backward passes: the squeeze of an RDB, the
compression of a group, and the transposed products of their input gradients (`conv1x1_kernel`,
two of them in one launch `conv1x1_pair_kernel`); and every weight gradient, 1x1 or 3x3, as
deterministic split-M partial sums over 64 x 64 channel tiles, stored tile-major
(`weight_grad_tiles_kernel` for a block's, `weight_grad_blocks_kernel` for several blocks' in one
launch), added up in a fixed order, cast and scattered into nn.Conv2d's layout by one more launch
(`sum_partials_scatter_kernel`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (KERNELS_INTERPRETED, cdiv, check_int32, dot_precision, elu, elu_grad_from_input, elu_grad_from_output,
                      is_fp64, join_alpha, launch, split_alpha, track)

EPILOGUE_LINEAR = 0   # out = acc + bias (+ res on columns < NRES)
EPILOGUE_ELU = 1      # out = ELU(acc + bias) (+ res on columns < NRES)
EPILOGUE_ELU_GRAD = 2  # out = res * ELU'(acc + bias): the gradient through an ELU, recomputing its input
EPILOGUE_TIMES_ELU_GRAD_OF_RES = 3  # out = (acc + bias) * ELU'(x) where res = ELU(x) was saved


@triton.jit
def _conv1x1_tile(
    pid_m, pid_n, x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, M, N, K, NRES,
    stride_xm, stride_wn, stride_wk, stride_rm, stride_om, alpha,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, EPILOGUE: tl.constexpr, IS_FP64: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One [BLOCK_M, BLOCK_N] output tile of conv1x1_kernel (its arguments, alpha already joined).
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if IS_FP64 else tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :],
                    mask=m_ok[:, None] & (kk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + kk[:, None] * stride_wk + rn[None, :] * stride_wn,
                    mask=(kk[:, None] < K) & n_ok[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(acc.dtype)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if EPILOGUE == 1:
        acc = elu(acc, alpha)
    if EPILOGUE == 2:
        g = tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :], mask=mask, other=0.0)
        acc = g.to(acc.dtype) * elu_grad_from_input(acc, alpha)
    elif EPILOGUE == 3:
        y = tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :], mask=mask, other=0.0)
        acc = acc * elu_grad_from_output(y, alpha, acc.dtype)
    elif HAS_RES:
        res_ok = m_ok[:, None] & (rn[None, :] < NRES)
        acc += tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :], mask=res_ok, other=0.0).to(acc.dtype)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def conv1x1_kernel(
    x_ptr,       # [M, K] input rows, row stride stride_xm, channels contiguous
    w_ptr,       # weight: element (n, k) at n * stride_wn + k * stride_wk
    bias_ptr,    # [N] bias, read when HAS_BIAS
    res_ptr,     # [M, N] residual (or incoming gradient for EPILOGUE_ELU_GRAD), row stride stride_rm
    out_ptr,     # [M, N] output rows, row stride stride_om
    M,           # pixel rows
    N,           # output channels
    K,           # input channels
    NRES,        # output columns that get the residual (N, or D where the output also has new channels)
    stride_xm,   # elements between pixel rows of x
    stride_wn,   # weight stride along output channels
    stride_wk,   # weight stride along input channels
    stride_rm,   # elements between pixel rows of res
    stride_om,   # elements between pixel rows of out
    alpha_hi,    # ELU alpha, fp32 high half
    alpha_lo,    # ELU alpha, fp32 low half (float64 runs only)
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,   # read res (always true for EPILOGUE_ELU_GRAD)
    EPILOGUE: tl.constexpr,  # one of the EPILOGUE_* codes above
    IS_FP64: tl.constexpr,   # float64 storage: float64 accumulation (interpreter tests)
    PRECISION: tl.constexpr,  # tl.dot input_precision: "tf32x3" for float32 storage (see dot_precision)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    _conv1x1_tile(tl.program_id(0), tl.program_id(1), x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, M, N, K, NRES,
                  stride_xm, stride_wn, stride_wk, stride_rm, stride_om, join_alpha(alpha_hi, alpha_lo, IS_FP64),
                  HAS_BIAS, HAS_RES, EPILOGUE, IS_FP64, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def conv1x1_pair_kernel(
    x0_ptr,      # problem 0, as conv1x1_kernel's x_ptr ... stride_om
    w0_ptr,
    bias0_ptr,
    res0_ptr,
    out0_ptr,
    N0, K0, stride_x0, stride_wn0, stride_wk0, stride_r0, stride_o0,
    x1_ptr,      # problem 1, the same
    w1_ptr,
    bias1_ptr,
    res1_ptr,
    out1_ptr,
    N1, K1, stride_x1, stride_wn1, stride_wk1, stride_r1, stride_o1,
    M,           # pixel rows, shared
    alpha_hi,    # ELU alpha, fp32 high half
    alpha_lo,    # ELU alpha, fp32 low half (float64 runs only)
    HAS_BIAS0: tl.constexpr,
    HAS_RES0: tl.constexpr,
    EPILOGUE0: tl.constexpr,  # EPILOGUE_* of problem 0 (a residual, if any, on every column)
    HAS_BIAS1: tl.constexpr,
    HAS_RES1: tl.constexpr,
    EPILOGUE1: tl.constexpr,
    IS_FP64: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Two independent 1x1 products over the same pixel rows in one launch: column tiles
    # [0, tiles(N0)) are problem 0's, the rest problem 1's.
    alpha = join_alpha(alpha_hi, alpha_lo, IS_FP64)
    pid_n = tl.program_id(1)
    tiles0 = tl.cdiv(N0, BLOCK_N)
    if pid_n < tiles0:
        _conv1x1_tile(tl.program_id(0), pid_n, x0_ptr, w0_ptr, bias0_ptr, res0_ptr, out0_ptr, M, N0, K0, N0,
                      stride_x0, stride_wn0, stride_wk0, stride_r0, stride_o0, alpha,
                      HAS_BIAS0, HAS_RES0, EPILOGUE0, IS_FP64, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        _conv1x1_tile(tl.program_id(0), pid_n - tiles0, x1_ptr, w1_ptr, bias1_ptr, res1_ptr, out1_ptr, M, N1, K1, N1,
                      stride_x1, stride_wn1, stride_wk1, stride_r1, stride_o1, alpha,
                      HAS_BIAS1, HAS_RES1, EPILOGUE1, IS_FP64, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _weight_grad_tile_program(
    local,       # this program's index within its problem: (split, tile), tile = a dot tile or a bias tile
    g_ptr,       # [M, N] gradient at the conv's output, row stride stride_gm
    x_ptr,       # [M, K] the conv's input, row stride stride_xm
    seg_ptr,     # this problem's segment of partial row 0: [TAPS, N, K] weight entries (k fastest),
                 # then N bias entries; split s writes s * row_len further on
    row_len,     # entries in one partial row (every problem's segment)
    M, H, W, rows_per_split,
    n_units,         # N, K and the row strides of g and x, in units of ROW_ALIGN elements
    k_units,
    stride_g_units,
    stride_x_units,
    TAPS,            # 1 or 9 (3x3, padding 1): a constant, or (SHIFTED) a run-time value
    SHIFTED: tl.constexpr,  # read x at the tap's shift: TAPS == 9 where TAPS is a constant, else always
    IS_FP64: tl.constexpr, PRECISION: tl.constexpr, ROW_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    N = n_units * ROW_ALIGN
    K = k_units * ROW_ALIGN
    stride_gm = stride_g_units * ROW_ALIGN
    stride_xm = stride_x_units * ROW_ALIGN
    # Per split: the dot tiles (N tile, K tile, tap), tap fastest so that the nine programs reading
    # the same rows of g run side by side, then one bias tile per N tile. The bias has programs of
    # its own so that no dot program spends issue slots on a row reduction.
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    num_k_tiles = tl.cdiv(K, BLOCK_K)
    dot_tiles = num_n_tiles * num_k_tiles * TAPS
    split = local // (dot_tiles + num_n_tiles)
    tile = local % (dot_tiles + num_n_tiles)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, M)
    row = seg_ptr + split * row_len
    acc_dtype = tl.float64 if IS_FP64 else tl.float32
    if tile < dot_tiles:
        tap = tile % TAPS
        pid_n = (tile // TAPS) // num_k_tiles
        pid_k = (tile // TAPS) % num_k_tiles
        if SHIFTED:  # a 1x1 problem run shifted (TAPS 1, tap 0) reads at shift 0
            shift_y = (tap // 3 - 1) * (TAPS // 9)
            shift_x = (tap % 3 - 1) * (TAPS // 9)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        n_ok = rn < N
        k_ok = rk < K
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=acc_dtype)
        for m0 in range(row_start, row_end, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            m_ok = rm < row_end
            if SHIFTED:
                h = (rm // W) % H + shift_y
                w = rm % W + shift_x
                src_ok = m_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
                src = rm + shift_y * W + shift_x
            else:
                src_ok = m_ok
                src = rm
            # g too is read only where the tap's source pixel exists: a pixel of the zero padding is
            # no term of the sum, so a NaN of g there must not meet it as NaN * 0 (exact IEEE semantics).
            g = tl.load(g_ptr + rm[:, None] * stride_gm + rn[None, :], mask=src_ok[:, None] & n_ok[None, :],
                        other=0.0)
            x = tl.load(x_ptr + src[:, None] * stride_xm + rk[None, :], mask=src_ok[:, None] & k_ok[None, :],
                        other=0.0)
            acc = tl.dot(tl.trans(g), x, acc, input_precision=PRECISION)
        tl.store(row + tap * N * K + rn[:, None] * K + rk[None, :], acc, mask=n_ok[:, None] & k_ok[None, :])
    else:
        rn = (tile - dot_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        bias_acc = tl.zeros((BLOCK_N,), dtype=acc_dtype)
        for m0 in range(row_start, row_end, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            g = tl.load(g_ptr + rm[:, None] * stride_gm + rn[None, :], mask=(rm < row_end)[:, None] & n_ok[None, :],
                        other=0.0)
            bias_acc += tl.sum(g.to(acc_dtype), axis=0)
        tl.store(row + TAPS * N * K + rn, bias_acc, mask=n_ok)


@triton.jit
def weight_grad_tiles_kernel(
    part_ptr,    # [S, row_len] partial sums (fp32, or fp64 for float64): problem p's segment of each
                 # row starts at seg_p; every partial is written by exactly one program (no atomics)
    g0_ptr,      # problem 0: [M, N0] gradient at the conv's output, row stride stride_g0 * ROW_ALIGN
    x0_ptr,      # problem 0: [M, K0] the conv's input, row stride stride_x0 * ROW_ALIGN
    N0, K0, stride_g0, stride_x0,  # problem 0's channel counts and row strides / ROW_ALIGN
    seg0,        # problem 0's segment of a partial row
    g1_ptr,      # problem 1 (PROBLEMS >= 2), as problem 0
    x1_ptr,
    N1, K1, stride_g1, stride_x1, seg1,
    g2_ptr,      # problem 2 (PROBLEMS == 3), as problem 0
    x2_ptr,
    N2, K2, stride_g2, stride_x2, seg2,
    M,           # pixel rows, shared by every problem
    H,           # image height (3x3 taps only)
    W,           # image width (3x3 taps only)
    rows_per_split,  # pixel rows per partial, a multiple of BLOCK_M
    row_len,     # entries in one partial row
    PROBLEMS: tl.constexpr,  # 1 to 3 weight gradients in this launch
    TAPS0: tl.constexpr,     # 1 for a 1x1 conv; 9 for a 3x3 conv with padding 1 (x read at the tap's shift)
    TAPS1: tl.constexpr,
    TAPS2: tl.constexpr,
    IS_FP64: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input_precision (see dot_precision)
    ROW_ALIGN: tl.constexpr,  # every channel count and row stride is a multiple of this many elements
                              # and is passed divided by it: rows of D + d = 72 channels are 16-byte
                              # aligned and masks constant over 8 channels, which Triton cannot know
                              # from 72 (not a multiple of 16): without it no load vectorizes or pipelines
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Programs [0, P0) run problem 0, [P0, P0 + P1) problem 1, the rest problem 2, where
    # P = S * (N tiles * K tiles * TAPS + N tiles).
    pid = tl.program_id(0)
    splits = tl.cdiv(M, rows_per_split)
    end0 = splits * tl.cdiv(N0 * ROW_ALIGN, BLOCK_N) * (tl.cdiv(K0 * ROW_ALIGN, BLOCK_K) * TAPS0 + 1)
    end1 = end0 + splits * tl.cdiv(N1 * ROW_ALIGN, BLOCK_N) * (tl.cdiv(K1 * ROW_ALIGN, BLOCK_K) * TAPS1 + 1)
    if pid < end0:
        _weight_grad_tile_program(pid, g0_ptr, x0_ptr, part_ptr + seg0, row_len, M, H, W, rows_per_split,
                                  N0, K0, stride_g0, stride_x0, TAPS0, TAPS0 == 9, IS_FP64, PRECISION,
                                  ROW_ALIGN, BLOCK_M, BLOCK_N, BLOCK_K)
    elif PROBLEMS >= 2 and pid < end1:
        _weight_grad_tile_program(pid - end0, g1_ptr, x1_ptr, part_ptr + seg1, row_len, M, H, W, rows_per_split,
                                  N1, K1, stride_g1, stride_x1, TAPS1, TAPS1 == 9, IS_FP64, PRECISION,
                                  ROW_ALIGN, BLOCK_M, BLOCK_N, BLOCK_K)
    elif PROBLEMS == 3:
        _weight_grad_tile_program(pid - end1, g2_ptr, x2_ptr, part_ptr + seg2, row_len, M, H, W, rows_per_split,
                                  N2, K2, stride_g2, stride_x2, TAPS2, TAPS2 == 9, IS_FP64, PRECISION,
                                  ROW_ALIGN, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _tiles_end(start, splits, N, K, taps, ROW_ALIGN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # The first program after those of a problem that begin at `start`: S * (N tiles * (K tiles * taps + 1)).
    return start + splits * tl.cdiv(N * ROW_ALIGN, BLOCK_N) * (tl.cdiv(K * ROW_ALIGN, BLOCK_K) * taps + 1)


# taps are 1 or 9 and picked at run time: not specialized, so one compile serves every block pattern.
@triton.jit(do_not_specialize=[f"taps{p}" for p in range(9)])
def weight_grad_blocks_kernel(
    part_ptr,    # [S, row_len] partial sums, as weight_grad_tiles_kernel's
    g0_ptr,      # problem 0: [M, N0] gradient at the conv's output, row stride stride_g0 * ROW_ALIGN
    x0_ptr,      # problem 0: [M, K0] the conv's input, row stride stride_x0 * ROW_ALIGN
    N0, K0, stride_g0, stride_x0,  # problem 0's channel counts and row strides / ROW_ALIGN
    seg0,        # problem 0's segment of a partial row
    taps0,       # problem 0's taps: 1 (1x1 conv) or 9 (3x3 conv with padding 1)
    # Problems 1 to 8 (read when PROBLEMS is above their number), as problem 0: three a block.
    g1_ptr, x1_ptr, N1, K1, stride_g1, stride_x1, seg1, taps1,
    g2_ptr, x2_ptr, N2, K2, stride_g2, stride_x2, seg2, taps2,
    g3_ptr, x3_ptr, N3, K3, stride_g3, stride_x3, seg3, taps3,
    g4_ptr, x4_ptr, N4, K4, stride_g4, stride_x4, seg4, taps4,
    g5_ptr, x5_ptr, N5, K5, stride_g5, stride_x5, seg5, taps5,
    g6_ptr, x6_ptr, N6, K6, stride_g6, stride_x6, seg6, taps6,
    g7_ptr, x7_ptr, N7, K7, stride_g7, stride_x7, seg7, taps7,
    g8_ptr, x8_ptr, N8, K8, stride_g8, stride_x8, seg8, taps8,
    M,           # pixel rows, shared by every problem
    H,           # image height
    W,           # image width
    rows_per_split,  # pixel rows per partial, a multiple of BLOCK_M
    row_len,     # entries in one partial row
    PROBLEMS: tl.constexpr,  # 4 to 9 weight gradients in this launch (fewer: weight_grad_tiles_kernel)
    IS_FP64: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input_precision (see dot_precision)
    ROW_ALIGN: tl.constexpr,  # as weight_grad_tiles_kernel's
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # The weight gradients of several blocks (weight_grad_blocks) in one launch: programs [0, end0)
    # run problem 0, [end0, end1) problem 1, and so on. The problem's pointers and sizes are picked
    # at run time and one tile body runs them all: one body inlined per problem (as
    # weight_grad_tiles_kernel does for its three) gets shared memory of its own each, which at 6
    # and 9 problems passed the limit on sm_90 and sm_80 (AOT check).
    pid = tl.program_id(0)
    splits = tl.cdiv(M, rows_per_split)
    local, g_ptr, x_ptr, n, k, stride_g, stride_x, seg, taps = (
        pid, g0_ptr, x0_ptr, N0, K0, stride_g0, stride_x0, seg0, taps0)
    end = _tiles_end(0, splits, N0, K0, taps0, ROW_ALIGN, BLOCK_N, BLOCK_K)
    if pid >= end:
        local, g_ptr, x_ptr, n, k, stride_g, stride_x, seg, taps = (
            pid - end, g1_ptr, x1_ptr, N1, K1, stride_g1, stride_x1, seg1, taps1)
    end = _tiles_end(end, splits, N1, K1, taps1, ROW_ALIGN, BLOCK_N, BLOCK_K)
    if pid >= end:
        local, g_ptr, x_ptr, n, k, stride_g, stride_x, seg, taps = (
            pid - end, g2_ptr, x2_ptr, N2, K2, stride_g2, stride_x2, seg2, taps2)
    end = _tiles_end(end, splits, N2, K2, taps2, ROW_ALIGN, BLOCK_N, BLOCK_K)
    if pid >= end:
        local, g_ptr, x_ptr, n, k, stride_g, stride_x, seg, taps = (
            pid - end, g3_ptr, x3_ptr, N3, K3, stride_g3, stride_x3, seg3, taps3)
    if PROBLEMS >= 5:
        end = _tiles_end(end, splits, N3, K3, taps3, ROW_ALIGN, BLOCK_N, BLOCK_K)
        if pid >= end:
            local, g_ptr, x_ptr, n, k, stride_g, stride_x, seg, taps = (
                pid - end, g4_ptr, x4_ptr, N4, K4, stride_g4, stride_x4, seg4, taps4)
    if PROBLEMS >= 6:
        end = _tiles_end(end, splits, N4, K4, taps4, ROW_ALIGN, BLOCK_N, BLOCK_K)
        if pid >= end:
            local, g_ptr, x_ptr, n, k, stride_g, stride_x, seg, taps = (
                pid - end, g5_ptr, x5_ptr, N5, K5, stride_g5, stride_x5, seg5, taps5)
    if PROBLEMS >= 7:
        end = _tiles_end(end, splits, N5, K5, taps5, ROW_ALIGN, BLOCK_N, BLOCK_K)
        if pid >= end:
            local, g_ptr, x_ptr, n, k, stride_g, stride_x, seg, taps = (
                pid - end, g6_ptr, x6_ptr, N6, K6, stride_g6, stride_x6, seg6, taps6)
    if PROBLEMS >= 8:
        end = _tiles_end(end, splits, N6, K6, taps6, ROW_ALIGN, BLOCK_N, BLOCK_K)
        if pid >= end:
            local, g_ptr, x_ptr, n, k, stride_g, stride_x, seg, taps = (
                pid - end, g7_ptr, x7_ptr, N7, K7, stride_g7, stride_x7, seg7, taps7)
    if PROBLEMS == 9:
        end = _tiles_end(end, splits, N7, K7, taps7, ROW_ALIGN, BLOCK_N, BLOCK_K)
        if pid >= end:
            local, g_ptr, x_ptr, n, k, stride_g, stride_x, seg, taps = (
                pid - end, g8_ptr, x8_ptr, N8, K8, stride_g8, stride_x8, seg8, taps8)
    _weight_grad_tile_program(local, g_ptr, x_ptr, part_ptr + seg, row_len, M, H, W, rows_per_split,
                              n, k, stride_g, stride_x, taps, True, IS_FP64, PRECISION, ROW_ALIGN,
                              BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _scatter_segment(total, offs, start, seg, N, K, TAPS, stride_dn, stride_dk, stride_dt, dw_ptr, db_ptr,
                     BLOCK: tl.constexpr):
    # Entries [seg, seg + TAPS*N*K) of a partial row are (tap, n, k), k fastest: element
    # (n, k, tap) of the weight gradient is at n * stride_dn + k * stride_dk + tap * stride_dt.
    # The next N entries are the bias gradient. A program whose entries [start, start + BLOCK) miss
    # the segment skips it (a launch for several blocks has up to 9 segments, a program meets 1 or 2).
    nk = N * K
    if (seg < start + BLOCK) & (start < seg + TAPS * nk + N):
        r = offs - seg
        tap = r // nk
        n = (r % nk) // K
        k = r % K
        tl.store(dw_ptr + n * stride_dn + k * stride_dk + tap * stride_dt, total.to(dw_ptr.dtype.element_ty),
                 mask=(r >= 0) & (r < TAPS * nk))
        rb = r - TAPS * nk
        tl.store(db_ptr + rb, total.to(db_ptr.dtype.element_ty), mask=(rb >= 0) & (rb < N))


# Strides of 1, splits of 1 and the rest are ordinary values here: no launch-time specialization,
# so one compile serves every weight layout (the kernel moves a few hundred KB).
@triton.jit(do_not_specialize=["S", *(f"{name}{p}" for p in range(9)
                                     for name in ("seg", "N", "K", "T", "sdn", "sdk", "sdt"))])
def sum_partials_scatter_kernel(
    part_ptr,    # [S, L] partial sums (fp32, or fp64 for float64), contiguous, as weight_grad_tiles_kernel wrote
    S,           # partials per entry
    L,           # entries per partial
    dw0_ptr,     # problem 0's weight gradient (weight dtype), element (n, k, tap) at
    db0_ptr,     # n * sdn0 + k * sdk0 + tap * sdt0; its bias gradient [N0]
    seg0, N0, K0, T0, sdn0, sdk0, sdt0,
    # Problems 1 to 8 (read when PROBLEMS is above their number), as problem 0.
    dw1_ptr, db1_ptr, seg1, N1, K1, T1, sdn1, sdk1, sdt1,
    dw2_ptr, db2_ptr, seg2, N2, K2, T2, sdn2, sdk2, sdt2,
    dw3_ptr, db3_ptr, seg3, N3, K3, T3, sdn3, sdk3, sdt3,
    dw4_ptr, db4_ptr, seg4, N4, K4, T4, sdn4, sdk4, sdt4,
    dw5_ptr, db5_ptr, seg5, N5, K5, T5, sdn5, sdk5, sdt5,
    dw6_ptr, db6_ptr, seg6, N6, K6, T6, sdn6, sdk6, sdt6,
    dw7_ptr, db7_ptr, seg7, N7, K7, T7, sdn7, sdk7, sdt7,
    dw8_ptr, db8_ptr, seg8, N8, K8, T8, sdn8, sdk8, sdt8,
    PROBLEMS: tl.constexpr,
    BLOCK: tl.constexpr,  # entries per program
):
    # One program per BLOCK entries, adding the S partials in index order: the same sum on every
    # run (deterministic), no atomics; reads are coalesced, the scattered writes are the small gradient.
    start = tl.program_id(0) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    ok = offs < L
    total = tl.load(part_ptr + offs, mask=ok, other=0.0)
    for s in range(1, S):
        total += tl.load(part_ptr + s * L + offs, mask=ok, other=0.0)
    _scatter_segment(total, offs, start, seg0, N0, K0, T0, sdn0, sdk0, sdt0, dw0_ptr, db0_ptr, BLOCK)
    if PROBLEMS >= 2:
        _scatter_segment(total, offs, start, seg1, N1, K1, T1, sdn1, sdk1, sdt1, dw1_ptr, db1_ptr, BLOCK)
    if PROBLEMS >= 3:
        _scatter_segment(total, offs, start, seg2, N2, K2, T2, sdn2, sdk2, sdt2, dw2_ptr, db2_ptr, BLOCK)
    if PROBLEMS >= 4:
        _scatter_segment(total, offs, start, seg3, N3, K3, T3, sdn3, sdk3, sdt3, dw3_ptr, db3_ptr, BLOCK)
    if PROBLEMS >= 5:
        _scatter_segment(total, offs, start, seg4, N4, K4, T4, sdn4, sdk4, sdt4, dw4_ptr, db4_ptr, BLOCK)
    if PROBLEMS >= 6:
        _scatter_segment(total, offs, start, seg5, N5, K5, T5, sdn5, sdk5, sdt5, dw5_ptr, db5_ptr, BLOCK)
    if PROBLEMS >= 7:
        _scatter_segment(total, offs, start, seg6, N6, K6, T6, sdn6, sdk6, sdt6, dw6_ptr, db6_ptr, BLOCK)
    if PROBLEMS >= 8:
        _scatter_segment(total, offs, start, seg7, N7, K7, T7, sdn7, sdk7, sdt7, dw7_ptr, db7_ptr, BLOCK)
    if PROBLEMS == 9:
        _scatter_segment(total, offs, start, seg8, N8, K8, T8, sdn8, sdk8, sdt8, dw8_ptr, db8_ptr, BLOCK)


# ---------------------------------------------------------------------------------------------
# Launchers. Callers pass channels_last row views (checked by the op that owns them) and get
# freshly allocated outputs. Configs: one fixed under the interpreter, a small autotuned set on
# a GPU keyed on the channel counts (and, implicitly, the dtype); every one of them is in the AOT
# check (kernels/registry.py).
# ---------------------------------------------------------------------------------------------

CONV1X1_INTERPRETER = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)
# BLOCK_M 128 spilled (254-255 registers) when strides are not multiples of 16 (AOT check). Float32
# runs 3xTF32 dots, whose split operands need more registers: at BLOCK_K 32 they spilled on sm_80.
CONV1X1_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
]
CONV1X1_FP32_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=4, num_stages=3),
]

# weight_grad_tiles_kernel: whole 64-channel blocks on both sides of the product (the MMA's M is
# BLOCK_N, its N is BLOCK_K, its K runs over pixel rows), so g is read once per tap and K tile
# instead of once per 16 channels, and the operand rows are 128 bytes wide (full shared-memory
# swizzle). The first design's 64 x 16 tiles had 6-7-way bank conflicts on an H100 and took a bf16
# DRN x4 training step to 15.17 ms of kernel time against these tiles' 9.98 ms on an H200: deleted.
WEIGHT_GRAD_INTERPRETER = triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=1)
WEIGHT_GRAD_TILES_SPLIT_ROWS = 128  # rows_per_split is a multiple of this: every config's BLOCK_M divides it
WEIGHT_GRAD_TILES_PROGRAMS = 256     # programs a launch aims at, from shapes only (about 2 per H100 SM)
WEIGHT_GRAD_MAX_PROBLEMS = 9  # weight gradients one launch computes: three blocks' (weight_grad_blocks)
# Chosen by compiling for sm_90 and sm_80 without spills (kernels/aot_check.py). "aligned": every
# channel count and row stride a multiple of 16 bytes (ROW_ALIGN > 1): loads vectorize and
# pipeline (cp.async, 3 stages); otherwise (odd channel counts) they cannot, and need 8 warps or
# narrower tiles to stay out of local memory.
WEIGHT_GRAD_TILES_CONFIGS = {
    (False, True): [  # 16-bit, aligned
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    ],
    # 16-bit, unaligned. Its 8-warp config (64, 64, 32, 3 stages) gave dW_squeeze 5.6e-2 from
    # float64 on an H100 at D + d = 139, F = 64, M = 13, where eager bf16 was at 7.5e-3 (the same
    # value at two commits; 4 warps passed): a suspected 8-warp miscompile (docs/kernels.md), so
    # only 4 warps run here.
    (False, False): [
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=2),
    ],
    (True, True): [  # float32 (3xTF32), aligned
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=2),
    ],
    (True, False): [  # float32, unaligned
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=2),
    ],
}
# 16-bit, aligned candidates, neither launched nor autotuned: bench/profile_kernels.py times them
# beside the configs above at 256, 512 and 1024 programs a launch, and a GPU test checks each against
# float64; one joins the list when a GPU run shows it wins. Nsight Compute saw the default fill 0.4
# of a wave at 11.6% achieved occupancy (H200, 0211768): latency, not bandwidth, bounds it, so these
# keep more loads in flight a program: four stages, at the default's tile or at half its row step
# (the same 33.8 KB of shared memory a program as the default in the blocks kernel on sm_90, so as
# many programs an SM). 64 x 64 x 64 at 3 stages (4 and 8 warps) spilled 8 bytes in the one-block
# kernel on sm_80 (AOT check) and is not a candidate.
WEIGHT_GRAD_CANDIDATES = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
]
SUM_PARTIALS_SCATTER_BLOCK = 256  # entries per program: ~180 programs for a DRN block (45 at 1024)
SUM_PARTIALS_SCATTER_CONFIG = triton.Config({"BLOCK": SUM_PARTIALS_SCATTER_BLOCK}, num_warps=4, num_stages=1)


def conv1x1_configs(dtype: torch.dtype) -> list:
    return CONV1X1_FP32_CONFIGS if dtype == torch.float32 else CONV1X1_CONFIGS


def row_align(dtype: torch.dtype, *extents: int) -> int:
    """The largest element count of at most 16 bytes that divides every channel count and row stride."""
    align = 128 // torch.finfo(dtype).bits
    while align > 1 and any(extent % align for extent in extents):
        align //= 2
    return align


# Keyed by "float32 storage?": each storage width autotunes over its own configs.
conv1x1_tuned = {fp32: triton.autotune(configs=conv1x1_configs(torch.float32 if fp32 else None),
                                       key=["N", "K", "EPILOGUE"])(conv1x1_kernel) for fp32 in (False, True)}
conv1x1_pair_tuned = {fp32: triton.autotune(configs=conv1x1_configs(torch.float32 if fp32 else None),
                                            key=["N0", "K0", "N1", "K1", "EPILOGUE0", "EPILOGUE1"])(conv1x1_pair_kernel)
                      for fp32 in (False, True)}


def weight_grad_autotuner(configs: list, several: bool):
    """weight_grad_blocks_kernel (several blocks' problems) or weight_grad_tiles_kernel, autotuned
    over `configs`."""
    if several:
        return triton.autotune(configs=configs, key=["PROBLEMS", *(f"{name}{p}" for p in range(WEIGHT_GRAD_MAX_PROBLEMS)
                                                                   for name in ("N", "K", "taps")), "ROW_ALIGN"])(
            weight_grad_blocks_kernel)
    return triton.autotune(configs=configs, key=["PROBLEMS", "N0", "K0", "TAPS0", "N1", "K1", "TAPS1", "N2", "K2",
                                                 "TAPS2", "ROW_ALIGN"])(weight_grad_tiles_kernel)


# Keyed by (float32 storage?, rows aligned?).
weight_grad_tiles_tuned = {key: weight_grad_autotuner(configs, False)
                           for key, configs in WEIGHT_GRAD_TILES_CONFIGS.items()}
weight_grad_blocks_tuned = {key: weight_grad_autotuner(configs, True)
                            for key, configs in WEIGHT_GRAD_TILES_CONFIGS.items()}


def conv1x1(x: torch.Tensor, x_stride: int, w: torch.Tensor, transpose_w: bool, bias: torch.Tensor | None,
            epilogue: int, alpha: float, res: torch.Tensor | None = None, res_stride: int = 0,
            out: torch.Tensor | None = None, out_stride: int | None = None, n_res: int | None = None) -> torch.Tensor:
    """out[m, :] = epilogue(x[m, :K] @ W^T + bias, res[m, :]) over M pixel rows.

    x is any tensor whose storage holds M rows of `x_stride` elements (a channels_last activation
    or a channel prefix of one); w is a (C_out, C_in, 1, 1) conv weight, used as (C_in -> C_out),
    or transposed (C_out -> C_in) when `transpose_w`. With `out` None a fresh channels_last tensor
    is returned. A residual (EPILOGUE_LINEAR, EPILOGUE_ELU) lands on the first n_res output columns
    (default all): the split-add of a residual distilling block.
    """
    n_img, _, height, width = x.shape
    m = n_img * height * width
    c_out, c_in = w.shape[0], w.shape[1]
    n, k = (c_in, c_out) if transpose_w else (c_out, c_in)
    if out is None:
        out = track(torch.empty((n_img, n, height, width), device=x.device, dtype=x.dtype,
                                memory_format=torch.channels_last))
        out_stride = n
    check_int32("conv1x1", m * x_stride, m * out_stride, m * max(res_stride, 1), w.numel())
    alpha_hi, alpha_lo = split_alpha(alpha)
    launch(
        conv1x1_kernel, conv1x1_tuned[x.dtype == torch.float32],
        lambda meta: (cdiv(m, meta["BLOCK_M"]), cdiv(n, meta["BLOCK_N"])),
        CONV1X1_INTERPRETER,
        x_ptr=x, w_ptr=w, bias_ptr=bias if bias is not None else w, res_ptr=res if res is not None else x,
        out_ptr=out, M=m, N=n, K=k, NRES=n if n_res is None else n_res, stride_xm=x_stride,
        stride_wn=1 if transpose_w else c_in, stride_wk=c_in if transpose_w else 1,
        stride_rm=res_stride, stride_om=out_stride, alpha_hi=alpha_hi, alpha_lo=alpha_lo,
        HAS_BIAS=bias is not None, HAS_RES=res is not None, EPILOGUE=epilogue, IS_FP64=is_fp64(x),
        PRECISION=dot_precision(x.dtype),
    )
    return out


def _numbered(*names: str) -> tuple:
    """The keyword names of each problem slot of a multi-problem kernel ("x{}_ptr" -> x0_ptr, x1_ptr,
    x2_ptr), built once: formatting them at every launch cost microseconds of host time."""
    return tuple(tuple(name.format(p) for name in names) for p in range(WEIGHT_GRAD_MAX_PROBLEMS))


_PAIR_ARG_NAMES = _numbered("x{}_ptr", "w{}_ptr", "bias{}_ptr", "res{}_ptr", "out{}_ptr", "N{}", "K{}", "stride_x{}",
                            "stride_wn{}", "stride_wk{}", "stride_r{}", "stride_o{}", "HAS_BIAS{}", "HAS_RES{}",
                            "EPILOGUE{}")
_TILES_ARG_NAMES = _numbered("g{}_ptr", "x{}_ptr", "N{}", "K{}", "stride_g{}", "stride_x{}", "seg{}", "TAPS{}")
_BLOCKS_ARG_NAMES = _numbered("g{}_ptr", "x{}_ptr", "N{}", "K{}", "stride_g{}", "stride_x{}", "seg{}", "taps{}")
_SCATTER_ARG_NAMES = _numbered("dw{}_ptr", "db{}_ptr", "seg{}", "N{}", "K{}", "T{}", "sdn{}", "sdk{}", "sdt{}")


def conv1x1_pair(first: dict, second: dict, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Two conv1x1 products over the same pixel rows in one launch, each into a fresh channels_last
    tensor. Each problem: dict(x, x_stride, w, transpose_w, bias, epilogue, res=None, res_stride=0),
    as conv1x1's arguments (a residual, if any, on every output column)."""
    n_img, _, height, width = first["x"].shape
    m = n_img * height * width
    args, outs = {}, []
    for p, problem in enumerate((first, second)):
        x, w, transpose_w = problem["x"], problem["w"], problem["transpose_w"]
        bias, res = problem["bias"], problem.get("res")
        c_out, c_in = w.shape[0], w.shape[1]
        n, k = (c_in, c_out) if transpose_w else (c_out, c_in)
        out = track(torch.empty((n_img, n, height, width), device=x.device, dtype=x.dtype,
                                memory_format=torch.channels_last))
        outs.append(out)
        res_stride = problem.get("res_stride", 0)
        check_int32("conv1x1", m * problem["x_stride"], m * n, m * max(res_stride, 1), w.numel())
        args.update(zip(_PAIR_ARG_NAMES[p], (
            x, w, bias if bias is not None else w, res if res is not None else x, out, n, k, problem["x_stride"],
            1 if transpose_w else c_in, c_in if transpose_w else 1, res_stride, n, bias is not None, res is not None,
            problem["epilogue"])))
    alpha_hi, alpha_lo = split_alpha(alpha)
    x0 = first["x"]
    launch(
        conv1x1_pair_kernel, conv1x1_pair_tuned[x0.dtype == torch.float32],
        lambda meta: (cdiv(m, meta["BLOCK_M"]), cdiv(args["N0"], meta["BLOCK_N"]) + cdiv(args["N1"], meta["BLOCK_N"])),
        CONV1X1_INTERPRETER,
        **args, M=m, alpha_hi=alpha_hi, alpha_lo=alpha_lo, IS_FP64=is_fp64(x0), PRECISION=dot_precision(x0.dtype),
    )
    return outs[0], outs[1]


def _grad_format(w: torch.Tensor, taps: int) -> torch.memory_format:
    """The memory format a weight gradient is written in: the weight's own where it is channels_last
    (a 3x3 weight of a model moved to channels_last), else contiguous."""
    if taps == 9 and not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def weight_grads(*problems) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Weight and bias gradients of up to nine convs (three blocks') over the same M = N*H*W pixel
    rows, in two launches: split-M partials of all of them (weight_grad_tiles_kernel, or
    weight_grad_blocks_kernel for more than three), then one fixed-order sum
    that writes each gradient in its weight's dtype and nn.Conv2d layout (sum_partials_scatter_kernel).
    Bitwise reproducible run to run, no atomics.

    Each problem is (g, g_stride, x, x_stride, n, k, taps, weight): channels_last rows of the
    gradient at the conv's output (n channels) and of its input (k channels), every g of one
    (N, C, H, W) size; taps 9 for a 3x3 conv with padding 1, 1 for a 1x1; the weight (one dtype for
    all). Returns [(dW (n, k, kh, kw), db (n,))] in the problems' order, dW in the weight's memory
    format (contiguous or channels_last): autograd then hands it to .grad without a copy.
    """
    if not 1 <= len(problems) <= WEIGHT_GRAD_MAX_PROBLEMS:
        raise ValueError(f"weight_grads: 1 to {WEIGHT_GRAD_MAX_PROBLEMS} problems a launch, got {len(problems)}")
    g0 = problems[0][0]
    n_img, _, height, width = g0.shape
    m = n_img * height * width
    quantum = WEIGHT_GRAD_INTERPRETER.kwargs["BLOCK_M"] if KERNELS_INTERPRETED else WEIGHT_GRAD_TILES_SPLIT_ROWS
    tiles = sum(cdiv(n, 64) * (cdiv(k, 64) * taps + 1) for _g, _gs, _x, _xs, n, k, taps, _w in problems)
    chunks = cdiv(m, quantum)
    splits = max(1, min(chunks, cdiv(WEIGHT_GRAD_TILES_PROGRAMS, tiles)))
    rows_per_split = cdiv(chunks, splits) * quantum
    splits = cdiv(m, rows_per_split)
    acc_dtype = torch.float64 if g0.dtype == torch.float64 else torch.float32
    segments, length = [], 0
    for _g, _gs, _x, _xs, n, k, taps, _w in problems:
        segments.append(length)
        length += taps * n * k + n
    partials = track(torch.empty((splits, length), device=g0.device, dtype=acc_dtype))
    check_int32("weight gradient", partials.numel(), *(m * max(gs, xs) for _g, gs, _x, xs, *_rest in problems))
    # Up to 3 problems (a block's): weight_grad_tiles_kernel, one body per problem; more (several
    # blocks'): weight_grad_blocks_kernel, one body for all. Unused slots repeat problem 0: never read.
    several = len(problems) > 3
    padded = list(problems) + [problems[0]] * (WEIGHT_GRAD_MAX_PROBLEMS - len(problems))
    # Storage offsets too: the allocator aligns every block, so a view's rows are aligned when its offset is.
    align = row_align(g0.dtype, *(v for g, gs, x, xs, n, k, _t, _w in problems
                                  for v in (gs, xs, n, k, g.storage_offset(), x.storage_offset())))
    args, sum_args, outs = {}, {}, []
    for p, (g, g_stride, x, x_stride, n, k, taps, w) in enumerate(padded):
        seg = segments[p] if p < len(problems) else 0
        if several or p < 3:
            args.update(zip((_BLOCKS_ARG_NAMES if several else _TILES_ARG_NAMES)[p],
                            (g, x, n // align, k // align, g_stride // align, x_stride // align, seg, taps)))
        if p < len(problems):
            size = 3 if taps == 9 else 1
            memory_format = _grad_format(w, taps)
            dw = track(torch.empty((n, k, size, size), device=g0.device, dtype=w.dtype, memory_format=memory_format))
            db = track(torch.empty((n,), device=g0.device, dtype=w.dtype))
            outs.append((dw, db))
            # dw.stride(): (n, k, kh, kw); tap = kh * 3 + kw, and kw's stride is kh's / 3 in both layouts.
            sdt = dw.stride(3) if taps == 9 else 0
        else:
            dw, db, sdt = outs[0][0], outs[0][1], 0
        sum_args.update(zip(_SCATTER_ARG_NAMES[p], (dw, db, seg, n, k, taps, dw.stride(0), dw.stride(1), sdt)))

    def grid(meta):
        per_split = sum(cdiv(n, meta["BLOCK_N"]) * (cdiv(k, meta["BLOCK_K"]) * taps + 1)
                        for _g, _gs, _x, _xs, n, k, taps, _w in problems)
        return (splits * per_split,)

    kernel, tuned = ((weight_grad_blocks_kernel, weight_grad_blocks_tuned) if several else
                     (weight_grad_tiles_kernel, weight_grad_tiles_tuned))
    launch(kernel, tuned[(g0.dtype == torch.float32, align > 1)], grid, WEIGHT_GRAD_INTERPRETER, part_ptr=partials,
           **args, M=m, H=height, W=width, rows_per_split=rows_per_split, row_len=length, PROBLEMS=len(problems),
           IS_FP64=is_fp64(g0), PRECISION=dot_precision(g0.dtype), ROW_ALIGN=align)
    launch(sum_partials_scatter_kernel, None, lambda meta: (cdiv(length, meta["BLOCK"]),), SUM_PARTIALS_SCATTER_CONFIG,
           part_ptr=partials, S=splits, L=length, **sum_args, PROBLEMS=len(problems))
    return outs


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile check (kernels/registry.py, `python -m fastdrn.kernels.aot_check`).
# ---------------------------------------------------------------------------------------------
def aot_variants():
    """Every way these kernels can be compiled for a GPU, as registry.Variant records.

    conv1x1_kernel: every EPILOGUE_* code of this module, with or without bias, with or without
    res (epilogues past EPILOGUE_ELU always read res), in both weight orientations (a launcher's
    unit weight stride is specialized to constexpr 1 at launch); conv1x1_pair_kernel: the pair a
    block's backward launches; weight_grad_tiles_kernel: one 1x1 problem (compress_skip) and a
    block's three (1x1, 3x3, 1x1); weight_grad_blocks_kernel: two or three blocks' (6 and 9
    problems); both with rows aligned and not. All at every autotune config and every pinned config
    (FASTDRN_NUM_WARPS, FASTDRN_AUTOTUNE=0), for fp32, bf16 and fp16 storage. IS_FP64 is always
    False on a GPU. sum_partials_scatter_kernel at its one fixed config, for 1, 3, 6 and 9 problems.
    """
    import itertools

    from .registry import AOT_DTYPES, config_label, expand, launch_configs

    epilogues = sorted({v for k, v in globals().items() if k.startswith("EPILOGUE_") and isinstance(v, int)})
    conv_cases = []
    for epilogue, has_bias, has_res, transposed in itertools.product(epilogues, (True, False), (True, False),
                                                                     (False, True)):
        if epilogue not in (EPILOGUE_LINEAR, EPILOGUE_ELU) and not has_res:
            continue
        unit = {"stride_wn": 1} if transposed else {"stride_wk": 1}
        label = (f"E{epilogue}{' bias' if has_bias else ''}{' res' if has_res else ''}"
                 f" {'wT' if transposed else 'w'}")
        conv_cases.append((label, {"HAS_BIAS": has_bias, "HAS_RES": has_res, "EPILOGUE": epilogue,
                                   "IS_FP64": False, **unit}))
    conv_kinds = {
        "x_ptr": "ptr", "w_ptr": "ptr", "bias_ptr": "ptr", "res_ptr": "ptr", "out_ptr": "ptr",
        "M": "i32", "N": "i32", "K": "i32", "NRES": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_wk": "i32",
        "stride_rm": "i32", "stride_om": "i32", "alpha_hi": "fp32", "alpha_lo": "fp32",
        "HAS_BIAS": "constexpr", "HAS_RES": "constexpr", "EPILOGUE": "constexpr", "IS_FP64": "constexpr",
        "PRECISION": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
    }
    variants = []
    for dtype in AOT_DTYPES:
        configs = conv1x1_configs(torch.float32 if dtype == "fp32" else None)
        variants += expand(conv1x1_kernel, conv_kinds, conv_cases, launch_configs(configs), dtypes=(dtype,),
                           div16=("M", "N", "K", "NRES", "stride_xm", "stride_wn", "stride_wk", "stride_rm", "stride_om"))

    # conv1x1_pair: the residual distilling block's backward, squeeze recomputed (ELU, bias) beside
    # g_b = (dy W_e) * ELU'(b) (transposed expand weight, saved b as res).
    pair_kinds = {}
    for p in range(2):
        pair_kinds.update({f"{name}{p}_ptr": "ptr" for name in ("x", "w", "bias", "res", "out")})
        pair_kinds.update({f"{name}{p}": "i32" for name in ("N", "K", "stride_x", "stride_wn", "stride_wk", "stride_r",
                                                             "stride_o")})
    pair_kinds.update({"M": "i32", "alpha_hi": "fp32", "alpha_lo": "fp32"})
    pair_kinds.update({name: "constexpr" for name in ("HAS_BIAS0", "HAS_RES0", "EPILOGUE0", "HAS_BIAS1", "HAS_RES1",
                                                      "EPILOGUE1", "IS_FP64", "PRECISION", "BLOCK_M", "BLOCK_N",
                                                      "BLOCK_K")})
    pair_cases = [(f"squeeze E1{' bias' if bias else ''} w + expand-grad E3 res wT",
                   {"HAS_BIAS0": bias, "HAS_RES0": False, "EPILOGUE0": EPILOGUE_ELU, "stride_wk0": 1,
                    "HAS_BIAS1": False, "HAS_RES1": True, "EPILOGUE1": EPILOGUE_TIMES_ELU_GRAD_OF_RES, "stride_wn1": 1,
                    "IS_FP64": False}) for bias in (True, False)]
    for dtype in AOT_DTYPES:
        configs = conv1x1_configs(torch.float32 if dtype == "fp32" else None)
        variants += expand(conv1x1_pair_kernel, pair_kinds, pair_cases, launch_configs(configs), dtypes=(dtype,),
                           div16=("M", *(n for n, k in pair_kinds.items() if k == "i32" and n != "M")),
                           aligned=("out0_ptr", "out1_ptr"))

    # The launches weight_grads makes: compress_skip's one 1x1 and a residual distilling block's
    # expand (1x1), 3x3 and squeeze (1x1) through weight_grad_tiles_kernel (unused problem slots
    # repeat problem 0); two or three blocks' in one launch (weight_grad_blocks) through
    # weight_grad_blocks_kernel, whose taps are run-time values.
    def tiles_kinds(slots, taps_kind):
        kinds = {"part_ptr": "*fp32"}
        for p in range(slots):
            kinds.update({f"g{p}_ptr": "ptr", f"x{p}_ptr": "ptr"})
            kinds.update({f"{name}{p}": "i32" for name in ("N", "K", "stride_g", "stride_x", "seg")})
            if taps_kind == "i32":  # after each problem's arguments, else with the constexprs
                kinds[f"taps{p}"] = "i32"
        kinds.update({name: "i32" for name in ("M", "H", "W", "rows_per_split", "row_len")})
        kinds["PROBLEMS"] = "constexpr"
        if taps_kind == "constexpr":
            kinds.update({f"TAPS{p}": "constexpr" for p in range(slots)})
        kinds.update({name: "constexpr" for name in ("IS_FP64", "PRECISION", "ROW_ALIGN", "BLOCK_M", "BLOCK_N",
                                                     "BLOCK_K")})
        return kinds

    kernels = [
        (weight_grad_tiles_kernel, 3, tiles_kinds(3, "constexpr"),
         [("1 problem, 1x1", {"PROBLEMS": 1, "TAPS0": 1, "TAPS1": 1, "TAPS2": 1}),
          ("3 problems, 1x1 3x3 1x1", {"PROBLEMS": 3, "TAPS0": 1, "TAPS1": 9, "TAPS2": 1})]),
        (weight_grad_blocks_kernel, WEIGHT_GRAD_MAX_PROBLEMS, tiles_kinds(WEIGHT_GRAD_MAX_PROBLEMS, "i32"),
         [(f"{3 * blocks} problems, {blocks} blocks", {"PROBLEMS": 3 * blocks}) for blocks in (2, 3)]),
    ]
    for kernel, slots, kinds, cases in kernels:
        ints = [f"{name}{p}" for p in range(slots) for name in ("N", "K", "stride_g", "stride_x", "seg")]
        for dtype in AOT_DTYPES:
            for aligned in (True, False):
                configs = launch_configs(WEIGHT_GRAD_TILES_CONFIGS[(dtype == "fp32", aligned)])
                if dtype != "fp32" and aligned:
                    configs += [(f"{config_label(c)} [candidate]", c) for c in WEIGHT_GRAD_CANDIDATES]
                unit = (4 if dtype == "fp32" else 8) if aligned else 1
                labelled = [(f"{label} align {unit}", {**values, "IS_FP64": False, "ROW_ALIGN": unit})
                            for label, values in cases]
                # part_ptr is allocated by weight_grads; ROW_ALIGN > 1 also means every g and x
                # row starts 16-byte aligned (row_align counts the storage offsets).
                pointers = ("part_ptr", *(f"{t}{p}_ptr" for p in range(slots) for t in "gx")) if aligned else (
                    "part_ptr",)
                variants += expand(kernel, kinds, labelled, configs, dtypes=(dtype,),
                                   div16=("M", "H", "W", "rows_per_split", "row_len", *ints), aligned=pointers)

    # The weight's dtype is the storage dtype here (fastdrn.DRN casts weights to it); fp32 partials.
    slots = range(WEIGHT_GRAD_MAX_PROBLEMS)
    scatter_kinds = {"part_ptr": "*fp32", "S": "i32", "L": "i32"}
    for p in slots:
        scatter_kinds.update({f"dw{p}_ptr": "ptr", f"db{p}_ptr": "ptr"})
        scatter_kinds.update({f"{name}{p}": "i32" for name in ("seg", "N", "K", "T", "sdn", "sdk", "sdt")})
    scatter_kinds.update(PROBLEMS="constexpr", BLOCK="constexpr")
    scatter_config = triton.Config({"BLOCK": SUM_PARTIALS_SCATTER_BLOCK}, num_warps=4, num_stages=1)
    variants += expand(sum_partials_scatter_kernel, scatter_kinds,
                       [(f"{problems} problem{'s' if problems > 1 else ''}", {"PROBLEMS": problems})
                        for problems in (1, 3, 6, 9)],
                       [(config_label(scatter_config) + " [fixed]", scatter_config)], dtypes=AOT_DTYPES,
                       div16=("L",), needs_mma=False,
                       aligned=("part_ptr", *(f"d{t}{p}_ptr" for p in slots for t in "wb")))
    return variants
