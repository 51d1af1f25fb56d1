"""Polarized Self-Attention against a plain reference of Liu et al. 2021 (sec. 3: the channel-only and
spatial-only branches, the parallel and sequential compositions)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.conv.polarized import PolarizedSelfAttention
from attnjax.vision.polarized import polarized_channel_gate, polarized_self_attention, polarized_spatial_gate
from attnjax.testing.modules import check_module_against_reference, conv2d, parameter_count, parameters
from tests.helpers import assert_close, outputs_and_grads


def image(shape=(2, 5, 7, 16), seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def conv(p, x):
    return conv2d(x, p["kernel"], p.get("bias"))


def channel_reference(p, x):
    """A^ch(X) = F_SG[LN(W_z((W_v X) × F_SM(W_q X)))]: softmax over the H·W pixels, LayerNorm over C."""
    B, H, W, C = x.shape
    weights = jax.nn.softmax(conv(p["channel_query"], x).reshape(B, H * W), axis=-1)
    values = conv(p["channel_value"], x).reshape(B, H * W, C // 2)
    z = conv(p["channel_out"], jnp.einsum("bn,bnd->bd", weights, values)[:, None, None, :])
    z = (z - z.mean(-1, keepdims=True)) / jnp.sqrt(z.var(-1, keepdims=True) + 1e-5)
    return jax.nn.sigmoid(z * p["channel_norm"]["scale"] + p["channel_norm"]["bias"])


def spatial_reference(p, x):
    """A^sp(X) = F_SG[F_SM(F_GP(W_q X)) × W_v X]: global average pooling, softmax over the C/2 channels."""
    weights = jax.nn.softmax(conv(p["spatial_query"], x).mean(axis=(1, 2)), axis=-1)
    return jax.nn.sigmoid(jnp.einsum("bhwd,bd->bhw", conv(p["spatial_value"], x), weights))[..., None]


def parallel_reference(p, x):
    """PSA_p(X) = A^ch(X) ⊙^ch X + A^sp(X) ⊙^sp X."""
    return channel_reference(p, x) * x + spatial_reference(p, x) * x


def sequential_reference(p, x):
    """PSA_s(X) = A^sp(A^ch(X) ⊙^ch X) ⊙^sp (A^ch(X) ⊙^ch X)."""
    z = channel_reference(p, x) * x
    return spatial_reference(p, z) * z


@pytest.mark.parametrize("layout, use_bias, reference", [("parallel", False, parallel_reference),
                                                         ("sequential", True, sequential_reference)])
def test_psa_equals_the_paper_formula_forward_and_gradients(layout, use_bias, reference):
    model = PolarizedSelfAttention(16, layout=layout, use_bias=use_bias, rngs=nnx.Rngs(0))
    check_module_against_reference(model, reference, image(seed=int(use_bias)))


def test_the_gate_methods_are_the_two_branches():
    psa, x = PolarizedSelfAttention(16, use_bias=True, rngs=nnx.Rngs(1)), image(seed=2)
    p = parameters(psa)
    channel, spatial = jax.jit(lambda x: (psa.channel_gate(x), psa.spatial_gate(x)))(x)
    channel_ref, spatial_ref = jax.jit(lambda x: (channel_reference(p, x), spatial_reference(p, x)))(x)
    np.testing.assert_allclose(channel, channel_ref, atol=1e-5)
    np.testing.assert_allclose(spatial, spatial_ref, atol=1e-5)


@pytest.mark.parametrize("channels, use_bias, expected", [
    (64, False, 2 * 64 ** 2 + 3 * 64),       # W_q^ch C, W_v^ch and W_z C²/2 each, LN 2C, W_q^sp and W_v^sp C²/2 each
    (64, True, 2 * 64 ** 2 + 3 * 64 + 32 + 64 + 2 * 32),
    (7, False, 7 + 2 * 7 * 3 + 2 * 7 + 2 * 7 * 3),  # odd C: the inner width is C // 2 = 3
])
def test_psa_parameter_count(channels, use_bias, expected):
    model = nnx.eval_shape(lambda: PolarizedSelfAttention(channels, use_bias=use_bias, rngs=nnx.Rngs(0)))
    assert parameter_count(model) == expected


def test_gates_are_in_unit_interval_and_bf16_is_finite():
    psa = PolarizedSelfAttention(16, layout="sequential", rngs=nnx.Rngs(0))
    x = 30 * image(dtype=jnp.bfloat16)
    y, channel, spatial = jax.jit(lambda x: (psa(x), psa.channel_gate(x), psa.spatial_gate(x)))(x)
    assert y.dtype == jnp.bfloat16 and y.shape == (2, 5, 7, 16)
    assert channel.shape == (2, 1, 1, 16) and spatial.shape == (2, 5, 7, 1)
    assert np.all(np.isfinite(np.asarray(y, np.float32)))
    for gate in (np.asarray(channel, np.float32), np.asarray(spatial, np.float32)):
        assert np.all((gate >= 0) & (gate <= 1))


def test_bad_inputs_name_the_argument():
    psa = PolarizedSelfAttention(16, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, height, width, 16\] \(NHWC\), got \[2, 16, 5, 7\]"):
        psa(jnp.zeros((2, 16, 5, 7)))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, height, width, 16\] \(NHWC\), got \[2, 5, 7, 8\]"):
        psa.spatial_gate(jnp.zeros((2, 5, 7, 8)))
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        psa.channel_gate(jnp.ones((2, 5, 7, 16), jnp.int32))
    with pytest.raises(ValueError, match="layout must be one of"):
        PolarizedSelfAttention(16, layout="serial", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="channels must be at least 2"):
        PolarizedSelfAttention(1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="channels must be a positive int, got 0"):
        PolarizedSelfAttention(0, rngs=nnx.Rngs(0))


def test_functional_core_equals_the_reference_forward_and_gradients():
    """``attnjax.vision.polarized`` on explicit weights (the sequential layout with biases), gradients of x and of
    every weight against ``sequential_reference``."""
    p = parameters(PolarizedSelfAttention(16, use_bias=True, rngs=nnx.Rngs(3)))

    def core(p, x):
        def w(name):
            return p[name]["kernel"][0, 0]

        def channel(x):
            return polarized_channel_gate(x, w("channel_query")[:, 0], w("channel_value"), p["channel_value"]["bias"],
                                          w("channel_out"), p["channel_out"]["bias"], p["channel_norm"]["scale"],
                                          p["channel_norm"]["bias"])

        def spatial(x):
            return polarized_spatial_gate(x, w("spatial_query"), p["spatial_query"]["bias"], w("spatial_value"),
                                          p["spatial_value"]["bias"])

        return polarized_self_attention(x, channel, spatial, "sequential")

    x = image(seed=4)
    (out, actual), (out_ref, expected) = (outputs_and_grads(fn, (p, x), (0, 1)) for fn in (core, sequential_reference))
    assert_close(out, out_ref, name="output")
    for (path, g), g_ref in zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected)):
        assert_close(g, g_ref, name=f"d{jax.tree_util.keystr(path)}")
