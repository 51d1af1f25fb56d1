"""InLineAttention against a plain reference of the official module (InLine eq. 5 + the local residual)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.vision.inline import InLineAttention, depthwise_conv3x3
from attnjax.testing.modules import check_module_against_reference, conv2d, parameter_count, parameters
from tests.helpers import assert_close


def image(shape=(2, 5, 7, 16), seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def grouped_1x1(x, layer, heads):
    """A ``Conv1d(k=1, groups=heads)`` on ``x [B, C_in]``: group g maps input block g to output block g."""
    B, C = x.shape
    kernel = layer["kernel"][0]                                            # [C_in / heads, C_out]
    blocks = kernel.reshape(C // heads, heads, -1)                         # [i, g, o]
    out = jnp.einsum("bgi,igo->bgo", x.reshape(B, heads, -1), blocks, precision="highest")
    return out.reshape(B, -1) + layer["bias"]


def inline_reference(p, x, heads, phi=lambda t: t):
    """``y = (InLine(Q, K, V) + DWConv3×3_w(V)) W_o + b_o`` with ``w = W_2 GELU(W_1 mean(x))`` (LeapLabTHU/InLine)."""
    B, H, W, C = x.shape
    N, d = H * W, C // heads
    t = x.reshape(B, N, C)

    def linear(name):
        y = jnp.einsum("bnc,cd->bnd", t, p[name]["kernel"], precision="highest")
        return y + p[name]["bias"] if "bias" in p[name] else y

    q, k, v = phi(linear("query")), phi(linear("key")), linear("value")
    qh, kh, vh = (a.reshape(B, N, heads, d) for a in (q, k, v))
    scores = jnp.einsum("bihd,bjhd->bhij", qh, kh, precision="highest")
    weights = d ** -0.5 / N * (scores - scores.mean(-1, keepdims=True)) + 1 / N
    o = jnp.einsum("bhij,bjhd->bihd", weights, vh, precision="highest").reshape(B, H, W, C)
    hidden = jax.nn.gelu(grouped_1x1(t.mean(1), p["residual_hidden"], heads), approximate=False)
    kernels = grouped_1x1(hidden, p["residual_kernel"], heads).reshape(B, C, 3, 3)
    local = jax.vmap(lambda vb, kb: conv2d(vb[None], kb.transpose(1, 2, 0)[:, :, None, :], padding=((1, 1), (1, 1)),
                                           groups=C)[0])(v.reshape(B, H, W, C), kernels)
    return jnp.einsum("bhwc,cd->bhwd", o + local, p["out"]["kernel"], precision="highest") + p["out"]["bias"]


def test_inline_attention_equals_the_official_module_forward_and_gradients():
    model = InLineAttention(16, num_heads=2, rngs=nnx.Rngs(0))
    check_module_against_reference(model, lambda p, x: inline_reference(p, x, 2), image(), rtol=1e-4)


def test_inline_attention_with_relu_features_and_a_key_bias():
    model = InLineAttention(16, num_heads=2, feature_map="relu", rngs=nnx.Rngs(0))
    x = image((1, 4, 3, 16), seed=3)
    expected = jax.jit(lambda p, x: inline_reference(p, x, 2, jax.nn.relu))(parameters(model), x)
    assert_close(nnx.jit(lambda m, x: m(x))(model, x), expected, rtol=1e-5, name="relu")


def test_depthwise_conv3x3_is_a_per_image_grouped_convolution():
    x, kernels = image((2, 4, 5, 3), 1), image((2, 3, 3, 3), 2)
    expected = jnp.stack([conv2d(x[b:b + 1], kernels[b].transpose(1, 2, 0)[:, :, None, :], padding=((1, 1), (1, 1)),
                                 groups=3)[0] for b in range(2)])
    np.testing.assert_allclose(depthwise_conv3x3(x, kernels), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("C, heads, feature_map", [(16, 2, "identity"), (24, 4, "relu")])
def test_parameter_count(C, heads, feature_map):
    model = nnx.eval_shape(lambda: InLineAttention(C, num_heads=heads, feature_map=feature_map, rngs=nnx.Rngs(0)))
    key_bias = feature_map != "identity"
    assert parameter_count(model) == 4 * C * C + 3 * C + key_bias * C + 10 * C * C // heads + 10 * C


def test_errors():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        InLineAttention(10, num_heads=4, rngs=nnx.Rngs(0))
    model = nnx.eval_shape(lambda: InLineAttention(16, num_heads=2, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, height, width, 16\]"):
        model(jnp.zeros((1, 4, 16)))
