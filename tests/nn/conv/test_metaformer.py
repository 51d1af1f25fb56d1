"""PoolFormer's token mixer and the MetaFormer block against plain references of Yu et al. 2022 (MetaFormer Is
Actually What You Need for Vision, eqs. 2-4), with the official code's choices (count_include_pad=False, GroupNorm
with one group, LayerScale)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn import MultiHeadAttention
from attnjax.nn.conv import LargeKernelAttention, SqueezeExcite
from attnjax.nn.conv.metaformer import MetaFormerBlock, PoolingMixer
from attnjax.testing.modules import check_module_against_reference, parameter_count
from tests.nn.conv.test_large_kernel import lka_reference

EPS = 1e-5


def image(shape=(2, 5, 7, 16), seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def gelu(x):
    """The exact GELU ``x Φ(x)`` of ``torch.nn.GELU``."""
    return 0.5 * x * (1 + jax.scipy.special.erf(x / np.sqrt(2)))


def pooling_reference(x, pool_size=3):
    """Eq. 4, AvgPool(x) - x, averaging each window over the positions inside the image (count_include_pad=False):
    the window sums of the zero-padded input over the window sums of a zero-padded map of ones."""
    p = pool_size // 2
    h, w = x.shape[1:3]

    def window_sum(a):
        a = jnp.pad(a, ((0, 0), (p, p), (p, p), (0, 0)))
        return sum(a[:, i:i + h, j:j + w] for i in range(pool_size) for j in range(pool_size))

    return window_sum(x) / window_sum(jnp.ones((1, h, w, 1))) - x


def group_norm(x, layer):
    """GroupNorm with one group: statistics over H, W and C of each sample."""
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    var = ((x - mean) ** 2).mean(axis=(1, 2, 3), keepdims=True)
    return (x - mean) / jnp.sqrt(var + EPS) * layer["scale"] + layer["bias"]


def layer_norm(x, layer):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + EPS) * layer["scale"] + layer["bias"]


def attention_reference(p, x):
    """Softmax self-attention of the H*W tokens, no mask (Vaswani et al. 2017), MultiHeadAttention's projections."""
    b, h, w, c = x.shape
    t = x.reshape(b, h * w, c)
    q, k, v = (jnp.einsum("btc,chd->bthd", t, p[name]["kernel"], precision="highest") for name in ("query", "key",
                                                                                                   "value"))
    s = jnp.einsum("bthd,bshd->bhts", q, k, precision="highest") / np.sqrt(q.shape[-1])
    o = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v, precision="highest")
    return jnp.einsum("bthd,hdc->btc", o, p["out"]["kernel"], precision="highest").reshape(b, h, w, c)


def block_reference(mixer, norm=group_norm):
    """Eqs. 2-3 with LayerScale: Y = X + g1 * mixer(Norm(X)); Z = Y + g2 * (GELU(Norm(Y) W1 + b1) W2 + b2)."""
    def reference(p, x):
        y = x + p["layer_scale_1"] * mixer(p.get("token_mixer"), norm(x, p["norm1"]))
        u = gelu(jnp.einsum("bhwc,cd->bhwd", norm(y, p["norm2"]), p["fc1"]["kernel"], precision="highest")
                 + p["fc1"]["bias"])
        return y + p["layer_scale_2"] * (jnp.einsum("bhwd,dc->bhwc", u, p["fc2"]["kernel"], precision="highest")
                                         + p["fc2"]["bias"])
    return reference


@pytest.mark.parametrize("pool_size", [3, 5])
def test_pooling_mixer_is_avg_pool_minus_identity(pool_size):
    x = image()
    y, y_ref = jax.jit(lambda x: (PoolingMixer(16, pool_size=pool_size)(x), pooling_reference(x, pool_size)))(x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-6, atol=1e-6)


def test_pooling_mixer_does_not_count_the_padding():
    """count_include_pad=False: the 3x3 window at a corner averages the 4 pixels inside the image (not sum / 9)."""
    x = image((1, 4, 5, 16))
    y = jax.jit(PoolingMixer(16))(x)
    np.testing.assert_allclose(np.asarray(y[0, 0, 0]), np.asarray(x[0, :2, :2].mean(axis=(0, 1)) - x[0, 0, 0]),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(y[0, 0, 2]), np.asarray(x[0, :2, 1:4].mean(axis=(0, 1)) - x[0, 0, 2]),
                               rtol=1e-6, atol=1e-6)
    # a map constant over H, W is annihilated, so a shift before the mixer gets no gradient
    shift = jax.jit(jax.grad(lambda b: jnp.sum(PoolingMixer(16)(x + b) * x)))(jnp.ones(16))
    np.testing.assert_allclose(np.asarray(shift), 0.0, atol=1e-5)


def test_poolformer_block_equals_the_paper_formula_forward_and_gradients():
    """atol: the gradient of norm1's shift is exactly zero (AvgPool(c) - c = 0 for a constant map c), so the two
    sides agree there up to rounding only; every other gradient is O(1)."""
    model = MetaFormerBlock(16, layer_scale_init=0.5, rngs=nnx.Rngs(0))
    assert model.mixer_input == "image" and model.token_mixer == PoolingMixer(16)
    check_module_against_reference(model, block_reference(lambda _, x: pooling_reference(x)), image(), atol=2e-6)


def test_attention_block_mixes_the_flattened_tokens_forward_and_gradients():
    model = MetaFormerBlock(16, functools.partial(MultiHeadAttention, num_heads=2), norm="layer",
                            layer_scale_init=0.5, rngs=nnx.Rngs(1))
    assert model.mixer_input == "tokens"
    check_module_against_reference(model, block_reference(attention_reference, layer_norm), image(seed=1))


def test_lka_block_calls_an_image_mixer_on_the_feature_map():
    model = MetaFormerBlock(16, LargeKernelAttention, layer_scale_init=0.5, rngs=nnx.Rngs(2))
    assert model.mixer_input == "image"
    x = image(seed=2)
    y = nnx.jit(lambda m, x: m(x))(model, x)
    y_ref = jax.jit(block_reference(lka_reference))(nnx.to_pure_dict(nnx.state(model, nnx.Param)), x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)


def test_layer_scale_init_and_a_block_without_layer_scale_or_norm_shifts():
    model = MetaFormerBlock(16, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(model.layer_scale_1[...]), np.full(16, 1e-5, np.float32))
    plain = MetaFormerBlock(16, layer_scale_init=None, norm_bias=False, rngs=nnx.Rngs(3))
    p = nnx.to_pure_dict(nnx.state(plain, nnx.Param))
    assert "layer_scale_1" not in p and "bias" not in p["norm1"] and "bias" not in p["norm2"]

    def reference(p, x):
        p = {**p, "layer_scale_1": 1.0, "layer_scale_2": 1.0}
        return block_reference(lambda _, x: pooling_reference(x), lambda x, n: group_norm(x, {**n, "bias": 0.0}))(p, x)

    y = nnx.jit(lambda m, x: m(x))(plain, image())
    np.testing.assert_allclose(np.asarray(y), np.asarray(jax.jit(reference)(p, image())), rtol=1e-5, atol=1e-5)


def test_the_block_builds_its_own_mixer():
    """A factory, so two blocks never share a mixer and each initializes it from its own rngs."""
    attention = functools.partial(MultiHeadAttention, num_heads=2)
    a, b = (MetaFormerBlock(16, attention, rngs=nnx.Rngs(seed)) for seed in (0, 1))
    assert a.token_mixer is not b.token_mixer
    assert not np.allclose(np.asarray(a.token_mixer.query.kernel[...]), np.asarray(b.token_mixer.query.kernel[...]))
    forced = MetaFormerBlock(16, SqueezeExcite, mixer_input="image", rngs=nnx.Rngs(0))
    assert isinstance(forced.token_mixer, SqueezeExcite) and forced.mixer_input == "image"


def test_parameter_count():
    """The official PoolFormerBlock(64): two GroupNorms (2C each), fc1 1x1 conv C -> 4C, fc2 4C -> C, two C-vectors
    of LayerScale: 33472. With attention: plus MultiHeadAttention's 4C² (no biases)."""
    def count(**kwargs):
        return parameter_count(nnx.eval_shape(lambda: MetaFormerBlock(c, **kwargs, rngs=nnx.Rngs(0))))

    c = 64
    assert count() == 4 * c + (c * 4 * c + 4 * c) + (4 * c * c + c) + 2 * c == 33472
    assert count(layer_scale_init=None, mlp_ratio=2) == 4 * c + (2 * c * c + 2 * c) + (2 * c * c + c)
    assert count(mixer=functools.partial(MultiHeadAttention, num_heads=4)) == 33472 + 4 * c * c
    assert count(norm_bias=False) == 33472 - 2 * c


def test_bf16_is_finite_and_keeps_its_dtype():
    x = 10 * image(dtype=jnp.bfloat16)
    y = nnx.jit(lambda m, x: m(x))(MetaFormerBlock(16, rngs=nnx.Rngs(0)), x)
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    assert np.all(np.isfinite(np.asarray(y, np.float32)))


def test_bad_inputs_name_the_argument():
    block = nnx.eval_shape(lambda: MetaFormerBlock(16, rngs=nnx.Rngs(0)))  # the checks run before any math
    with pytest.raises(ValueError, match=r"x must have shape \[batch, height, width, 16\] \(NHWC\), got \[2, 35, 16\]"):
        block(np.zeros((2, 35, 16), np.float32))
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        PoolingMixer(16)(np.ones((2, 5, 7, 16), np.int32))
    with pytest.raises(TypeError, match="mixer must be a factory .* not a built module \\(got a SqueezeExcite\\)"):
        MetaFormerBlock(16, nnx.eval_shape(lambda: SqueezeExcite(16, rngs=nnx.Rngs(0))), rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="mixer must be a factory .*, got 'pool'"):
        MetaFormerBlock(16, "pool", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="norm must be one of"):
        MetaFormerBlock(16, norm="batch", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mixer_input must be one of"):
        MetaFormerBlock(16, mixer_input="sequence", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mlp_ratio must be a number"):
        MetaFormerBlock(16, mlp_ratio=0.01, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="pool_size must be odd"):
        PoolingMixer(16, pool_size=4)
    with pytest.raises(ValueError, match=r"x must have shape \[batch, seq, 16\], got \[2, 5, 7, 16\]"):
        nnx.eval_shape(lambda: MetaFormerBlock(16, functools.partial(MultiHeadAttention, num_heads=2),
                                               mixer_input="image", rngs=nnx.Rngs(0))).mix(np.zeros((2, 5, 7, 16)))
