"""The reference DRN against docs/architecture.md: parameter counts, state_dict names and shapes."""
import pytest
import torch

from fastdrn import reference


@pytest.mark.parametrize("scale,count", [(2, 2_898_227), (3, 3_082_867), (4, 3_341_363)])
def test_parameter_counts(scale, count):
    assert sum(p.numel() for p in reference.drn(scale).parameters()) == count


def expected_state_dict_shapes(scale, n_colors=3, C=64, G=6, K=9, F=64, d=8):
    shapes = {"rgb_mean": (1, n_colors, 1, 1), "head.weight": (C, n_colors, 3, 3), "head.bias": (C,)}
    for g in range(G):
        for k in range(K):
            D = C + k * d
            p = f"groups.{g}.blocks.{k}."
            shapes.update({p + "squeeze.weight": (F, D, 1, 1), p + "squeeze.bias": (F,),
                           p + "conv.weight": (F, F, 3, 3), p + "conv.bias": (F,),
                           p + "expand.weight": (D + d, F, 1, 1), p + "expand.bias": (D + d,)})
        shapes.update({f"groups.{g}.compress.weight": (C, C + K * d, 1, 1), f"groups.{g}.compress.bias": (C,)})
    shapes.update({"upsample.weight": (C * scale * scale, C, 3, 3), "upsample.bias": (C * scale * scale,),
                   "tail.weight": (n_colors, C, 3, 3), "tail.bias": (n_colors,)})
    return shapes


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_state_dict_names_and_shapes(scale):
    got = {k: tuple(v.shape) for k, v in reference.drn(scale).state_dict().items()}
    assert got == expected_state_dict_shapes(scale)


def test_drn_plus_is_256_wide():
    sd = reference.drn_plus(3).state_dict()
    assert sd["groups.0.blocks.0.conv.weight"].shape == (256, 256, 3, 3)


def test_rgb_mean_is_a_buffer_not_a_parameter():
    model = reference.drn(2)
    assert "rgb_mean" not in dict(model.named_parameters())
    assert torch.allclose(model.rgb_mean.flatten(), torch.tensor(reference.DIV2K_RGB_MEAN))


def test_forward_shape_and_no_clamp():
    model = reference.DRN(scale=3, n_feats=8, n_groups=1, n_blocks=2, inner=8, distill=2).double()
    x = torch.rand(2, 3, 5, 4, dtype=torch.float64) * 4 - 2  # outside [0, 1]: no clamping anywhere
    out = model(x)
    assert out.shape == (2, 3, 15, 12)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kwargs,message", [
    (dict(scale=1), "scale"),
    (dict(scale=2.0), "scale"),
    (dict(n_feats=0), "n_feats"),
    (dict(distill=0), "distill"),
    (dict(alpha=0.0), "alpha"),
    (dict(n_colors=1), "rgb_mean"),
    # rgb_range was only tested with math.isfinite: a string or None raised "must be real number,
    # not str" naming no argument, and True passed as a white of 1
    (dict(rgb_range="255"), "rgb_range must be a real number, got str '255'"),
    (dict(rgb_range=None), "rgb_range must be a real number"),
    (dict(rgb_range=True), "rgb_range must be a real number, got bool"),
    # rgb_mean reached torch.tensor unchecked: NaN built a model whose every output pixel was NaN,
    # strings and a bare number raised torch's or len()'s messages naming no argument
    (dict(rgb_mean=(float("nan"), 0.4, 0.4)), r"rgb_mean must be finite, got \(nan, 0.4, 0.4\)"),
    (dict(rgb_mean=(0.4, float("inf"), 0.4)), "rgb_mean must be finite"),
    (dict(rgb_mean=("a", "b", "c")), "rgb_mean must be a sequence of n_colors numbers"),
    (dict(rgb_mean=0.5), "rgb_mean must be a sequence of n_colors numbers, got 0.5"),
    (dict(rgb_mean=None), "rgb_mean must be a sequence of n_colors numbers, got None"),
])
def test_bad_config_is_named(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        reference.DRN(**kwargs)


def test_rgb_mean_may_be_a_tensor_and_is_copied():
    mean = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    model = reference.DRN(scale=2, n_feats=4, n_groups=1, n_blocks=1, rgb_mean=mean)
    mean[0] = 9.0                                     # the caller's tensor is not the model's buffer
    assert model.rgb_mean.dtype == torch.float32 and model.rgb_mean.shape == (1, 3, 1, 1)
    torch.testing.assert_close(model.rgb_mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))
    with torch.device("meta"):                        # deferred initialization: checked, yet on meta
        assert reference.DRN(scale=2, n_feats=4, n_groups=1, n_blocks=1).rgb_mean.is_meta
