"""MATLAB-compatible bicubic resizing and the SR field's PSNR / SSIM (fastdrn.tools.imresize, .metrics)."""
import math

import pytest
import torch

from fastdrn.tools.imresize import cubic, downsample, imresize, resize_weights, upsample
from fastdrn.tools.metrics import psnr, psnr_ssim, quantize, rgb_to_y, ssim


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_matlab_1d_example():
    # MATLAB: imresize([1 2 3 4 5 6 7 8], 0.5) -> 1.4492 3.4883 5.5117 7.5508. Derivation (see the
    # docstring of fastdrn.tools.imresize): u = 2i - 0.5; taps at +-0.5, +-1.5, +-2.5, +-3.5 weigh
    # 0.5*cubic(0.5 t) = 0.43359375, 0.11328125, -0.03515625, -0.01171875; the ramp is reproduced
    # except where mirrored taps (x(0)=x(1), x(-1)=x(2), x(-2)=x(3)) replace 0, -1, -2.
    x = torch.arange(1, 9, dtype=torch.float64).view(1, 8)
    y = imresize(x, 0.5)
    expected = torch.tensor([[1.44921875, 3.48828125, 5.51171875, 7.55078125]], dtype=torch.float64)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)


def test_kernel_values_and_interior_taps():
    assert cubic(torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])).tolist() == [1.0, 0.5625, 0.0, -0.0625, 0.0, 0.0]
    # x2 antialiased downsampling: an interior row is the stretched kernel 0.5 * cubic(0.5 t)
    w = resize_weights(40, 20, 0.5)
    row = w[10]
    nz = row[row != 0]
    expected = torch.tensor([-0.01171875, -0.03515625, 0.11328125, 0.43359375,
                             0.43359375, 0.11328125, -0.03515625, -0.01171875], dtype=torch.float64)
    torch.testing.assert_close(nz, expected, rtol=0, atol=1e-15)
    assert row.nonzero().flatten().tolist() == list(range(17, 25))   # centred on u = 20.5 (1-based)


@pytest.mark.parametrize("n_in,n_out", [(8, 4), (37, 13), (48, 12), (10, 30), (17, 34), (9, 7), (5, 11)])
def test_weights_sum_to_one(n_in, n_out):
    w = resize_weights(n_in, n_out)
    torch.testing.assert_close(w.sum(1), torch.ones(n_out, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("s", [2, 3, 4])
def test_constant_stays_constant(s):
    x = torch.full((3, 24, 36), 0.37, dtype=torch.float64)
    torch.testing.assert_close(downsample(x, s), torch.full((3, 24 // s, 36 // s), 0.37, dtype=torch.float64))
    torch.testing.assert_close(upsample(x, s), torch.full((3, 24 * s, 36 * s), 0.37, dtype=torch.float64))


def test_upsampling_reproduces_a_ramp_inside():
    # Keys' cubic (a=-0.5) reproduces linear functions; x2 output i sits at u = i/2 + 1/4.
    x = torch.arange(1, 21, dtype=torch.float64).view(1, 20)
    y = imresize(x, 2.0)[0]
    u = torch.arange(1, 41, dtype=torch.float64) / 2 + 0.25
    torch.testing.assert_close(y[4:-4], u[4:-4], rtol=0, atol=1e-12)


def test_2d_is_separable_and_sizes_follow_matlab():
    x = torch.rand(2, 3, 19, 23, dtype=torch.float64)
    y = imresize(x, 1 / 3)
    assert y.shape == (2, 3, 7, 8)                                      # ceil(19/3), ceil(23/3)
    wh, ww = resize_weights(19, 7, 1 / 3), resize_weights(23, 8, 1 / 3)
    torch.testing.assert_close(y, wh @ x @ ww.t())
    assert imresize(x, size=(10, 40)).shape == (2, 3, 10, 40)


# ------------------------------------------------------------------------------------- metrics

def _photos():
    data = pytest.importorskip("skimage.data")
    for name in ("astronaut", "coffee", "chelsea"):
        img = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1).double() / 255
        yield name, img[:, 40:280, 60:360]     # a 240x300 crop keeps the test fast


def test_y_channel_is_matlab_rgb2ycbcr():
    color = pytest.importorskip("skimage.color")
    _, img = next(_photos())
    ours = rgb_to_y(img * 255)
    ref = torch.from_numpy(color.rgb2ycbcr(img.permute(1, 2, 0).numpy())[..., 0])
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("scale", [2, 3])
def test_psnr_ssim_agree_with_skimage_on_photos(scale):
    metrics = pytest.importorskip("skimage.metrics")
    for name, hr in _photos():
        h, w = (hr.shape[1] // scale) * scale, (hr.shape[2] // scale) * scale
        hr = hr[:, :h, :w]
        lr = quantize(downsample(hr, scale)) / 255
        sr = upsample(lr, scale) + 0.01 * torch.randn(3, h, w, dtype=torch.float64)
        p, s = psnr_ssim(sr, hr, scale, data_range=1.0)     # the noise overshoots [0, 1]: clamp it
        a = rgb_to_y(quantize(sr))[scale:-scale, scale:-scale].numpy()
        b = rgb_to_y(quantize(hr))[scale:-scale, scale:-scale].numpy()
        p_ref = metrics.peak_signal_noise_ratio(b, a, data_range=255)
        s_ref = metrics.structural_similarity(b, a, gaussian_weights=True, sigma=1.5,
                                              use_sample_covariance=False, data_range=255)
        assert abs(p - p_ref) < 1e-9, (name, p, p_ref)
        assert abs(s - s_ref) < 1e-9, (name, s, s_ref)
        assert 20 < p < 45 and 0.5 < s < 1



# crop 1: the narrowest border, which no other test crops (they crop the scale, 2 or 3);
# crop 4: the x4 benchmarks' border. Odd sizes; the interior keeps SSIM's 11 x 11 window.
@pytest.mark.parametrize("crop", [1, 4])
def test_crop_leaves_out_exactly_the_border(crop):
    """PSNR and SSIM with crop c score the pixels at least c from every edge, all of them: an sr
    that differs from hr only on its c outermost rows and columns scores as identical, and one
    that differs one pixel further in scores as the PSNR formula over the interior's Y gives."""
    h, w = 13 + 2 * crop, 15 + 2 * crop
    hr = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
    sr = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
    inside = (slice(None), slice(crop, h - crop), slice(crop, w - crop))
    sr[inside] = hr[inside]
    assert psnr(sr, hr, crop) == math.inf
    assert ssim(sr, hr, crop) == pytest.approx(1.0)
    sr[:, crop, w - crop - 1] = 255 - hr[:, crop, w - crop - 1]  # the interior's top-right pixel
    y_sr, y_hr = (rgb_to_y(t.double())[crop:h - crop, crop:w - crop] for t in (sr, hr))
    mse = ((y_sr - y_hr) ** 2).mean().item()
    assert mse > 0
    assert psnr(sr, hr, crop) == pytest.approx(10 * math.log10(255 ** 2 / mse), rel=1e-12)
    assert ssim(sr, hr, crop) < 1

def test_metric_edge_cases():
    x = torch.rand(3, 32, 32)
    assert psnr(x, x, 2) == math.inf
    assert ssim(x, x, 2) == pytest.approx(1.0)
    # with data_range given, outputs outside it are clamped by the 8-bit quantisation, like a saved PNG
    assert psnr(x + 2.0, torch.ones_like(x), 0, data_range=1.0) == math.inf
    with pytest.raises(ValueError):
        psnr(x, x[:, :-1], 0)


def test_metrics_read_uint8_as_0_255_and_refuse_floats_out_of_range():
    _, hr = next(_photos())
    hr = hr[:, :96, :128]
    sr = (hr + 0.03 * torch.randn_like(hr)).clamp(0, 1)
    want_p, want_s = psnr(sr, hr, 2), ssim(sr, hr, 2)
    assert 25 < want_p < 40
    sr8, hr8 = quantize(sr).to(torch.uint8), quantize(hr).to(torch.uint8)
    # uint8, as torch (C, H, W) or numpy (H, W, C): the same numbers as the [0, 1] floats
    assert psnr(sr8, hr8, 2) == pytest.approx(want_p, abs=1e-12)
    assert ssim(sr8.permute(1, 2, 0).numpy(), hr8.permute(1, 2, 0).numpy(), 2) == pytest.approx(want_s, abs=1e-12)
    assert psnr_ssim(sr8, hr, 2) == pytest.approx((want_p, want_s), abs=1e-12)       # mixed kinds
    # 0-255 floats were silently clamped to [0, 1] (a wrong number); now refused, or read with data_range
    with pytest.raises(ValueError, match=r"outside \[0, 1\].*data_range=255"):
        psnr(sr * 255, hr * 255, 2)
    with pytest.raises(ValueError, match="outside"):
        psnr_ssim(sr * 255, hr, 2)
    assert psnr(sr * 255, hr * 255, 2, data_range=255) == pytest.approx(want_p, abs=1e-9)
    assert ssim(sr * 255, hr * 255, 2, data_range=255) == pytest.approx(want_s, abs=1e-9)
    with pytest.raises(TypeError, match="need data_range"):
        psnr(sr8.to(torch.int32), hr8.to(torch.int32), 2)
    with pytest.raises(ValueError, match="contradicts"):
        psnr(sr8, hr8, 2, data_range=1.0)
    # RGB instead of Y: the mean over all three channels, as BasicSR's test_y_channel=False
    a, b = quantize(sr), quantize(hr)
    mse = ((a - b)[:, 2:-2, 2:-2] ** 2).mean().item()
    assert psnr(sr, hr, 2, y_channel=False) == pytest.approx(10 * math.log10(255 ** 2 / mse), abs=1e-12)


def test_imresize_takes_numpy_images_and_uint8():
    np = pytest.importorskip("numpy")
    _, hr = next(_photos())
    hr = hr[:, :61, :83]                                                  # odd sizes
    want = downsample(hr, 3)
    hwc = hr.permute(1, 2, 0).numpy()
    got = imresize(hwc, 1 / 3)
    assert isinstance(got, np.ndarray) and got.shape == (21, 28, 3) and got.dtype == np.float64
    np.testing.assert_allclose(got, want.permute(1, 2, 0).numpy(), rtol=0, atol=1e-12)
    gray = imresize(hwc[..., 0], size=(30, 20))
    assert gray.shape == (30, 20)
    np.testing.assert_allclose(gray, imresize(hr[0], size=(30, 20)).numpy(), rtol=0, atol=1e-12)
    # uint8 in, uint8 out: the float result rounded once (as `fastdrn train` makes LR images)
    hr8 = quantize(hr).to(torch.uint8)
    want8 = torch.round(downsample(hr8.double(), 3).clamp(0, 255)).to(torch.uint8)
    assert torch.equal(imresize(hr8, 1 / 3), want8)
    out8 = imresize(hr8.permute(1, 2, 0).numpy(), 1 / 3)
    assert out8.dtype == np.uint8 and np.array_equal(out8, want8.permute(1, 2, 0).numpy())
    with pytest.raises(TypeError, match="float or uint8"):
        imresize(hr8.to(torch.int16), 0.5)
