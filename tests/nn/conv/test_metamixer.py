"""FFNified attention, FFNet's channel mixer and block against plain references of Yun et al. 2024
("MetaMixer Is All You Need"; official code ysj9909/FFNet, ``Token_Mixer``, ``Channel_Mixer``, ``FFBlock``)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnjax
from attnjax.nn.conv import FFNetBlock, FFNetChannelMixer, FFNifiedAttention
from attnjax.testing.modules import check_module_against_reference, conv2d, parameter_count, parameters
from attnjax.testing.numerics import assert_close
from attnjax.vision.metamixer import metamixer


def image(shape=(2, 5, 7, 16), seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32), dtype)


def gelu(x):
    return 0.5 * x * (1 + jax.scipy.special.erf(x / math.sqrt(2)))


def depthwise(x, p):
    return conv2d(x, p["kernel"], p["bias"], groups=x.shape[-1])


def ffnified_reference(p, x):
    """FFNification: query 1x1 projection, query-key DWConv, GELU for softmax, coefficient-value DWConv."""
    q = jnp.einsum("bhwc,cd->bhwd", x, p["query"]["kernel"]) + p["query"]["bias"]
    return depthwise(gelu(depthwise(q, p["key"])), p["value"])


def channel_mixer_reference(p, x):
    """FFNet's channel mixer: DWConv (query), 1x1 (keys), GELU, 1x1 (values)."""
    h = gelu(jnp.einsum("bhwc,ce->bhwe", depthwise(x, p["conv"]), p["fc1"]["kernel"]) + p["fc1"]["bias"])
    return jnp.einsum("bhwe,ec->bhwc", h, p["fc2"]["kernel"]) + p["fc2"]["bias"]


def test_ffnet_block_equals_the_paper_formula_forward_and_gradients():
    """Both mixers and the layer scales, forward and every gradient."""
    def reference(p, x):
        x = x + p["gamma1"] * ffnified_reference(p["token_mixer"], x)
        return x + p["gamma2"] * channel_mixer_reference(p["channel_mixer"], x)

    model = FFNetBlock(16, key_kernel_size=3, value_kernel_size=5, kernel_size=3, layer_scale=0.5, rngs=nnx.Rngs(0))
    check_module_against_reference(model, reference, image(seed=1))


def test_each_mixer_alone_and_the_block_without_layer_scale():
    """Forward only, the default 7x7 kernels: the gradients of both mixers are checked above."""
    x = image(seed=2)
    attention = FFNifiedAttention(16, rngs=nnx.Rngs(0))
    assert_close(nnx.jit(lambda m, x: m(x))(attention, x), ffnified_reference(parameters(attention), x),
                 name="attention")
    mixer = FFNetChannelMixer(16, expansion=2, rngs=nnx.Rngs(0))
    assert_close(nnx.jit(lambda m, x: m(x))(mixer, x), channel_mixer_reference(parameters(mixer), x), name="mixer")
    block = FFNetBlock(16, rngs=nnx.Rngs(1))
    p = parameters(block)
    y = ffnified_reference(p["token_mixer"], x) + x
    assert_close(nnx.jit(lambda m, x: m(x))(block, x), y + channel_mixer_reference(p["channel_mixer"], y),
                 name="block")


def test_metamixer_with_attention_suboperations_is_self_attention():
    """MetaMixer (Fig. 1(a)): query = x W_Q, key = q Kᵀ, activation = softmax, value = a V is self-attention."""
    rng = np.random.default_rng(3)
    x, wq, k, v = (jnp.asarray(rng.standard_normal(s, np.float32)) for s in ((2, 9, 8), (8, 8), (2, 11, 8), (2, 11, 8)))

    @jax.jit
    def mixed(x, wq, k, v):
        return metamixer(x, lambda t: t @ wq / math.sqrt(8), lambda q: jnp.einsum("btd,bsd->bts", q, k),
                         lambda a: jnp.einsum("bts,bsd->btd", a, v), activation=lambda s: jax.nn.softmax(s, axis=-1))

    @jax.jit
    def expected(x, wq, k, v):
        return attnjax.attention((x @ wq)[:, :, None], k[:, :, None], v[:, :, None])[:, :, 0]

    assert_close(mixed(x, wq, k, v), expected(x, wq, k, v), name="self-attention")


def count(cls, *args, **kwargs):
    return parameter_count(nnx.eval_shape(lambda: cls(*args, **kwargs, rngs=nnx.Rngs(0))))


def test_parameter_counts():
    C = 64                                                       # defaults: 7x7 kernels, expansion 3
    attention = C * C + C + 2 * (49 + 1) * C
    mixer = (49 + 1) * C + 2 * C * 3 * C + 3 * C + C
    assert count(FFNifiedAttention, C) == attention
    assert count(FFNifiedAttention, C, key_kernel_size=3, value_kernel_size=3) == C * C + C + 2 * (9 + 1) * C
    assert count(FFNetChannelMixer, C) == mixer
    assert count(FFNetBlock, C) == attention + mixer
    assert count(FFNetBlock, C, layer_scale=1e-6) == attention + mixer + 2 * C


def test_bf16_is_finite():
    x = 30 * image(dtype=jnp.bfloat16)
    for model in (FFNifiedAttention(16, rngs=nnx.Rngs(0)), FFNetBlock(16, kernel_size=3, rngs=nnx.Rngs(0))):
        y = nnx.jit(lambda m, x: m(x))(model, x)
        assert y.dtype == jnp.bfloat16 and y.shape == x.shape
        assert np.all(np.isfinite(np.asarray(y, np.float32)))


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match=r"x must have shape \[batch, height, width, 16\] \(NHWC\), got \[2, 5, 7\]"):
        FFNifiedAttention(16, rngs=nnx.Rngs(0))(image((2, 5, 7)))
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        FFNetChannelMixer(16, rngs=nnx.Rngs(0))(jnp.ones((2, 5, 7, 16), jnp.int32))
    with pytest.raises(ValueError, match="key_kernel_size must be odd, got 4"):
        FFNifiedAttention(16, key_kernel_size=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="kernel_size must be a positive int, got 0"):
        FFNetChannelMixer(16, kernel_size=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="channels must be a positive int, got -1"):
        FFNetBlock(-1, rngs=nnx.Rngs(0))
