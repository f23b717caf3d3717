"""The fused residual distilling block against the float64 reference: forward, every gradient,
both memory policies, the in-place group path, saved memory, determinism and bad input."""
import contextlib
import math

import pytest
import torch

from fastdrn import backend, ops, reference
from fastdrn.kernels.registry import config_label
from fastdrn.reference import ResidualDistillBlock
from helpers import (SIXTEEN_BIT, assert_close, assert_op_grads_close, dtypes_for, float64_leaves, randn, tolerance,
                     launch_settings, where)

# (N, D, F, d, H, W, channels_last), each there for a reason:
CASES = [
    (1, 64, 64, 8, 5, 13, True),     # DRN's first block (D = C = 64), odd H and W
    (3, 72, 64, 8, 1, 5, False),     # H = 1, N = 3, DRN's second block, contiguous NCHW input
    (1, 136, 64, 3, 13, 1, True),    # W = 1, d = 3, D past a power of two
    (2, 328, 64, 8, 3, 5, False),    # D far wider than F: many squeeze chunks and expand columns
    (1, 136, 256, 8, 4, 3, True),    # DRN+ width, F = 256
    (2, 24, 16, 5, 6, 7, False),     # narrowest F, odd d
]


def make_block(d_in, inner, distill, dtype, device):
    block = ResidualDistillBlock(d_in, inner, distill, 0.2)
    with torch.no_grad():  # default init leaves biases tiny; make every term count
        for conv in (block.squeeze, block.conv, block.expand):
            conv.bias.normal_(0.0, 0.3)
    return [p.detach().to(device, dtype).requires_grad_() for p in (
        block.squeeze.weight, block.squeeze.bias, block.conv.weight, block.conv.bias,
        block.expand.weight, block.expand.bias)]


def make_inputs(case, dtype, device):
    n, d_in, inner, distill, h, w, channels_last = case
    z = randn(n, d_in, h, w, dtype=dtype, device=device, channels_last=channels_last, requires_grad=True)
    return [z, *make_block(d_in, inner, distill, dtype, device)]


NAMES = ("z", "w_squeeze", "b_squeeze", "w_conv", "b_conv", "w_expand", "b_expand")


def _reference(y, blocks, compression, leaves, grad_out):
    """Blocks (None for a missing bias) through the reference ops, then the compression with the long
    skip if given: the float64 output and the leaves' gradients, computed in float64 and, for the
    16-bit tolerance rule (helpers.assert_op_grads_close), in the leaves' own dtype (eager PyTorch)."""
    def run(dtype):
        copies = {id(t): t.detach().to(dtype).requires_grad_() for t in leaves}
        of = lambda t: None if t is None else copies.get(id(t), t.detach().to(dtype))  # noqa: E731
        out = of(y)
        for block in blocks:
            out = reference.residual_distill(out, *map(of, block))
        if compression is not None:
            out = reference.compress_skip(out, *map(of, compression), of(y))
        return out, torch.autograd.grad(out, [copies[id(t)] for t in leaves], grad_out.to(dtype))

    ref, ref_grads = run(torch.float64)
    eager_grads = run(y.dtype)[1] if y.dtype in SIXTEEN_BIT else ref_grads
    return ref, ref_grads, eager_grads


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_match_float64_reference(case, recompute, device):
    for dtype in dtypes_for(device):
        fwd_tol, grad_tol = tolerance(device, dtype)

        def draw():
            inputs = make_inputs(case, dtype, device)
            out = ops.residual_distill(*inputs, recompute=recompute)
            grad_out = randn(*out.shape, dtype=dtype, device=device)
            grads = torch.autograd.grad(out, inputs, grad_out)
            ref, ref_grads, eager_grads = _reference(inputs[0], [inputs[1:]], None, inputs, grad_out)
            assert out.dtype == dtype and out.shape == ref.shape
            assert_close(out, ref, fwd_tol, f"{dtype} forward")
            return grads, eager_grads, ref_grads

        assert_op_grads_close(dtype, grad_tol, draw, NAMES, f"{dtype} (recompute={recompute})")


@pytest.mark.parametrize("recompute", [False, True])
def test_registered_op_and_eager_path_agree(recompute, monkeypatch, device):
    """Eager calls skip the custom-op dispatch (kernels/_common.py eager_fast_path); torch.compile
    runs the registered op. Both must give the same output, gradients and saved bytes, bit for bit."""
    from fastdrn.kernels import residual_distill as module

    dtype = dtypes_for(device)[0]
    if not backend.use_triton("residual_distill", torch.device(device), dtype):
        pytest.skip("the fused op does not run here")
    if not module.eager_fast_path():
        pytest.skip("this torch has no direct-launch switch: every call already goes through the op")
    inputs = make_inputs((1, 24, 16, 5, 3, 4, True), dtype, device)
    results = []
    for fast in (True, False):
        monkeypatch.setattr(module, "eager_fast_path", lambda fast=fast: fast)
        fn = lambda *args: ops.residual_distill(*args, recompute=recompute)  # noqa: E731
        saved = saved_activation_bytes(fn, inputs, inputs[1:])
        out = fn(*inputs)
        results.append([saved, out, *torch.autograd.grad(out, inputs, torch.ones_like(out))])
    assert results[0][0] == results[1][0], "saved bytes differ"
    for a, b in zip(results[0][1:], results[1][1:]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fast", [True, False])  # the eager Function; the registered op (torch.compile's)
@pytest.mark.parametrize("recompute", [False, True])
def test_saved_tensors_handed_back_contiguous(recompute, fast, monkeypatch, device):
    """torch.autograd.graph.save_on_cpu(pin_memory=True) hands every saved tensor back as a
    contiguous copy, so the block's channels_last b and z come back in NCHW: the backward reads them
    as they are handed back, and every gradient equals the one without offloading, bit for bit."""
    from fastdrn.kernels import residual_distill as module

    dtype = dtypes_for(device)[0]
    if not backend.use_triton("residual_distill", torch.device(device), dtype):
        pytest.skip("the fused op does not run here")
    if not module.eager_fast_path():
        pytest.skip("this torch has no direct-launch switch: every call already goes through the op")
    monkeypatch.setattr(module, "eager_fast_path", lambda: fast)
    inputs = make_inputs((2, 24, 16, 5, 3, 4, True), dtype, device)
    grad_out = randn(2, 29, 3, 4, dtype=dtype, device=device)
    expected = torch.autograd.grad(ops.residual_distill(*inputs, recompute=recompute), inputs, grad_out)
    with torch.autograd.graph.save_on_cpu(pin_memory=True):
        out = ops.residual_distill(*inputs, recompute=recompute)
    for name, g, e in zip(NAMES, torch.autograd.grad(out, inputs, grad_out), expected):
        assert torch.equal(g, e), name


def test_weight_gradients_keep_the_weights_memory_format(device):
    """A channels_last 3x3 weight (a model moved to channels_last) gets its gradient in channels_last,
    so autograd hands it to .grad without a copy; values as for a contiguous weight."""
    dtype = dtypes_for(device)[-1]
    inputs = make_inputs((1, 24, 16, 4, 5, 3, True), dtype, device)
    out = ops.residual_distill(*inputs)
    grad_out = randn(*out.shape, dtype=dtype, device=device)
    expected = torch.autograd.grad(out, inputs, grad_out)
    w_conv = inputs[3].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    inputs_cl = [*inputs[:3], w_conv, *inputs[4:]]
    grads = torch.autograd.grad(ops.residual_distill(*inputs_cl), inputs_cl, grad_out)
    assert grads[3].is_contiguous(memory_format=torch.channels_last) and not grads[3].is_contiguous()
    for name, g, e in zip(NAMES, grads, expected):
        assert torch.equal(g, e), name


@pytest.mark.parametrize("recompute", [False, True])
def test_without_biases(recompute, device):
    """Convs built with bias=False: every kernel's no-bias variant, gradients of z and the weights."""
    for dtype in dtypes_for(device):
        fwd_tol, grad_tol = tolerance(device, dtype)

        def draw():
            z, w_sq, _, w_c, _, w_e, _ = make_inputs((2, 24, 16, 5, 3, 4, True), dtype, device)
            inputs = [z, w_sq, None, w_c, None, w_e, None]
            out = ops.residual_distill(*inputs, recompute=recompute)
            grad_out = randn(*out.shape, dtype=dtype, device=device)
            leaves = [z, w_sq, w_c, w_e]
            grads = torch.autograd.grad(out, leaves, grad_out)
            ref, ref_grads, eager_grads = _reference(z, [inputs[1:]], None, leaves, grad_out)
            assert_close(out, ref, fwd_tol, f"{dtype} forward without biases")
            return grads, eager_grads, ref_grads

        assert_op_grads_close(dtype, grad_tol, draw, ("z", "w_squeeze", "w_conv", "w_expand"),
                              f"{dtype} without biases (recompute={recompute})")


@pytest.mark.parametrize("recompute", [False, True])
def test_float64_gradcheck(recompute):
    if where(torch.device("cpu")) != "interpreter":
        pytest.skip("float64 runs through the interpreter")
    inputs = make_inputs((2, 3, 4, 2, 3, 4, True), torch.float64, "cpu")
    fn = lambda *args: ops.residual_distill(*args, recompute=recompute)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


# F = 16: each block's 3x3 kernel computes the next block's squeeze (folds_next_squeeze);
# F = 256: too wide to fold, every block launches its own squeeze.
@pytest.mark.parametrize("inner", [16, 256])
@pytest.mark.parametrize("grad", [True, False])
def test_group_folds_the_next_squeeze(inner, grad, monkeypatch, device):
    """A group's chain (training path and in-place inference path): output and every gradient
    against float64, with one squeeze launch for the group where the next squeeze folds."""
    from fastdrn.kernels import residual_distill as module

    squeezes = []
    squeeze = module._squeeze
    monkeypatch.setattr(module, "_squeeze", lambda *args, **kwargs: squeezes.append(1) or squeeze(*args, **kwargs))
    dtype = dtypes_for(device)[0]  # float64 in the interpreter, float32 on a GPU
    if not backend.use_triton("residual_distill", torch.device(device), dtype):
        pytest.skip("the fused op does not run here")
    fwd_tol, grad_tol = tolerance(device, dtype)
    c, distill, n_blocks = 24, 4, 3
    y = randn(2, c, 5, 3, dtype=dtype, device=device, channels_last=True, requires_grad=grad)
    blocks = [tuple(make_block(c + k * distill, inner, distill, dtype, device)) for k in range(n_blocks)]
    if not grad:
        blocks = [tuple(t.detach() for t in block) for block in blocks]
    with torch.set_grad_enabled(grad):
        out = ops.distill_group(y, blocks)
    folds = module.folds_next_squeeze(inner, dtype, inner)
    assert len(squeezes) == (1 if folds else n_blocks)
    leaves = [y, *(t for block in blocks for t in block)]
    ref_leaves = float64_leaves(*leaves)
    ref = ref_leaves[0]
    for k in range(n_blocks):
        ref = reference.residual_distill(ref, *ref_leaves[1 + 6 * k:7 + 6 * k])
    assert_close(out, ref, fwd_tol, f"{dtype} group forward")
    if grad:
        grad_out = randn(*out.shape, dtype=dtype, device=device)
        grads = torch.autograd.grad(out, leaves, grad_out)
        ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.double())
        for i, (g, rg) in enumerate(zip(grads, ref_grads)):
            assert_close(g, rg, grad_tol, f"{dtype} group gradient {i}")


# F = 16: the fused expand writes in place; F = 256: float32 runs the expand as its own 1x1
# launch (fuses_second_gemm), which must write in place too.
@pytest.mark.parametrize("inner,h,w", [(16, 5, 7), (256, 3, 2)])
def test_in_place_group_matches_block_by_block(inner, h, w, device):
    """The inference path (one buffer, blocks writing in place) equals chaining the op."""
    for dtype in dtypes_for(device):
        c, distill, n_blocks = 24, 4, 3
        y = randn(2, c, h, w, dtype=dtype, device=device)
        blocks = [tuple(t.detach() for t in make_block(c + k * distill, inner, distill, dtype, device))
                  for k in range(n_blocks)]
        with torch.no_grad():
            in_place = ops.distill_group(y, blocks)
            chained = y
            for block in blocks:
                chained = ops.residual_distill(chained, *block)
        assert in_place.shape == (2, c + n_blocks * distill, h, w)
        ref = y.double()
        for block in blocks:
            ref = reference.residual_distill(ref, *(t.double() for t in block))
        assert_close(in_place, ref, tolerance(device, dtype)[0], f"{dtype} in-place group")
        if where(device) == "interpreter":
            assert torch.equal(in_place, chained)


def test_in_place_group_op_takes_blocks_without_biases(monkeypatch, device):
    """The in-place group as the registered op runs it (torch.compile, and eager on a torch without
    the direct-launch switch), with a block that has no biases: the op's schema was Tensor[], which
    refused the Nones ("Expected a value of type 'List[Tensor]' for argument 'weights'")."""
    from fastdrn.kernels import residual_distill as module

    monkeypatch.setattr(module, "eager_fast_path", lambda: False)
    dtype = dtypes_for(device)[0]
    y = randn(2, 24, 3, 5, dtype=dtype, device=device)
    blocks = [tuple(None if t is None else t.detach() for t in block)
              for block in _group_blocks(dtype, device, biases=False)]
    with torch.no_grad():
        out = ops.distill_group(y, blocks)
    ref = y.double()
    for block in blocks:
        ref = reference.residual_distill(ref, *(None if t is None else t.double() for t in block))
    assert_close(out, ref, tolerance(device, dtype)[0], f"{dtype} in-place group through the op, no biases")


def saved_activation_bytes(fn, inputs, params, align=1):
    """Bytes of the non-parameter tensors autograd keeps for backward, counted through the hooks, each
    rounded up to a multiple of `align`: a group's Function keeps its activations as 256-byte
    aligned pieces of one tensor (kernels/residual_distill.py _saved_views), so align=256 compares it
    with separate tensors like for like. (On a GPU the separate tensors take more: the caching
    allocator rounds each up to 512 bytes.)"""
    param_ptrs = {p.data_ptr() for p in params}
    total = [0]

    def pack(t):
        if t.data_ptr() not in param_ptrs:
            total[0] += -(-t.numel() * t.element_size() // align) * align
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return total[0]


# DRN's blocks (D = 64..136 by 8, F = 64) and DRN+'s (F = 256).
@pytest.mark.parametrize("d_in,inner", [(d, 64) for d in range(64, 137, 8)] + [(64, 256), (136, 256)])
def test_saved_memory_targets(d_in, inner, device):
    if not backend.use_triton("residual_distill", device, torch.float32):
        pytest.skip("the fused op does not run here")
    inputs = make_inputs((1, d_in, inner, 8, 3, 3, True), torch.float32, device)
    params = inputs[1:]
    ref_bytes = saved_activation_bytes(reference.residual_distill, inputs, params)
    default = saved_activation_bytes(lambda *a: ops.residual_distill(*a), inputs, params)
    recompute = saved_activation_bytes(lambda *a: ops.residual_distill(*a, recompute=True), inputs, params)
    assert default <= ref_bytes * 2 / 3, f"default saves {default} bytes, reference {ref_bytes}"
    assert recompute <= ref_bytes / 2, f"recompute saves {recompute} bytes, reference {ref_bytes}"


@pytest.mark.parametrize("recompute", [False, True])
def test_weight_gradients_are_bitwise_reproducible(recompute, device):
    dtype = dtypes_for(device)[-1]
    inputs = make_inputs((2, 72, 64, 8, 9, 11, True), dtype, device)
    out = ops.residual_distill(*inputs, recompute=recompute)
    grad_out = randn(*out.shape, dtype=dtype, device=device)
    first = torch.autograd.grad(out, inputs, grad_out, retain_graph=True)
    second = torch.autograd.grad(out, inputs, grad_out)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"d{name} differs between two backward runs"


# (N, D, F, d, H, W): rows split over several partials and several tiles a program under the
# interpreter (M > 32 rows), channel counts whose rows are 16-byte aligned (72 + 8) or not (29 + 3:
# ROW_ALIGN 1), and F = 16 (the narrowest width).
@pytest.mark.parametrize("case", [(2, 72, 64, 8, 9, 11), (1, 29, 16, 3, 7, 5)])
def test_weight_gradient_splits_and_row_alignment(case, device):
    """A block's output and every gradient against float64 (a channels_last 3x3 weight too),
    bitwise the same on a second run, and the in-place group path equal to chaining the op."""
    n, d_in, inner, distill, h, w = case
    for dtype in dtypes_for(device):
        fwd_tol, grad_tol = tolerance(device, dtype)

        def draw():
            inputs = make_inputs((n, d_in, inner, distill, h, w, True), dtype, device)
            inputs[3] = inputs[3].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
            out = ops.residual_distill(*inputs)
            grad_out = randn(*out.shape, dtype=dtype, device=device)
            grads = torch.autograd.grad(out, inputs, grad_out, retain_graph=True)
            again = torch.autograd.grad(out, inputs, grad_out)
            ref, ref_grads, eager_grads = _reference(inputs[0], [inputs[1:]], None, inputs, grad_out)
            assert_close(out, ref, fwd_tol, f"{dtype} forward")
            for name, g, g2 in zip(NAMES, grads, again):
                assert torch.equal(g, g2), f"d{name} differs between two runs"
            assert grads[3].is_contiguous(memory_format=torch.channels_last)
            blocks = [tuple(t.detach() for t in inputs[1:]),
                      tuple(t.detach() for t in make_block(d_in + distill, inner, distill, dtype, device))]
            with torch.no_grad():
                in_place = ops.distill_group(inputs[0].detach(), blocks)
                chained = inputs[0].detach()
                for block in blocks:
                    chained = ops.residual_distill(chained, *block)
            assert_close(in_place, chained.double(), fwd_tol, f"{dtype} in-place group")
            return grads, eager_grads, ref_grads

        assert_op_grads_close(dtype, grad_tol, draw, NAMES, str(dtype))


def test_double_backward_raises(device):
    inputs = make_inputs((1, 8, 16, 2, 2, 3, True), dtypes_for(device)[0], device)
    out = ops.residual_distill(*inputs)
    if not backend.use_triton("residual_distill", device, out.dtype):
        pytest.skip("the reference supports double backward")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), inputs[:1], create_graph=True)


def test_inner_width_beyond_the_kernels_is_refused(monkeypatch, device):
    if not backend.use_triton("residual_distill", device, torch.float32):
        pytest.skip("the fused op does not run here")
    monkeypatch.setenv("FASTDRN_BACKEND", "triton")
    inputs = [t.detach() for t in make_inputs((1, 4, 512, 2, 1, 1, True), torch.float32, device)]
    with pytest.raises(ValueError, match="F <= 256"):
        ops.residual_distill(*inputs)


def _valid():
    return [t.detach() for t in make_inputs((1, 8, 16, 4, 3, 3, True), torch.float32, "cpu")]


@pytest.mark.parametrize("index,bad,message", [
    (0, torch.randn(1, 9, 3, 3), "w_squeeze expects 8 input channels but z has 9"),
    (0, torch.randn(8, 3, 3), "4-D tensor"),
    (3, torch.randn(16, 16, 1, 1), "3x3 conv weight"),
    (3, torch.randn(12, 16, 3, 3), r"w_conv has shape \(12, 16, 3, 3\), expected \(16, 16, 3, 3\)"),
    (1, torch.randn(16, 8, 3, 3), "1x1 conv weight"),
    (5, torch.randn(8, 16, 1, 1), "needs more than z's 8"),
    (5, torch.randn(12, 15, 1, 1), "w_expand expects 15 input channels"),
    (6, torch.randn(11), "b_expand has shape"),
    (2, torch.randn(16, dtype=torch.float64), "dtype"),
    (4, torch.randn(16, device="meta"), "is on meta"),
])
def test_bad_input_is_named(index, bad, message):
    args = _valid()
    args[index] = bad
    with pytest.raises((ValueError, TypeError), match=message):
        ops.residual_distill(*args)


def test_int32_offsets_are_checked():
    from fastdrn.kernels._common import check_int32

    check_int32("op", 2**31 - 1)
    with pytest.raises(ValueError, match="int32"):
        check_int32("op", 2**31)


def test_reference_saves_what_the_targets_assume():
    """The reference keeps D + 4F values a pixel: the denominator of the memory targets."""
    inputs = make_inputs((1, 64, 64, 8, 2, 2, True), torch.float32, "cpu")
    got = saved_activation_bytes(reference.residual_distill, inputs, inputs[1:])
    assert got == (64 + 4 * 64) * 4 * 4 * math.prod((1,))


def _group_blocks(dtype, device, biases=True, inners=(16, 16, 12)):
    """Three blocks over 24 + 4k channels. With the last one narrower (F = 12), block 2 does not fold
    block 3's squeeze into its 3x3 (folds_next_squeeze) and the 3x3 weights are packed one by one
    (_pack_convs), not in one copy; with biases=False the middle block has none."""
    blocks = [make_block(24 + 4 * k, inner, 4, dtype, device) for k, inner in enumerate(inners)]
    if not biases:
        blocks[1][1] = blocks[1][3] = blocks[1][5] = None
    return [tuple(block) for block in blocks]


def _chained_per_block(y, blocks, recompute):
    """The group as one autograd Function per block (_EagerResidualDistill), with the same folding:
    what the eager training path ran before a group became one Function."""
    from fastdrn.kernels import residual_distill as module

    z, a = y, None
    for k, block in enumerate(blocks):
        next_squeeze = tuple(blocks[k + 1][:2]) if k + 1 < len(blocks) else (None, None)
        z, a = module._block(z, module.dense_as_read(list(block)), 0.2, recompute, a, next_squeeze)
    return z


def _eager_group_or_skip(device, dtype):
    from fastdrn.kernels import residual_distill as module

    if not backend.use_triton("residual_distill", torch.device(device), dtype):
        pytest.skip("the fused op does not run here")
    if not module.eager_fast_path():
        pytest.skip("this torch has no direct-launch switch: the group runs block by block through the op")


# The group tests that compare with float64 run 2 x 7 x 9 pixels, not the 2 x 5 x 3 of the bitwise-only
# ones: on 30 pixels the bf16 weight gradients were 3.5e-2 to 1.9e-1 off in 3 or 4 of 8 draws (ELU
# flips; H200, cc8f6fb), which measures the flips rather than the group.
# blocks_a_launch (weight_grad_blocks): 1, each block's weight gradients in launches of their own, as
# the per-block Functions run them, at every combination; 2, the three blocks in launches of 2 and 1;
# 3, one launch for the whole group (with b rebuilt, no biases, a narrower last block: the 9 problems
# of unequal shapes).
GROUP_CASES = ([(1, recompute, biases, inners) for recompute in (False, True) for biases in (True, False)
                for inners in ((16, 16, 16), (16, 16, 12))]
               + [(2, False, True, (16, 16, 16)), (3, False, True, (16, 16, 16)), (3, True, False, (16, 16, 12))])


@pytest.mark.parametrize("blocks_a_launch, recompute, biases, inners", GROUP_CASES)
def test_group_function_equals_per_block_functions(blocks_a_launch, recompute, biases, inners, device):
    """The eager training path runs a group as one autograd Function: output, input gradient and the
    saved bytes equal one Function per block, bit for bit (the same kernels in the same order); so do
    the weight gradients where each block has its own weight-gradient launch. Where blocks share one
    (weight_grad_blocks), the rows split into fewer partials, so the fp32 sums round differently: the
    weight gradients are then checked against float64, and bitwise against a second backward."""
    for dtype in dtypes_for(device):
        _eager_group_or_skip(device, dtype)
        fwd_tol, grad_tol = tolerance(device, dtype)

        def draw():
            y = randn(2, 24, 7, 9, dtype=dtype, device=device, channels_last=True, requires_grad=True)
            blocks = _group_blocks(dtype, device, biases, inners)
            leaves = [t for t in (y, *(t for block in blocks for t in block)) if t is not None]
            group = lambda y, *_: ops.distill_group(y, blocks, recompute=recompute)  # noqa: E731
            chained = lambda y, *_: _chained_per_block(y, blocks, recompute)  # noqa: E731
            with launch_settings(weight_grad_blocks=blocks_a_launch, fold_backward=False):  # the per-block schedule
                out = group(y)
                assert type(out.grad_fn).__name__ == "_EagerDistillGroupBackward", "the group did not run as one Function"
                expected = chained(y)
                assert torch.equal(out, expected), f"{dtype} output"
                grad_out = randn(*out.shape, dtype=dtype, device=device)
                grads = torch.autograd.grad(out, leaves, grad_out, retain_graph=True)
                again = torch.autograd.grad(out, leaves, grad_out)
                expected_grads = torch.autograd.grad(expected, leaves, grad_out)
                assert (saved_activation_bytes(group, leaves, leaves[1:], align=256)
                        == saved_activation_bytes(chained, leaves, leaves[1:], align=256))
            bitwise = expected_grads if blocks_a_launch == 1 else (expected_grads[0], *again[1:])
            for i, (g, e) in enumerate(zip(grads, bitwise)):
                assert torch.equal(g, e), f"{dtype} gradient of leaf {i} (recompute={recompute}, biases={biases})"
            ref, ref_grads, eager_grads = _reference(y, blocks, None, leaves, grad_out)
            assert_close(out, ref, fwd_tol, f"{dtype} group forward")
            return grads, eager_grads, ref_grads

        assert_op_grads_close(dtype, grad_tol, draw, None, f"{dtype} group")


# (inner widths, biases, recompute, frozen leading block): each there for a reason
FOLD_CASES = [
    ((16, 16, 16), True, False, False),   # every block's g_b from the next block's kernel
    ((16, 12, 12), False, False, False),  # block 0 narrower: its g_b is a 1x1 launch of its own
    ((16, 16, 16), True, False, True),    # block 0 needs no gradient: its a is not saved, block 1's is
    ((16, 16, 16), True, True, False),    # recompute: nothing to fold, the schedule without the fold
]


@pytest.mark.parametrize("inners, biases, recompute, frozen", FOLD_CASES)
def test_group_backward_fold(inners, biases, recompute, frozen, device):
    """fold_backward: the forward saves each block's a (F values a pixel more; with recompute,
    nothing more), the output is bitwise the one without the fold, and every gradient matches
    float64 (the fold adds up the previous block's g_b in another order, so not bit for bit)."""
    for dtype in dtypes_for(device):
        _eager_group_or_skip(device, dtype)
        fwd_tol, grad_tol = tolerance(device, dtype)

        def draw():
            y = randn(2, 24, 7, 9, dtype=dtype, device=device, channels_last=True, requires_grad=not frozen)
            blocks = _group_blocks(dtype, device, biases, inners)
            if frozen:
                blocks[0] = tuple(None if t is None else t.detach() for t in blocks[0])
            leaves = [t for t in (y, *(t for block in blocks for t in block)) if t is not None and t.requires_grad]
            group = lambda y, *_: ops.distill_group(y, blocks, recompute=recompute)  # noqa: E731
            with launch_settings(fold_backward=False):
                plain = group(y)
                plain_bytes = saved_activation_bytes(group, [y], leaves, align=256)
            with launch_settings(fold_backward=True):
                out = group(y)
                grad_out = randn(*out.shape, dtype=dtype, device=device)
                grads = torch.autograd.grad(out, leaves, grad_out, retain_graph=True)
                again = torch.autograd.grad(out, leaves, grad_out)
                fold_bytes = saved_activation_bytes(group, [y], leaves, align=256)
            assert torch.equal(out, plain), f"{dtype} output"
            for i, (g, g2) in enumerate(zip(grads, again)):
                assert torch.equal(g, g2), f"{dtype} gradient of leaf {i} differs between two backward runs"
            n, _, h, w = y.shape
            saved_a = 0 if recompute else sum(-(-n * h * w * f * y.element_size() // 256) * 256
                                              for f in inners[int(frozen):])
            assert fold_bytes == plain_bytes + saved_a, (fold_bytes, plain_bytes, saved_a)
            ref, ref_grads, eager_grads = _reference(y, blocks, None, leaves, grad_out)
            assert_close(out, ref, fwd_tol, f"{dtype} group forward")
            return grads, eager_grads, ref_grads

        assert_op_grads_close(dtype, grad_tol, draw, None, f"{dtype} group, fold_backward")


# (N, C, d, H, W, inner widths, fold_backward): odd channel counts (rows not 16-byte aligned:
# ROW_ALIGN 1, and nothing folds) and an image of one row, through the shared weight-gradient launch.
ODD_GROUP_CASES = [
    (1, 29, 3, 5, 13, (12, 12, 12), False),  # 29 + 3k channels: unaligned rows
    (1, 29, 3, 5, 13, (12, 12, 12), True),   # the same with the fold asked for: each g_b its own launch
    (2, 16, 8, 1, 5, (16, 16), True),        # H = 1, aligned rows, two blocks: one folds into the other
]


@pytest.mark.parametrize("n, c, distill, h, w, inners, fold", ODD_GROUP_CASES)
def test_group_backward_at_odd_sizes(n, c, distill, h, w, inners, fold, device):
    """A group's training path (weight gradients of its blocks in one shared launch) against float64
    at channel counts and image sizes that are not the common case."""
    for dtype in dtypes_for(device):
        _eager_group_or_skip(device, dtype)
        fwd_tol, grad_tol = tolerance(device, dtype)

        def draw():
            y = randn(n, c, h, w, dtype=dtype, device=device, channels_last=True, requires_grad=True)
            blocks = [tuple(make_block(c + k * distill, inner, distill, dtype, device))
                      for k, inner in enumerate(inners)]
            leaves = [y, *(t for block in blocks for t in block)]
            with launch_settings(fold_backward=fold):
                out = ops.distill_group(y, blocks)
                grad_out = randn(*out.shape, dtype=dtype, device=device)
                grads = torch.autograd.grad(out, leaves, grad_out)
            ref, ref_grads, eager_grads = _reference(y, blocks, None, leaves, grad_out)
            assert_close(out, ref, fwd_tol, f"{dtype} group forward")
            return grads, eager_grads, ref_grads

        assert_op_grads_close(dtype, grad_tol, draw, None, f"{dtype} group at {n}x{c}x{h}x{w}, fold {fold}")


@pytest.mark.parametrize("frozen", ["input and first block", "input and one weight a block", "every weight"])
def test_group_function_with_frozen_tensors(frozen, device):
    """Tensors that do not require grad (frozen blocks, an input that needs no gradient): the group
    gives every tensor that asks for one the gradient one Function per block gives, and keeps
    nothing for the blocks that need no gradient."""
    dtype = dtypes_for(device)[0]
    _eager_group_or_skip(device, dtype)
    y = randn(2, 24, 5, 3, dtype=dtype, device=device, channels_last=True)
    blocks = _group_blocks(dtype, device)
    if frozen == "input and first block":
        blocks[0] = tuple(t.detach() for t in blocks[0])
    elif frozen == "input and one weight a block":
        blocks = [tuple(t.detach() if i == k + 1 else t for i, t in enumerate(block)) for k, block in enumerate(blocks)]
    else:
        y.requires_grad_()
        blocks = [tuple(t.detach() for t in block) for block in blocks]
    leaves = [t for t in (y, *(t for block in blocks for t in block)) if t.requires_grad]
    # Bit for bit only in the per-block Functions' schedule: each block's weight gradients in a launch
    # of their own (a shared launch sums in another order: at 8 warps on an H200, the last bit of a
    # bias gradient differed) and a recomputed, not saved (the fold sums g_b in another order).
    with launch_settings(weight_grad_blocks=1, fold_backward=False):
        out = ops.distill_group(y, blocks)
        expected = _chained_per_block(y, blocks, False)
        assert torch.equal(out, expected)
        grad_out = randn(*out.shape, dtype=dtype, device=device)
        for i, (g, e) in enumerate(zip(torch.autograd.grad(out, leaves, grad_out),
                                       torch.autograd.grad(expected, leaves, grad_out))):
            assert torch.equal(g, e), f"gradient of leaf {i}"
        group = lambda *_: ops.distill_group(y, blocks)  # noqa: E731
        chained = lambda *_: _chained_per_block(y, blocks, False)  # noqa: E731
        params = [t for block in blocks for t in block]
        saved = saved_activation_bytes(group, [], params, align=256)
        saved_chained = saved_activation_bytes(chained, [], params, align=256)
    if frozen == "input and first block":  # a per-block Function packs z for a node autograd never records
        assert saved == saved_chained - -(-y.numel() * y.element_size() // 256) * 256
    else:
        assert saved == saved_chained


@pytest.mark.parametrize("frozen", ["nothing", "input", "input and first block", "compression", "every block"])
@pytest.mark.parametrize("recompute", [False, True])
def test_group_and_compression_in_one_node(frozen, recompute, device):
    """ops.distill_and_compress in training runs the group and its compression as one autograd node:
    output and every gradient equal the two ops (distill_group, then compress_skip) bit for bit, the
    input's including the long skip's share; and the float64 reference within tolerance. Frozen
    tensors move where the group's backward starts (`first`) or leave the compression without
    weight gradients; with every block frozen only the compression learns (then it is the two ops)."""
    for dtype in dtypes_for(device):
        _eager_group_or_skip(device, dtype)
        fwd_tol, grad_tol = tolerance(device, dtype)

        def draw():
            y = randn(2, 24, 7, 9, dtype=dtype, device=device, channels_last=True, requires_grad=frozen == "nothing")
            blocks = _group_blocks(dtype, device)
            w_c = randn(24, 36, 1, 1, dtype=dtype, device=device, requires_grad=frozen != "compression")
            b_c = randn(24, dtype=dtype, device=device, requires_grad=frozen != "compression")
            if frozen == "input and first block":
                blocks[0] = tuple(t.detach() for t in blocks[0])
            elif frozen == "every block":
                blocks = [tuple(t.detach() for t in block) for block in blocks]
            elif frozen == "compression":
                y.requires_grad_()
            leaves = [t for t in (y, *(t for block in blocks for t in block), w_c, b_c) if t.requires_grad]
            out = ops.distill_and_compress(y, blocks, w_c, b_c, recompute=recompute)
            if frozen != "every block":
                assert type(out.grad_fn).__name__ == "_EagerDistillGroupBackward", "not one node"
            expected = ops.compress_skip(ops.distill_group(y, blocks, recompute=recompute), w_c, b_c, y)
            assert torch.equal(out, expected), f"{dtype} output"
            grad_out = randn(*out.shape, dtype=dtype, device=device)
            grads = torch.autograd.grad(out, leaves, grad_out)
            for i, (g, e) in enumerate(zip(grads, torch.autograd.grad(expected, leaves, grad_out))):
                assert torch.equal(g, e), f"{dtype} gradient of leaf {i}"
            ref, ref_grads, eager_grads = _reference(y, blocks, (w_c, b_c), leaves, grad_out)
            assert_close(out, ref, fwd_tol, f"{dtype} forward")
            return grads, eager_grads, ref_grads

        assert_op_grads_close(dtype, grad_tol, draw, None, f"{dtype}")


@pytest.mark.parametrize("inners", [(16, 16, 16), (16, 16, 12)])
def test_distill_groups_equals_the_groups_one_by_one(inners, device):
    """ops.distill_groups (fastdrn.DRN's body) packs every group's 3x3 weights in one copy: output
    and every gradient equal distill_and_compress called group by group, bit for bit, in training
    and in inference. With a narrower last block the weights differ in shape: each group packs its
    own. A bad 3x3 weight still gets its group's clear error."""
    dtype = dtypes_for(device)[0]
    _eager_group_or_skip(device, dtype)
    groups = [(_group_blocks(dtype, device, inners=inners),
               (randn(24, 36, 1, 1, dtype=dtype, device=device, requires_grad=True),
                randn(24, dtype=dtype, device=device, requires_grad=True))) for _ in range(2)]
    leaves = [t for blocks, compression in groups for t in (*(t for block in blocks for t in block), *compression)]
    y = randn(2, 24, 5, 3, dtype=dtype, device=device, channels_last=True, requires_grad=True)

    def one_by_one(y):
        for blocks, (w, b) in groups:
            y = ops.distill_and_compress(y, blocks, w, b)
        return y

    out, expected = ops.distill_groups(y, groups), one_by_one(y)
    assert torch.equal(out, expected)
    grad_out = randn(*out.shape, dtype=dtype, device=device)
    grads = torch.autograd.grad(out, [y, *leaves], grad_out)
    for i, (g, e) in enumerate(zip(grads, torch.autograd.grad(expected, [y, *leaves], grad_out))):
        assert torch.equal(g, e), f"gradient of leaf {i}"
    with torch.no_grad():
        assert torch.equal(ops.distill_groups(y, groups), one_by_one(y))
    blocks = [list(block) for block in groups[1][0]]
    blocks[1][2] = blocks[1][2].detach().to("meta")
    with pytest.raises(ValueError, match="w_conv is on meta"):
        ops.distill_groups(y, [groups[0], ([tuple(block) for block in blocks], groups[1][1])])
    with pytest.raises(ValueError, match="group 1's compression is 1 tensors, not"):
        ops.distill_groups(y, [groups[0], (groups[1][0], groups[1][1][:1])])


# (N, H, W, each group's block count): each there for a reason
BODY_CASES = [
    (2, 5, 3, (2, 3)),     # odd H and W; groups of different lengths
    (1, 1, 13, (1, 1, 1)),  # H = 1; one-block groups (no block folds a next squeeze)
    (3, 4, 1, (2, 2)),     # W = 1, N = 3
]


@pytest.mark.parametrize("fold", [False, True])  # FASTDRN_FOLD_BACKWARD: a saved, the previous g_b folded
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("n, h, w, lengths", BODY_CASES)
def test_body_in_one_node_equals_the_groups_one_by_one(n, h, w, lengths, recompute, fold, device, monkeypatch):
    """In training, with an input that needs a gradient, distill_groups runs every group in one
    autograd node (residual_distill_groups): output and every gradient equal distill_and_compress
    called group by group (one node a group), bit for bit."""
    from fastdrn.kernels import residual_distill as rd

    dtype = dtypes_for(device)[0]
    _eager_group_or_skip(device, dtype)
    groups = [(_group_blocks(dtype, device, inners=(16,) * length),
               (randn(24, 24 + 4 * length, 1, 1, dtype=dtype, device=device, requires_grad=True),
                randn(24, dtype=dtype, device=device, requires_grad=True))) for length in lengths]
    leaves = [t for blocks, compression in groups for t in (*(t for block in blocks for t in block), *compression)]
    y = randn(n, 24, h, w, dtype=dtype, device=device, channels_last=True, requires_grad=True)
    grad_out = randn(n, 24, h, w, dtype=dtype, device=device)
    original, bodies = rd.residual_distill_groups, []

    def counted(*args):
        bodies.append(args)
        return original(*args)

    monkeypatch.setattr(rd, "residual_distill_groups", counted)
    with launch_settings(fold_backward=fold):
        out = ops.distill_groups(y, groups, recompute=recompute)
        assert bodies, "distill_groups did not run its groups in one node"
        grads = torch.autograd.grad(out, [y, *leaves], grad_out)
        expected = y
        for blocks, (w_c, b_c) in groups:
            expected = ops.distill_and_compress(expected, blocks, w_c, b_c, recompute=recompute)
        expected_grads = torch.autograd.grad(expected, [y, *leaves], grad_out)
    assert torch.equal(out, expected)
    for i, (g, e) in enumerate(zip(grads, expected_grads)):
        assert torch.equal(g, e), f"gradient of leaf {i}"


def _unpacked_at_an_offset(t):
    """A saved_tensors_hooks unpack: a copy of t with its strides, 8 elements into a larger storage
    (as a hook that offloads activations into one pooled buffer hands back views of it)."""
    storage = torch.empty(8 + 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())), dtype=t.dtype,
                          device=t.device)
    return storage.as_strided(t.shape, t.stride(), 8).copy_(t)


# recompute, fold_backward: b saved; b rebuilt; a saved too (the arena holds every block's a and b)
@pytest.mark.parametrize("recompute, fold", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("body", [False, True])  # distill_and_compress (one node a group), distill_groups (one node)
def test_saved_tensors_handed_back_at_a_storage_offset(body, recompute, fold, device):
    """Saved tensors that a saved_tensors_hooks unpack hands back as views into a larger storage (a
    nonzero storage offset): the backward reads each saved activation where it lies in the tensor
    handed back, so every gradient equals the one without the hook, bit for bit."""
    dtype = dtypes_for(device)[0]
    _eager_group_or_skip(device, dtype)
    groups = [(_group_blocks(dtype, device, inners=(16, 16, 16)),
               (randn(24, 36, 1, 1, dtype=dtype, device=device, requires_grad=True),
                randn(24, dtype=dtype, device=device, requires_grad=True))) for _ in range(2 if body else 1)]
    leaves = [t for blocks, compression in groups for t in (*(t for block in blocks for t in block), *compression)]
    y = randn(2, 24, 5, 3, dtype=dtype, device=device, channels_last=True, requires_grad=True)
    grad_out = randn(2, 24, 5, 3, dtype=dtype, device=device)

    def gradients():
        if body:
            out = ops.distill_groups(y, groups, recompute=recompute)
        else:
            (blocks, (w_c, b_c)), = groups
            out = ops.distill_and_compress(y, blocks, w_c, b_c, recompute=recompute)
        return torch.autograd.grad(out, [y, *leaves], grad_out)

    with launch_settings(fold_backward=fold):
        expected = gradients()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, _unpacked_at_an_offset):
            got = gradients()
    for i, (g, e) in enumerate(zip(got, expected)):
        assert torch.equal(g, e), f"gradient of leaf {i}"


def _unpacked_strided(t):
    """A saved_tensors_hooks unpack: a copy of t with the same values in another layout where one
    exists: a 1-D tensor (a bias, the activations' arena) at stride 2, a 1x1 weight transposed in
    memory; others as they are."""
    if t.dim() == 1:
        return torch.empty(2 * t.numel(), dtype=t.dtype, device=t.device)[::2].copy_(t)
    if t.dim() == 4 and t.shape[2:] == (1, 1):
        return torch.empty_like(t.transpose(0, 1), memory_format=torch.contiguous_format).transpose(0, 1).copy_(t)
    return t.clone()


# The autograd nodes whose backward reads saved weights, biases or activations.
@pytest.mark.parametrize("node", ["block", "compression", "group", "body"])
def test_saved_tensors_handed_back_in_any_layout(node, device):
    """A saved_tensors_hooks unpack may hand back each saved tensor in another layout (the values
    are what autograd asks of it): biases and the activations' arena strided, 1x1 weights transposed
    in memory. The backward reads them as they are, so every gradient equals the one without the
    hook, bit for bit."""
    dtype = dtypes_for(device)[0]
    _eager_group_or_skip(device, dtype)
    y = randn(2, 24, 5, 3, dtype=dtype, device=device, channels_last=True, requires_grad=True)
    groups = [(_group_blocks(dtype, device, inners=(16, 16, 16)),
               (randn(24, 36, 1, 1, dtype=dtype, device=device, requires_grad=True),
                randn(24, dtype=dtype, device=device, requires_grad=True))) for _ in range(2 if node == "body" else 1)]
    (blocks, (w_c, b_c)), *_ = groups
    z36 = randn(2, 36, 5, 3, dtype=dtype, device=device, channels_last=True, requires_grad=True)
    run, leaves = {
        "block": (lambda: ops.residual_distill(y, *blocks[0]), [y, *blocks[0]]),
        "compression": (lambda: ops.compress_skip(z36, w_c, b_c, y), [z36, w_c, b_c, y]),
        "group": (lambda: ops.distill_and_compress(y, blocks, w_c, b_c),
                  [y, *(t for block in blocks for t in block), w_c, b_c]),
        "body": (lambda: ops.distill_groups(y, groups),
                 [y, *(t for blocks, compression in groups for t in (*(t for b in blocks for t in b), *compression))]),
    }[node]
    out = run()
    grad_out = randn(*out.shape, dtype=dtype, device=device)
    expected = torch.autograd.grad(out, leaves, grad_out)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, _unpacked_strided):
        out = run()
    for i, (g, e) in enumerate(zip(torch.autograd.grad(out, leaves, grad_out), expected)):
        assert torch.equal(g, e), f"gradient of leaf {i}"


@pytest.mark.parametrize("node,changed", [
    # "inputs": the saved tensors that require a gradient (inputs, weights, biases); "internal": the
    # activations the node made (the compression saves none). The groups compare their activations'
    # dtype always and the rest's where their addresses changed.
    ("block", "inputs"), ("block", "internal"), ("compression", "inputs"), ("group", "inputs"),
    ("group", "internal"), ("body", "inputs"), ("body", "internal")])
def test_saved_tensors_handed_back_in_another_dtype_are_refused(node, changed, device):
    """A saved_tensors_hooks unpack that casts (float64 handed back as float32) failed inside the
    kernels for the block and the groups, and gave gradients rounded to float32 for the compression,
    where the reference's ops refuse it. Now each backward names it."""
    dtype = dtypes_for(device)[0]
    _eager_group_or_skip(device, dtype)
    other = torch.float32 if dtype == torch.float64 else torch.float64
    y = randn(1, 24, 3, 5, dtype=dtype, device=device, channels_last=True, requires_grad=True)
    groups = [(_group_blocks(dtype, device, inners=(16, 16)),
               (randn(24, 32, 1, 1, dtype=dtype, device=device, requires_grad=True),
                randn(24, dtype=dtype, device=device, requires_grad=True))) for _ in range(2 if node == "body" else 1)]
    (blocks, (w_c, b_c)), *_ = groups
    z32 = randn(1, 32, 3, 5, dtype=dtype, device=device, channels_last=True, requires_grad=True)
    run = {"block": lambda: ops.residual_distill(y, *blocks[0]),
           "compression": lambda: ops.compress_skip(z32, w_c, b_c, y),
           "group": lambda: ops.distill_and_compress(y, blocks, w_c, b_c),
           "body": lambda: ops.distill_groups(y, groups)}[node]

    def pack(t):
        return t.to(other) if (changed == "inputs") == t.requires_grad else t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    with pytest.raises(RuntimeError, match=f"saved_tensors_hooks unpack as {other}"):
        out.backward(torch.ones_like(out))


@pytest.mark.parametrize("body", [False, True])  # distill_and_compress (one node a group), distill_groups (one node)
def test_a_saved_activation_handed_back_at_its_address_in_another_layout(body, device):
    """A saved_tensors_hooks pair that frees a saved activation and hands it back where a new
    allocation lands, which can be its old address (a caching allocator reuses freed blocks), in
    another layout (save_on_cpu-style offloading copies into contiguous tensors): here, the group's
    channels_last input rewritten in NCHW order in its own storage. The backward's launch plan is
    keyed by the forward's layouts only where the saved tensors are the forward's: the same address
    alone does not say so, and every gradient equals the one without the hook, bit for bit."""
    dtype = dtypes_for(device)[0]
    _eager_group_or_skip(device, dtype)
    y_leaf = randn(2, 24, 5, 3, dtype=dtype, device=device, channels_last=True, requires_grad=True)
    groups = [(_group_blocks(dtype, device, inners=(16, 16, 16)),
               (randn(24, 36, 1, 1, dtype=dtype, device=device, requires_grad=True),
                randn(24, dtype=dtype, device=device, requires_grad=True))) for _ in range(2 if body else 1)]
    leaves = [y_leaf, *(t for blocks, compression in groups for t in (*(t for b in blocks for t in b), *compression))]
    grad_out = randn(2, 24, 5, 3, dtype=dtype, device=device)

    def gradients():
        y = y_leaf * 2  # an activation whose storage nothing else reads after the forward
        if body:
            out = ops.distill_groups(y, groups)
        else:
            (blocks, (w_c, b_c)), = groups
            out = ops.distill_and_compress(y, blocks, w_c, b_c)
        return torch.autograd.grad(out, leaves, grad_out)

    def pack(t):  # the 4-D activations that are not contiguous (the groups' channels_last inputs)
        if t.dim() != 4 or t.is_contiguous():
            return t
        return t.untyped_storage(), t.storage_offset(), t.shape, t.detach().clone()

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        storage, offset, shape, values = packed
        return values.new_empty(0).set_(storage, offset, shape).copy_(values)  # NCHW, at the same address

    expected = gradients()
    gradients()  # replayed: the backward's plan keyed by the forward's signature
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        got = gradients()
    for i, (g, e) in enumerate(zip(got, expected)):
        assert torch.equal(g, e), f"gradient of leaf {i}"


def _packed_oracle(w, transposed):
    """What the 3x3 kernels read, by permutation: tap-major (9, F_in, F_out), or (9, F_out, F_in)."""
    return w.permute(2, 3, 0, 1).flatten(0, 1) if transposed else w.permute(2, 3, 1, 0).flatten(0, 1)


# (F_out, F_in): DRN's square width; unequal odd ones (13 x 5), where a swapped index shows; 9 x 33,
# over one tile (BLOCK_O 8, BLOCK_I 16), so that edge tiles are masked; 1 x 1.
@pytest.mark.parametrize("f_out, f_in", [(16, 16), (13, 5), (9, 33), (1, 1)])
# Where the weights come from: stacked contiguous ones (pack_groups), a channels_last weight among
# them (a model moved to channels_last), packed ones read back as weights (_transposed_packs).
@pytest.mark.parametrize("source", ["contiguous", "channels_last", "packed"])
def test_pack3x3_writes_the_permuted_weights(f_out, f_in, source, device):
    """pack3x3_kernel copies n 3x3 weights into both packed forms bit for bit, in every storage dtype,
    whatever the weights' strides; each form alone too, and one weight at a time (_pack_conv)."""
    from fastdrn.kernels import residual_distill as rd

    _eager_group_or_skip(device, torch.float32)
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        if dtype == torch.float64 and where(device) == "gpu":
            continue  # float64 runs only under the interpreter
        weights = [randn(f_out, f_in, 3, 3, dtype=dtype, device=device) for _ in range(3)]
        if source == "channels_last":
            weights[1] = weights[1].contiguous(memory_format=torch.channels_last)
        stack = torch.stack(weights)
        if source == "packed":  # (n, 9, F_in, F_out) seen as (n, F_out, F_in, 3, 3)
            stack = rd._as_weights(torch.stack([_packed_oracle(w, False) for w in weights]))
        packed, packed_t = rd._pack3x3(stack, True, True)
        assert rd._pack3x3(stack, True, False)[1] is None and rd._pack3x3(stack, False, True)[0] is None
        for k, w in enumerate(weights):
            for transposed, got in ((False, packed[k]), (True, packed_t[k])):
                expected = _packed_oracle(w, transposed)
                assert torch.equal(got, expected), (dtype, k, transposed)
                assert torch.equal(rd._pack3x3(stack, not transposed, transposed)[transposed][k], expected)
                assert torch.equal(rd._pack_conv(w, transposed), expected), (dtype, k, transposed)


# frozen: the input and the first group's first block need no gradient, so that group's backward
# starts at its second block and reads its transposed packs from there.
@pytest.mark.parametrize("fold", [False, True])  # FASTDRN_FOLD_BACKWARD: the input-gradient kernels read them too
@pytest.mark.parametrize("frozen", [False, True])
def test_distill_groups_transposes_the_3x3_weights_once_a_step(frozen, fold, device, monkeypatch):
    """In training, distill_groups packs every group's transposed 3x3 weights (what the backward's
    input gradient reads) in the same one launch as the forward's: each block's slice equals its own
    transposed pack, no group's backward transposes its own, and the gradients are those of the
    groups called one by one, bit for bit."""
    from fastdrn.kernels import residual_distill as rd

    dtype = dtypes_for(device)[0]
    _eager_group_or_skip(device, dtype)
    groups = [(_group_blocks(dtype, device, inners=(16, 16, 16)),
               (randn(24, 36, 1, 1, dtype=dtype, device=device, requires_grad=True),
                randn(24, dtype=dtype, device=device, requires_grad=True))) for _ in range(2)]
    w_convs = [block[2] for blocks, _ in groups for block in blocks]
    packs, packs_t = rd.pack_groups(w_convs, [3, 3], transposed=True)
    for k, (forward, backward) in enumerate(zip(packs, packs_t)):
        for i in range(3):
            assert torch.equal(forward[0][i], rd._pack_conv(w_convs[3 * k + i]))
            assert torch.equal(backward[0][i], rd._pack_conv(w_convs[3 * k + i], transpose=True))
    assert rd.pack_groups(w_convs, [3, 3])[1] is None  # inference: no transposed packs

    y = randn(2, 24, 5, 3, dtype=dtype, device=device, channels_last=True, requires_grad=not frozen)
    if frozen:
        for t in groups[0][0][0]:
            t.requires_grad_(False)
    grad_out = randn(2, 24, 5, 3, dtype=dtype, device=device)
    leaves = [t for t in (y, *w_convs) if t.requires_grad]

    def refuse(*args, **kwargs):
        raise AssertionError("a group's backward transposed its own 3x3 weights")

    with launch_settings(fold_backward=fold):
        expected = ops.distill_and_compress(ops.distill_and_compress(y, *_flat(groups[0])), *_flat(groups[1]))
        expected_grads = torch.autograd.grad(expected, leaves, grad_out)
        monkeypatch.setattr(rd, "_transposed_packs", refuse)
        out = ops.distill_groups(y, groups)
        assert torch.equal(out, expected)
        for i, (g, e) in enumerate(zip(torch.autograd.grad(out, leaves, grad_out), expected_grads)):
            assert torch.equal(g, e), f"gradient of leaf {i}"


def _flat(group):
    blocks, (w, b) = group
    return blocks, w, b


def _unpinned(configs) -> list:
    """The configs of a list that neither FASTDRN_NUM_WARPS=4 nor 8 (the GPU tests' warp pins) runs."""
    from fastdrn.kernels import _common

    pinned = [_common.pinned_config(configs, warps) for warps in (4, 8)]
    return [config for config in configs if not any(config is p for p in pinned)]


@contextlib.contextmanager
def _forced_autotuners(monkeypatch, *slots):
    """Each (table, key, autotuner) of `slots` put in its table for the block. Launch plans and lean
    launchers hold compiled kernels by autotuner: forgotten before and after, so none outlives it."""
    from fastdrn.kernels import _common, plans

    def forget():
        plans.reset()
        for _table, _key, tuner in slots:
            _common._lean_launchers.pop(id(tuner), None)

    for table, key, tuner in slots:
        monkeypatch.setitem(table, key, tuner)
    forget()
    try:
        yield
    finally:
        forget()


def _unpinned_conv3x3_configs() -> list:
    """(F, config) for each unpinned 16-bit 3x3 config, and each candidate (CONV3X3_CANDIDATES)."""
    from fastdrn.kernels import residual_distill as module

    return [(block_f, config) for block_f in module.CONV3X3_CONFIGS
            for config in (_unpinned(module.conv3x3_configs(block_f, torch.bfloat16))
                           + module.CONV3X3_CANDIDATES.get(block_f, []))]


def _two_blocks_against_float64(inner, height, width, dtype, device, config) -> None:
    """A group of two blocks of inner width `inner` (8-aligned widths, so the forward folds the next
    squeeze where F <= 64) over 2 x height x width pixels, under whatever 3x3 config is forced:
    output, every gradient (helpers.assert_op_grads_close) and the in-place inference path's output
    against float64."""
    fwd_tol, grad_tol = tolerance(device, dtype)

    def draw():
        y = randn(2, 16, height, width, dtype=dtype, device=device, channels_last=True, requires_grad=True)
        blocks = [tuple(make_block(16 + 8 * k, inner, 8, dtype, device)) for k in range(2)]
        leaves = [y, *(t for block in blocks for t in block)]
        out = ops.distill_group(y, blocks)
        grad_out = randn(*out.shape, dtype=dtype, device=device)
        grads = torch.autograd.grad(out, leaves, grad_out)
        ref, ref_grads, eager_grads = _reference(y, blocks, None, leaves, grad_out)
        assert_close(out, ref, fwd_tol, f"{dtype} forward, {config}")
        with torch.no_grad():
            assert_close(ops.distill_group(y.detach(), [[t.detach() for t in b] for b in blocks]), ref,
                         fwd_tol, f"{dtype} in-place forward, {config}")
        return grads, eager_grads, ref_grads

    assert_op_grads_close(dtype, grad_tol, draw, None, f"{dtype} {config}")


# Each 16-bit 3x3 config that the GPU tests' warp pins (FASTDRN_NUM_WARPS 4 and 8) do not run
# (autotuning may launch any listed config), and each candidate the GPU profile times.
@pytest.mark.parametrize("inner,config", _unpinned_conv3x3_configs(),
                         ids=lambda v: v if isinstance(v, int) else config_label(v).replace(" ", ""))
def test_every_3x3_config_matches_float64(inner, config, device, monkeypatch):
    """Each such config, forced: a group of two blocks with 8-aligned widths (so the forward folds
    the next squeeze where F <= 64) at 2 x 13 x 5 pixels (M = 130, no multiple of any tile), output
    and every gradient against float64, and the in-place inference path's output."""
    from fastdrn.kernels import residual_distill as module

    if device.type != "cuda":
        pytest.skip("the interpreter runs configs of its own (CONV3X3_INTERPRETER_BY_F)")
    block_f = module.next_pow2(inner)
    with _forced_autotuners(monkeypatch, *((module.conv3x3_tuned, (block_f, False, inplace),
                                            module.conv3x3_autotuner([config], inplace)) for inplace in (False, True))):
        for dtype in dtypes_for(device):
            if dtype not in SIXTEEN_BIT:
                continue
            _two_blocks_against_float64(inner, 13, 5, dtype, device, config)


# The 3x3's two launch options that only GPU candidates use (CONV3X3_CANDIDATES), through the
# interpreter's own config: 2-D pixel tiles (TILE_W) of 4 x 8 and 8 x 4 pixels, and x loaded
# through L1 (X_IN_L1, which must load the same values). The images are no multiple of either
# tile: 13 x 5 (ragged in both directions), 1 x 13 (a tile mostly above the image) and 5 x 1.
@pytest.mark.parametrize("tile_w,x_in_l1", [(8, False), (4, True), (0, True)])
@pytest.mark.parametrize("height,width", [(13, 5), (1, 13), (5, 1)])
def test_3x3_pixel_tiles_and_l1_loads_match_float64(tile_w, x_in_l1, height, width, device, monkeypatch):
    """A group of two blocks (F = 24, which folds the next squeeze) under the forced config: output,
    every gradient and the in-place inference path's output against float64."""
    from fastdrn.kernels import residual_distill as module

    if device.type == "cuda":
        pytest.skip("a GPU runs these options as candidates (test_every_3x3_config_matches_float64)")
    inner, dtype = 24, torch.float64
    block_f = module.next_pow2(inner)
    config = module._config(32, 32, min(block_f, 32), 4, 1, tile_w=tile_w, x_in_l1=x_in_l1)
    with _forced_autotuners(monkeypatch, (module.CONV3X3_INTERPRETER_BY_F, block_f, config)):
        _two_blocks_against_float64(inner, height, width, dtype, device, config)


def _unpinned_weight_grad_configs() -> list:
    """Each unpinned 16-bit weight-gradient config for aligned rows, and each candidate
    (WEIGHT_GRAD_CANDIDATES)."""
    from fastdrn.kernels import gemm

    return _unpinned(gemm.WEIGHT_GRAD_TILES_CONFIGS[(False, True)]) + list(gemm.WEIGHT_GRAD_CANDIDATES)


# Each such config (autotuning may launch any listed config; the GPU profile times the candidates).
@pytest.mark.parametrize("config", _unpinned_weight_grad_configs(), ids=lambda c: config_label(c).replace(" ", ""))
def test_every_weight_grad_config_matches_float64(config, device, monkeypatch):
    """Each such config, forced in both weight-gradient kernels: one block (weight_grad_tiles_kernel,
    3 problems) and a group of three (weight_grad_blocks_kernel, 9 problems in one launch), widths
    8-aligned so the rows are 16-byte aligned, at 2 x 13 x 5 pixels (M = 130: two partial splits,
    the second 2 rows long); every gradient against float64."""
    from fastdrn.kernels import _common, gemm

    if device.type != "cuda":
        pytest.skip("the interpreter runs one config of its own (WEIGHT_GRAD_INTERPRETER)")
    forced = {"tiles": gemm.weight_grad_autotuner([config], False), "blocks": gemm.weight_grad_autotuner([config], True)}
    launched = []  # the autotuners launched: the forced ones must be (rows not aligned would run others)
    real_launch = gemm.launch

    def spy(kernel, tuned, *args, **kwargs):
        launched.append(tuned)
        return real_launch(kernel, tuned, *args, **kwargs)

    monkeypatch.setattr(gemm, "launch", spy)

    with _forced_autotuners(monkeypatch, (gemm.weight_grad_tiles_tuned, (False, True), forced["tiles"]),
                            (gemm.weight_grad_blocks_tuned, (False, True), forced["blocks"])):
        for dtype in dtypes_for(device):
            if dtype not in SIXTEEN_BIT:
                continue
            _fwd_tol, grad_tol = tolerance(device, dtype)
            for n_blocks in (1, 3):
                def draw():
                    y = randn(2, 16, 13, 5, dtype=dtype, device=device, channels_last=True, requires_grad=True)
                    blocks = [tuple(make_block(16 + 8 * k, 64, 8, dtype, device)) for k in range(n_blocks)]
                    leaves = [y, *(t for block in blocks for t in block)]
                    out = ops.distill_group(y, blocks)
                    grad_out = randn(*out.shape, dtype=dtype, device=device)
                    grads = torch.autograd.grad(out, leaves, grad_out)
                    _ref, ref_grads, eager_grads = _reference(y, blocks, None, leaves, grad_out)
                    return grads, eager_grads, ref_grads

                launched.clear()
                with _common.launch_settings(weight_grad_blocks=3):
                    assert_op_grads_close(dtype, grad_tol, draw, None, f"{dtype} {n_blocks} blocks {config}")
                kernel = forced["blocks" if n_blocks == 3 else "tiles"]
                assert any(tuned is kernel for tuned in launched), f"{n_blocks} blocks: the forced config never ran"


def test_group_function_double_backward_raises(device):
    dtype = dtypes_for(device)[0]
    _eager_group_or_skip(device, dtype)
    y = randn(1, 24, 2, 3, dtype=dtype, device=device, channels_last=True, requires_grad=True)
    out = ops.distill_group(y, _group_blocks(dtype, device))
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), [y], create_graph=True)
