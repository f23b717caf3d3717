"""shuffle_tail = conv3x3(pixel_shuffle(u + b_up, s), w_tail, b_tail) + mean in one Triton kernel
(kernels/shuffle_tail.py, inference only) against the float64 reference (reference.shuffle_tail)."""
import pytest
import torch

from fastdrn import backend, ops, reference
from helpers import assert_close, dtypes_for, randn, tolerance, where

# (N, C, n_colors, s, H, W): C channels after the shuffle (u has C*s*s), each there for a reason:
SHAPES = [
    (2, 24, 3, 2, 5, 13),   # x2; batch 2; C not a power of two (one and a half 16-channel chunks); odd H, W
    (1, 40, 3, 3, 13, 1),   # x3 (s*s = 9 rows of 16 per sub-block, the rest masked); W = 1; C = 40
    (1, 64, 3, 4, 1, 5),    # x4 at DRN's width, u of 64*16 = 1024 channels; H = 1
    (2, 8, 1, 4, 3, 2),     # n_colors 1 (a grey image); C below one chunk; sub-blocks of two images in a program
    (1, 5, 3, 3, 2, 3),     # C = 5, an odd count; tiles with sub-blocks past the last pixel
]


@pytest.fixture(autouse=True)
def _triton_runs(device):
    if backend.triton_unavailable_reason(torch.device(device)) is not None:
        pytest.skip(backend.triton_unavailable_reason(torch.device(device)))


def shuffle_tail(*args, **kwargs):
    """The checked entry, which runs the kernel here (the fixture above skips where it cannot)."""
    return ops._shuffle_tail(*args, **kwargs)


def make_inputs(shape, dtype, device, param_dtype=None):
    n, c, colors, s, h, w = shape
    param_dtype = param_dtype or dtype
    u = randn(n, c * s * s, h, w, dtype=dtype, device=device, channels_last=True)
    b_up = randn(c * s * s, dtype=param_dtype, device=device, scale=0.5)
    w_tail = randn(colors, c, 3, 3, dtype=param_dtype, device=device, scale=(9 * c) ** -0.5)
    b_tail = randn(colors, dtype=param_dtype, device=device, scale=0.5)
    mean = randn(1, colors, 1, 1, dtype=param_dtype, device=device, scale=0.5)
    return u, b_up, w_tail, b_tail, mean


def oracle(u, b_up, w_tail, b_tail, mean, s):
    return reference.shuffle_tail(*(t.double() for t in (u, b_up, w_tail, b_tail, mean)), s)


# The two ways the kernel loads u's tile (kernels/shuffle_tail.py PIXELS_FASTEST, chosen by the Triton
# version): both must compute the same, whichever one this machine's Triton would choose.
@pytest.mark.parametrize("pixels_fastest", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])  # the output written NCHW-contiguous or channels_last
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(shape, channels_last, pixels_fastest, monkeypatch, device):
    from fastdrn.kernels import shuffle_tail as kernel_module

    monkeypatch.setattr(kernel_module, "PIXELS_FASTEST", pixels_fastest)
    s = shape[3]
    for dtype in dtypes_for(device):
        inputs = make_inputs(shape, dtype, device)
        out = shuffle_tail(*inputs, s, channels_last=channels_last)
        ref = oracle(*inputs, s)
        assert out.dtype == dtype and out.shape == ref.shape
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert out.is_contiguous(memory_format=fmt)
        assert_close(out, ref, tolerance(device, dtype)[0], f"{dtype} {shape} channels_last={channels_last}")


def test_float32_parameters_are_cast_to_u_dtype(device):
    """Under autocast the parameters stay float32 while u is 16-bit; the kernel casts them. Here
    (interpreter) float64 u with float32 parameters: their values are exact in float64."""
    dtype = torch.float64 if where(torch.device(device)) == "interpreter" else torch.bfloat16
    shape = (1, 24, 3, 2, 3, 5)
    inputs = make_inputs(shape, dtype, device, param_dtype=torch.float32)
    out = shuffle_tail(*inputs, 2, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert_close(out, oracle(*inputs, 2), tolerance(device, torch.float32 if dtype == torch.float64 else dtype)[0],
                 "float32 parameters")


def test_output_dtype_follows_mean_by_default(device):
    dtype = dtypes_for(device)[-1]  # float32 in the interpreter, 16-bit on a GPU
    u, b_up, w_tail, b_tail, _ = make_inputs((1, 8, 3, 2, 3, 3), dtype, device)
    mean = randn(1, 3, 1, 1, dtype=torch.float32, device=device)
    out = shuffle_tail(u, b_up, w_tail, b_tail, mean, 2)
    assert out.dtype == torch.promote_types(dtype, torch.float32)


def test_u_in_nchw_is_read_as_channels_last(device):
    dtype = dtypes_for(device)[0]
    inputs = make_inputs((1, 24, 3, 3, 5, 5), dtype, device)
    out = shuffle_tail(inputs[0].contiguous(), *inputs[1:], 3)
    assert torch.equal(out, shuffle_tail(*inputs, 3))


def test_non_finite_values_reach_exactly_their_receptive_field(device):
    """A NaN or an infinity in u reaches the outputs whose 3x3 window holds its shuffled pixel, and no
    other: the same NaN and infinity masks as the reference (masked loads must not leak them)."""
    dtype = dtypes_for(device)[0]
    s, shape = 3, (2, 24, 3, 3, 5, 7)
    u, *params = make_inputs(shape, dtype, device)
    u[0, 5, 0, 0] = float("nan")       # a corner pixel: its window is cut by the padding
    u[1, 100, 2, 3] = float("nan")     # inside the second image
    u[1, 7, 4, 6] = float("inf")       # the last pixel
    out = shuffle_tail(u, *params, s)
    ref = oracle(u, *params, s)
    assert torch.isnan(ref).any() and torch.isinf(ref).any()
    assert torch.equal(torch.isnan(out).cpu(), torch.isnan(ref).cpu())
    assert torch.equal(torch.isinf(out).cpu(), torch.isinf(ref).cpu())
    finite = torch.isfinite(ref)
    assert_close(out[finite], ref[finite], tolerance(device, dtype)[0], "finite outputs")


def test_registered_op_and_eager_path_agree(monkeypatch, device):
    """Eager calls launch directly (kernels/_common.py eager_fast_path); torch.compile runs the op."""
    from fastdrn.kernels import shuffle_tail as module

    if not module.eager_fast_path():
        pytest.skip("this torch has no direct-launch switch: every call already goes through the op")
    inputs = make_inputs((1, 24, 3, 2, 3, 5), dtypes_for(device)[0], device)
    results = []
    for fast in (True, False):
        monkeypatch.setattr(module, "eager_fast_path", lambda fast=fast: fast)
        results.append(module.shuffle_tail(*inputs, 2, inputs[0].dtype, channels_last=True))
    assert torch.equal(*results)


def _valid():
    return [torch.randn(2, 32, 3, 3).contiguous(memory_format=torch.channels_last), torch.randn(32),
            torch.randn(3, 8, 3, 3), torch.randn(3), torch.randn(1, 3, 1, 1)]


@pytest.mark.parametrize("mutate,scale,error,message", [
    (lambda a: a.__setitem__(0, torch.randn(32, 3, 3)), 2, ValueError, "u must be a 4-D tensor"),
    (lambda a: a.__setitem__(0, torch.randn(0, 32, 3, 3)), 2, ValueError, "u is empty"),
    (lambda a: a.__setitem__(0, torch.randint(0, 3, (2, 32, 3, 3))), 2, TypeError, "u has dtype"),
    (lambda a: None, 3, ValueError, "32 channels, which is not divisible by scale"),
    (lambda a: None, 0, ValueError, "scale must be from 1"),
    (lambda a: None, True, TypeError, "scale must be an int"),
    (lambda a: a.__setitem__(2, torch.randn(3, 7, 3, 3)), 2, ValueError, r"w_tail has shape \(3, 7, 3, 3\), expected"),
    (lambda a: a.__setitem__(2, torch.randn(3, 8, 1, 1)), 2, ValueError, "w_tail has shape"),
    (lambda a: (a.__setitem__(2, torch.randn(17, 8, 3, 3)), a.__setitem__(3, torch.randn(17)),
                a.__setitem__(4, torch.randn(17))), 2, ValueError, "17 output channels"),
    (lambda a: a.__setitem__(1, torch.randn(31)), 2, ValueError, "b_up has 31 elements"),
    (lambda a: a.__setitem__(3, torch.randn(4)), 2, ValueError, "b_tail has 4 elements"),
    (lambda a: a.__setitem__(4, torch.randn(3, 1, 1)), 2, ValueError, "mean has shape"),
    (lambda a: a.__setitem__(2, torch.randn(3, 8, 3, 3, dtype=torch.float16)), 2, TypeError, "w_tail has dtype"),
    (lambda a: a.__setitem__(1, torch.randn(32, device="meta")), 2, ValueError, "b_up is on meta"),
])
def test_bad_input_is_named(mutate, scale, error, message):
    args = _valid()
    mutate(args)
    with pytest.raises(error, match=message):
        shuffle_tail(*args, scale)


def test_inference_only(device):
    args = [t.to(device) for t in _valid()]
    args[2].requires_grad_()
    with pytest.raises(RuntimeError, match="inference-only"):
        shuffle_tail(*args, 2)
    with torch.no_grad():  # no gradient wanted: it runs
        assert shuffle_tail(*args, 2).shape == (2, 3, 6, 6)


@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_backend_runs_the_reference_ops(channels_last, monkeypatch, device):
    """FASTDRN_BACKEND=torch: no kernel launch, the reference ops' result in the dtype and memory
    format asked for (float32 parameters under 16-bit u cast as the kernel casts them)."""
    from fastdrn.kernels import shuffle_tail as module

    monkeypatch.setenv("FASTDRN_BACKEND", "torch")
    monkeypatch.setattr(module, "shuffle_tail", lambda *a, **k: pytest.fail("the kernel ran under the torch backend"))
    dtype = dtypes_for(device)[-1]
    inputs = make_inputs((1, 5, 3, 3, 2, 3), dtype, device, param_dtype=torch.float32)
    out = shuffle_tail(*inputs, 3, out_dtype=dtype, channels_last=channels_last)
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    u, b_up, w_tail, b_tail, mean = inputs
    cast = [t.to(dtype).double() for t in (b_up, w_tail, b_tail)]
    expected = reference.shuffle_tail(u.double(), *cast, mean.double(), 3)
    assert_close(out, expected, tolerance(device, dtype)[0], "torch backend")


# (1, 5, 3, 3, 2, 1): an output 3 wide for 3 colors, where a mean broadcast along the width fits;
# (1, 5, 3, 2, 2, 2): 4 wide, where it does not.
@pytest.mark.parametrize("shape", [(1, 5, 3, 3, 2, 1), (1, 5, 3, 2, 2, 2)])
@pytest.mark.parametrize("backend_name", ["auto", "torch"])
def test_a_mean_of_n_colors_values_is_one_per_channel(backend_name, shape, monkeypatch, device):
    """mean as (n_colors,), which the checks accept beside (1, n_colors, 1, 1): one value per output
    channel on every backend. The torch backend added it along the output's width (a wrong result
    where the width was n_colors, a broadcasting error elsewhere)."""
    monkeypatch.setenv("FASTDRN_BACKEND", backend_name)
    dtype = dtypes_for(device)[0]
    u, b_up, w_tail, b_tail, mean = make_inputs(shape, dtype, device)
    s = shape[3]
    with torch.no_grad():
        out = shuffle_tail(u, b_up, w_tail, b_tail, mean.reshape(-1), s)
    assert_close(out, oracle(u, b_up, w_tail, b_tail, mean, s), tolerance(device, dtype)[0], backend_name)
