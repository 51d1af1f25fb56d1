"""ELA against a plain reference of Xu & Wan 2024 (sec. 3): strip pooling, a shared 1-D convolution,
GroupNorm, sigmoid, ``y = x ⊙ y^h ⊙ y^w``; the four versions ELA-T/B/S/L."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.conv import EfficientLocalAttention
from attnjax.testing.modules import check_module_against_reference, conv2d, parameter_count
from attnjax.vision.efficient_local import VARIANTS, variant_config


def image(shape=(2, 5, 7, 16), seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def ela_reference(groups, norm_groups):
    """y^h = σ(GN(F(z^h))), y^w = σ(GN(F(z^w))), y = x · y^h · y^w; z^h, z^w the averages over W and over H."""

    def gate(p, z):
        B, L, C = z.shape
        f = conv2d(z[:, None], p["conv"]["kernel"][None], groups=groups)[:, 0]  # a 1 x L image, a 1 x k kernel
        g = f.reshape(B, L, norm_groups, C // norm_groups)
        g = (g - g.mean(axis=(1, 3), keepdims=True)) / jnp.sqrt(g.var(axis=(1, 3), keepdims=True) + 1e-5)
        return jax.nn.sigmoid(g.reshape(B, L, C) * p["norm"]["scale"] + p["norm"]["bias"])

    def reference(p, x):
        return x * gate(p, x.mean(axis=2))[:, :, None, :] * gate(p, x.mean(axis=1))[:, None, :, :]

    return reference


@pytest.mark.parametrize("variant, channels", [("T", 64), ("B", 32), ("S", 32)])  # 2 channels per GroupNorm group
def test_ela_equals_the_paper_formula_forward_and_gradients(variant, channels):
    model = EfficientLocalAttention(channels, variant=variant, rngs=nnx.Rngs(0))
    check_module_against_reference(model, ela_reference(model.groups, model.norm_groups),
                                   image((2, 5, 7, channels), seed=channels))


def test_overrides_replace_the_variant_settings():
    model = nnx.eval_shape(lambda: EfficientLocalAttention(16, variant="L", kernel_size=3, groups=4, norm_groups=2,
                                                           rngs=nnx.Rngs(0)))
    assert model.conv.kernel.shape == (3, 16 // 4, 16) and model.conv.feature_group_count == model.groups == 4
    assert model.norm.num_groups == model.norm_groups == 2


def test_the_four_versions_of_the_paper():
    """Kernel size, convolution groups and GroupNorm groups of ELA-T/B/S/L, C = 64."""
    assert {v: variant_config(v, 64) for v in VARIANTS} == {"T": (5, 64, 32), "B": (7, 64, 16), "S": (5, 8, 16),
                                                            "L": (7, 8, 16)}
    default = nnx.eval_shape(lambda: EfficientLocalAttention(64, rngs=nnx.Rngs(0)))
    assert (default.conv.kernel.shape, default.groups, default.norm_groups) == ((7, 1, 64), 64, 16)


@pytest.mark.parametrize("variant, expected", [
    ("T", 5 * 64 + 2 * 64),             # depthwise: k·C weights, GroupNorm 2C
    ("B", 7 * 64 + 2 * 64),
    ("S", 5 * 8 * 64 + 2 * 64),         # C/8 groups of 8 channels: 8·k·C weights
    ("L", 7 * 8 * 64 + 2 * 64),
])
def test_ela_parameter_count(variant, expected):
    model = nnx.eval_shape(lambda: EfficientLocalAttention(64, variant=variant, rngs=nnx.Rngs(0)))
    assert parameter_count(model) == expected


def test_the_core_uses_the_flax_layers_semantics():
    """The gates equal σ(nnx.GroupNorm(nnx.Conv(z))), the layers whose parameters the module owns."""
    ela = EfficientLocalAttention(16, variant="S", rngs=nnx.Rngs(0))
    x = image()
    (g_h, g_w), (flax_h, flax_w) = jax.jit(lambda x: (ela.gates(x), tuple(
        jax.nn.sigmoid(ela.norm(ela.conv(x.mean(axis=axis)))) for axis in (2, 1))))(x)
    np.testing.assert_allclose(g_h[:, :, 0], flax_h, atol=1e-5)
    np.testing.assert_allclose(g_w[:, 0], flax_w, atol=1e-5)


def test_gates_are_in_unit_interval_and_bf16_is_finite():
    ela = EfficientLocalAttention(16, rngs=nnx.Rngs(0))
    x = 30 * image(dtype=jnp.bfloat16)
    y, (g_h, g_w) = jax.jit(lambda x: (ela(x), ela.gates(x)))(x)
    assert y.dtype == jnp.bfloat16 and y.shape == (2, 5, 7, 16)
    assert g_h.shape == (2, 5, 1, 16) and g_w.shape == (2, 1, 7, 16)
    assert np.all(np.isfinite(np.asarray(y, np.float32)))
    for gate in (np.asarray(g_h, np.float32), np.asarray(g_w, np.float32)):
        assert np.all((gate >= 0) & (gate <= 1))


def test_bad_inputs_name_the_argument():
    ela = EfficientLocalAttention(16, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, height, width, 16\] \(NHWC\), got \[2, 16, 5, 7\]"):
        ela(jnp.zeros((2, 16, 5, 7)))
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        ela.gates(jnp.ones((2, 5, 7, 16), jnp.int32))
    with pytest.raises(ValueError, match=r"norm_groups \(32\) must divide channels \(16\) \(variant 'T'\)"):
        EfficientLocalAttention(16, variant="T", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"groups \(3\) must divide channels \(16\)"):
        EfficientLocalAttention(16, groups=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        EfficientLocalAttention(16, kernel_size=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="variant must be one of"):
        EfficientLocalAttention(16, variant="M", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="norm_groups must be a positive int, got 0"):
        EfficientLocalAttention(16, norm_groups=0, rngs=nnx.Rngs(0))
