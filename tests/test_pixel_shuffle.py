"""fastdrn.ops.pixel_shuffle and the C++/CUDA extension behind it (csrc/, fastdrn/extension.py),
and the internal pixel_shuffle_bias (the conv's bias added as the shuffle gathers).

The op only moves elements, so every comparison with torch.nn.functional.pixel_shuffle is bitwise
(the bits of every element, NaN, Inf and -0.0 included), and so is every gradient. The CPU kernel
runs everywhere; the CUDA cases skip without a GPU. The first test to need the extension compiles
it (about 10 s of CPU time here; later runs load it from torch's extensions cache).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fastdrn import extension, ops, reference

HAS_CUDA = torch.cuda.is_available()
needs_cuda = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float64, id="fp64")]
SCALES = [1, 2, 3, 4, 5]
# (N, C, H, W) of the shuffled (large) tensor's batch and channels and the small tensor's H, W.
SHAPES = [
    pytest.param((1, 1, 1, 1), id="ones"),  # every axis of size 1: each digit of the index wraps at once
    pytest.param((2, 3, 5, 7), id="odd"),  # odd sizes: 16-byte vectors straddle rows, numel leaves a tail
    pytest.param((3, 4, 2, 6), id="even"),  # even sizes: vectors tile the rows exactly
    pytest.param((1, 64, 3, 2), id="drn-width"),  # DRN's 64 features: channels_last runs span many vectors
    pytest.param((2, 1, 9, 1), id="column"),  # C = 1 and W = 1: NCHW and channels_last strides coincide on axes
]
FORMATS = [pytest.param(False, id="nchw"), pytest.param(True, id="channels_last")]
_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _channels_last(x):
    return x.contiguous(memory_format=torch.channels_last)


def _sliced(x):
    return x[..., ::2]


def _transposed(x):
    return x.transpose(2, 3)


def _batch_broadcast(x):
    return x[:1].expand(3, -1, -1, -1)


def _channels_permuted(x):
    return x.permute(0, 2, 1, 3)


ODD_LAYOUTS = [
    _sliced,  # every other column: not dense, made dense first
    _transposed,  # H and W swapped: the strides of neither memory format
    _batch_broadcast,  # batch stride 0
    _channels_permuted,  # (N, H, C, W) storage viewed as NCHW: C lies between H and W in memory
]


def assert_bitwise_equal(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.device == ref.device
    view = _INT_VIEW[out.element_size()]
    assert torch.equal(out.view(view), ref.view(view)), "elements differ"


def sample(shape, dtype, device, channels_last=False, specials=True) -> torch.Tensor:
    """Random values, led by NaN, -Inf and -0.0 unless specials=False: a bitwise comparison then
    checks that these are moved untouched too."""
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    if specials:
        x.view(-1)[:3] = torch.tensor([float("nan"), float("-inf"), -0.0], dtype=dtype)[: x.numel()]
    x = x.to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def shuffle_input_shape(shape, s):
    n, c, h, w = shape
    return (n, c * s * s, h, w)


class RecordOps(TorchDispatchMode):
    """The names of the operators that run below autograd."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def ext():
    """The extension, built or loaded once; a failure here is a failure of the product, not a skip."""
    error = extension.load_error()
    assert error is None, f"the extension did not load: {error}"
    return torch.ops.fastdrn_ext


def strides_in_format_of(x, shape):
    """Strides of a dense tensor of `shape` in x's suggested memory format. On the CPU torch's own
    pixel shuffle keeps that format; on CUDA torch returns contiguous output, and the extension
    keeps the input's format there too (a deliberate difference, found on an H100)."""
    from torch._prims_common import suggest_memory_format

    return torch.empty(shape, device="meta", memory_format=suggest_memory_format(x)).stride()


@pytest.fixture
def forced(monkeypatch, ext):
    """FASTDRN_BACKEND=triton: fastdrn.ops.pixel_shuffle runs the extension on every device."""
    monkeypatch.setenv("FASTDRN_BACKEND", "triton")
    return ext


# ---- results equal torch's, bit for bit --------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("s", SCALES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_torch(forced, shape, s, dtype, channels_last, device):
    x = sample(shuffle_input_shape(shape, s), dtype, device, channels_last).requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    out = ops.pixel_shuffle(x, s)
    ref = F.pixel_shuffle(ref_x, s)
    assert_bitwise_equal(out, ref)
    assert out.stride() == strides_in_format_of(x, out.shape)  # the input's memory format
    assert out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()  # a copy, even for s = 1

    # The incoming gradient in the other memory format: the backward makes it dense first.
    grad = sample(ref.shape, dtype, device, channels_last=not channels_last)
    out.backward(grad)
    ref.backward(grad)
    assert_bitwise_equal(x.grad, ref_x.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("s", SCALES)
@pytest.mark.parametrize("shape", SHAPES)
def test_unshuffle_op_matches_torch(ext, shape, s, dtype, channels_last, device):
    n, c, h, w = shape
    x = sample((n, c, h * s, w * s), dtype, device, channels_last)
    out = ext.pixel_unshuffle(x, s)
    ref = F.pixel_unshuffle(x, s)
    assert_bitwise_equal(out, ref)
    assert out.stride() == strides_in_format_of(x, out.shape)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ODD_LAYOUTS)
def test_any_strides(forced, layout, device):
    x = layout(torch.randn(3, 18, 18, 10, device=device))
    assert_bitwise_equal(ops.pixel_shuffle(x, 3), F.pixel_shuffle(x, 3))
    out = ops.pixel_shuffle(x, 3)
    assert out.stride() == strides_in_format_of(x, out.shape)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 8, 3, 3), (2, 0, 3, 3), (2, 8, 0, 3)])  # an empty axis each
def test_empty(forced, shape, device):
    x = torch.randn(shape, device=device)
    assert ops.pixel_shuffle(x, 2).shape == F.pixel_shuffle(x, 2).shape


@pytest.mark.parametrize("backend_name", ["triton", "torch", "auto"])  # the extension; torch's own, twice on the CPU
@pytest.mark.parametrize("shape", [(0, 8, 3, 3), (2, 0, 3, 3), (2, 8, 0, 3)])  # an empty axis each
def test_empty_backward(backend_name, shape, monkeypatch, ext):
    """An empty input's gradient has the input's shape on every path, with and without the bias.
    torch's CPU pixel_unshuffle hands an empty input back in its own shape (pytorch/pytorch PR
    192816), so torch's pixel_shuffle backward failed: "PixelShuffleBackward0 returned an invalid
    gradient at index 0 - got [0, 2, 6, 6] but expected shape compatible with [0, 8, 3, 3]"."""
    monkeypatch.setenv("FASTDRN_BACKEND", backend_name)
    x = torch.randn(shape, requires_grad=True)
    bias = torch.randn(shape[1], requires_grad=True)
    expected = (shape[0], shape[1] // 4, shape[2] * 2, shape[3] * 2)
    out = ops.pixel_shuffle(x, 2)
    assert out.shape == expected
    (x_grad,) = torch.autograd.grad(out, x, torch.ones(expected))
    assert x_grad.shape == x.shape
    out = ops._pixel_shuffle_bias(x, bias, 2)
    assert out.shape == expected
    x_grad, bias_grad = torch.autograd.grad(out, [x, bias], torch.ones(expected))
    assert x_grad.shape == x.shape and torch.equal(bias_grad, torch.zeros_like(bias))


def test_numpy_integer_factor(forced):
    x = torch.randn(1, 8, 2, 3)  # torch.nn.functional.pixel_shuffle takes numpy integers too
    assert_bitwise_equal(ops.pixel_shuffle(x, np.int64(2)), F.pixel_shuffle(x, 2))


@pytest.mark.parametrize("channels_last", FORMATS)
def test_gradcheck_float64(forced, channels_last):
    x = sample((2, 18, 3, 4), torch.float64, "cpu", channels_last, specials=False).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.pixel_shuffle(t, 3), (x,))
    assert torch.autograd.gradgradcheck(lambda t: ops.pixel_shuffle(t, 3), (x,))


# ---- bad input: the same clear errors on every backend -----------------------------------------
BAD_INPUTS = [
    pytest.param(lambda: (torch.randn(1, 6, 2, 2), 2), ValueError, "not divisible", id="channels-not-divisible"),
    pytest.param(lambda: (torch.randn(4, 2, 2), 2), ValueError, "4-D", id="3-D"),
    pytest.param(lambda: (torch.randn(1, 1, 4, 2, 2), 2), ValueError, "4-D", id="5-D"),
    pytest.param(lambda: (torch.randn(1, 4, 2, 2), 0), ValueError, ">= 1", id="factor-0"),
    pytest.param(lambda: (torch.randn(1, 4, 2, 2), -2), ValueError, ">= 1", id="factor-negative"),
    pytest.param(lambda: (torch.randn(1, 4, 2, 2), 2.0), TypeError, "must be an int", id="factor-float"),
    pytest.param(lambda: (torch.randn(1, 4, 2, 2), True), TypeError, "must be an int", id="factor-bool"),
    pytest.param(lambda: (torch.ones(1, 4, 2, 2, dtype=torch.int32), 2), TypeError, "dtype", id="int-tensor"),
    pytest.param(lambda: ([[[[1.0]]]], 1), TypeError, "torch.Tensor", id="not-a-tensor"),
]


@pytest.mark.parametrize("choice", ["torch", "auto", "triton"])
@pytest.mark.parametrize("make, error, match", BAD_INPUTS)
def test_bad_input(monkeypatch, choice, make, error, match):
    monkeypatch.setenv("FASTDRN_BACKEND", choice)
    with pytest.raises(error, match=match):
        ops.pixel_shuffle(*make())


@pytest.mark.parametrize("op, args, error, match", [
    ("pixel_shuffle", (torch.randn(1, 6, 2, 2), 2), ValueError, "not divisible"),
    ("pixel_shuffle", (torch.randn(4, 2, 2), 2), ValueError, "4-D"),
    ("pixel_shuffle", (torch.randn(1, 4, 2, 2), 0), ValueError, ">= 1"),
    ("pixel_shuffle", (torch.ones(1, 4, 2, 2, dtype=torch.int32), 2), TypeError, "dtype"),
    ("pixel_unshuffle", (torch.randn(1, 1, 4, 3), 2), ValueError, "divisible by downscale_factor"),
    ("pixel_unshuffle", (torch.randn(1, 1, 4, 4), -1), ValueError, ">= 1"),
])
def test_op_bad_input(ext, op, args, error, match):
    """The C++ ops check for themselves, with the same error types (TORCH_CHECK_VALUE/_TYPE)."""
    with pytest.raises(error, match=match):
        getattr(ext, op)(*args)


# ---- backend routing -----------------------------------------------------------------------------
def _ran_extension(x, s=2) -> bool:
    with RecordOps() as record:
        out = ops.pixel_shuffle(x, s)
    assert_bitwise_equal(out, F.pixel_shuffle(x, s))
    return "fastdrn_ext::pixel_shuffle" in record.names


def test_routing_on_cpu(monkeypatch, ext):
    x = torch.randn(2, 8, 3, 3)
    monkeypatch.setenv("FASTDRN_BACKEND", "torch")
    assert not _ran_extension(x)
    monkeypatch.setenv("FASTDRN_BACKEND", "auto")  # auto keeps plain PyTorch for CPU tensors
    assert not _ran_extension(x)
    monkeypatch.setenv("FASTDRN_BACKEND", "triton")
    assert _ran_extension(x)


@pytest.fixture
def broken_extension(monkeypatch, ext):
    """The loader as it is on a machine where the extension cannot be built (state restored after)."""
    def fail():
        raise RuntimeError("no C++ compiler (simulated)")

    monkeypatch.setattr(extension, "_loaded", False)
    monkeypatch.setattr(extension, "_load_failure", None)
    monkeypatch.setattr(extension, "_import_or_build", fail)


@pytest.mark.parametrize("device", DEVICES)
def test_forced_backend_raises_when_extension_cannot_load(monkeypatch, broken_extension, device):
    monkeypatch.setenv("FASTDRN_BACKEND", "triton")
    with pytest.raises(RuntimeError, match=r"FASTDRN_BACKEND=triton .*no C\+\+ compiler \(simulated\)"):
        ops.pixel_shuffle(torch.randn(1, 4, 2, 2, device=device), 2)
    assert extension.load_error() == "RuntimeError: no C++ compiler (simulated)"


@pytest.mark.parametrize("device", DEVICES)
def test_auto_falls_back_when_extension_cannot_load(monkeypatch, broken_extension, device):
    x = torch.randn(2, 8, 3, 3, device=device)
    assert not _ran_extension(x)
    assert "no C++ compiler" in extension.unavailable_reason(x.device)


@pytest.mark.parametrize("choice,device,warned", [
    ("auto", "cuda", True),    # auto on a GPU falls back to PyTorch's shuffle: said once, with the reason
    ("auto", "cpu", False),    # auto never uses the extension on the CPU: nothing fell back
    ("torch", "cuda", False),  # PyTorch's shuffle asked for
])
def test_auto_says_once_why_the_extension_is_not_used(choice, device, warned, monkeypatch):
    """Under auto a CUDA tensor's pixel shuffle fell back to PyTorch's in silence wherever the
    extension failed to build or load (no toolkit, no compiler, a FASTDRN_CUDA_ARCH_LIST typo), and
    model.backend still said Triton: nothing said why the GPU path ran slower. (A stand-in for the
    CUDA tensor: the routing reads only its device.)"""
    import types
    import warnings

    reason = "the C++/CUDA extension could not be loaded (ValueError: FASTDRN_CUDA_ARCH_LIST: cannot read 'Hopper')"
    monkeypatch.setenv("FASTDRN_BACKEND", choice)
    monkeypatch.setattr(extension, "unavailable_reason", lambda device: reason)
    monkeypatch.setattr(ops, "_extension_fallback_said", False, raising=False)
    x = types.SimpleNamespace(device=torch.device(device))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not ops._use_extension("pixel_shuffle", x)
        assert not ops._use_extension("pixel_shuffle", x)
    said = [str(w.message) for w in caught]
    assert len(said) == (1 if warned else 0), said
    if warned:
        assert reason in said[0] and "FASTDRN_BACKEND=triton" in said[0], said[0]


def test_cuda_kernel_image_error_is_named_before_a_launch(monkeypatch, ext):
    """The extension was built for sm_80 and sm_90 without PTX, so on any other GPU generation its
    first launch failed with CUDA's "no kernel image" under auto instead of falling back. Now each
    device is asked once (cudaFuncGetAttributes, stood in for here: CPU builds have no CUDA kernels)
    and the answer routes: auto falls back with the warning, triton raises naming the GPU and the fix."""
    import types
    import warnings

    asked = []

    def image_error(index):
        asked.append(index)
        return "cudaErrorNoKernelImageForDevice: no kernel image is available for execution on the device"

    monkeypatch.setattr(extension, "_cuda_kernels", True)
    monkeypatch.setattr(extension, "_kernel_image_errors", {})
    monkeypatch.setattr(torch.ops.fastdrn_ext, "cuda_kernel_image_error", image_error, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (12, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "Future GPU")
    monkeypatch.setattr(ops, "_extension_fallback_said", False, raising=False)
    reason = extension.unavailable_reason(torch.device("cuda", 1))
    assert "Future GPU" in reason and "12.0" in reason and "FASTDRN_CUDA_ARCH_LIST=12.0" in reason, reason
    assert "no kernel image" in reason
    x = types.SimpleNamespace(device=torch.device("cuda", 1))  # the routing reads only the device
    monkeypatch.setenv("FASTDRN_BACKEND", "auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not ops._use_extension("pixel_shuffle", x)
    assert len(caught) == 1 and "FASTDRN_CUDA_ARCH_LIST=12.0" in str(caught[0].message)
    monkeypatch.setenv("FASTDRN_BACKEND", "triton")
    with pytest.raises(RuntimeError, match=r"FASTDRN_BACKEND=triton .*compute capability 12\.0"):
        ops._use_extension("pixel_shuffle", x)
    assert asked == [1]  # once a device


def test_a_build_without_the_kernel_image_check_is_named(monkeypatch, ext):
    """An extension built before cuda_kernel_image_error existed: named (auto falls back), not an
    AttributeError from inside the routing."""
    def missing(index):
        raise AttributeError("'_OpNamespace' 'fastdrn_ext' object has no attribute 'cuda_kernel_image_error'")

    monkeypatch.setattr(extension, "_cuda_kernels", True)
    monkeypatch.setattr(extension, "_kernel_image_errors", {})
    monkeypatch.setattr(torch.ops.fastdrn_ext, "cuda_kernel_image_error", missing, raising=False)
    assert "reinstall fastdrn" in extension.unavailable_reason(torch.device("cuda", 0))


def test_cuda_kernels_that_run_are_used(monkeypatch, ext):
    monkeypatch.setattr(extension, "_cuda_kernels", True)
    monkeypatch.setattr(extension, "_kernel_image_errors", {})
    monkeypatch.setattr(torch.ops.fastdrn_ext, "cuda_kernel_image_error", lambda index: "", raising=False)
    assert extension.unavailable_reason(torch.device("cuda", 0)) is None


# ---- the architectures the CUDA kernels are built for --------------------------------------------
def _gencodes(flags):
    return [f.split("=", 1)[1] for f in flags]


def test_default_arch_list_embeds_ptx_for_newer_gpus(monkeypatch):
    """sm_80 and sm_90 machine code, and compute_90 PTX: without it a GPU newer than Hopper had no
    kernel it could run."""
    monkeypatch.delenv("FASTDRN_CUDA_ARCH_LIST", raising=False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(extension, "_nvcc_archs", lambda: {75, 80, 86, 89, 90, 100, 120})
    assert _gencodes(extension.nvcc_arch_flags()) == [
        "arch=compute_80,code=sm_80", "arch=compute_90,code=sm_90", "arch=compute_90,code=compute_90"]


@pytest.mark.parametrize("fastdrn_list,torch_list,expected", [
    (None, "8.6", ["arch=compute_86,code=sm_86"]),  # PyTorch's setting, which every other extension honours
    ("9.0a", "8.6", ["arch=compute_90a,code=sm_90a"]),  # fastdrn's own wins over it
    ("80 10.0+PTX", None, ["arch=compute_80,code=sm_80", "arch=compute_100,code=sm_100",
                           "arch=compute_100,code=compute_100"]),
])
def test_arch_list_settings(monkeypatch, fastdrn_list, torch_list, expected):
    for name, value in (("FASTDRN_CUDA_ARCH_LIST", fastdrn_list), ("TORCH_CUDA_ARCH_LIST", torch_list)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.setattr(extension, "_nvcc_archs", lambda: {75, 80, 86, 89, 90, 100, 120})
    assert _gencodes(extension.nvcc_arch_flags()) == expected


@pytest.mark.parametrize("setting,value,message", [
    ("FASTDRN_CUDA_ARCH_LIST", "Hopper", r"cannot read 'Hopper'"),
    ("FASTDRN_CUDA_ARCH_LIST", "7.5", r"'7.5' is compute capability 7.5; .*8.0 \(A100\) and newer"),
    ("FASTDRN_CUDA_ARCH_LIST", "1.0", r"compute capability 1.0"),
    ("FASTDRN_CUDA_ARCH_LIST", "8.0;99", r"nvcc does not know '99'; it compiles for 8.0, 8.6, 9.0, 10.0"),
    ("TORCH_CUDA_ARCH_LIST", "Ampere", r"TORCH_CUDA_ARCH_LIST='Ampere': cannot read 'Ampere'"),
    ("FASTDRN_CUDA_ARCH_LIST", ";", r"names no architecture"),
])
def test_arch_list_nonsense_is_named_before_nvcc(monkeypatch, setting, value, message):
    """These reached nvcc, whose refusal was buried in a failed build's log."""
    monkeypatch.delenv("FASTDRN_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setenv(setting, value)
    monkeypatch.setattr(extension, "_nvcc_archs", lambda: {75, 80, 86, 90, 100})
    with pytest.raises(ValueError, match=message):
        extension.nvcc_arch_flags()
    assert extension.build_config(cuda=False) == (list(extension.CPU_SOURCES), ["-O3"])  # unread without CUDA


def test_forced_backend_raises_for_other_devices(forced):
    with pytest.raises(RuntimeError, match="CPU and CUDA kernels only"):
        ops.pixel_shuffle(torch.empty(1, 4, 2, 2, device="meta"), 2)


@pytest.mark.parametrize("device", DEVICES)
def test_auto_uses_extension_only_on_cuda(ext, device):
    assert _ran_extension(torch.randn(2, 8, 3, 3, device=device)) == (device == "cuda")


# ---- torch.compile and the registrations it relies on --------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", FORMATS)
def test_opcheck(ext, channels_last, device):
    """Schema, autograd registration and fake implementation agree with the kernels."""
    x = sample((2, 12, 3, 5), torch.float32, device, channels_last, specials=False).requires_grad_()
    torch.library.opcheck(ext.pixel_shuffle.default, (x, 2))
    y = sample((2, 3, 6, 10), torch.float32, device, channels_last, specials=False).requires_grad_()
    torch.library.opcheck(ext.pixel_unshuffle.default, (y, 2))


@pytest.mark.parametrize("layout", [torch.clone, _channels_last, *ODD_LAYOUTS])
@pytest.mark.parametrize("shape", SHAPES)
def test_fake_strides_match_kernel(ext, shape, layout):
    """torch.compile plans later ops with the fake's strides: they must be the kernel's, whatever x's."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    n, c, h, w = shape
    x = layout(torch.randn(n, 4 * c, 4 * h, 4 * w))  # every axis a multiple of 4 in every layout
    for op in (ext.pixel_shuffle, ext.pixel_unshuffle):
        with FakeTensorMode() as mode:
            fake = op(mode.from_tensor(x), 2)
        real = op(x, 2)
        assert (fake.shape, fake.stride()) == (real.shape, real.stride())


@pytest.mark.slow  # a few seconds of tracing
def test_compile_fullgraph(monkeypatch, forced):
    """torch.compile traces fastdrn.ops.pixel_shuffle with no graph break, including the first use
    of the extension inside the compiled function (the loader runs eagerly, not traced)."""
    from torch._dynamo.backends.debugging import aot_eager

    monkeypatch.setattr(extension, "_loaded", False)
    monkeypatch.setattr(extension, "_import_or_build", lambda: None)  # already loaded in this process
    monkeypatch.setattr(extension, "_register_python_parts", lambda: None)
    torch._dynamo.reset()
    graphs = []

    def record_graph(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)  # AOT autograd: traces the fake and the backward

    def f(x):
        return ops.pixel_shuffle(x * 2, 2).sin()

    compiled = torch.compile(f, fullgraph=True, backend=record_graph)
    x = torch.randn(2, 12, 3, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    out = compiled(x)
    (graph,) = graphs
    assert any("fastdrn_ext.pixel_shuffle" in str(node.target) for node in graph.graph.nodes)
    ref = f(ref_x)
    assert_bitwise_equal(out, ref)
    out.sum().backward()
    ref.sum().backward()
    assert_bitwise_equal(x.grad, ref_x.grad)


# ---- pixel_shuffle_bias: pixel_shuffle(x + bias.view(1, -1, 1, 1)) in one pass ---------------------
# The add is rounded once from the op-math type, as torch's is, so results are bitwise equal to the
# reference; the bias gradient is a sum, compared with float64 autograd within its rounding bound.
BIAS_SHAPES = [  # (N, C, H, W): C channels after the shuffle (C*s*s before), H, W before it
    pytest.param((2, 3, 5, 13), id="3ch-5x13"),
    pytest.param((1, 5, 1, 5), id="5ch-h1"),
    pytest.param((3, 3, 13, 1), id="3ch-w1"),
    pytest.param((1, 5, 13, 5), id="5ch-13x5"),
]
BIAS_SCALES = [1, 2, 3, 4]


def bias_grad_bound(grad64: torch.Tensor, ref: torch.Tensor, s: int, dtype: torch.dtype) -> torch.Tensor:
    """How far the bias gradient may be from float64's: the sum of n = N*H*W gradient elements (exact
    in the accumulator) accumulated in float32 (float64 for float64) errs by at most n * u_acc * sum|g|
    in the worst (recursive) order, and the one rounding to the bias's dtype adds u_dtype * |ref|."""
    abs_sum = F.pixel_unshuffle(grad64.abs(), s).sum(dim=(0, 2, 3))
    n = grad64.shape[0] * grad64.shape[2] * grad64.shape[3] // (s * s)
    u_acc = 2.0 ** -53 if dtype == torch.float64 else 2.0 ** -24
    return torch.finfo(dtype).eps / 2 * ref.abs() + 2 * n * u_acc * abs_sum


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("s", BIAS_SCALES)
@pytest.mark.parametrize("shape", BIAS_SHAPES)
def test_bias_forward_and_backward_match_reference(forced, shape, s, dtype, channels_last, device):
    x = sample(shuffle_input_shape(shape, s), dtype, device, channels_last, specials=False).requires_grad_()
    bias = sample((x.shape[1],), dtype, device, specials=False).requires_grad_()
    with RecordOps() as record:
        out = ops._pixel_shuffle_bias(x, bias, s)
    assert "fastdrn_ext::pixel_shuffle_bias" in record.names
    assert_bitwise_equal(out, reference.pixel_shuffle_bias(x.detach(), bias.detach(), s))
    assert out.stride() == strides_in_format_of(x, out.shape)

    x64 = x.detach().double().requires_grad_()
    bias64 = bias.detach().double().requires_grad_()
    ref64 = reference.pixel_shuffle_bias(x64, bias64, s)
    grad = sample(out.shape, dtype, device, channels_last=not channels_last, specials=False)
    out.backward(grad)
    ref64.backward(grad.double())
    assert_bitwise_equal(x.grad, x64.grad.to(dtype))  # moved, not computed: exact
    assert bias.grad.dtype == dtype
    error = (bias.grad.double() - bias64.grad).abs()
    assert bool((error <= bias_grad_bound(grad.double(), bias64.grad, s, dtype)).all()), error.max()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ODD_LAYOUTS)
def test_bias_any_strides(forced, layout, device):
    x = layout(torch.randn(3, 18, 18, 10, device=device))
    bias = torch.randn(x.shape[1], device=device)
    out = ops._pixel_shuffle_bias(x, bias, 3)
    assert_bitwise_equal(out, reference.pixel_shuffle_bias(x, bias, 3))
    assert out.stride() == strides_in_format_of(x, out.shape)
    strided_bias = torch.randn(2 * x.shape[1], device=device)[::2]  # not dense: made dense first
    assert_bitwise_equal(ops._pixel_shuffle_bias(x, strided_bias, 3), reference.pixel_shuffle_bias(x, strided_bias, 3))


@pytest.mark.parametrize("channels_last", FORMATS)
def test_bias_gradcheck_float64(forced, channels_last):
    x = sample((2, 18, 3, 4), torch.float64, "cpu", channels_last, specials=False).requires_grad_()
    bias = sample((18,), torch.float64, "cpu", specials=False).requires_grad_()
    assert torch.autograd.gradcheck(lambda t, b: ops._pixel_shuffle_bias(t, b, 3), (x, bias))
    assert torch.autograd.gradgradcheck(lambda t, b: ops._pixel_shuffle_bias(t, b, 3), (x, bias))


@pytest.mark.parametrize("device", DEVICES)
def test_bias_backward_computes_only_requested_gradients(forced, device):
    x = sample((2, 12, 3, 5), torch.float32, device, specials=False)
    bias = sample((12,), torch.float32, device, specials=False)
    for needs_x, needs_bias in ((True, False), (False, True)):
        x_leaf, bias_leaf = x.clone().requires_grad_(needs_x), bias.clone().requires_grad_(needs_bias)
        out = ops._pixel_shuffle_bias(x_leaf, bias_leaf, 2)
        with RecordOps() as record:
            out.backward(torch.randn_like(out))
        assert ("aten::sum" in record.names) == needs_bias
        assert (x_leaf.grad is not None) == needs_x and (bias_leaf.grad is not None) == needs_bias


BIAS_BAD_INPUTS = [
    pytest.param(lambda: (torch.randn(1, 8, 2, 2), torch.randn(4), 2), ValueError, "bias has 4 elements",
                 id="bias-wrong-size"),
    pytest.param(lambda: (torch.randn(1, 8, 2, 2), torch.randn(8, dtype=torch.float64), 2), TypeError,
                 "bias has dtype", id="bias-wrong-dtype"),
    pytest.param(lambda: (torch.randn(1, 8, 2, 2), torch.randn(2, 4), 2), ValueError, "1-D", id="bias-2-D"),
    pytest.param(lambda: (torch.randn(1, 8, 2, 2), torch.empty(8, device="meta"), 2), ValueError,
                 "bias is on meta", id="bias-wrong-device"),
    pytest.param(lambda: (torch.randn(1, 6, 2, 2), torch.randn(6), 2), ValueError, "not divisible",
                 id="x-channels-not-divisible"),
    pytest.param(lambda: (torch.randn(1, 8, 2, 2), torch.randn(8), 0), ValueError, ">= 1", id="factor-0"),
]


@pytest.mark.parametrize("choice", ["torch", "auto", "triton"])
@pytest.mark.parametrize("make, error, match", BIAS_BAD_INPUTS)
def test_bias_bad_input(monkeypatch, choice, make, error, match):
    monkeypatch.setenv("FASTDRN_BACKEND", choice)
    with pytest.raises(error, match=match):
        ops._pixel_shuffle_bias(*make())


@pytest.mark.parametrize("make, error, match", BIAS_BAD_INPUTS)
def test_bias_op_bad_input(ext, make, error, match):
    """The C++ op (or, for a meta tensor, its fake) checks for itself, with the same error types."""
    with pytest.raises(error, match=match):
        ext.pixel_shuffle_bias(*make())


def test_bias_routing_on_cpu(monkeypatch, ext):
    x, bias = torch.randn(2, 8, 3, 3), torch.randn(8)
    for choice, runs_extension in (("torch", False), ("auto", False), ("triton", True)):
        monkeypatch.setenv("FASTDRN_BACKEND", choice)
        with RecordOps() as record:
            out = ops._pixel_shuffle_bias(x, bias, 2)
        assert_bitwise_equal(out, reference.pixel_shuffle_bias(x, bias, 2))
        assert ("fastdrn_ext::pixel_shuffle_bias" in record.names) == runs_extension


@pytest.mark.parametrize("device", DEVICES)
def test_bias_forced_backend_raises_when_extension_cannot_load(monkeypatch, broken_extension, device):
    monkeypatch.setenv("FASTDRN_BACKEND", "triton")
    with pytest.raises(RuntimeError, match=r"FASTDRN_BACKEND=triton but pixel_shuffle_bias .*no C\+\+ compiler"):
        ops._pixel_shuffle_bias(torch.randn(1, 4, 2, 2, device=device), torch.randn(4, device=device), 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", FORMATS)
def test_bias_opcheck(ext, channels_last, device):
    """Schema, autograd registration and fake implementation agree with the kernel."""
    x = sample((2, 12, 3, 5), torch.float32, device, channels_last, specials=False).requires_grad_()
    bias = sample((12,), torch.float32, device, specials=False).requires_grad_()
    torch.library.opcheck(ext.pixel_shuffle_bias.default, (x, bias, 2))


@pytest.mark.slow  # a few seconds of tracing
def test_bias_compile_fullgraph(forced):
    """torch.compile traces a function calling _pixel_shuffle_bias with no graph break, forward and
    backward (AOT autograd traces the fake and the registered backward)."""
    from torch._dynamo.backends.debugging import aot_eager

    torch._dynamo.reset()
    graphs = []

    def record_graph(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    def f(x, bias):
        return ops._pixel_shuffle_bias(x * 2, bias, 2).sin()

    compiled = torch.compile(f, fullgraph=True, backend=record_graph)
    x = torch.randn(2, 12, 3, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    bias = torch.randn(12).requires_grad_()
    ref_x, ref_bias = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    out = compiled(x, bias)
    (graph,) = graphs
    assert any("fastdrn_ext.pixel_shuffle_bias" in str(node.target) for node in graph.graph.nodes)
    ref = f(ref_x, ref_bias)
    assert_bitwise_equal(out, ref)
    out.sum().backward()
    ref.sum().backward()
    assert_bitwise_equal(x.grad, ref_x.grad)
    assert_bitwise_equal(bias.grad, ref_bias.grad)


# ---- CUDA only -----------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("channels_last", FORMATS)
def test_cuda_graph_capture(forced, channels_last):
    """Capture fails if a kernel is launched on any stream but the current one (the capturing one)."""
    x = sample((4, 64 * 4, 33, 17), torch.float16, "cuda", channels_last)
    ops.pixel_shuffle(x, 2)  # loads the extension before capturing
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.pixel_shuffle(x, 2)
        back = forced.pixel_unshuffle(out, 2)
    x.copy_(sample(x.shape, x.dtype, "cuda", specials=False))
    graph.replay()
    torch.cuda.synchronize()
    assert_bitwise_equal(out, F.pixel_shuffle(x, 2))
    assert_bitwise_equal(back, x)


@pytest.mark.gpu
@pytest.mark.slow  # about 20 GB of GPU memory
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_64bit_indexing(ext):
    """More than 2**31 - 1 elements: the kernels switch to 64-bit indices."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GiB of GPU memory")
    x = torch.randn(1, 4, 16384, 32769, device="cuda", dtype=torch.float16)  # 2**31 + 65536 elements
    out = ext.pixel_shuffle(x, 2)
    assert torch.equal(out, F.pixel_shuffle(x, 2))
    del out
    y = ext.pixel_unshuffle(x.view(1, 1, 32768, 65538), 2)
    assert torch.equal(y, F.pixel_unshuffle(x.view(1, 1, 32768, 65538), 2))
