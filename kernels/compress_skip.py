"""Fused group compression: out = ELU(conv1x1(z, w, b)) + skip, forward and backward.

Kernels: the shared pixel-row GEMM (kernels/gemm.py) does all the arithmetic. Forward is one
launch (GEMM, bias, ELU and the long skip fused in the epilogue). Backward recomputes the
pre-activation from z instead of saving it (one GEMM, and no activation-sized save):
  g  = dy * ELU'(z W^T + b)                  one launch, ELU' from the recomputed input
  dz = g W                                   one launch, the same GEMM with W transposed
  dW, db = split-M partials of g^T z, g      one launch, and one more to sum them in a fixed order
  dskip = dy
"""
from __future__ import annotations

import torch
from torch.library import triton_op

from ._common import check_saved, check_unbatched, direct_launches, eager_fast_path, function_apply, row_stride, rows
from .gemm import EPILOGUE_ELU, EPILOGUE_ELU_GRAD, EPILOGUE_LINEAR, conv1x1, weight_grads
from .plans import planned


# ---- launchers ------------------------------------------------------------------------------
def _forward(z, w, b, skip, alpha):
    z, skip = rows(z), rows(skip)
    return conv1x1(z, row_stride(z), w, False, b, EPILOGUE_ELU, alpha, res=skip, res_stride=row_stride(skip))


def _backward(grad, z, w, b, alpha):
    z, grad = rows(z), rows(grad)
    g = conv1x1(z, row_stride(z), w, False, b, EPILOGUE_ELU_GRAD, alpha, res=grad, res_stride=row_stride(grad))
    dz = conv1x1(g, row_stride(g), w, True, None, EPILOGUE_LINEAR, alpha)
    [(dw, db)] = weight_grads((g, row_stride(g), z, row_stride(z), w.shape[0], w.shape[1], 1, w))
    return dz, dw, db


# ---- registered ops and autograd --------------------------------------------------------------
@triton_op("fastdrn::compress_skip", mutates_args={})
def compress_skip_op(z: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, skip: torch.Tensor,
                     alpha: float) -> torch.Tensor:
    return _forward(z, w, b, skip, alpha)


@triton_op("fastdrn::compress_skip_backward", mutates_args={})
def compress_skip_backward_op(grad: torch.Tensor, z: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                              alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(grad, z, w, b, alpha)


def _setup_context(ctx, inputs, output):
    z, w, b, _skip, alpha = inputs
    ctx.save_for_backward(z, w, b)
    ctx.alpha = alpha
    ctx.has_bias = b is not None


def _input_grads(ctx, grad, backward):
    """Gradients for (z, w, b, skip, alpha) from backward(grad, z, w, b, alpha): the registered
    backward op, or _backward itself on the eager path."""
    if torch.is_grad_enabled():
        raise RuntimeError("fastdrn compress_skip: double backward (create_graph=True) is not supported")
    z, w, b = ctx.saved_tensors
    check_saved("compress_skip", (z, w, b), grad)
    # As the kernels read them, whatever layout a saved_tensors_hooks unpack handed them back in.
    dz, dw, db = backward(grad, z, w.contiguous(), None if b is None else b.contiguous(), ctx.alpha)
    return dz, dw, db if ctx.has_bias else None, grad, None


def _autograd_backward(ctx, grad):
    return _input_grads(ctx, grad, compress_skip_backward_op)


compress_skip_op.register_autograd(_autograd_backward, setup_context=_setup_context)


class _EagerCompressSkip(torch.autograd.Function):
    """The registered op without the custom-op dispatch (kernels/_common.py eager_fast_path)."""

    @staticmethod
    def forward(ctx, z, w, b, skip, alpha):
        with direct_launches():
            out = planned(_forward_region, (alpha,), [z, w, b, skip])
        _setup_context(ctx, (z, w, b, skip, alpha), out)
        return out

    @staticmethod
    def backward(ctx, grad):
        check_unbatched("compress_skip", grad)
        with direct_launches():
            return _input_grads(ctx, grad, _planned_backward)


# Eager calls replay launch plans (kernels/plans.py) of the launchers above.
def _forward_region(static, inputs):
    return _forward(*inputs, static[0])


def _backward_region(static, inputs):
    return _backward(*inputs, static[0])


def _planned_backward(grad, z, w, b, alpha):
    return planned(_backward_region, (alpha,), [rows(grad), z, w, b])


_apply = function_apply(_EagerCompressSkip)  # apply without its Python layer (kernels/_common.py)


# ---- public function --------------------------------------------------------------------------
def compress_skip(z, w, b, skip, alpha=0.2):
    """ELU(conv1x1(z, w, b)) + skip through the Triton kernels (inputs checked by fastdrn.ops)."""
    if eager_fast_path():
        return _apply(z, w, b, skip, float(alpha))
    return compress_skip_op(z, w, b, skip, float(alpha))
