"""The fused ops as a hostile caller would use them (issue 14): weights in any layout, non-finite
values, dtypes and devices the interpreter cannot run, bad alpha and widths, the backend switch
flipped late. Every check compares against the float64 reference of fastdrn.reference."""
import os
import subprocess
import sys
import zlib

import pytest
import torch

import fastdrn
from fastdrn import backend, ops, reference
from helpers import (SIXTEEN_BIT, assert_close, assert_op_grads_close, draws, dtypes_for, float64_leaves,
                     median, pytorch_fp32_convs, randn, rel_err, tolerance, where)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# N, D, F, d, H, W: tiny (the interpreter is slow), odd where it can be.
N, D, F, DIST, H, W = 2, 5, 6, 3, 4, 5


def _fused_runs(device, dtype=None) -> bool:
    return backend.use_triton("residual_distill", torch.device(device), dtype)


def _needs_fused(device):
    if not _fused_runs(device):
        pytest.skip("the fused kernels do not run here")


# ---- weights in any memory layout (item 2) --------------------------------------------------------

def _transposed(shape):
    """A (C_out, C_in, ...) view of a (C_in, C_out, ...) tensor, or every other element of a bias."""
    if len(shape) == 1:
        return (2 * shape[0],), lambda base: base[::2]
    return (shape[1], shape[0], *shape[2:]), lambda base: base.transpose(0, 1)


def _expanded(shape):
    """One filter (one bias value) broadcast to every output channel: a stride-0 view."""
    return (1, *shape[1:]), lambda base: base.expand(*shape)


def _sliced(shape):
    """Every other input channel of a wider weight (every third bias value)."""
    if len(shape) == 1:
        return (3 * shape[0],), lambda base: base[1::3]
    return (shape[0], 2 * shape[1], *shape[2:]), lambda base: base[:, ::2]


def _channels_last(shape):
    """A 3x3 weight after model.to(memory_format=torch.channels_last); other tensors as they are."""
    if len(shape) == 4 and shape[2] == 3:
        return shape, lambda base: base.contiguous(memory_format=torch.channels_last)
    return shape, lambda base: base


LAYOUTS = {"transposed": _transposed, "expanded": _expanded, "sliced": _sliced, "channels_last": _channels_last}
BLOCK_SHAPES = [(F, D, 1, 1), (F,), (F, F, 3, 3), (F,), (D + DIST, F, 1, 1), (D + DIST,)]
BLOCK_NAMES = ("w_squeeze", "b_squeeze", "w_conv", "b_conv", "w_expand", "b_expand")


def _views(layout, shapes, dtype, device):
    """Leaf tensors (the storage a model would own) and the views of them the op gets."""
    leaves, makers = [], []
    for shape in shapes:
        base_shape, make = LAYOUTS[layout](shape)
        leaves.append(randn(*base_shape, dtype=dtype, device=device, scale=0.5, requires_grad=True))
        makers.append(make)
    return leaves, makers


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_residual_distill_reads_weights_in_any_layout(layout, device):
    """Every weight and bias of the block a non-contiguous view at once: output and the gradient of
    every leaf (reached back through the view) within SPEC's tolerance of float64."""
    _needs_fused(device)
    for dtype in dtypes_for(device):
        fwd_tol, grad_tol = tolerance(device, dtype)

        def draw():
            leaves, makers = _views(layout, BLOCK_SHAPES, dtype, device)
            weights = [make(leaf) for make, leaf in zip(makers, leaves)]
            if layout != "channels_last":
                assert not any(w.is_contiguous() for w in weights)
            z = randn(N, D, H, W, dtype=dtype, device=device, requires_grad=True)
            out = ops.residual_distill(z, *weights)
            grad_out = randn(*out.shape, dtype=dtype, device=device)
            grads = torch.autograd.grad(out, [z, *leaves], grad_out)

            ref_grads, eager_grads = [], []
            for ref_dtype, into in ((torch.float64, ref_grads), (dtype, eager_grads)):
                ref_leaves = [t.detach().to(ref_dtype).requires_grad_() for t in (z, *leaves)]
                ref_weights = [make(leaf) for make, leaf in zip(makers, ref_leaves[1:])]
                result = reference.residual_distill(ref_leaves[0], *ref_weights)
                into += torch.autograd.grad(result, ref_leaves, grad_out.to(ref_dtype))
                ref = result if ref_dtype == torch.float64 else ref
            assert_close(out, ref, fwd_tol, f"{layout} {dtype} forward")
            return grads, eager_grads, ref_grads

        assert_op_grads_close(dtype, grad_tol, draw, ("z", *BLOCK_NAMES), f"{layout} {dtype}")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_compress_skip_reads_weights_in_any_layout(layout, device):
    _needs_fused(device)
    c_in, c_out = D + 2 * DIST, D
    for dtype in dtypes_for(device):
        fwd_tol, grad_tol = tolerance(device, dtype)

        def draw():
            leaves, makers = _views(layout, [(c_out, c_in, 1, 1), (c_out,)], dtype, device)
            w, b = (make(leaf) for make, leaf in zip(makers, leaves))
            z = randn(N, c_in, H, W, dtype=dtype, device=device, requires_grad=True)
            skip = randn(N, c_out, H, W, dtype=dtype, device=device, requires_grad=True)
            out = ops.compress_skip(z, w, b, skip)
            grad_out = randn(*out.shape, dtype=dtype, device=device)
            grads = torch.autograd.grad(out, [z, skip, *leaves], grad_out)

            ref_grads, eager_grads = [], []
            for ref_dtype, into in ((torch.float64, ref_grads), (dtype, eager_grads)):
                ref_leaves = [t.detach().to(ref_dtype).requires_grad_() for t in (z, skip, *leaves)]
                rw, rb = (make(leaf) for make, leaf in zip(makers, ref_leaves[2:]))
                result = reference.compress_skip(ref_leaves[0], rw, rb, ref_leaves[1])
                into += torch.autograd.grad(result, ref_leaves, grad_out.to(ref_dtype))
                ref = result if ref_dtype == torch.float64 else ref
            assert_close(out, ref, fwd_tol, f"{layout} {dtype} forward")
            return grads, eager_grads, ref_grads

        assert_op_grads_close(dtype, grad_tol, draw, ("z", "skip", "w", "b"), f"{layout} {dtype}")


def test_in_place_group_reads_weights_in_any_layout(device):
    """The inference path (distill_group without gradients) with one block per layout."""
    _needs_fused(device)
    dtype = torch.float32
    fwd_tol, _ = tolerance(device, dtype)
    y = randn(N, D, H, W, dtype=dtype, device=device)
    blocks, ref_blocks, width = [], [], D
    for layout in sorted(LAYOUTS):
        shapes = [(F, width, 1, 1), (F,), (F, F, 3, 3), (F,), (width + DIST, F, 1, 1), (width + DIST,)]
        leaves, makers = _views(layout, shapes, dtype, device)
        blocks.append(tuple(make(leaf.detach()) for make, leaf in zip(makers, leaves)))
        ref_blocks.append(tuple(make(leaf.detach().double()) for make, leaf in zip(makers, leaves)))
        width += DIST
    with torch.no_grad():
        out = ops.distill_group(y, blocks)
    ref = y.double()
    for block in ref_blocks:
        ref = reference.residual_distill(ref, *block)
    assert_close(out, ref, fwd_tol, "in-place group with non-contiguous weights")


def _column(n, c, h, dtype, device, requires_grad=False):
    """An (n, c, h, 1) image as the transpose of a channels_last (n, c, 1, h) one: channels_last
    contiguous (torch skips size-1 dims), but its width stride is h*c, not c."""
    base = randn(n, c, 1, h, dtype=dtype, device=device, channels_last=True, requires_grad=requires_grad)
    t = base.transpose(2, 3)
    assert t.is_contiguous(memory_format=torch.channels_last) and t.stride(3) == h * c
    return base, t


def test_activations_whose_width_of_1_has_any_stride(device):
    """Width 1 with a width stride that is not the channel count (a 1-row channels_last image
    transposed to a column): compress_skip's z, skip and output gradient, and distill_and_compress's
    input, each such a view. The pixel stride was read off the width's stride, so pixel m was read
    at m*h*c: 0.2 to 1.2 from float64, no error (out of bounds on a GPU)."""
    _needs_fused(device)
    c_in, c_out, height = D + DIST, D, 7  # 7: more pixels than one row of the image
    for dtype in dtypes_for(device):
        fwd_tol, grad_tol = tolerance(device, dtype)
        z_base, z = _column(N, c_in, height, dtype, device, requires_grad=True)
        skip_base, skip = _column(N, c_out, height, dtype, device, requires_grad=True)
        w = randn(c_out, c_in, 1, 1, dtype=dtype, device=device, scale=0.5, requires_grad=True)
        b = randn(c_out, dtype=dtype, device=device, requires_grad=True)
        out = ops.compress_skip(z, w, b, skip)
        _, grad_out = _column(N, c_out, height, dtype, device)
        grads = torch.autograd.grad(out, [z_base, skip_base, w, b], grad_out)
        leaves = float64_leaves(z_base, skip_base, w, b)
        ref = reference.compress_skip(leaves[0].transpose(2, 3), leaves[2], leaves[3], leaves[1].transpose(2, 3))
        ref_grads = torch.autograd.grad(ref, leaves, grad_out.double())
        assert_close(out, ref, fwd_tol, f"compress_skip {dtype} forward")
        for name, g, rg in zip(("z", "skip", "w", "b"), grads, ref_grads):
            assert_close(g, rg, grad_tol, f"compress_skip {dtype} d{name}")

        _, y = _column(N, D, height, dtype, device)
        block = [randn(*shape, dtype=dtype, device=device, scale=0.5) for shape in BLOCK_SHAPES]
        wc, bc = randn(D, D + DIST, 1, 1, dtype=dtype, device=device, scale=0.5), randn(D, dtype=dtype, device=device)
        with torch.no_grad():
            out = ops.distill_and_compress(y, [block], wc, bc)
        ref_block = float64_leaves(*block)
        ref = reference.compress_skip(reference.residual_distill(y.double(), *ref_block), wc.double(), bc.double(),
                                      y.double())
        assert_close(out, ref, fwd_tol, f"distill_and_compress {dtype} forward")


def test_model_with_non_contiguous_parameters_assigned(device):
    """load_state_dict(assign=True) hands the model whatever views the caller had: the fused model
    must give the reference's output and parameter gradients on them."""
    _needs_fused(device)
    cfg = dict(scale=2, n_feats=6, n_groups=1, n_blocks=2, inner=6, distill=3)
    dtype = torch.float32
    fwd_tol, grad_tol = tolerance(device, dtype)
    source = reference.DRN(**cfg).to(device, dtype)
    state = {}
    for name, t in source.state_dict().items():
        if name.startswith("groups.") and t.dim() == 4:
            t = t.transpose(0, 1).contiguous().transpose(0, 1)   # the same values, transposed storage
        elif name.startswith("groups.") and t.dim() == 1:
            t = torch.stack([t, torch.full_like(t, float("nan"))], 1)[:, 0]  # every other element
        state[name] = t
    fast = fastdrn.DRN(**cfg).to(device, dtype)
    fast.load_state_dict(state, assign=True)
    assert not fast.groups[0].blocks[0].squeeze.weight.is_contiguous()
    ref = reference.DRN(**cfg).to(device, torch.float64)
    ref.load_state_dict(source.state_dict())
    x = torch.rand(1, 3, 5, 4, dtype=dtype, device=device)
    with pytorch_fp32_convs():
        out, expected = fast(x), ref(x.double())
        assert_close(out, expected, fwd_tol, "model output")
        grad = torch.randn_like(expected)
        grads = torch.autograd.grad(out, list(fast.parameters()), grad.to(dtype))
        ref_grads = torch.autograd.grad(expected, list(ref.parameters()), grad)
    for (name, _), g, rg in zip(fast.named_parameters(), grads, ref_grads):
        assert_close(g, rg, grad_tol, f"model grad of {name}")


# ---- NaN and Inf pass through as in the reference (item 3) ----------------------------------------

def _poison(kind, tensors):
    """Put one non-finite value where `kind` says. tensors: z, then the weights, detached."""
    nan, inf = float("nan"), float("inf")
    z = tensors[0]
    if kind == "nan bias":
        tensors[2][1] = nan          # b_squeeze for a block, b for compress_skip
    elif kind == "nan pixel":
        z[0, 1, 2, 3] = nan
    elif kind == "+inf pixel":
        z[1, 0, 1, 1] = inf
    elif kind == "-inf pixel":
        z[0, 2, 3, 0] = -inf
    elif kind == "nan weight":
        tensors[1][2, 1, 0, 0] = nan


def _finite_part_tol(device, dtype) -> float:
    """A guard on the finite elements beside the non-finite ones, not a precision claim (those
    elements are a masked subset: the per-dtype checks live in the layout tests and the op tests)."""
    return max(1e-4, 3 * tolerance(device, dtype)[1])


KINDS = ["nan bias", "nan pixel", "+inf pixel", "-inf pixel", "nan weight"]


def _elu_with_nan_derivative(x, alpha=1.0):
    """F.elu with ELU'(NaN) = NaN on every element. F.elu's own CPU backward gives NaN there in its
    vectorized loop but 1 in the scalar loop over a tensor's last few elements (torch 2.13,
    measured: a 64-element tensor gets NaN, an 8-element one 1), so which gradients are NaN would
    depend on where the NaN sits. The kernels propagate NaN (a NaN pre-activation never hides in a
    finite gradient); the oracle here does the same everywhere. Forward values are F.elu's."""
    negative = alpha * torch.expm1(torch.where(x > 0, torch.zeros_like(x), x))
    return torch.where(x > 0, x, negative)


_conv2d = torch.nn.functional.conv2d


def _conv2d_padding_not_a_term(x, w, b=None, stride=1, padding=0):
    """F.conv2d, except that a 3x3 conv's zero padding is no term of its sums, forward and backward:
    the sum over the taps of 1x1 convs of the shifted input, each over the pixels whose source
    exists. F.conv2d on the CPU multiplies the padding's zeros into the weight gradient, so a NaN of
    the output gradient at a border pixel makes NaN * 0 = NaN there, and whether cuDNN does depends on
    its algorithm (one draw of the -inf pixel case, float64: the CPU's F.conv2d gives 324 non-finite
    elements of the 324-element 3x3 weight gradient, an H200's 320, the exact sum 320). The kernels
    skip the padding (kernels/gemm.py); the oracle here does the same."""
    if padding == 0:
        return _conv2d(x, w, b, stride)
    assert padding == 1 and stride == 1 and w.shape[-2:] == (3, 3)
    h, wd = x.shape[-2:]
    out = b[None, :, None, None] if b is not None else 0
    for ky in range(3):
        for kx in range(3):
            dy, dx = ky - 1, kx - 1
            y0, y1, x0, x1 = max(0, -dy), min(h, h - dy), max(0, -dx), min(wd, wd - dx)
            if y0 >= y1 or x0 >= x1:
                continue
            part = torch.einsum("oc,nchw->nohw", w[:, :, ky, kx], x[:, :, y0 + dy:y1 + dy, x0 + dx:x1 + dx])
            out = out + torch.nn.functional.pad(part, (x0, wd - x1, y0, h - y1))
    return out


@pytest.fixture
def nan_consistent_reference(monkeypatch):
    """fastdrn.reference with ELU' of NaN = NaN (see _elu_with_nan_derivative) and a 3x3 conv whose
    padding is no term (see _conv2d_padding_not_a_term)."""
    monkeypatch.setattr(reference.F, "elu", _elu_with_nan_derivative)
    monkeypatch.setattr(reference.F, "conv2d", _conv2d_padding_not_a_term)


def _same_non_finite(out, ref, what) -> float:
    """Non-finite at exactly the reference's elements (docs/numerics.md); returns the finite
    elements' relative error. NaN where the reference has NaN; where it has an infinity, that
    infinity or NaN: a product of inf and a zero that pads a tile (or 3xTF32's split, inf - inf)
    turns inf into NaN, and both say the same to an overflow check."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    bad = ~torch.isfinite(ref)
    assert torch.equal(~torch.isfinite(out), bad), (
        f"{what}: {int((~torch.isfinite(out)).sum())} non-finite elements, the reference has {int(bad.sum())}")
    assert torch.isnan(out[torch.isnan(ref)]).all(), f"{what}: a NaN of the reference is not NaN"
    inf = torch.isinf(ref)
    assert (torch.isnan(out[inf]) | (out[inf] == ref[inf])).all(), f"{what}: an infinity changed sign"
    return rel_err(out[~bad], ref[~bad]) if (~bad).any() else 0.0


def _assert_same_non_finite(out, ref, what, tol=1e-4):
    err = _same_non_finite(out, ref, what)
    assert err <= tol, f"{what} (finite elements): relative error {err:.3e} > {tol:.0e}"


def _check_poisoned_draws(device, dtype, what, draw):
    """draw() poisons fresh random inputs and returns [(name, out, ref)]. Each: non-finite exactly
    where the reference is (_same_non_finite), on every draw; the finite elements within
    _finite_part_tol: on the one draw in float32 and float64, as the median over DRAWS_16BIT draws in
    16-bit. One ELU derivative flipped by 16-bit rounding moves a gradient of these 40-pixel tensors
    by up to ~0.1 (measured in fp16 through the interpreter, the NaN-pixel case's dz on one draw:
    1.06e-1 with the NaN, 9.3e-2 on the same draw with none), so one draw's error is noise there
    (helpers.assert_op_grads_close)."""
    tol = _finite_part_tol(device, dtype)
    errors = {}
    for pieces in draws(dtype, draw):
        for name, out, ref in pieces:
            errors.setdefault(name, []).append(_same_non_finite(out, ref, f"{what} {name}"))
    for name, errs in errors.items():
        assert median(errs) <= tol, (f"{what} {name} (finite elements): median relative error over {len(errs)} "
                                     f"draws {median(errs):.3e} > {tol:.0e} ({', '.join(f'{e:.1e}' for e in errs)})")


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_residual_distill_keeps_nan_and_inf(kind, recompute, device, nan_consistent_reference):
    _needs_fused(device)
    for dtype in dtypes_for(device):
        if where(device) == "gpu" and dtype == torch.float32 and "inf" in kind:
            continue  # 3xTF32 splits inf into inf and inf - inf = NaN: checked in float64 and 16-bit

        def draw():
            tensors = [randn(N, D, H, W, dtype=dtype, device=device)]
            tensors += [randn(*shape, dtype=dtype, device=device, scale=0.5) for shape in BLOCK_SHAPES]
            _poison(kind, tensors)
            inputs = [t.requires_grad_() for t in tensors]
            out = ops.residual_distill(*inputs, recompute=recompute)
            grad_out = randn(*out.shape, dtype=dtype, device=device)
            grads = torch.autograd.grad(out, inputs, grad_out)
            ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
            ref = reference.residual_distill(*ref_inputs)
            ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out.double())
            assert (~torch.isfinite(ref)).any(), "the poisoned input must reach the output"
            return [("forward", out, ref), *zip((f"grad of {n}" for n in ("z", *BLOCK_NAMES)), grads, ref_grads)]

        _check_poisoned_draws(device, dtype, f"{kind} {dtype}", draw)


@pytest.mark.parametrize("recompute", [False, True])
def test_a_saturated_elu_passes_no_gradient(recompute, device):
    """Far below zero ELU's derivative alpha * exp(x) underflows to exactly 0, as in the reference,
    so a squeeze channel whose pre-activation is about -1000 everywhere gets exactly zero weight and
    bias gradients. The kernels read ELU' off the stored output, and -alpha rounded to 16 bits is not
    -alpha (bf16 rounds below it, fp16 above): output + alpha alone would leave a gradient of 1e-4
    of the upstream one there (in bf16 of the wrong sign), and turn 0 * inf into inf. 16-bit only:
    float16 through the interpreter (which refuses bf16), both on a GPU."""
    _needs_fused(device)
    for dtype in ([torch.float16] if where(device) == "interpreter" else [torch.bfloat16, torch.float16]):
        tensors = [randn(N, D, H, W, dtype=dtype, device=device)]
        tensors += [randn(*shape, dtype=dtype, device=device, scale=0.5) for shape in BLOCK_SHAPES]
        tensors[2][0] = -1000.0  # b_squeeze of channel 0: that channel of a is -alpha at every pixel
        inputs = [t.requires_grad_() for t in tensors]
        out = ops.residual_distill(*inputs, recompute=recompute)
        grads = torch.autograd.grad(out, inputs, randn(*out.shape, dtype=dtype, device=device))
        d_w_squeeze, d_b_squeeze = grads[1], grads[2]
        assert d_w_squeeze[1:].abs().sum() > 0, "the other channels must pass gradient"
        assert torch.all(d_w_squeeze[0] == 0), f"{dtype}: dW_squeeze of a saturated channel {d_w_squeeze[0].flatten()}"
        assert d_b_squeeze[0] == 0, f"{dtype}: db_squeeze of a saturated channel is {d_b_squeeze[0].item()}"



# recompute=False: ELU'(b) is read off the saved b by the conv1x1_pair kernel; True: off the b the
# 3x3 kernel recomputes. ELU'(a) is read off the recomputed a either way.
@pytest.mark.parametrize("recompute", [False, True])
def test_elu_of_exactly_zero_passes_alpha_times_the_gradient(recompute, device):
    """Where a pre-activation is exactly 0, F.elu's derivative is alpha (its x <= 0 branch), not 1.
    The kernels read ELU' off the stored output, so an output of 0 must take that branch too: a
    squeeze channel with zero weights and bias and a 3x3 output channel with zero weights and bias
    are exactly ELU(0) = 0 at every pixel, and every gradient must match the float64 reference's."""
    _needs_fused(device)
    for dtype in dtypes_for(device):
        grad_tol = tolerance(device, dtype)[1]

        def draw():
            tensors = [randn(N, D, H, W, dtype=dtype, device=device)]
            tensors += [randn(*shape, dtype=dtype, device=device, scale=0.5) for shape in BLOCK_SHAPES]
            for weight, bias, channel in ((1, 2, 0), (3, 4, 1)):  # a's channel 0, b's channel 1: ELU(0)
                tensors[weight][channel] = 0.0
                tensors[bias][channel] = 0.0
            inputs = [t.requires_grad_() for t in tensors]
            out = ops.residual_distill(*inputs, recompute=recompute)
            grad_out = randn(*out.shape, dtype=dtype, device=device)
            grads = torch.autograd.grad(out, inputs, grad_out)

            def reference_grads(ref_dtype):
                leaves = [t.detach().to(ref_dtype).requires_grad_() for t in inputs]
                return torch.autograd.grad(reference.residual_distill(*leaves), leaves, grad_out.to(ref_dtype))

            ref_grads = reference_grads(torch.float64)
            return grads, reference_grads(dtype) if dtype in SIXTEEN_BIT else ref_grads, ref_grads

        assert_op_grads_close(dtype, grad_tol, draw, ("z", *BLOCK_NAMES), f"{dtype} recompute={recompute}")

@pytest.mark.parametrize("kind", KINDS)
def test_compress_skip_keeps_nan_and_inf(kind, device, nan_consistent_reference):
    _needs_fused(device)
    c_in, c_out = D + DIST, D
    for dtype in dtypes_for(device):
        if where(device) == "gpu" and dtype == torch.float32 and "inf" in kind:
            continue

        def draw():
            tensors = [randn(N, c_in, H, W, dtype=dtype, device=device),
                       randn(c_out, c_in, 1, 1, dtype=dtype, device=device, scale=0.5),
                       randn(c_out, dtype=dtype, device=device),
                       randn(N, c_out, H, W, dtype=dtype, device=device)]
            _poison(kind, tensors)
            inputs = [t.requires_grad_() for t in tensors]
            out = ops.compress_skip(*inputs)
            grad_out = randn(*out.shape, dtype=dtype, device=device)
            grads = torch.autograd.grad(out, inputs, grad_out)
            ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
            ref = reference.compress_skip(*ref_inputs)
            ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out.double())
            return [("forward", out, ref), *zip((f"grad of {n}" for n in ("z", "w", "b", "skip")), grads, ref_grads)]

        _check_poisoned_draws(device, dtype, f"{kind} {dtype}", draw)


def test_elu_of_non_finite_values_is_f_elu(device):
    """compress_skip with an identity weight is ELU itself: NaN stays NaN, ELU(+inf) = +inf,
    ELU(-inf) = -alpha, ELU(0) = 0; ELU'(NaN) = NaN, ELU'(+inf) = 1, ELU'(-inf) = 0, ELU'(0) = alpha."""
    _needs_fused(device)
    for dtype in dtypes_for(device):
        values = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -1.5, 2.0, -0.0],
                              dtype=dtype, device=device)
        z = values.view(1, 1, 1, -1).clone().requires_grad_()
        w = torch.ones(1, 1, 1, 1, dtype=dtype, device=device)
        skip = torch.zeros_like(z)
        out = ops.compress_skip(z, w, None, skip, alpha=0.3)
        (grad,) = torch.autograd.grad(out, z, torch.ones_like(out))
        zr = values.double().view(1, 1, 1, -1)
        ref = torch.nn.functional.elu(zr, 0.3)
        ref_grad = torch.tensor([float("nan"), 1.0, 0.0, 0.3, 0.3 * torch.exp(torch.tensor(-1.5)).item(), 1.0, 0.3],
                                dtype=torch.float64).view(1, 1, 1, -1)
        tol = _finite_part_tol(device, dtype)
        _assert_same_non_finite(out, ref, f"{dtype} ELU", tol)
        _assert_same_non_finite(grad, ref_grad, f"{dtype} ELU'", tol)


def test_a_nan_parameter_makes_the_model_output_nan(device):
    """One NaN bias inside a group: the fused model's output is NaN wherever the reference's is (a
    diverging model must not look finite)."""
    _needs_fused(device)
    cfg = dict(scale=2, n_feats=6, n_groups=1, n_blocks=1, inner=6, distill=3)
    dtype = torch.float32
    ref = reference.DRN(**cfg).to(device, dtype)
    with torch.no_grad():
        ref.groups[0].blocks[0].conv.bias[2] = float("nan")
    fast = fastdrn.DRN(**cfg).to(device, dtype)
    fast.load_state_dict(ref.state_dict())
    x = torch.rand(1, 3, 4, 5, dtype=dtype, device=device)
    with torch.no_grad():
        _assert_same_non_finite(fast(x), ref(x), "model output")
        assert torch.isnan(fast(x)).all()


# ---- bfloat16 and meta tensors in the interpreter (item 7, minor) ---------------------------------

def _block_inputs(dtype, device="cpu"):
    return [randn(N, D, H, W, dtype=dtype, device=device)] + [
        randn(*shape, dtype=dtype, device=device, scale=0.5) for shape in BLOCK_SHAPES]


@pytest.mark.skipif(not backend.interpreting(), reason="about Triton's interpreter")
def test_interpreter_refuses_bfloat16_when_forced(monkeypatch):
    monkeypatch.setenv("FASTDRN_BACKEND", "triton")
    with pytest.raises(RuntimeError, match=r"bfloat16.*FASTDRN_BACKEND=torch"):
        ops.residual_distill(*_block_inputs(torch.bfloat16))
    z, *_ = _block_inputs(torch.bfloat16)
    with pytest.raises(RuntimeError, match="bfloat16"):
        ops.compress_skip(z, torch.randn(3, D, 1, 1).bfloat16(), None, torch.randn(N, 3, H, W).bfloat16())


@pytest.mark.skipif(not backend.interpreting(), reason="about Triton's interpreter")
def test_interpreter_auto_runs_bfloat16_through_pytorch_math():
    """auto routes bf16 CPU tensors to the reference math: within bf16's tolerance of float64
    (the interpreter's own bf16 products were off by a factor of ~1e9)."""
    inputs = _block_inputs(torch.bfloat16)
    assert "bfloat16" in backend.triton_unavailable_reason(torch.device("cpu"), torch.bfloat16)
    out = ops.residual_distill(*inputs)
    ref = reference.residual_distill(*[t.double() for t in inputs])
    assert_close(out, ref, 2e-2, "bf16 block through auto")
    model = fastdrn.DRN(scale=2, n_feats=6, n_groups=1, n_blocks=1, inner=6, distill=3)
    x = torch.rand(1, 3, 4, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    ref_model = reference.DRN(scale=2, n_feats=6, n_groups=1, n_blocks=1, inner=6, distill=3).double()
    ref_model.load_state_dict(model.state_dict())
    assert_close(out, ref_model(x.double()), 2e-2, "bf16 autocast model through auto")


@pytest.mark.skipif(not backend.interpreting(), reason="about Triton's interpreter")
def test_interpreter_float16_stays_on_the_kernels():
    """float16 is computed right by the interpreter (measured 4e-4 against float64 on this block):
    it is not refused, and stays within SPEC's 16-bit tolerance."""
    assert backend.use_triton("residual_distill", torch.device("cpu"), torch.float16)
    inputs = _block_inputs(torch.float16)
    out = ops.residual_distill(*inputs)
    assert_close(out, reference.residual_distill(*[t.double() for t in inputs]), 2e-2, "fp16 block")


def test_meta_tensors_give_shapes_in_auto_and_a_clear_error_when_forced(monkeypatch):
    inputs = _block_inputs(torch.float32, device="meta")
    out = ops.residual_distill(*inputs)
    assert out.device.type == "meta" and out.shape == (N, D + DIST, H, W)
    c = ops.compress_skip(out, torch.empty(D, D + DIST, 1, 1, device="meta"), None,
                          torch.empty(N, D, H, W, device="meta"))
    assert c.shape == (N, D, H, W)
    monkeypatch.setenv("FASTDRN_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="meta"):
        ops.residual_distill(*inputs)


# ---- alpha and widths (item 8, minor) ----------------------------------------------------------

@pytest.mark.parametrize("alpha", [-0.2, 0.0, -1e-30, float("nan"), float("inf")])
def test_alpha_must_be_finite_and_positive(alpha):
    inputs = _block_inputs(torch.float64)
    for call in (lambda: ops.residual_distill(*inputs, alpha=alpha),
                 lambda: ops.compress_skip(inputs[0], torch.randn(3, D, 1, 1, dtype=torch.float64), None,
                                           torch.randn(N, 3, H, W, dtype=torch.float64), alpha=alpha),
                 lambda: ops.distill_group(inputs[0], [tuple(inputs[1:])], alpha=alpha)):
        with pytest.raises(ValueError, match="alpha must be finite and > 0"):
            call()


@pytest.mark.parametrize("alpha", [1e39, 3.5e38])  # finite in float64, past float32's largest (3.4e38)
def test_alpha_past_float32_range_is_refused(alpha):
    """The kernels take alpha in float32 (float64 runs as two float32 halves): past float32's range
    the halves were inf and -inf and every output NaN, no error, where the float64 reference is
    finite. Refused on every path, and by the fused model's constructor."""
    inputs = _block_inputs(torch.float64)
    for call in (lambda: ops.residual_distill(*inputs, alpha=alpha),
                 lambda: ops.compress_skip(inputs[0], torch.randn(3, D, 1, 1, dtype=torch.float64), None,
                                           torch.randn(N, 3, H, W, dtype=torch.float64), alpha=alpha),
                 lambda: ops.distill_group(inputs[0], [tuple(inputs[1:])], alpha=alpha),
                 lambda: fastdrn.DRN(scale=2, n_feats=4, n_groups=1, n_blocks=1, inner=4, distill=2, alpha=alpha)):
        with pytest.raises(ValueError, match="alpha must be at most"):
            call()


@pytest.mark.parametrize("alpha", ["0.2", "abc", None, True, torch.tensor(0.2), [0.2]])
def test_alpha_must_be_a_real_number(alpha):
    inputs = _block_inputs(torch.float64)
    with pytest.raises(TypeError, match="alpha must be a real number"):
        ops.residual_distill(*inputs, alpha=alpha)
    with pytest.raises(TypeError, match="alpha must be a real number"):
        ops.compress_skip(inputs[0], torch.randn(3, D, 1, 1, dtype=torch.float64), None,
                          torch.randn(N, 3, H, W, dtype=torch.float64), alpha=alpha)
    with pytest.raises(TypeError, match="alpha must be a real number"):
        reference.DRN(alpha=alpha)


def test_positive_alpha_of_any_numeric_type_is_accepted():
    import numpy as np

    inputs = _block_inputs(torch.float64)
    expected = reference.residual_distill(*inputs, alpha=0.5)
    for alpha in (np.float32(0.5), 1 / 2, np.float64(0.5)):
        assert_close(ops.residual_distill(*inputs, alpha=alpha), expected, 1e-6, f"alpha {type(alpha).__name__}")


def test_zero_inner_width_is_refused():
    z = randn(N, D, H, W, dtype=torch.float64, device="cpu")
    empty = [torch.empty(0, D, 1, 1, dtype=torch.float64), torch.empty(0, dtype=torch.float64),
             torch.empty(0, 0, 3, 3, dtype=torch.float64), torch.empty(0, dtype=torch.float64),
             torch.empty(D + DIST, 0, 1, 1, dtype=torch.float64), torch.zeros(D + DIST, dtype=torch.float64)]
    with pytest.raises(ValueError, match="w_squeeze is empty"):
        ops.residual_distill(z, *empty)
    with pytest.raises(ValueError, match="w is empty"):
        ops.compress_skip(z, torch.empty(0, D, 1, 1, dtype=torch.float64), None,
                          torch.empty(N, 3, H, W, dtype=torch.float64))


# ---- blocks and groups given as iterators ----------------------------------------------------------

@pytest.mark.parametrize("backend_name", ["auto", "torch"])  # the fused kernels (here), and PyTorch's math
def test_blocks_and_groups_may_be_iterators(backend_name, monkeypatch, device):
    """blocks and groups read once, whatever iterable holds them. A generator of blocks was spent by
    the length checks: on PyTorch's math distill_group handed back its input unchanged, no error;
    on the kernels an IndexError; distill_groups spent it packing the 3x3 weights."""
    monkeypatch.setenv("FASTDRN_BACKEND", backend_name)
    dtype = torch.float64
    y, *block = _block_inputs(dtype, device)
    w, b = randn(D, D + DIST, 1, 1, dtype=dtype, device=device, scale=0.5), randn(D, dtype=dtype, device=device)
    ref_y, ref_block = y.double(), [t.double() for t in block]
    expected = reference.residual_distill(ref_y, *ref_block)
    compressed = reference.compress_skip(expected, w.double(), b.double(), ref_y)
    tol = tolerance(device, dtype)[0]
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            assert_close(ops.distill_group(y, iter([tuple(block)])), expected, tol, f"distill_group grad={grad}")
            assert_close(ops.distill_and_compress(y, (blk for blk in [tuple(block)]), w, b), compressed, tol,
                         f"distill_and_compress grad={grad}")
            groups = (((blk for blk in [tuple(block)]), (w, b)) for _ in range(2))
            second = reference.compress_skip(reference.residual_distill(compressed, *ref_block), w.double(),
                                             b.double(), compressed)
            assert_close(ops.distill_groups(y, groups), second, tol, f"distill_groups grad={grad}")
        y = y.detach().requires_grad_()


@pytest.mark.parametrize("backend_name", ["auto", "torch"])
@pytest.mark.parametrize("bad", ["y", "w_squeeze", "b_conv"])
def test_group_ops_name_an_input_that_is_not_a_tensor(bad, backend_name, monkeypatch):
    """A numpy array (or a list) as a group's input or as a block's weight: a TypeError naming it, as
    the single-block ops give, not "AttributeError: 'numpy.ndarray' object has no attribute
    'requires_grad'" (or "'str' object has no attribute 'type'") from fastdrn's internals."""
    monkeypatch.setenv("FASTDRN_BACKEND", backend_name)
    y, *block = _block_inputs(torch.float64)
    if bad == "y":
        y = y.numpy()
    else:
        index = BLOCK_NAMES.index(bad)
        block[index] = block[index].tolist()
    w, b = torch.randn(D, D + DIST, 1, 1, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    for call in (lambda: ops.distill_group(y, [tuple(block)]),
                 lambda: ops.distill_and_compress(y, [tuple(block)], w, b),
                 lambda: ops.distill_groups(y, [([tuple(block)], (w, b))])):
        with pytest.raises(TypeError, match=f"{bad} must be a torch.Tensor"):
            call()
    if bad == "y":  # no blocks: nothing to run, the input still checked
        with pytest.raises(TypeError, match="y must be a torch.Tensor"):
            ops.distill_group(y, [])


NOT_DENSE = {  # tensors the kernels cannot read as rows of memory; float32, which mkldnn needs
    "sparse_coo": lambda t: t.to_sparse(),
    "mkldnn": lambda t: t.to_mkldnn(),
    "nested": lambda t: torch.nested.as_nested_tensor(list(t.unbind(0)), layout=torch.jagged),
}


@pytest.mark.parametrize("backend_name", ["auto", "torch"])
@pytest.mark.parametrize("layout", sorted(NOT_DENSE))
@pytest.mark.parametrize("bad", ["y", "w_conv", "w_compress"])
def test_a_tensor_that_is_not_dense_is_named(bad, layout, backend_name, monkeypatch):
    """A sparse, mkldnn or nested tensor as an input or a weight: a TypeError naming it and its layout,
    also after dense tensors of the same shape, dtype and device passed the checks (whose cache
    they would otherwise match), not an error from deep inside the kernels or their launchers."""
    monkeypatch.setenv("FASTDRN_BACKEND", backend_name)
    y, *block = _block_inputs(torch.float32)
    w, b = randn(D, D + DIST, 1, 1, dtype=torch.float32, device="cpu", scale=0.5), randn(D, dtype=torch.float32,
                                                                                        device="cpu")
    z = randn(N, D + DIST, H, W, dtype=torch.float32, device="cpu")
    # Per op: how it is called, and the name each bad tensor has there (y is compress_skip's skip).
    calls = {
        "residual_distill": (lambda y, block, w: ops.residual_distill(y, *block), dict(y="z", w_conv="w_conv")),
        "compress_skip": (lambda y, block, w: ops.compress_skip(z, w, b, y), dict(y="skip", w_compress="w")),
        "distill_and_compress": (lambda y, block, w: ops.distill_and_compress(y, [tuple(block)], w, b),
                                 dict(y="y", w_conv="w_conv", w_compress="w")),
    }
    conv = BLOCK_NAMES.index("w_conv")
    for op, (call, names) in calls.items():
        call(y, block, w)  # dense: passes, and its signature is kept
        if bad not in names:
            continue
        args = [y, list(block), w]
        if bad == "y":
            args[0] = NOT_DENSE[layout](y)
        elif bad == "w_conv":
            args[1][conv] = NOT_DENSE[layout](block[conv])
        else:
            args[2] = NOT_DENSE[layout](w)
        with pytest.raises(TypeError, match=rf": {names[bad]} is a {layout} tensor"):  # the op, or the one it runs
            call(*args)


# ---- TRITON_INTERPRET set after the kernels were imported (minor) ----------------------------------

LATE_INTERPRET = r"""
import os, torch
os.environ.pop("TRITON_INTERPRET", None)
import fastdrn.kernels.compress_skip  # decorated for the GPU compiler
from fastdrn import ops, reference
os.environ["TRITON_INTERPRET"] = "1"
args = (torch.randn(1, 4, 2, 3), torch.randn(3, 4, 1, 1), torch.randn(3), torch.randn(1, 3, 2, 3))
auto = ops.compress_skip(*args)
assert torch.allclose(auto, reference.compress_skip(*args)), "auto must run the PyTorch math"
os.environ["FASTDRN_BACKEND"] = "triton"
try:
    ops.compress_skip(*args)
except RuntimeError as e:
    print("refused:", e)
"""


def test_triton_interpret_set_after_import_is_named():
    env = {k: v for k, v in os.environ.items() if k not in ("FASTDRN_BACKEND", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-c", LATE_INTERPRET], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    # Triton itself was imported (with fastdrn) before the kernels: the message names that, the earlier cause.
    assert "refused:" in run.stdout and "TRITON_INTERPRET was unset when Triton was imported" in run.stdout, run.stdout


INTERPRET_AFTER_IMPORT = r"""
import os, sys, torch
os.environ.pop("TRITON_INTERPRET", None)
import fastdrn  # imports Triton, which decorates its own library (tl.cdiv...) for the compiler now
from fastdrn import reference
if sys.argv[1] == "after the kernels":
    import fastdrn.kernels.residual_distill
os.environ["TRITON_INTERPRET"] = "1"
model = fastdrn.DRN(scale=2, n_feats=4, n_groups=1, n_blocks=1, inner=4, distill=2)
ref = reference.DRN(scale=2, n_feats=4, n_groups=1, n_blocks=1, inner=4, distill=2)
ref.load_state_dict(model.state_dict())
x = torch.rand(1, 3, 3, 5)
assert torch.allclose(model(x), ref(x), atol=1e-5), "auto must run the PyTorch math"
print("auto:", model.backend)
os.environ["FASTDRN_BACKEND"] = "triton"
try:
    model(x)
except RuntimeError as e:
    print("refused:", e)
"""


@pytest.mark.parametrize("when", [
    "before the kernels",  # after `import fastdrn`, before the first op: what the docs allowed
    "after the kernels",   # the kernels imported too (the case the check covered)
])
def test_triton_interpret_set_after_importing_fastdrn_is_named(when):
    """TRITON_INTERPRET=1 set after `import fastdrn` but before the first op: fastdrn's kernels were
    decorated for the interpreter, Triton's own library (imported with fastdrn) for the compiler, and
    the first kernel failed inside the interpreter ("Cannot call @triton.jit'd outside of the scope
    of a kernel", at tl.cdiv); the docs said setting it before the kernels' import was enough. Now
    auto runs PyTorch's math and the forced backend names why."""
    env = {k: v for k, v in os.environ.items() if k not in ("FASTDRN_BACKEND", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-c", INTERPRET_AFTER_IMPORT, when], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    why = "TRITON_INTERPRET was unset when Triton was imported"
    assert f"auto: torch (auto: {why}" in run.stdout, run.stdout
    assert "refused:" in run.stdout and why in run.stdout and "before importing fastdrn" in run.stdout, run.stdout


# ---- launch settings -------------------------------------------------------------------------------

@pytest.mark.parametrize("variable,value,option,expected,default,changed", [
    # memory short (README: "set it to 0"), then the fused tail turned on for an inference
    ("FASTDRN_FOLD_BACKWARD", "0", "fold_backward", False, True, dict(fuse_tail=True)),
    # a GPU test run's pin (README: FASTDRN_NUM_WARPS=8 pytest), then another setting changed
    ("FASTDRN_NUM_WARPS", "8", "num_warps", 8, None, dict(weight_grad_blocks=1)),
    ("FASTDRN_AUTOTUNE", "0", "autotune", False, True, dict(fold_backward=False)),
    # nothing named: only forgets the kept kernels and plans (tests call it so)
    ("FASTDRN_WEIGHT_GRAD_BLOCKS", "2", "weight_grad_blocks", 2, 3, dict()),
])
def test_set_launch_options_keeps_the_settings_it_does_not_name(variable, value, option, expected, default, changed,
                                                                 monkeypatch):
    """set_launch_options(fuse_tail=True) put every setting it was not given back to its default: a
    FASTDRN_FOLD_BACKWARD=0 chosen for memory was silently undone, and a FASTDRN_NUM_WARPS pin
    dropped (test_plans.py's call of set_launch_options() unpinned a pinned GPU test run from there
    on). A setting named, even to its default, is set."""
    from fastdrn.kernels import set_launch_options, settings

    monkeypatch.setattr(settings, "_options", None)  # as at the first launch; restored after the test
    monkeypatch.setenv(variable, value)
    set_launch_options(**changed)
    options = settings.launch_options()
    assert getattr(options, option) == expected, f"{variable}={value} undone by set_launch_options({changed})"
    for name, setting in changed.items():
        assert getattr(options, name) == setting
    set_launch_options(**{option: default})
    assert getattr(settings.launch_options(), option) == default, "a setting named, to its default too, is set"


# ---- test seeds (minor) ---------------------------------------------------------------------------

def test_the_seed_is_a_stable_function_of_the_test_name(request):
    """conftest seeds torch from crc32 of the test id: the same in every process, so a failure can
    be rerun from its name (hash() of a string changes with PYTHONHASHSEED)."""
    assert torch.initial_seed() == zlib.crc32(request.node.nodeid.encode("utf-8"))
