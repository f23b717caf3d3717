"""Pixel-row GEMM kernels that several fused ops share.

A 1x1 convolution over channels_last activations is a GEMM over M = N*H*W pixel rows. These two
kernels carry every 1x1 product of the forward and backward passes: the squeeze of an RDB, the
compression of a group, and the transposed products of their input gradients (`conv1x1_kernel`);
and every weight gradient, 1x1 or 3x3, as deterministic split-M partial sums (`weight_grad_kernel`),
added up in a fixed order, cast and laid out as nn.Conv2d's by one more launch (`sum_partials_kernel`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from torch.library import wrap_triton

from fastdrn.backend import interpreting

from ._common import cdiv, check_int32, dot_precision, elu, elu_grad_from_input, elu_grad_from_output, grad_split, is_fp64, join_alpha, launch, split_alpha

EPILOGUE_LINEAR = 0   # out = acc + bias (+ res on columns < NRES)
EPILOGUE_ELU = 1      # out = ELU(acc + bias) (+ res on columns < NRES)
EPILOGUE_ELU_GRAD = 2  # out = res * ELU'(acc + bias): the gradient through an ELU, recomputing its input
EPILOGUE_TIMES_ELU_GRAD_OF_RES = 3  # out = (acc + bias) * ELU'(x) where res = ELU(x) was saved


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
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
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
    alpha = join_alpha(alpha_hi, alpha_lo, IS_FP64)
    mask = m_ok[:, None] & n_ok[None, :]
    if EPILOGUE == 1:
        acc = elu(acc, alpha)
    if EPILOGUE == 2:
        g = tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :], mask=mask, other=0.0)
        acc = g.to(acc.dtype) * elu_grad_from_input(acc, alpha)
    elif EPILOGUE == 3:
        y = tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :], mask=mask, other=0.0)
        acc = acc * elu_grad_from_output(y.to(acc.dtype), alpha)
    elif HAS_RES:
        res_ok = m_ok[:, None] & (rn[None, :] < NRES)
        acc += tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :], mask=res_ok, other=0.0).to(acc.dtype)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def weight_grad_kernel(
    g_ptr,       # [M, N] gradient at the conv's output, row stride stride_gm
    x_ptr,       # [M, K] the conv's input, row stride stride_xm
    part_ptr,    # [S, N*K*TAPS (+ N when HAS_BIAS)] partial sums (fp32, or fp64 for float64): each
                 # row is one split's weight gradient in nn.Conv2d order (n, k, tap), then its bias's
    M,           # pixel rows
    N,           # output channels
    K,           # input channels
    H,           # image height (3x3 taps only)
    W,           # image width (3x3 taps only)
    rows_per_split,  # pixel rows per partial, a multiple of BLOCK_M
    stride_gm,   # elements between pixel rows of g
    stride_xm,   # elements between pixel rows of x
    TAPS: tl.constexpr,      # 1 for a 1x1 conv; 9 for a 3x3 conv with padding 1 (x read at the tap's shift)
    HAS_BIAS: tl.constexpr,
    IS_FP64: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input_precision (see dot_precision)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # program_id(0) picks the (N, K) tile, program_id(1) = split * TAPS + tap. Every partial is
    # written by exactly one program; the host sums them in a fixed order (no atomics).
    num_k_tiles = tl.cdiv(K, BLOCK_K)
    pid_n = tl.program_id(0) // num_k_tiles
    pid_k = tl.program_id(0) % num_k_tiles
    split = tl.program_id(1) // TAPS
    tap = tl.program_id(1) % TAPS
    shift_y = tap // 3 - 1 if TAPS == 9 else 0
    shift_x = tap % 3 - 1 if TAPS == 9 else 0
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = rn < N
    k_ok = rk < K
    acc_dtype = tl.float64 if IS_FP64 else tl.float32
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=acc_dtype)
    bias_acc = tl.zeros((BLOCK_N,), dtype=acc_dtype)
    row_start = split * rows_per_split
    for m0 in range(row_start, tl.minimum(row_start + rows_per_split, M), BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < M
        g = tl.load(g_ptr + rm[:, None] * stride_gm + rn[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        if TAPS == 9:
            h = (rm // W) % H + shift_y
            w = rm % W + shift_x
            src_ok = m_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            src = rm + shift_y * W + shift_x
        else:
            src_ok = m_ok
            src = rm
        x = tl.load(x_ptr + src[:, None] * stride_xm + rk[None, :], mask=src_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(g), x, acc, input_precision=PRECISION)
        if HAS_BIAS:
            bias_acc += tl.sum(g.to(acc_dtype), axis=0)
    row = part_ptr + split * (N * K * TAPS + (N if HAS_BIAS else 0))
    tl.store(row + (rn[:, None] * K + rk[None, :]) * TAPS + tap, acc, mask=n_ok[:, None] & k_ok[None, :])
    if HAS_BIAS:
        if (pid_k == 0) & (tap == 0):
            tl.store(row + N * K * TAPS + rn, bias_acc, mask=n_ok)


@triton.jit
def sum_partials_kernel(
    part_ptr,    # [S, L] partial sums (fp32, or fp64 for float64), contiguous
    dw_ptr,      # [NW] the weight gradient: entries [0, NW) of the sum, in the weight's dtype
    db_ptr,      # [L - NW] the bias gradient: entries [NW, L) of the sum (none when L == NW)
    S,           # partials per entry
    NW,          # weight entries
    L,           # entries per partial
    BLOCK: tl.constexpr,
):
    # One program per BLOCK entries, adding the S partials in index order: the same sum on every
    # run (deterministic), and no atomics.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < L
    acc = tl.load(part_ptr + offs, mask=ok, other=0.0)
    for s in range(1, S):
        acc += tl.load(part_ptr + s * L + offs, mask=ok, other=0.0)
    tl.store(dw_ptr + offs, acc.to(dw_ptr.dtype.element_ty), mask=offs < NW)
    tl.store(db_ptr + (offs - NW), acc.to(db_ptr.dtype.element_ty), mask=ok & (offs >= NW))


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

SUM_PARTIALS_BLOCK = 1024  # one fixed launch config, the same under the interpreter and on a GPU

WEIGHT_GRAD_BLOCK_M_GPU = 64
WEIGHT_GRAD_INTERPRETER = triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=1)
WEIGHT_GRAD_CONFIGS = [
    # BLOCK_K 64 at 4 warps spilled on sm_80 for the 3x3 taps (AOT check).
    triton.Config({"BLOCK_M": WEIGHT_GRAD_BLOCK_M_GPU, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": WEIGHT_GRAD_BLOCK_M_GPU, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]
# Float32 (3xTF32): the 128 x 64 tile spilled on sm_80 and sm_90.
WEIGHT_GRAD_FP32_CONFIGS = [
    WEIGHT_GRAD_CONFIGS[0],
    triton.Config({"BLOCK_M": WEIGHT_GRAD_BLOCK_M_GPU, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
]


def conv1x1_configs(dtype: torch.dtype) -> list:
    return CONV1X1_FP32_CONFIGS if dtype == torch.float32 else CONV1X1_CONFIGS


def weight_grad_configs(dtype: torch.dtype) -> list:
    return WEIGHT_GRAD_FP32_CONFIGS if dtype == torch.float32 else WEIGHT_GRAD_CONFIGS


# Keyed by "float32 storage?": each storage width autotunes over its own configs.
conv1x1_tuned = {fp32: triton.autotune(configs=conv1x1_configs(torch.float32 if fp32 else None),
                                       key=["N", "K", "EPILOGUE"])(conv1x1_kernel) for fp32 in (False, True)}
weight_grad_tuned = {fp32: triton.autotune(configs=weight_grad_configs(torch.float32 if fp32 else None),
                                           key=["N", "K", "TAPS"])(weight_grad_kernel) for fp32 in (False, True)}


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
        out = torch.empty((n_img, n, height, width), device=x.device, dtype=x.dtype,
                          memory_format=torch.channels_last)
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


def weight_grad(g: torch.Tensor, g_stride: int, x: torch.Tensor, x_stride: int, n: int, k: int, taps: int,
                with_bias: bool, weight_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dW (n, k, kh, kw) and db (n,) of a conv from its input rows x and output gradient rows g.

    Split-M partials in fp32 (fp64 for float64), then one launch that adds them in a fixed order and
    writes both gradients in the weight's dtype and layout: bitwise reproducible run to run, no atomics.
    """
    n_img, _, height, width = g.shape
    m = n_img * height * width
    block_m = WEIGHT_GRAD_INTERPRETER.kwargs["BLOCK_M"] if interpreting() else WEIGHT_GRAD_BLOCK_M_GPU
    rows_per_split = grad_split(m, block_m, cdiv(n, 64) * cdiv(k, 64) * taps)
    splits = cdiv(m, rows_per_split)
    acc_dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
    n_weight = n * k * taps
    length = n_weight + (n if with_bias else 0)
    partials = torch.empty((splits, length), device=g.device, dtype=acc_dtype)
    check_int32("weight gradient", m * g_stride, m * x_stride, partials.numel())
    launch(
        weight_grad_kernel, weight_grad_tuned[g.dtype == torch.float32],
        lambda meta: (cdiv(n, meta["BLOCK_N"]) * cdiv(k, meta["BLOCK_K"]), splits * taps),
        WEIGHT_GRAD_INTERPRETER,
        g_ptr=g, x_ptr=x, part_ptr=partials,
        M=m, N=n, K=k, H=height, W=width, rows_per_split=rows_per_split, stride_gm=g_stride, stride_xm=x_stride,
        TAPS=taps, HAS_BIAS=with_bias, IS_FP64=is_fp64(g), PRECISION=dot_precision(g.dtype),
    )
    kernel_size = 3 if taps == 9 else 1
    dw = torch.empty((n, k, kernel_size, kernel_size), device=g.device, dtype=weight_dtype)
    db = torch.empty((n,), device=g.device, dtype=weight_dtype) if with_bias else None
    wrap_triton(sum_partials_kernel)[(cdiv(length, SUM_PARTIALS_BLOCK),)](
        part_ptr=partials, dw_ptr=dw, db_ptr=db if with_bias else dw, S=splits, NW=n_weight, L=length,
        BLOCK=SUM_PARTIALS_BLOCK, num_warps=4, num_stages=1)
    return dw, db


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile check (kernels/registry.py, `python -m fastdrn.kernels.aot_check`).
# ---------------------------------------------------------------------------------------------
def aot_variants():
    """Every way these two kernels can be compiled for a GPU, as registry.Variant records.

    conv1x1_kernel: every EPILOGUE_* code of this module, with or without bias, with or without
    res (epilogues past EPILOGUE_ELU always read res), in both weight orientations (a launcher's
    unit weight stride is specialized to constexpr 1 at launch); weight_grad_kernel: 1 and 9 taps,
    with or without bias. Both at every autotune config and every pinned config (FASTDRN_NUM_WARPS,
    FASTDRN_AUTOTUNE=0), for fp32, bf16 and fp16 storage. IS_FP64 is always False on a GPU.
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

    grad_cases = [(f"taps{taps}{' bias' if has_bias else ''}", {"TAPS": taps, "HAS_BIAS": has_bias, "IS_FP64": False})
                  for taps in (1, 9) for has_bias in (True, False)]
    grad_kinds = {
        "g_ptr": "ptr", "x_ptr": "ptr", "part_ptr": "*fp32",
        "M": "i32", "N": "i32", "K": "i32", "H": "i32", "W": "i32", "rows_per_split": "i32",
        "stride_gm": "i32", "stride_xm": "i32",
        "TAPS": "constexpr", "HAS_BIAS": "constexpr", "IS_FP64": "constexpr", "PRECISION": "constexpr",
        "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
    }
    for dtype in AOT_DTYPES:
        configs = weight_grad_configs(torch.float32 if dtype == "fp32" else None)
        variants += expand(weight_grad_kernel, grad_kinds, grad_cases, launch_configs(configs),
                           dtypes=(dtype,), div16=("M", "N", "K", "H", "W", "rows_per_split", "stride_gm", "stride_xm"))

    # The weight's dtype is the storage dtype here (fastdrn.DRN casts weights to it); fp32 partials.
    sum_kinds = {"part_ptr": "*fp32", "dw_ptr": "ptr", "db_ptr": "ptr", "S": "i32", "NW": "i32", "L": "i32",
                 "BLOCK": "constexpr"}
    sum_config = triton.Config({"BLOCK": SUM_PARTIALS_BLOCK}, num_warps=4, num_stages=1)
    variants += expand(sum_partials_kernel, sum_kinds, [("", {})], [(config_label(sum_config) + " [fixed]", sum_config)],
                       dtypes=AOT_DTYPES, div16=("S", "NW", "L"), needs_mma=False, aligned=("part_ptr", "dw_ptr"))
    return variants
