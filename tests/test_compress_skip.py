"""compress_skip = ELU(conv1x1(z, w, b)) + skip: fused Triton kernels against the float64 reference."""
import pytest
import torch

from fastdrn import ops, reference
from helpers import assert_close, dtypes_for, float64_leaves, randn, tolerance, where

# (N, C_in, C_out, H, W), each there for a reason:
SHAPES = [
    (1, 136, 64, 5, 13),   # DRN's compression (C + K*d = 136 -> 64) at odd H, W
    (3, 72, 40, 1, 5),     # H = 1; channel counts that are not powers of two, several N
    (2, 7, 3, 13, 1),      # W = 1; fewer channels than one block (masked tiles)
    (1, 200, 130, 3, 3),   # more than one block of input and output channels, plus a remainder
]


def make_inputs(shape, dtype, device, channels_last):
    n, c_in, c_out, h, w = shape
    conv = torch.nn.Conv2d(c_in, c_out, 1)
    z = randn(n, c_in, h, w, dtype=dtype, device=device, channels_last=channels_last, requires_grad=True)
    weight = conv.weight.detach().to(device, dtype).requires_grad_()
    bias = (torch.randn(c_out) * 0.5).to(device, dtype).requires_grad_()
    skip = randn(n, c_out, h, w, dtype=dtype, device=device, channels_last=channels_last, requires_grad=True)
    return z, weight, bias, skip


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradients_match_float64_reference(shape, channels_last, device):
    for dtype in dtypes_for(device):
        fwd_tol, grad_tol = tolerance(device, dtype)
        inputs = make_inputs(shape, dtype, device, channels_last)
        out = ops.compress_skip(*inputs)
        grad_out = randn(*out.shape, dtype=dtype, device=device)
        grads = torch.autograd.grad(out, inputs, grad_out)

        ref_inputs = float64_leaves(*inputs)
        ref = reference.compress_skip(*ref_inputs)
        ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out.double())
        assert out.dtype == dtype and out.shape == ref.shape
        assert_close(out, ref, fwd_tol, f"{dtype} forward")
        for name, g, rg in zip(("z", "w", "b", "skip"), grads, ref_grads):
            assert_close(g, rg, grad_tol, f"{dtype} d{name}")


def test_without_bias(device):
    dtype = dtypes_for(device)[0]
    z, w, _, skip = make_inputs((2, 20, 12, 3, 5), dtype, device, True)
    out = ops.compress_skip(z, w, None, skip)
    ref = reference.compress_skip(*float64_leaves(z, w, None, skip))
    assert_close(out, ref, tolerance(device, dtype)[0], "forward without bias")
    dz, dw = torch.autograd.grad(out.sum(), (z, w))
    assert dz.shape == z.shape and dw.shape == w.shape


def test_registered_op_and_eager_path_agree(monkeypatch, device):
    """Eager calls skip the custom-op dispatch (kernels/_common.py eager_fast_path); torch.compile
    runs the registered op. Both must give the same output and gradients, bit for bit."""
    from fastdrn import backend
    from fastdrn.kernels import compress_skip as module

    dtype = dtypes_for(device)[0]
    if not backend.use_triton("compress_skip", torch.device(device), dtype):
        pytest.skip("the fused op does not run here")
    if not module.eager_fast_path():
        pytest.skip("this torch has no direct-launch switch: every call already goes through the op")
    inputs = make_inputs((2, 24, 16, 3, 5), dtype, device, True)
    results = []
    for fast in (True, False):
        monkeypatch.setattr(module, "eager_fast_path", lambda fast=fast: fast)
        out = ops.compress_skip(*inputs)
        results.append([out, *torch.autograd.grad(out, inputs, torch.ones_like(out))])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_float64_gradcheck():
    if where(torch.device("cpu")) != "interpreter":
        pytest.skip("float64 runs through the interpreter")
    inputs = [t.detach().requires_grad_() for t in make_inputs((2, 9, 5, 3, 2), torch.float64, "cpu", True)]
    assert torch.autograd.gradcheck(ops.compress_skip, inputs)


def test_weight_gradients_are_bitwise_reproducible(device):
    dtype = dtypes_for(device)[-1]
    inputs = make_inputs((2, 136, 64, 9, 11), dtype, device, True)
    out = ops.compress_skip(*inputs)
    grad_out = randn(*out.shape, dtype=dtype, device=device)
    first = torch.autograd.grad(out, inputs[1:3], grad_out, retain_graph=True)
    second = torch.autograd.grad(out, inputs[1:3], grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_double_backward_raises(device):
    inputs = make_inputs((1, 8, 4, 2, 2), dtypes_for(device)[0], device, True)
    out = ops.compress_skip(*inputs)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), inputs[:1], create_graph=True)


def _valid():
    return [torch.randn(2, 8, 3, 3), torch.randn(4, 8, 1, 1), torch.randn(4), torch.randn(2, 4, 3, 3)]


@pytest.mark.parametrize("mutate,message", [
    (lambda a: a.__setitem__(0, torch.randn(2, 7, 3, 3)), "w expects 8 input channels but z has 7"),
    (lambda a: a.__setitem__(3, torch.randn(2, 5, 3, 3)), "skip has shape"),
    (lambda a: a.__setitem__(2, torch.randn(5)), "b has shape"),
    (lambda a: a.__setitem__(1, torch.randn(4, 8, 3, 3)), "1x1 conv weight"),
    (lambda a: a.__setitem__(0, torch.randn(8, 3, 3)), "4-D tensor"),
    (lambda a: a.__setitem__(3, torch.randn(2, 4, 3, 3, dtype=torch.float64)), "dtype"),
    (lambda a: a.__setitem__(0, torch.randn(2, 8, 3, 3, device="meta")), "is on"),
    (lambda a: a.__setitem__(0, torch.randint(0, 3, (2, 8, 3, 3))), "dtype"),
    (lambda a: a.__setitem__(0, torch.randn(0, 8, 3, 3)), "empty"),
])
def test_bad_input_is_named(mutate, message):
    args = _valid()
    mutate(args)
    with pytest.raises((ValueError, TypeError), match=message):
        ops.compress_skip(*args)
